"""Shared pieces of the benchmarks: sizes, one synthetic batch for both models, the peer
model, timing, per-step memory, and Markdown tables."""
from __future__ import annotations

import dataclasses
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional, Sequence

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

from vltrain.config import ModelConfig, debug_model_config  # noqa: E402
from vltrain.data.batch import MODE_BIDIRECTIONAL, MODE_SEQ2SEQ, Batch  # noqa: E402
from vltrain import profiling  # noqa: E402

markdown_table = profiling.markdown_table     # one table formatter for the reports and in-job profiles

CLS, SEP, MASK, STOP = 101, 102, 103, 102


@dataclass
class Size:
    """One benchmark size: the model and the batch shape."""
    name: str
    model: ModelConfig
    batch: int
    regions: int
    text: int            # text tokens incl. [CLS] [SEP] .. [STOP]; sequence = 1 + regions + text - 1

    @property
    def seq_len(self) -> int:
        return self.regions + self.text


def full_size() -> Size:
    """BERT-base, micro-batch 8, 100 regions + 40 text tokens (issue 8's figures)."""
    return Size("base", ModelConfig(), batch=8, regions=100, text=40)


def quick_size() -> Size:
    """The debug model at a small shape: CI proves every row is produced."""
    return Size("debug", debug_model_config(), batch=4, regions=10, text=12)


# ------------------------------------------------------------------------------ data

def make_batch(size: Size, seed: int = 0, seq2seq_prob: float = 0.75, mlm_prob: float = 0.15,
               max_pred: int = 20) -> Batch:
    """A pretraining batch as the collator makes it: ``[CLS] [SEP] w.. [STOP]``, no padding,
    per-example mode (seq2seq with ``seq2seq_prob``), 15% of caption tokens masked."""
    cfg, B, N, T = size.model, size.batch, size.regions, size.text
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, cfg.vocab_size, (B, T), generator=g)
    ids[:, 0], ids[:, 1], ids[:, -1] = CLS, SEP, STOP
    tt = torch.zeros(B, T, dtype=torch.long)
    tt[:, 2:] = 1
    mode = torch.where(torch.rand(B, generator=g) < seq2seq_prob, MODE_SEQ2SEQ, MODE_BIDIRECTIONAL)
    tt = tt * (mode == MODE_SEQ2SEQ)[:, None]
    n_pred = min(max_pred, max(1, round(mlm_prob * (T - 3))))
    pos, lab = [], []
    for b in range(B):
        p = torch.randperm(T - 2, generator=g)[:n_pred] + 2          # caption tokens and [STOP]
        pos.append(b * T + p)
        lab.append(ids[b, p].clone())
        ids[b, p] = MASK
    xy = torch.rand(B, N, 2, generator=g) * 0.5
    return Batch(
        sample_id=torch.arange(B), input_ids=ids, token_type_ids=tt,
        attention_mask=torch.ones(B, T, dtype=torch.long), mode=mode,
        region_feats=torch.randn(B, N, cfg.region_feat_dim, generator=g).relu(),
        region_boxes=torch.cat([xy, xy + 0.1 + torch.rand(B, N, 2, generator=g) * 0.4], -1),
        region_cls_probs=torch.softmax(torch.randn(B, N, cfg.num_region_classes, generator=g), -1),
        region_mask=torch.ones(B, N, dtype=torch.bool),
        mlm_positions=torch.cat(pos), mlm_labels=torch.cat(lab))


def peer_inputs(batch: Batch) -> dict:
    """The same batch for ``VisualBertForPreTraining``: text then regions; MLM labels at the
    same masked text positions (-100 elsewhere), VisualBERT's segment convention."""
    B, T = batch.input_ids.shape
    N = batch.region_feats.shape[1]
    labels = torch.full((B, T + N), -100, dtype=torch.long)
    labels.view(-1)[(batch.mlm_positions // T) * (T + N) + batch.mlm_positions % T] = batch.mlm_labels
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                token_type_ids=torch.zeros_like(batch.input_ids),
                visual_embeds=batch.region_feats, visual_attention_mask=batch.region_mask.long(),
                visual_token_type_ids=torch.ones(B, N, dtype=torch.long), labels=labels)


def to_device(d, device):
    if isinstance(d, Batch):
        return d.to(device)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in d.items()}


# ------------------------------------------------------------------------------ models

def peer_model(cfg: ModelConfig):
    """``transformers.VisualBertForPreTraining`` of the same size as ``cfg``."""
    from transformers import VisualBertConfig, VisualBertForPreTraining
    pc = VisualBertConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                          num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
                          intermediate_size=cfg.intermediate_size, hidden_act=cfg.hidden_act,
                          hidden_dropout_prob=cfg.hidden_dropout,
                          attention_probs_dropout_prob=cfg.attention_dropout,
                          max_position_embeddings=cfg.max_position_embeddings,
                          type_vocab_size=cfg.type_vocab_size, layer_norm_eps=cfg.layer_norm_eps,
                          visual_embedding_dim=cfg.region_feat_dim)
    return VisualBertForPreTraining(pc)


def peer_flop_cfg(cfg: ModelConfig):
    return SimpleNamespace(num_layers=cfg.num_layers, hidden_size=cfg.hidden_size, vocab_size=cfg.vocab_size)


def make_optimizer(params, device: torch.device):
    """AdamW, fused where this torch supports it (the same optimizer for both models)."""
    try:
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)


