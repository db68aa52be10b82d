"""Training monitor: TensorBoard scalars (rank 0 only), throughput, MFU, a compact log line.

FLOP count (one documented formula, also used by the benchmarks):

    per token           6 * N  +  12 * layers * hidden * seq_len
    per predicted token 6 * hidden * vocab           (the MLM decoder, only where gathered)
    per sample          seq_len * (per token) + n_mlm_pred * 6 * hidden * vocab

seq_len is the sequence's real length (text, regions, VL-BERT's slots; not its padding): a
batch counts 6 * N * (its real tokens) + 12 * layers * hidden * (the sum of their squared
lengths), PaLM's tokens trained on.

N = non-embedding parameters: every parameter except embedding *tables* (word, position,
token-type: the ``nn.Embedding`` modules). The region projection, attention, FFN and head
layers are matrix products and count. MFU = achieved FLOP/s / (peak FLOP/s per device x
world size), the peak being the device's spec dense bf16/fp16 figure
(:data:`PEAK_TFLOPS`, overridable with ``train.peak_tflops``). No MFU tag is written where
no peak is known (CPU, fp32, unknown GPU) unless one is configured.

Tags (stable names; x = optimizer step, except ``by_samples/*``, whose x is samples seen
and which live in the ``tensorboard/by_samples`` run):
    train/loss, train/<other metrics passed, e.g. loss_mlm, mlm_acc>, train/lr,
    train/grad_norm, train/loss_scale (fp16), perf/samples_per_s, perf/tokens_per_s,
    perf/mfu, perf/data_wait_frac, perf/step_time_s, perf/peak_mem_gb, val/<metric>,
    by_samples/loss, by_samples/samples_per_s

Host-device syncs: losses/metrics/token counts passed as tensors are accumulated on
their device; the monitor synchronises and reads them back only every ``log_every`` steps.
Timing is wall-clock between logging boundaries, so it is exact at those boundaries.
"""
from __future__ import annotations

import logging
import math
import os
import re
import resource
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable, Mapping, NamedTuple, Optional, Union

import torch
from torch import nn

from vltrain.config import flatten
from vltrain.redact import redact

Number = Union[int, float, torch.Tensor]

# Spec dense (non-sparse) peak TFLOP/s per device for bf16/fp16 tensor-core math.
# Matched against torch.cuda.get_device_name() in order (first substring match wins).
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("GH200", {"bf16": 989.0, "fp16": 989.0}),
    ("H200 NVL", {"bf16": 835.0, "fp16": 835.0}),
    ("H200", {"bf16": 989.0, "fp16": 989.0}),
    ("H100 NVL", {"bf16": 835.0, "fp16": 835.0}),
    ("H100 PCIe", {"bf16": 756.0, "fp16": 756.0}),
    ("H100", {"bf16": 989.0, "fp16": 989.0}),        # SXM / HBM3 ("NVIDIA H100 80GB HBM3")
    ("H800 PCIe", {"bf16": 756.0, "fp16": 756.0}),
    ("H800", {"bf16": 989.0, "fp16": 989.0}),
    ("A100", {"bf16": 312.0, "fp16": 312.0}),
    ("A800", {"bf16": 312.0, "fp16": 312.0}),
    ("L40S", {"bf16": 362.0, "fp16": 362.0}),
    ("A10G", {"bf16": 70.0, "fp16": 70.0}),
    ("V100S", {"fp16": 130.0}),
    ("V100-PCIE", {"fp16": 112.0}),                 # "Tesla V100-PCIE-16GB"
    ("V100", {"fp16": 125.0}),                      # SXM2
]


def peak_tflops_for(device_name: str, precision: str = "bf16") -> Optional[float]:
    """Spec dense peak TFLOP/s of one device, or None when unknown (fp32 peaks are not listed)."""
    for key, table in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return table.get(precision)
    return None


def device_peak_tflops(precision: str = "bf16", override: float = 0.0) -> Optional[float]:
    """``override`` (train.peak_tflops) when > 0, else the table entry of this process's GPU."""
    if override and override > 0:
        return float(override)
    if torch.cuda.is_available():
        return peak_tflops_for(torch.cuda.get_device_name(), precision)
    return None


# ------------------------------------------------------------------------------ FLOPs

def is_embedding_table(module: nn.Module) -> bool:
    return isinstance(module, (nn.Embedding, nn.EmbeddingBag))


def non_embedding_params(model: nn.Module,
                         is_embedding: Callable[[str, nn.Module], bool] = lambda name, m: is_embedding_table(m)) -> int:
    """Parameters of ``model`` outside embedding tables (tied weights counted once). Under
    ZeRO-3 a partitioned parameter's tensor is empty: its full size is ``ds_numel``."""
    emb = set()
    for name, module in model.named_modules():
        if is_embedding(name, module):
            emb.update(id(p) for p in module.parameters(recurse=False))
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) in seen or id(p) in emb:
            continue
        seen.add(id(p))
        n += getattr(p, "ds_numel", p.numel())
    return n


def model_flops(n: int, model_cfg, tokens, tokens_sq, mlm_rows=0):
    """The formula above for sequences holding ``tokens`` real tokens whose squared lengths sum
    to ``tokens_sq``, ``mlm_rows`` of them predicted by the MLM decoder. Host numbers or device
    scalars (then a device scalar: no sync)."""
    L, H, V = model_cfg.num_layers, model_cfg.hidden_size, model_cfg.vocab_size
    return 6.0 * n * tokens + 12.0 * L * H * tokens_sq + 6.0 * H * V * mlm_rows


def flops_per_sample(model_or_n: Union[nn.Module, int], model_cfg, seq_len: int, n_mlm_pred: float = 0.0) -> float:
    """Model FLOPs (forward + backward) of one sample of ``seq_len`` tokens (regions included):
    DESIGN.md's count, 6·N + 12·L·H·S per token (PaLM's convention) + 6·H·V per predicted MLM
    token. N is every non-embedding parameter (the trainer's and benchmarks': less the heads the
    task never runs, :func:`flop_params`), charged at every token although the heads, the region
    embedding and (pretraining, caption fine-tuning) the last block's attention output and FFN
    run at fewer rows (MLM pretraining at base size, 100 regions + 40 text: 8.2% of the count is
    work not done, by FlopCounterMode; the benchmarks' and the issue's MFU figures are on this count).

    ``model_or_n``: the nn.Module (N counted with :func:`non_embedding_params`) or N itself;
    ``model_cfg``: anything with ``num_layers``, ``hidden_size``, ``vocab_size``;
    ``n_mlm_pred``: predicted MLM tokens in the sample (may be a batch average).
    """
    n = model_or_n if isinstance(model_or_n, int) else non_embedding_params(model_or_n)
    return model_flops(n, model_cfg, seq_len, seq_len * seq_len, n_mlm_pred)


MODEL_HEADS = ("mlm_head", "mrc_head", "cls_head")


def flop_params(task: nn.Module, model: nn.Module, heads: tuple[str, ...]) -> int:
    """N of a task module wrapping ``model``: its non-embedding parameters (the task's own heads
    included) less those of the model's heads the task never runs (``heads``: those it runs).
    A VQA fine-tune's N held the MLM and region heads but not its answer head, 3% and 6.5% of N
    at base size; VLP pretraining's held the region and [CLS] heads, 2.6% of N."""
    unused = [getattr(model, h) for h in MODEL_HEADS if h not in heads]
    return non_embedding_params(task) - sum(non_embedding_params(m) for m in unused)


class FlopCounter:
    """Caches N; FLOPs of one micro-batch by :func:`model_flops`.

    N is counted at construction, before or after ``deepspeed.initialize`` (any ZeRO stage:
    :func:`non_embedding_params` reads ZeRO-3's full sizes)."""

    def __init__(self, model_or_n: Union[nn.Module, int], model_cfg):
        self.n = model_or_n if isinstance(model_or_n, int) else non_embedding_params(model_or_n)
        self.cfg = model_cfg

    def count(self, tokens, tokens_sq, mlm_rows=0):
        """A batch's real tokens, their squared lengths' sum (``vltrain.tasks.base.Work``: device
        scalars, summed without a sync) and its MLM-predicted rows."""
        return model_flops(self.n, self.cfg, tokens, tokens_sq, mlm_rows)

    def batch(self, batch_size: int, seq_len: int, n_pred_total: int = 0) -> float:
        """``batch_size`` sequences of ``seq_len`` real tokens each (the benchmarks' batches)."""
        return self.count(batch_size * seq_len, batch_size * seq_len * seq_len, n_pred_total)