def bucketed_structure(size: Size, device, seed: int = 2):
    """The attention micro-benchmarks' structure: ``make_batch``'s per-example modes, with
    captions of random length (over [text/3, text]) padded inside the fixed text bucket."""
    from vltrain.model.attention import AttentionStructure
    batch = make_batch(size, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    lens = torch.randint(max(3, size.text // 3), size.text + 1, (size.batch,), generator=g)
    text_valid = torch.arange(size.text)[None, :] < lens[:, None]
    key_valid = torch.cat([text_valid[:, :1], batch.region_mask, text_valid[:, 1:]], 1)
    text_target = text_valid & (batch.token_type_ids == 1)
    target = torch.cat([text_target[:, :1], torch.zeros_like(batch.region_mask), text_target[:, 1:]], 1)
    return AttentionStructure(key_valid.to(device), target.to(device))


# ------------------------------------------------------------------------------ timing & memory

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tensor_bytes(tensors) -> int:
    """Bytes of distinct storages among ``tensors`` (views of one buffer counted once)."""
    seen, total = set(), 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        key = (s.data_ptr(), s.device.type)
        if key in seen:
            continue
        seen.add(key)
        total += s.nbytes()
    return total


def resident_bytes(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Parameters, gradients still held and optimizer state of one model (bytes)."""
    ts = list(model.parameters()) + [p.grad for p in model.parameters() if p.grad is not None]
    for st in optimizer.state.values():
        ts += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return tensor_bytes(ts)


def transient_peak_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during ``step()`` above what was allocated before it.

    CUDA: the caching allocator's peak counter. CPU: allocation/free events of the torch
    profiler (``profile_memory``) replayed in time order; compiled code allocates through
    the same allocator, so it is counted too.
    """
    if device.type == "cuda":
        sync(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    cur = peak = 0
    for _, n in events:
        cur += n
        peak = max(peak, cur)
    return peak


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else math.nan


@dataclass
class Runner:
    """One configuration of the throughput table: a model + optimizer + a step closure."""
    label: str
    model: str                     # "ours" | "VisualBERT (transformers)"
    backend: str
    compiled: bool
    step: Callable[[], None]
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    flops_per_step: float
    times: list = dataclasses.field(default_factory=list)
    cpu_times: list = dataclasses.field(default_factory=list)     # process CPU seconds, all threads
    peak_bytes: int = 0
    note: str = ""
    engine: object = None          # the DeepSpeed engine, for the engine row
    grad_accum: int = 1            # micro-batches a step (the engine's accumulation rows)


def runs_here(runner: Runner, device: torch.device) -> Optional[str]:
    """One step of ``runner`` (it compiles or builds its kernels there); the error, or None. For
    rows whose kernels have not run on this kind of device yet: a failure costs the row, not
    the run (the benchmark reports the error instead)."""
    try:
        runner.step()
        sync(device)
    except Exception as e:  # noqa: BLE001 — reported in the table
        return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    return None


def time_interleaved(runners: Sequence[Runner], device: torch.device, warmup: int, rounds: int,
                     log: Callable[[str], None] = print, steps_per_round: int = 1,
                     on_round: Optional[Callable[[int], None]] = None) -> None:
    """Warm every runner up, then time them round-robin (A B C A B C ...), so machine noise
    (other jobs, thermal) lands on every configuration alike. A round of a runner is
    ``steps_per_round`` steps and one sync; its per-step time is recorded. ``on_round(k)``
    after the k-th round (e.g. a partial report that a time limit cutting the run keeps)."""
    for r in runners:
        for i in range(warmup):
            t0 = time.perf_counter()
            r.step()
            sync(device)
            log(f"  warmup {r.label}: {time.perf_counter() - t0:.2f} s")
    for i in range(rounds):
        for r in runners:
            sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps_per_round):
                r.step()
            sync(device)
            r.times.append((time.perf_counter() - t0) / steps_per_round)
            r.cpu_times.append((time.process_time() - c0) / steps_per_round)
        log(f"  round {i + 1}/{rounds}: " + ", ".join(f"{r.label} {r.times[-1]:.2f}s" for r in runners))
        if on_round is not None:
            on_round(i + 1)


def measured_gemm_tflops(device: torch.device, dtype: torch.dtype, n: int = 2048, reps: int = 5) -> float:
    """Achieved TFLOP/s of a large square matmul: the CPU's reference peak for MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e12


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return (f"CPU: {cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")


def run_two_ranks(cmd: list[str], what: str, timeout: float) -> list[str]:
    """``python cmd...`` as ranks 0 and 1 of a gloo world on this machine (DeepSpeed's CPU
    accelerator, one thread each), as a launcher would start them; returns their output,
    raises with its tail when either fails."""
    from vltrain.engine.distributed import free_port
    port = free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ)
        for k in list(env):
            if k.startswith(("SLURM_", "PMI_", "OMPI_")):
                env.pop(k)
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE="2", LOCAL_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu",
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
                   PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
        procs.append(subprocess.Popen([sys.executable, *cmd], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{what} failed:\n" + "\n".join(t[-4000:] for t in logs))
    return logs


def emit_report(text: str, out: str | None, section: str | None = None) -> None:
    """Print a Markdown report, write it to ``out`` when given (``--out``), and replace its
    ``section`` of BENCHMARKS.md with it when given (``--update-benchmarks``)."""
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    if section:
        update_benchmarks(section, text)


def update_benchmarks(section: str, text: str, path: str = os.path.join(REPO, "BENCHMARKS.md")) -> None:
    """Replace (or append) the ``section`` heading's part of BENCHMARKS.md with ``text`` (which
    starts with that heading); the other sections are left as they are."""
    old = open(path).read() if os.path.exists(path) else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    new = pattern.sub(lambda _: text + "\n", old) if pattern.search(old) else old.rstrip("\n") + "\n\n" + text
    with open(path + ".tmp", "w") as f:
        f.write(new.rstrip("\n") + "\n")
    os.replace(path + ".tmp", path)