class Ratio(NamedTuple):
    """A metric averaged over items, not micro-batches: ``num`` and ``den`` are summed over
    micro-batches, steps and ranks (and a validation's batches), then divided. Accuracy over
    masked tokens is BERT's ``masked_lm_accuracy``, correct / masked over the whole interval:
    a micro-batch with 90 masked tokens weighs 9x one with 10 (as a plain metric, 10/10 and
    45/90 would read 75% instead of 55%)."""
    num: Number
    den: Number


def accuracy(pred: torch.Tensor, target: torch.Tensor) -> Ratio:
    """Correct predictions over all of them, as a :class:`Ratio` of device scalars (the count
    filled on the device: a host value copied there would synchronise on a GPU)."""
    correct = (pred == target).sum().float().detach()
    return Ratio(correct, correct.new_full((), float(target.numel())))


def _accumulate(sums: dict, counts: dict, key: str, value: Union[Number, Ratio]) -> None:
    """Add ``value`` to ``sums[key]`` and one to ``counts[key]``: a mean over those that gave
    it; a :class:`Ratio` adds its numerator and its denominator."""
    num, den = value if isinstance(value, Ratio) else (value, 1)
    sums[key] = sums[key] + num if key in sums else num
    counts[key] = counts[key] + den if key in counts else den


class MicroBatches:
    """One optimizer step's micro-batches, for :meth:`Monitor.step_end`: each metric's sum and
    how many micro-batches gave it (a text-only micro-batch has no region loss: its absence
    must not halve the step's mean), and the samples, tokens and FLOPs they ran."""

    def __init__(self):
        self.sums: dict[str, Number] = {}
        self.counts: dict[str, Number] = {}
        self.ratios: set[str] = set()
        self.samples, self.tokens, self.flops = 0, None, 0.0

    def add(self, metrics: Mapping[str, Union[Number, Ratio]], samples: int, tokens: Optional[Number] = None,
            flops: Number = 0.0) -> None:
        """``tokens`` None: this micro-batch's work is not counted (self-critical training)."""
        for k, v in metrics.items():
            _accumulate(self.sums, self.counts, k, v)
            if isinstance(v, Ratio):
                self.ratios.add(k)
        self.samples += samples
        if tokens is not None:
            self.tokens = tokens if self.tokens is None else self.tokens + tokens
        self.flops += flops

    def means(self) -> dict[str, Union[Number, Ratio]]:
        """Each metric's mean over the micro-batches that gave it; a ratio's sums, still to be
        summed over the interval."""
        return {k: Ratio(v, self.counts[k]) if k in self.ratios else v / self.counts[k] for k, v in self.sums.items()}


# ------------------------------------------------------------------------------ memory

def peak_memory_gb(device: Optional[torch.device] = None) -> float:
    """CUDA max allocated on GPU, else this process's peak RSS (GB = 1e9 bytes)."""
    if (device is None or torch.device(device).type == "cuda") and torch.cuda.is_available() \
            and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 1e9
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    return kb * 1024 / 1e9 if sys.platform != "darwin" else kb / 1e9


# ------------------------------------------------------------------------------ hparams

_SECRET_KEY = re.compile(r"(secret|passw|credential|access_key|api_key|auth|private|token|session)", re.I)


def scrub_hparams(d: Mapping) -> dict:
    """Flatten to dotted keys; drop text under secret-looking keys (a flag or a number there is
    no secret: ``model.pad_token_id``, ``objectives.mask_token_prob``) and strip user:password@
    from URLs."""
    out = {}
    for k, v in flatten(d).items():
        if isinstance(v, (str, list, tuple)) and _SECRET_KEY.search(k.split(".")[-1]):
            continue
        if isinstance(v, str):
            v = redact(v)
        elif isinstance(v, (list, tuple)):
            v = redact(str(list(v)))
        elif v is None:
            v = "None"
        out[k] = v
    return out


# ------------------------------------------------------------------------------ monitor

def _is_tensor(x) -> bool:
    return isinstance(x, torch.Tensor)


class Monitor:
    """Per-optimizer-step bookkeeping; TensorBoard + log line on rank 0 every ``log_every`` steps.

    Every rank must call :meth:`step_end` for every step (with ``reduce=True`` the averages
    are all-reduced across ranks at logging steps, a collective). Usage::

        fc = FlopCounter(model, cfg.model)
        mon = Monitor(run_dir, rank=info.rank, world_size=info.world, log_every=cfg.train.log_every,
                      peak_tflops=device_peak_tflops(precision, cfg.train.peak_tflops),
                      max_steps=cfg.train.max_steps)
        mon.log_hparams(config_to_dict(cfg), ds_config)
        for step in range(start, max_steps):
            with mon.data_wait():
                batch = next(it)
            ...
            mon.step_end(step + 1, {"loss": loss, "loss_mlm": l_mlm, "mlm_acc": acc},
                         samples=B, tokens=n_tok, flops=fc.batch(B, T, n_pred),
                         lr=sched.get_last_lr()[0], grad_norm=engine.get_global_grad_norm())
        mon.log_val(step, {"loss": v, "mlm_acc": a}); mon.close()

    On resume call ``mon.resume_at(step, samples_seen, pending)`` (the checkpoint's
    ``pending_state()``) before logging anything.
    """

    def __init__(self, run_dir: Optional[str], *, rank: int = 0, world_size: int = 1, log_every: int = 10,
                 peak_tflops: Optional[float] = None, reduce: bool = True,
                 log_fn: Optional[Callable[[str], None]] = None, max_steps: Optional[int] = None,
                 device: Optional[torch.device] = None):
        self.rank, self.world = rank, world_size
        # Where the reductions run: the process group's device (NCCL takes CUDA tensors only;
        # an interval may hold no tensor to take it from). None: the values' own, else the CPU.
        self.device = device
        self.log_every = max(1, int(log_every))
        self.peak_tflops = peak_tflops if peak_tflops and peak_tflops > 0 else None
        self.reduce = reduce
        self.max_steps = max_steps
        self.log_fn = log_fn or (lambda s: print(s, flush=True))
        self.tb_dir = os.path.join(run_dir, "tensorboard") if run_dir else None
        self._writers: dict = {}        # opened on first write, so resume_at() can still set purge steps
        self._purge: dict = {"": None, "by_samples": None}
        self._closed = False
        self.samples_seen = 0           # global (all ranks), host-side
        self._reset_interval()
        self._data_start: Optional[float] = None
        self.last: dict[str, float] = {}

    # ---- writers
    def _writer(self, sub: str = ""):
        """Rank 0's SummaryWriter for ``tensorboard/`` ("") or a run below it (``by_samples``, ``eval``); else None."""
        if self.rank != 0 or not self.tb_dir or self._closed:
            return None
        if sub not in self._writers:
            from torch.utils.tensorboard import SummaryWriter
            d = os.path.join(self.tb_dir, sub) if sub else self.tb_dir
            with self._tensorboard():
                os.makedirs(d, exist_ok=True)
                self._writers[sub] = SummaryWriter(log_dir=d, purge_step=self._purge.get(sub))
        return self._writers.get(sub)

    @property
    def writer(self):
        return self._writer("")

    def start_over(self):
        """A training run starting at step 0 where an earlier one may have logged (the same
        run_name without resuming, or a crash before its first checkpoint): its events are
        purged, as its checkpoints are replaced, so that no curve shows two runs. Call before
        the first log."""
        if self._writers:
            raise RuntimeError("Monitor.start_over() must be called before anything is logged")
        self._purge = {"": 0, "by_samples": 0}

    def resume_at(self, step: int, samples_seen: int = 0, pending: Optional[dict] = None):
        """Continue a run from a checkpoint taken after ``step`` optimizer steps and
        ``samples_seen`` samples: events a crashed run logged after that are purged
        (TensorBoard hides them), and the samples axis continues. ``pending``: the
        checkpoint's ``pending_state()``, so that the first interval logged after the resume
        averages the same steps as the uninterrupted run's. Call before the first log."""
        if self._writers:
            raise RuntimeError("Monitor.resume_at() must be called before anything is logged")
        self._purge = {"": int(step) + 1, "by_samples": int(samples_seen) + 1}
        self.samples_seen = int(samples_seen)
        if pending and (self.rank == 0 or not pending.get("global")):   # global sums: held once
            self._sums = dict(pending["sums"])
            self._counts = dict(pending["counts"])
            self._new_samples = pending["new_samples"]

    def pending_state(self) -> dict:
        """The logging interval so far: metric sums and counts and the samples not yet on the
        samples axis, summed over ranks when reducing (collective: every rank calls it, as
        every rank saves a checkpoint). A checkpoint keeps it for ``resume_at``; ``global``:
        the sums are the whole world's (reduced, or one rank), which rank 0 alone takes back,
        whatever the resumed run's number of ranks."""
        keys, vec, _ = self._reduced([self._new_samples])
        m = len(keys)
        return {"sums": dict(zip(keys, vec[:m])), "counts": dict(zip(keys, vec[m:2 * m])),
                "new_samples": int(round(vec[2 * m])), "global": self._reducing() or self.world == 1}

    # ---- timing
    def _reset_interval(self):
        self._sums: dict[str, Number] = {}
        self._counts: dict[str, Number] = {}     # micro-batch means given, or a Ratio's denominators
        self._new_samples: Number = 0      # for the samples-seen axis (survives reset_timer)
        self._reset_throughput()

    def _reset_throughput(self):
        self._steps = 0
        self._samples: Number = 0
        self._tokens: Number = 0
        self._flops = 0.0
        self._data_time = 0.0
        self._t_last = time.perf_counter()

    def reset_timer(self):
        """Restart the throughput clock now (after setup, a validation pass or a checkpoint save),
        so that time is not counted as training; losses of the interval are kept."""
        self._reset_throughput()

    def data_start(self):
        self._data_start = time.perf_counter()

    def data_end(self):
        if self._data_start is not None:
            self._data_time += time.perf_counter() - self._data_start
            self._data_start = None

    @contextmanager
    def data_wait(self):
        """Wrap the fetch of the next batch: time spent here is data wait."""
        self.data_start()
        try:
            yield
        finally:
            self.data_end()

    # ---- per step
    def _add(self, key: str, value: Union[None, Number, Ratio]):
        if value is None:
            return
        scalar = lambda v: v.detach().float().reshape(()) if _is_tensor(v) else v     # noqa: E731
        if isinstance(value, Ratio):
            value = Ratio(*map(scalar, value))
        else:
            # A rank's step mean weighs 1/world: a step's ranks then count 1 together, so the
            # interval's sums held in a checkpoint weigh the same after a resume on another
            # number of ranks (a count per rank made its steps weigh old/new world as much).
            share = self.world if self._reducing() else 1
            value = Ratio(scalar(value) / share, 1.0 / share)
        _accumulate(self._sums, self._counts, key, value)

    def step_end(self, step: int, metrics: Optional[Mapping[str, Union[Number, Ratio]]] = None, *, samples: Number,
                 tokens: Optional[Number] = None, flops: Number = 0.0, lr: Optional[float] = None,
                 grad_norm: Optional[Number] = None, loss_scale: Optional[float] = None,
                 instant: Optional[Mapping[str, float]] = None, force: bool = False) -> Optional[dict]:
        """Record one optimizer step (``step`` = steps done, the x value); log every ``log_every``.

        ``metrics`` (``train/<key>``) and ``grad_norm`` are averaged over the interval (a
        non-finite host float ``grad_norm`` is left out);
        ``samples``/``tokens``/``flops`` are this rank's counts for the step (summed over
        ranks when reducing); ``lr``, ``loss_scale`` and ``instant`` (full tag -> value) are
        written as given at logging steps. Returns the logged values on logging steps."""
        for k, v in (metrics or {}).items():
            self._add(f"train/{k}", v)
        if isinstance(grad_norm, float) and not math.isfinite(grad_norm):
            grad_norm = None     # fp16: DeepSpeed's norm of a step skipped on overflow is inf
        self._add("train/grad_norm", grad_norm)
        self._samples = self._samples + samples
        self._new_samples = self._new_samples + samples
        if tokens is not None:
            self._tokens = self._tokens + tokens
        self._flops = self._flops + flops
        self._steps += 1
        self._lr, self._loss_scale, self._instant = lr, loss_scale, instant
        if not force and step % self.log_every != 0 and not (self.max_steps and step >= self.max_steps):
            return None
        return self._flush(step)

    def _reducing(self) -> bool:
        return bool(self.reduce and self.world > 1 and torch.distributed.is_available()
                    and torch.distributed.is_initialized())

    def _reduced(self, extra: list, timed: bool = False) -> tuple[list, list, int]:
        """(metric keys, [metric sums..., metric counts..., *extra] summed over ranks when
        reducing, number of ranks summed). ``timed``: the wall time since the interval's start
        is appended to ``extra``, taken once the device has finished the interval's work."""
        keys = sorted(self._sums)
        reducing = self._reducing()
        if reducing:
            # Ranks may have seen different metrics in the interval (one whose micro-batches were
            # all text-only has no region loss): reduce the union, a missing one as 0 sum / 0 count.
            seen: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(seen, keys)
            keys = sorted(set().union(*seen))
        dev = self.device or next((v.device for v in [*self._sums.values(), *extra] if _is_tensor(v)), None)
        dev = dev or torch.device("cpu")
        vals = [self._sums.get(k, 0.0) for k in keys] + [self._counts.get(k, 0.0) for k in keys] + list(extra)
        if timed:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            wall = time.perf_counter() - self._t_last
            # the wall time, summed; then this rank's share of it spent waiting for data, maxed
            # over the ranks: the slowest loader holds every rank back (a mean hides it)
            vals += [wall, self._data_time / max(wall, 1e-9)]
        vec = torch.stack([v.to(dev, torch.float64) if _is_tensor(v) else torch.tensor(float(v), dtype=torch.float64, device=dev)
                           for v in vals])
        n_ranks = 1
        if reducing:
            summed, maxed = (vec[:-1], vec[-1:]) if timed else (vec, None)    # views: reduced in place
            torch.distributed.all_reduce(summed)
            if maxed is not None:
                torch.distributed.all_reduce(maxed, op=torch.distributed.ReduceOp.MAX)
            n_ranks = torch.distributed.get_world_size()
        return keys, vec.cpu().tolist(), n_ranks      # the one host-device sync per interval

    def _flush(self, step: int) -> dict:
        # One vector: [metric sums..., metric counts..., samples, tokens, flops, new samples, wall, data wait share]
        keys, vec, n_ranks = self._reduced([self._samples, self._tokens, self._flops,
                                            self._new_samples], timed=True)
        m = len(keys)
        out = {}
        for i, k in enumerate(keys):
            out[k] = vec[i] / vec[m + i] if vec[m + i] > 0 else 0.0
        samples, tokens, flops, new_samples, wall_sum, data_frac = vec[2 * m:2 * m + 6]
        wall = max(wall_sum / n_ranks, 1e-9)   # mean wall time across ranks
        self.samples_seen += int(round(new_samples))
        if self._lr is not None:
            out["train/lr"] = float(self._lr)
        if self._loss_scale is not None:
            out["train/loss_scale"] = float(self._loss_scale)
        out["perf/samples_per_s"] = samples / wall
        if tokens:
            out["perf/tokens_per_s"] = tokens / wall
        if self._steps:
            out["perf/step_time_s"] = wall / self._steps
        out["perf/data_wait_frac"] = min(1.0, data_frac)     # the slowest rank's
        out["perf/peak_mem_gb"] = peak_memory_gb()
        if self.peak_tflops and flops > 0:
            # flops holds the counts of n_ranks ranks (all of them when reduced, else this one)
            out["perf/mfu"] = (flops / wall) / (self.peak_tflops * 1e12 * n_ranks)
        for k, v in (self._instant or {}).items():
            out[k] = float(v)
        self.last = out
        w = self.writer
        if w is not None:
            with self._tensorboard():
                for k, v in out.items():
                    w.add_scalar(k, v, step)
                w.flush()
                # samples seen as x: a separate TensorBoard run ("by_samples"), so that purging
                # by step on resume does not hide these points (their steps are sample counts)
                ws = self._writer("by_samples")
                if ws is not None:
                    if "train/loss" in out:
                        ws.add_scalar("by_samples/loss", out["train/loss"], self.samples_seen)
                    ws.add_scalar("by_samples/samples_per_s", out["perf/samples_per_s"], self.samples_seen)
                    ws.flush()
        if self.rank == 0:
            self.log_fn(self.format_line(step, out))
        self._reset_interval()
        return out

    def format_line(self, step: int, out: Mapping[str, float]) -> str:
        total = f"/{self.max_steps}" if self.max_steps else ""
        parts = [f"step {step}{total}"]
        if "train/loss" in out:
            parts.append(f"loss {out['train/loss']:.4f}")
        for k, v in out.items():
            if k.startswith("train/") and k not in ("train/loss", "train/lr", "train/grad_norm", "train/loss_scale"):
                parts.append(f"{k[6:]} {v:.4g}")
        if "train/lr" in out:
            parts.append(f"lr {out['train/lr']:.3e}")
        if "train/grad_norm" in out:
            parts.append(f"gnorm {out['train/grad_norm']:.3g}")
        parts.append(f"{out['perf/samples_per_s']:.1f} samples/s")
        if "perf/mfu" in out:
            parts.append(f"MFU {100 * out['perf/mfu']:.1f}%")
        parts.append(f"data {100 * out['perf/data_wait_frac']:.1f}%")
        parts.append(f"mem {out['perf/peak_mem_gb']:.2f} GB")
        return " | ".join(parts)

    # ---- other records
    def log_val(self, step: int, metrics: Mapping[str, Number]) -> dict:
        """Validation metrics (already reduced across ranks by the caller) as ``val/<key>``."""
        out = {f"val/{k}": float(v.item() if _is_tensor(v) else v) for k, v in metrics.items()}
        w = self.writer
        if w is not None:
            with self._tensorboard():
                for k, v in out.items():
                    w.add_scalar(k, v, step)
                w.flush()
        if self.rank == 0:
            self.log_fn(f"val step {step} | " + " | ".join(f"{k[4:]} {v:.4g}" for k, v in out.items()))
        return out

    def log_scalar(self, tag: str, value: float, step: int, run: str = ""):
        """``run``: a TensorBoard run of its own under tensorboard/ (mode=eval's ``eval``)."""
        w = self._writer(run)
        if w is not None:
            with self._tensorboard():
                w.add_scalar(tag, float(value), step)

    def log_text(self, tag: str, text: str, step: int):
        """Markdown in TensorBoard's text tab (rank 0), e.g. a profile's summary."""
        w = self.writer
        if w is not None:
            with self._tensorboard():
                w.add_text(tag, text, step)
                w.flush()

    def log_hparams(self, config: Mapping, ds_config: Optional[Mapping] = None,
                    metric_tags: Iterable[str] = ("train/loss", "val/loss"), step: int = 0):
        """The run's hyper-parameters (no env variables): at step 0 the HParams dashboard's
        record, with ``metric_tags`` as its columns, and a text table; at a resume (``step`` >
        0) the table only, at that step (the run keeps its one HParams record; the table
        shows the settings it continued with)."""
        w = self.writer
        if w is None:
            return
        hp = scrub_hparams(config)
        if ds_config is not None:
            hp.update(scrub_hparams({"ds": ds_config}))
        if step == 0:
            from torch.utils.tensorboard.summary import hparams
            exp, ssi, sei = hparams(hp, {t: 0.0 for t in metric_tags})   # values unused: names only
            fw = w._get_file_writer()
            for s in (exp, ssi, sei):
                fw.add_summary(s)
        table = "| key | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in hp.items())
        with self._tensorboard():
            w.add_text("hparams", table, step)
            w.flush()

    def close(self):
        with self._tensorboard():
            for w in self._writers.values():
                w.flush()
                w.close()
        self._writers = {}
        self._closed = True

    @contextmanager
    def _tensorboard(self):
        """TensorBoard's writes failing (a full or lost filesystem): warned once, logging there
        stops, training goes on (a full disk then shows at the next checkpoint, whose error
        says what is intact), and the log lines keep every figure."""
        try:
            yield
        except OSError as e:
            log = logging.getLogger(__name__)
            log.warning("TensorBoard logging to %s stopped (%s: %s); training goes on, the figures stay in "
                        "the log", self.tb_dir, type(e).__name__, e)
            for w in self._writers.values():
                try:
                    w.close()
                except OSError:
                    pass
            self._writers = {}
            self._closed = True       # _writer() gives None from now on

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
