"""Training throughput, MFU and memory: our model beside transformers' VisualBERT, one run.

    python benchmarks/train_throughput.py                 # full: BERT-base, B=8, 100 regions + 40 text
    python benchmarks/train_throughput.py --quick         # debug size, for CI
    python benchmarks/train_throughput.py --out results.md

Sections of the Markdown report:
  1. Full training steps (forward, backward, AdamW step) of our model for each attention
     backend that trains on this device, compile off/on, through the DeepSpeed engine as
     ``vltrain/run.py`` trains (ZeRO-2, one rank, sdpa; bf16 weights on GPU), and of
     ``transformers.VisualBertForPreTraining`` of the same size, on the same batch, in the
     same process, timed round-robin (A B C A B C ...) so machine noise hits all alike.
     samples/s, tokens/s, achieved TFLOP/s and MFU (both with ``vltrain.monitor``'s formula on
     each model's own N: MLM only, so neither is credited with its full-vocabulary logits nor
     ours with the region and [CLS] heads MLM never runs), peak memory per configuration.
     Precision: fp32 on CPU, bf16 autocast on GPU (both models). MFU divides by the GPU's
     spec dense bf16 peak; on CPU, which has no spec entry, by the fp32 matmul rate measured
     in the same run (labelled so).
  2. Per-rank model + optimizer state for ZeRO 0/1/2/3 on 2 ranks (gloo, spawned here),
     read from the engine: parameters held by the rank (the ZeRO-3 partition), fp32 master
     partitions, Adam state; distinct storages counted once.
  3. Attention micro-benchmark at our sequence shape: forward + backward of each backend
     against eager, with the max deviation from eager.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import sys
import tempfile
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import (REPO, Runner, emit_report, Size, bucketed_structure, full_size,  # noqa: E402
                    machine_description, make_batch, make_optimizer, markdown_table,
                    measured_gemm_tflops, median, peer_flop_cfg, peer_inputs, peer_model, quick_size,
                    resident_bytes, run_two_ranks, runs_here, sync, tensor_bytes, time_interleaved, to_device,
                    transient_peak_bytes)

PEER = "VisualBERT (transformers)"
OURS = "ours (vltrain)"
CPU_TARGET = 1.2          # ours / peer samples/s, fp32, same batch (issue 8)
GPU_TARGET_MFU = 0.45
GPU_TARGET_RATIO = 2.0
ZERO3_TARGET = 0.6


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ 1. throughput

def backends_for(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """Backends that can *train* here, and why the others are left out."""
    from vltrain.model import attention as A
    skipped = {}
    names = ["eager", "sdpa"]
    if device.type == "cuda":
        if A.flex_available():
            names.append("flex")
        else:
            skipped["flex"] = "torch has no FlexAttention"
        if A.varlen_kernel_name("cuda") is not None:
            names.append("varlen")
        else:
            skipped["varlen"] = "neither flash_attn nor torch.nn.attention.varlen is available"
    else:
        skipped["flex"] = "FlexAttention has no backward on CPU (fused kernels are GPU-only)"
        skipped["varlen"] = ("no varlen kernel on CPU (only the SDPA emulation the tests use; "
                             "it is timed in the attention micro-benchmark)")
    if A.triton_attention.runs_on(device.type):
        names.append("triton")
    else:
        skipped["triton"] = ("Triton GPU kernels (on CPU they run only in Triton's interpreter, "
                             "TRITON_INTERPRET=1: the tests)")
    return names, skipped


def autocast_ctx(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


FULL_LAST = "eager, full last block"      # ablation row: not a configuration of ours to pick


class FullLastBlock(torch.nn.Module):
    """Ablation: the model computing its last block at every position, the losses gathering
    the masked rows from the full output (what pretraining did before the losses asked the
    model for those rows only)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.mlm_logits, self.mrc_head = model.mlm_logits, model.mrc_head

    def forward(self, *args, text_positions=None, region_positions=None, **kw):
        from vltrain.model.vl_model import VLModelOutput
        out = self.model(*args, **kw)
        B, T, H = out.text_hidden.shape
        text = out.text_hidden.reshape(B * T, H)[text_positions]
        regions = None
        if region_positions is not None and out.region_hidden is not None:
            regions = out.region_hidden.reshape(-1, H)[region_positions]
        return VLModelOutput(None, None, text_selected=text, region_selected=regions)


def build_ours(size: Size, backend: str, compiled: bool, batch, device, flops_pred: int,
               full_last: bool = False, bf16_weights: bool = False, compile_kwargs: dict | None = None,
               host_copy: str | None = None, **model_over) -> Runner:
    """Our model + torch's AdamW, bf16 autocast on GPU (fp32 on CPU). ``bf16_weights``: weights,
    gradients and optimizer state in bf16, no autocast; ``compile_kwargs`` go to
    ``torch.compile``; ``model_over`` replaces model config keys (benchmarks/mfu_levers.py).
    ``host_copy``: the batch starts every step in (pinned, on CUDA) host memory with the
    region inputs in fp16 as the loader delivers them, and is copied on the compute stream
    (``"compute-stream"``) or by the trainer's ``DeviceCopier`` (``"side-stream"``; with
    ``"side-stream-ahead"`` issued right after the forward for the next step, as the trainer
    does); None: it stays on the device (every other row)."""
    from vltrain.config import ObjectivesConfig
    from vltrain.model import VLModel
    from vltrain.model.compile import compile_blocks
    from vltrain.monitor import FlopCounter, flop_params
    from vltrain.tasks.pretrain import PretrainTask, pretrain_heads

    over = dict(model_over, attention_backend=backend)
    note = ""
    from vltrain.model.attention import varlen_kernel_name
    no_dropout = backend == "flex" or (backend == "varlen" and varlen_kernel_name(device.type) == "torch")
    if no_dropout and size.model.attention_dropout > 0:
        over["attention_dropout"] = 0.0           # these kernels have no attention dropout
        note = f"attention dropout 0 ({backend} has none)"
    cfg = dataclasses.replace(size.model, **over)
    torch.manual_seed(0)
    model = VLModel(cfg)
    if compiled:
        compile_blocks(model, **(compile_kwargs or {}))
    task = PretrainTask(FullLastBlock(model) if full_last else model, ObjectivesConfig()).to(device).train()
    if bf16_weights:
        task.to(torch.bfloat16)
    opt = make_optimizer(task.parameters(), device)
    float_dtype = torch.bfloat16 if bf16_weights else None
    b = batch.to(device, float_dtype=float_dtype)
    amp = nullcontext() if bf16_weights else autocast_ctx(device)
    copy = host_copier(batch, device, float_dtype, host_copy)
    ahead = []            # "side-stream-ahead": the next step's batch, copied during this forward

    def step():
        pending = ahead.pop() if ahead else copy() if copy else None
        with amp:
            loss, _ = task(pending.get() if pending else b)
        if host_copy == "side-stream-ahead":
            ahead.append(copy())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = FlopCounter(flop_params(task, model, pretrain_heads(task.objectives)), cfg).batch(
        size.batch, size.seq_len, flops_pred)
    label = FULL_LAST if full_last else f"{backend}{' +compile' if compiled else ''}"
    if full_last:
        note = "ablation: last block at every position"
    return Runner(label, OURS, label if full_last else backend, compiled, step, task, opt, flops, note=note)


def host_copier(batch, device, float_dtype, how: str | None):
    """A function issuing the copy of the batch from host memory (see ``build_ours``) and
    giving its ``InFlight``, or None."""
    if how is None:
        return None
    from vltrain.engine.device_copy import DeviceCopier, InFlight
    host = dataclasses.replace(batch, region_feats=batch.region_feats.half(),
                               region_cls_probs=batch.region_cls_probs.half())
    if device.type == "cuda":
        host = host.pin_memory()
    if how == "compute-stream":
        return lambda: InFlight(host.to(device, non_blocking=True, float_dtype=float_dtype))
    if how in ("side-stream", "side-stream-ahead"):
        return functools.partial(DeviceCopier(device, float_dtype).start, host)
    raise ValueError(f"host_copy={how!r}; choose compute-stream, side-stream or side-stream-ahead")


ENGINE_STAGE = 2      # ds_configs/zero2.json, the recipes' default, "auto" keys filled as run.py does


def build_engine(size: Size, batch, device, flops_pred: int, stage: int = ENGINE_STAGE,
                 ds_keys: dict | None = None, ds_readbacks: bool = False, grad_accum: int = 1) -> Runner:
    """Ours through the DeepSpeed engine, as ``vltrain/run.py`` trains: ZeRO-2 on one rank,
    sdpa, ``model.compile`` on GPU, ``train.precision`` bf16 on GPU (weights in bf16, fp32
    master copy, DeepSpeed's fused Adam) and fp32 on CPU (torch's fused AdamW).
    ``stage`` picks ds_configs/zero<stage>.json; ``ds_keys`` ({section: {key: value}}) are set
    in the resolved config (the diagnosis rows of benchmarks/mfu_levers.py); ``ds_readbacks``
    keeps DeepSpeed's own ZeRO step, which waits for the GPU before each step (vltrain's
    replaces it: vltrain/engine/ds_readbacks.py). ``grad_accum`` micro-batches (the same batch)
    make one step, whose samples and FLOPs count all of them; under bf16 ZeRO-2/3 the resolved
    config then sums gradients in fp32 (vltrain/engine/ds_config.py) unless ``ds_keys`` says."""
    import deepspeed
    from vltrain.config import Config
    from vltrain.engine.ds_config import check_buildable, no_decay_param_groups, resolve_ds_config
    from vltrain.engine.ds_readbacks import drop_step_readbacks
    from vltrain.model import VLModel
    from vltrain.model.compile import maybe_compile
    from vltrain.monitor import FlopCounter, flop_params
    from vltrain.tasks.pretrain import PretrainTask, pretrain_heads

    gpu = device.type == "cuda"
    cfg = Config(model=dataclasses.replace(size.model, attention_backend="sdpa", compile=gpu))
    cfg.train.micro_batch_size = size.batch
    cfg.train.grad_accum = grad_accum
    cfg.train.precision = "bf16" if gpu else "fp32"
    ds = resolve_ds_config(os.path.join(REPO, "ds_configs", f"zero{stage}.json"), cfg, 1, device.type)
    for section, keys in (ds_keys or {}).items():
        ds.setdefault(section, {}).update(keys)
    check_buildable(ds)                     # as vltrain/engine/build.py, before deepspeed.initialize
    torch.manual_seed(0)
    model = maybe_compile(VLModel(cfg.model))
    task = PretrainTask(model, cfg.objectives)
    engine, *_ = deepspeed.initialize(model=task, config=ds,
                                      model_parameters=no_decay_param_groups(task, cfg.train.weight_decay))
    if not ds_readbacks:
        drop_step_readbacks(engine.optimizer)          # as vltrain/engine/build.py
    b = batch.to(device, float_dtype=torch.bfloat16 if gpu else None)

    def step():
        for _ in range(grad_accum):        # the engine steps the optimizer at the last one
            loss, _ = engine(b)
            engine.backward(loss)
            if ds_readbacks:
                with deepspeeds_own_norm_mask():
                    engine.step()
            else:
                engine.step()

    flops = grad_accum * FlopCounter(flop_params(task, model, pretrain_heads(cfg.objectives)), cfg.model).batch(
        size.batch, size.seq_len, flops_pred)
    label = f"DeepSpeed engine, ZeRO-{stage}, sdpa{' +compile' if gpu else ''}"
    optim = "bf16 weights + fp32 master, fused Adam" if gpu else "fp32, torch's fused AdamW"
    note = f"what vltrain/run.py runs: {optim}; memory includes zero{stage}.json's reduce buckets"
    return Runner(label, OURS, label, gpu, step, task, engine.optimizer, flops, note=note, engine=engine,
                  grad_accum=grad_accum)


@contextlib.contextmanager
def deepspeeds_own_norm_mask():
    """DeepSpeed's own ``mask_nan_or_inf_with_val_inplace`` in its ZeRO-1/2 module for a while:
    vltrain's replacement is a global of that module, so another engine built in this process
    has set it for every ZeRO-1/2 optimizer (vltrain/engine/ds_readbacks.py)."""
    from deepspeed.runtime import utils as ds_utils
    from deepspeed.runtime.zero import stage_1_and_2
    current = stage_1_and_2.mask_nan_or_inf_with_val_inplace
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = ds_utils.mask_nan_or_inf_with_val_inplace
    try:
        yield
    finally:
        stage_1_and_2.mask_nan_or_inf_with_val_inplace = current


def init_single_process_group(device: torch.device) -> None:
    """A world of one for the engine row (DeepSpeed needs a process group)."""
    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if torch.distributed.is_initialized():
        return
    from vltrain.engine.distributed import free_port, init_distributed
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", LOCAL_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    init_distributed(300)


def full_last_speedup(runners, cpu: bool) -> str:
    """Step time of the ablation row over the plain eager row's (median; CPU time too)."""
    r = {x.label: x for x in runners}
    if FULL_LAST not in r:
        return "not measured in this run"
    a, b = r[FULL_LAST], r["eager"]
    text = f"{median(a.times) / median(b.times):.2f}× by step time"
    if cpu:
        text += f", {median(a.cpu_times) / median(b.cpu_times):.2f}× by CPU time"
    return text


def build_peer(size: Size, batch, device, flops_pred: int, bf16_weights: bool = False) -> Runner:
    from vltrain.monitor import FlopCounter, non_embedding_params
    torch.manual_seed(0)
    peer = peer_model(size.model).to(device).train()
    inputs = to_device(peer_inputs(batch), device)
    if bf16_weights:        # as ours' "bf16 weights" rows: weights, grads, AdamW state in bf16, no autocast
        peer.to(torch.bfloat16)
        inputs["visual_embeds"] = inputs["visual_embeds"].to(torch.bfloat16)
    opt = make_optimizer(peer.parameters(), device)

    def step():
        with (nullcontext() if bf16_weights else autocast_ctx(device)):
            loss = peer(**inputs).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = FlopCounter(non_embedding_params(peer), peer_flop_cfg(size.model)).batch(
        size.batch, size.seq_len, flops_pred)
    return Runner("peer", PEER, "eager (its own)", False, step, peer, opt, flops,
                  note="full-vocab MLM logits at every position (its design)")


def throughput_section(size: Size, device: torch.device, args) -> tuple[str, dict]:
    batch = make_batch(size, seed=0)
    n_pred = int(batch.mlm_positions.numel())
    names, skipped = backends_for(device)
    if args.backends:
        wanted = args.backends.split(",")
        for n in names:
            if n not in wanted:
                skipped[n] = "left out of this run (--backends)"
        names = [n for n in names if n in wanted]
    compile_opts = [False] if args.no_compile else [False, True]
    runners = []
    for compiled in compile_opts:
        for name in names:
            if compiled and args.quick and name != "sdpa":
                continue                       # CI: one compiled row proves compile works
            log(f"building ours: {name} compile={compiled}")
            r = build_ours(size, name, compiled, batch, device, n_pred)
            err = runs_here(r, device) if name == "triton" else None     # never run on a GPU before
            if err:
                skipped[f"{name} compile={'on' if compiled else 'off'}"] = f"failed here: {err}"
                log(f"row left out: {name} compile={compiled}: {err}")
                continue
            runners.append(r)
    if not args.no_ablation and "eager" in names:
        log("building ours (ablation): eager, last block at every position")
        runners.append(build_ours(size, "eager", False, batch, device, n_pred, full_last=True))
    if not args.no_engine:
        log(f"building ours through the DeepSpeed engine (ZeRO-{ENGINE_STAGE})")
        try:        # e.g. DeepSpeed's fused Adam cannot be built on this GPU node: report, go on
            init_single_process_group(device)
            runners.append(build_engine(size, batch, device, n_pred))
        except Exception as e:  # noqa: BLE001
            skipped["DeepSpeed engine"] = f"failed to build: {type(e).__name__}: {str(e)[:200]}"
            log(f"engine row left out: {skipped['DeepSpeed engine']}")
    log("building peer: VisualBertForPreTraining")
    runners.append(build_peer(size, batch, device, n_pred))

    time_interleaved(runners, device, warmup=args.warmup, rounds=args.rounds, log=log,
                     steps_per_round=args.steps_per_round)
    for r in runners:
        log(f"memory: {r.label}")
        held = engine_state_bytes(r.engine)["total"] if r.engine else resident_bytes(r.module, r.optimizer)
        r.peak_bytes = held + transient_peak_bytes(r.step, device)

    from vltrain.monitor import device_peak_tflops
    if device.type == "cuda":
        peak = device_peak_tflops("bf16")
        peak_note = f"spec dense bf16 peak of this GPU: {peak} TFLOP/s" if peak else "GPU not in PEAK_TFLOPS"
    else:
        gemm_n = 1024 if args.quick else 2048
        peak = measured_gemm_tflops(device, torch.float32, n=gemm_n)
        peak_note = (f"CPU has no spec peak: MFU is relative to the fp32 {gemm_n}^3 matmul rate measured in this "
                     f"run, {peak * 1e3:.1f} GFLOP/s")
    # Wall-clock median over interleaved rounds: every configuration sees the same mix of the
    # machine's load. On a CPU shared with other jobs, process CPU time (all threads) is a
    # second estimate that their load moves less.
    cpu = device.type == "cpu"
    est, est_name = median, "median"
    peer = runners[-1]
    peer_sps = size.batch / est(peer.times)
    rows, results = [], []
    for r in runners:
        t = est(r.times)
        sps = size.batch / t
        tflops = r.flops_per_step / t / 1e12
        mfu = tflops / peak if peak else math.nan
        by_cpu = median(peer.cpu_times) / median(r.cpu_times)
        row = [r.model, r.backend, "on" if r.compiled else "off", sps, sps * size.seq_len, tflops * 1e3,
               100 * mfu, r.peak_bytes / 1e9, t, sps / peer_sps]
        rows.append(row + ([median(r.cpu_times), by_cpu] if cpu else []) + [r.note or "-"])
        results.append(dict(label=r.label, model=r.model, samples_per_s=sps, mfu=mfu, peak_gb=r.peak_bytes / 1e9,
                            step_s=t, times=r.times, cpu_times=r.cpu_times, vs_peer=sps / peer_sps,
                            vs_peer_cpu_time=by_cpu))
    header = ["model", "attention", "compile", "samples/s", "tokens/s", "GFLOP/s", "MFU %", "peak mem GB",
              f"step s ({est_name})", "× peer"] + (["CPU s/step (median)", "× peer by CPU time"] if cpu else []) \
        + ["note"]
    ours = [x for x in results if x["model"] == OURS and x["label"] != FULL_LAST]
    best = max(ours, key=lambda x: x["samples_per_s"])
    plain = [x for x in ours if not x["label"].endswith("+compile")]
    best_plain = max(plain, key=lambda x: x["samples_per_s"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    lines = [markdown_table(header, rows), "",
             f"- Same batch for both models: {size.batch} samples × ({size.regions} regions + {size.text} text "
             f"tokens) = {size.seq_len} positions, {n_pred} masked tokens; {args.rounds} timed rounds of "
             f"{args.steps_per_round} step(s) per configuration (median of the rounds) after {args.warmup} "
             f"warm-up step(s), interleaved round-robin.",
             f"- FLOPs per step: ours {runners[0].flops_per_step / 1e9:,.4g} GFLOP, peer "
             f"{peer.flops_per_step / 1e9:,.4g} GFLOP (vltrain.monitor: 6·N_non-emb + 12·layers·hidden·seq per "
             f"token + 6·hidden·vocab per masked token, N each model's own, less the heads this MLM step never "
             f"runs: the peer is not credited with its full-vocabulary logits, ours not with its region and "
             f"[CLS] heads), the count the trainer's `perf/mfu` uses; ours is credited with it although its "
             f"last block runs only at the masked positions. {peak_note}.",
             f"- Peak memory = parameters + optimizer state + the step's peak transient allocation "
             f"({'CUDA allocator peak' if not cpu else 'torch profiler allocation events'}).",
             f"- Best of ours: {best['label']} at {best['samples_per_s']:.3g} samples/s = "
             f"{best['vs_peer']:.2f}× the peer" + (f" ({best['vs_peer_cpu_time']:.2f}× by CPU time)" if cpu else "")
             + f"; without compile: {best_plain['label']} = {best_plain['vs_peer']:.2f}×"
             + (f" ({best_plain['vs_peer_cpu_time']:.2f}× by CPU time)" if cpu else "") + ".",
             f"- The last block only at the masked positions (`eager`) vs the same model computing it at "
             f"every position (`{FULL_LAST}`), same run: {full_last_speedup(runners, cpu)}."]
    if args.steps_per_round > 1:
        lines.insert(2, f"- Each timed round runs {args.steps_per_round} steps back to back and synchronises "
                        f"once (as training does; a sync per step would expose the host's launch latency); "
                        f"step time = round time / {args.steps_per_round}.")
    if cpu:
        lines.append(f"- Load average at the end of the timing: {load:.1f} on {os.cpu_count()} cores.")
        wall_ok = best["vs_peer"] >= CPU_TARGET
        cpu_ok = max(x["vs_peer_cpu_time"] for x in ours) >= CPU_TARGET
        lines.append(f"- CPU target (ours ≥ {CPU_TARGET}× peer samples/s, fp32, same batch): "
                     f"{'met' if wall_ok else 'NOT met'} by wall-clock ({best['vs_peer']:.2f}×), "
                     f"{'met' if cpu_ok else 'NOT met'} by CPU time "
                     f"({max(x['vs_peer_cpu_time'] for x in ours):.2f}×).")
    else:
        lines.append(f"- GPU targets (≥ {GPU_TARGET_MFU:.0%} MFU, ≥ {GPU_TARGET_RATIO}× peer): MFU "
                     f"{best['mfu']:.1%}, {best['vs_peer']:.2f}× peer.")
    for name, why in skipped.items():
        lines.append(f"- Not measured here: `{name}` ({why}).")
    return "\n".join(lines), dict(rows=results, skipped=skipped)


# ------------------------------------------------------------------------------ 2. ZeRO memory

def zero_section(size: Size, args) -> tuple[str, dict]:
    """Spawn 2 gloo ranks of ``--zero-worker`` and tabulate what they measured."""
    out = os.path.join(tempfile.mkdtemp(prefix="vltrain_zero_"), "zero.json")
    run_two_ranks([os.path.abspath(__file__), "--zero-worker", out] + (["--quick"] if args.quick else []),
                  "ZeRO worker", args.zero_timeout)
    with open(out) as f:
        res = json.load(f)
    shutil.rmtree(os.path.dirname(out), ignore_errors=True)
    return render_zero(res, size), res


def render_zero(res: dict, size: Size) -> str:
    """The ZeRO section's Markdown from the workers' JSON."""
    def table(part: dict) -> tuple[str, float]:
        base = part["0"]["total"]
        rows = [[f"ZeRO-{st}", part[st]["optimizer"], part[st]["params"] / 1e6, part[st]["master"] / 1e6,
                 part[st]["optim"] / 1e6, part[st]["total"] / 1e6, part[st]["total"] / base]
                for st in ("0", "1", "2", "3")]
        return markdown_table(["stage", "DeepSpeed optimizer", "params MB", "fp32 master MB", "Adam state MB",
                               "model+optimizer MB / rank", "vs ZeRO-0"], rows), part["3"]["total"] / base

    md, ratio3 = table(res)
    n = res["num_params"]
    lines = [md, "",
             f"- {size.name} model, {n / 1e6:.1f} M parameters, fp32, 2 ranks (gloo, DeepSpeed on CPU), "
             f"after one training step; rank 0 shown (rank 1 differs by at most "
             f"{res['rank_spread'] / 1e6:.2f} MB). Distinct storages counted once.",
             f"- ZeRO-3 target (≤ {ZERO3_TARGET}× ZeRO-0 per rank): {'met' if ratio3 <= ZERO3_TARGET else 'NOT met'}"
             f" ({ratio3:.2f}×). In fp32, DeepSpeed's ZeRO keeps an fp32 master partition that is a *copy* "
             f"of the (also fp32) parameters, so with 2 ranks the floor is (4+4+8)/2 / (4+8) = 0.67×; "
             f"it falls towards 1/ranks with more ranks."]
    bf = res.get("bf16", {})
    if "error" in bf:
        lines.append(f"- bf16 variant not measured: {bf['error']}")
    elif bf:
        md16, r16 = table(bf)
        lines += ["", f"bf16 (the GPU recipe's precision; {bf['size']} model, same 2 ranks):", "", md16, "",
                  f"- ZeRO-3 target in bf16: {'met' if r16 <= ZERO3_TARGET else 'NOT met'} ({r16:.2f}×): "
                  f"bf16 parameters next to fp32 master weights are no duplicate, so sharding pays fully "
                  f"(ideal with 2 ranks: (2+4+8)/2 / (2+4+8) = 0.5×)."]
    for stage, c in res["compile"].items():
        lines.append(f"- `model.compile=true` under ZeRO-{stage} (debug model, 2 ranks, {len(c['eager'])} steps): "
                     f"losses equal eager's within {c['max_rel_diff']:.1e} relative, "
                     f"{c['graphs']} Dynamo graph(s) compiled for this stage's run "
                     f"({'ok' if c['max_rel_diff'] < 1e-4 and c['graphs'] > 0 else 'MISMATCH'}).")
    return "\n".join(lines)


def zero_worker(out: str, quick: bool) -> None:
    """One rank: build, initialise, step and measure ZeRO 0..3; rank 0 writes JSON."""
    from vltrain.engine.distributed import init_distributed

    info = init_distributed(300)
    size = quick_size() if quick else full_size()
    res = measure_zero_stages(info, size, "fp32")
    try:       # the GPU recipe's precision, at the debug size (a bf16 step on CPU is slow)
        res["bf16"] = measure_zero_stages(info, quick_size(), "bf16")
    except Exception as e:                                  # reported, not fatal
        res["bf16"] = {"error": f"{type(e).__name__}: {e}"[:300]}
    res["compile"] = compile_under_zero(info, size if quick else quick_size())
    if info.rank == 0:
        with open(out, "w") as f:
            json.dump(res, f)
    torch.distributed.barrier()


def engine_state_bytes(engine) -> dict:
    """This rank's bytes of parameters, fp32 master weights and optimizer state in a
    DeepSpeed engine (any ZeRO stage); distinct storages counted once."""
    opt = engine.optimizer
    params = []
    for p in engine.module.parameters():
        if hasattr(p, "ds_tensor"):
            params.append(p.ds_tensor)          # ZeRO-3: this rank's partition
        if p.data.numel():
            params.append(p.data)               # whole parameter (stage 0-2; ZeRO-3 persistent ones)
    master = []        # fp32 master weights, whatever the DeepSpeed optimizer calls them
    for attr in ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition",
                 "fp32_groups_flat", "fp32_groups"):
        for t in getattr(opt, attr, None) or []:
            master += [t] if torch.is_tensor(t) else [x for x in t if torch.is_tensor(x)]
    inner = getattr(opt, "optimizer", opt)
    states = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    return dict(params=tensor_bytes(params), master=tensor_bytes(master), optim=tensor_bytes(states),
                total=tensor_bytes(params + master + states))


def stepped_zero_engine(cfg, stage: int, world: int, batch):
    """(DeepSpeed engine of the pretraining task under ZeRO-``stage`` as vltrain/run.py builds it
    on CPU, after one training step on ``batch``; the task's parameter count). Seeded: every
    rank and stage starts from the same weights."""
    import deepspeed
    from vltrain.engine.ds_config import no_decay_param_groups, resolve_ds_config
    from vltrain.model import VLModel
    from vltrain.tasks.pretrain import PretrainTask

    ds = resolve_ds_config({"zero_optimization": {"stage": stage}}, cfg, world, "cpu")
    torch.manual_seed(0)
    task = PretrainTask(VLModel(cfg.model), cfg.objectives)
    n_params = sum(p.numel() for p in task.parameters())
    engine, *_ = deepspeed.initialize(model=task, config=ds,
                                      model_parameters=no_decay_param_groups(task, cfg.train.weight_decay))
    loss, _ = engine(batch)
    engine.backward(loss)
    engine.step()
    return engine, n_params


def measure_zero_stages(info, size: Size, precision: str) -> dict:
    """Per-rank bytes of parameters, fp32 master partitions and optimizer state, ZeRO 0..3."""
    from vltrain.config import Config

    cfg = Config(model=size.model)
    cfg.train.micro_batch_size = size.batch
    cfg.train.precision = precision
    float_dtype = torch.bfloat16 if precision == "bf16" else None
    batch = make_batch(size, seed=1 + info.rank).to("cpu", float_dtype=float_dtype)
    res = {"precision": precision, "size": size.name}
    for stage in (0, 1, 2, 3):
        engine, n_params = stepped_zero_engine(cfg, stage, info.world, batch)
        opt = engine.optimizer
        m = dict(engine_state_bytes(engine), num_params=n_params, optimizer=type(opt).__name__)
        gathered = [None] * info.world
        torch.distributed.all_gather_object(gathered, m)
        res[str(stage)] = gathered[0]
        res.setdefault("rank_spread", 0)
        res["rank_spread"] = max(res["rank_spread"], max(abs(g["total"] - gathered[0]["total"]) for g in gathered))
        res["num_params"] = n_params
        engine.destroy()
        del engine, opt
        gc.collect()
    return res


def compile_under_zero(info, size: Size, steps: int = 3) -> dict:
    """model.compile=true under ZeRO-1/2/3: compiled blocks (compiled before
    ``deepspeed.initialize``, as vltrain/engine/build.py does) give the same losses as eager."""
    import deepspeed
    from vltrain.config import Config
    from vltrain.engine.ds_config import no_decay_param_groups, resolve_ds_config
    from vltrain.model import VLModel
    from vltrain.model.compile import maybe_compile
    from vltrain.tasks.pretrain import PretrainTask

    from torch._dynamo.utils import counters
    out = {}
    for stage in (1, 2, 3):
        losses = {}
        for compiled in (False, True):
            if compiled:    # compile afresh: graphs cached from another stage would count nothing here
                torch._dynamo.reset()
                counters.clear()
            cfg = Config(model=dataclasses.replace(size.model, compile=compiled, attention_backend="sdpa"))
            cfg.train.micro_batch_size = size.batch
            ds = resolve_ds_config({"zero_optimization": {"stage": stage}}, cfg, info.world, "cpu")
            torch.manual_seed(0)
            model = maybe_compile(VLModel(cfg.model))
            task = PretrainTask(model, cfg.objectives)
            engine, *_ = deepspeed.initialize(model=task, config=ds,
                                              model_parameters=no_decay_param_groups(task, cfg.train.weight_decay))
            seen = []
            for i in range(steps):
                loss, _ = engine(make_batch(size, seed=100 + 10 * i + info.rank))
                engine.backward(loss)
                engine.step()
                t = loss.detach().clone()
                torch.distributed.all_reduce(t)
                seen.append(float(t) / info.world)
            losses[compiled] = seen
            engine.destroy()
        out[str(stage)] = dict(eager=losses[False], compiled=losses[True],
                               graphs=int(counters["stats"]["unique_graphs"]),
                               max_rel_diff=max(abs(a - b) / abs(a) for a, b in zip(losses[False], losses[True])))
    return out


# ------------------------------------------------------------------------------ 3. attention

def attention_section(size: Size, device: torch.device, args) -> tuple[str, dict]:
    """fwd+bwd of each backend's ``attend`` (after its once-per-forward ``prepare``)."""
    from vltrain.model import attention as A
    B, L = size.batch, size.seq_len
    h, d = size.model.num_heads, size.model.hidden_size // size.model.num_heads
    st = bucketed_structure(size, device)
    g = torch.Generator().manual_seed(4)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    q0, k0, v0 = (torch.randn(B, L, h, d, generator=g).transpose(1, 2).to(device, dtype) for _ in range(3))
    go = torch.randn(B, h, L, d, generator=g).to(device, dtype)

    names = ["eager", "sdpa"]
    skipped = {}
    if device.type == "cuda":
        names += [n for n in ("flex", "varlen") if (n != "flex" or A.flex_available())
                  and (n != "varlen" or A.varlen_kernel_name("cuda"))]
    else:
        names.append("varlen")
        skipped["flex"] = "no FlexAttention backward on CPU"
    if A.triton_attention.runs_on(device.type):
        names.append("triton")
    kernels = {"varlen": A.varlen_kernel_name(device.type), "sdpa": "efficient/cuDNN (pinned)" if device.type == "cuda"
               else "torch CPU dispatch", "eager": "matmul + softmax", "flex": "compiled flex (Triton)",
               "triton": f"vltrain's Triton kernels, {A.triton_attention.block_for(L, dtype)}-wide blocks"}

    def run(name):
        be = A.get_backend(name)
        q, k, v = (t.detach().requires_grad_() for t in (q0, k0, v0))
        prepared = be.prepare(st, dtype)
        out = be.attend(q, k, v, prepared, 0.0)
        out.backward(go)
        return out.detach(), q.grad

    ref_out, ref_grad = run("eager")
    qmask = st.key_valid[:, None, :, None]
    errs = {}
    for n in list(names):
        try:
            out, grad = run(n)              # warm-up (compiles flex once for this shape)
        except Exception as e:  # noqa: BLE001 — a kernel that fails here is reported, not fatal
            skipped[n] = f"failed here: {type(e).__name__}: {str(e)[:200]}"
            names.remove(n)
            continue
        errs[n] = max(float(((out - ref_out) * qmask).abs().max()), float(((grad - ref_grad) * qmask).abs().max()))
    times = {n: [] for n in names}
    reps = 3 if args.quick else 10
    for _ in range(reps):
        for n in names:
            sync(device)
            t0 = time.perf_counter()
            run(n)
            sync(device)
            times[n].append(time.perf_counter() - t0)
    eager_t = median(times["eager"])
    rows = [[n, kernels.get(n) or "-", median(times[n]) * 1e3, eager_t / median(times[n]), errs[n]] for n in names]
    valid_frac = float(st.key_valid.float().mean())
    lines = [markdown_table(["backend", "kernel", "fwd+bwd ms (median)", "speed-up vs eager",
                             "max |Δ| vs eager (out, dq)"], rows), "",
             f"- Shape (B, heads, L, d) = ({B}, {h}, {L}, {d}), {str(dtype).replace('torch.', '')}, mixed "
             f"seq2seq/bidirectional examples, captions padded inside a {size.text}-token bucket "
             f"({valid_frac:.0%} of positions real); includes each backend's per-forward `prepare` "
             f"(mask / BlockMask / varlen plan), {reps} interleaved repetitions."]
    for n, why in skipped.items():
        lines.append(f"- Not measured here: `{n}` ({why}).")
    if device.type == "cpu":
        lines.append("- `varlen` on CPU is the SDPA emulation of the two-call scheme (a per-example Python loop: "
                     "the reference the tests use), not a fused kernel; its time says nothing about GPUs.")
    return "\n".join(lines), dict(ms={n: median(times[n]) * 1e3 for n in names}, err=errs)


def last_block_section(size: Size, device: torch.device, args) -> tuple[str, dict]:
    """One block, fwd+bwd: at every position then gathering the masked rows, vs the block
    called with ``rows=`` computing only those rows (what the pretraining and caption losses now ask for)."""
    from vltrain.model import attention as A
    from vltrain.model.transformer import Block
    torch.manual_seed(0)
    block = Block(size.model).to(device).train()
    batch = make_batch(size, seed=3)
    B, L, H = size.batch, size.seq_len, size.model.hidden_size
    T = batch.input_ids.shape[1]
    b_idx = (batch.mlm_positions // T).to(device)
    q_idx = (batch.mlm_positions % T + size.regions).to(device)   # text after [CLS] r1..rN
    st = A.AttentionStructure(torch.ones(B, L, dtype=torch.bool, device=device),
                              torch.zeros(B, L, dtype=torch.bool, device=device))
    backend = A.get_backend("sdpa")
    x0 = torch.randn(B, L, H, device=device)

    def full():
        x = x0.clone().requires_grad_()
        with autocast_ctx(device):
            y = block(x, backend.prepare(st, x.dtype), backend)[b_idx, q_idx]
        y.float().sum().backward()

    def selected():
        x = x0.clone().requires_grad_()
        with autocast_ctx(device):
            y = block(x, backend.prepare(st, x.dtype), backend, (b_idx, q_idx))
        y.float().sum().backward()

    runs = {"every position, then gather": full, "masked positions only": selected}
    times = {k: [] for k in runs}
    for f in runs.values():
        f()
    for _ in range(3 if args.quick else 10):
        for k, f in runs.items():
            sync(device)
            t0 = time.perf_counter()
            f()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    ms = {k: median(v) * 1e3 for k, v in times.items()}
    ref = ms["every position, then gather"]
    rows = [[k, ms[k], ref / ms[k]] for k in runs]
    md = "\n".join([markdown_table(["last block", "fwd+bwd ms (median)", "speed-up"], rows), "",
                    f"- One block of the model above, {B} × {L} positions, {len(b_idx)} masked rows read by the "
                    f"loss; attention at every position in both; interleaved repetitions."])
    return md, ms


# ------------------------------------------------------------------------------ main

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="debug-size model (CI)")
    p.add_argument("--out", help="write the Markdown report here too")
    p.add_argument("--json", help="write the raw numbers here")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=0, help="micro-batch (default: 8, or 4 with --quick); "
                   "sweep it on a GPU to find the best MFU")
    p.add_argument("--rounds", type=int, default=None, help="timed steps per configuration")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--no-compile", action="store_true", help="leave out the compile=on rows")
    p.add_argument("--no-zero", action="store_true", help="leave out the ZeRO memory section")
    p.add_argument("--backends", default="", help="comma-separated subset of our attention backends to time "
                   "(default: every one that trains on this device)")
    p.add_argument("--no-ablation", action="store_true", help="leave out the full-last-block ablation row")
    p.add_argument("--no-engine", action="store_true", help="leave out the DeepSpeed engine row")
    p.add_argument("--steps-per-round", type=int, default=0,
                   help="steps timed back to back per round (default: 1 on CPU, 5 on GPU)")
    p.add_argument("--zero-timeout", type=float, default=1800)
    p.add_argument("--zero-worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.zero_worker:
        zero_worker(args.zero_worker, args.quick)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.rounds = args.rounds or (2 if args.quick else 10 if gpu else 7)
    # GPU: the first steps compile / autotune / grow the allocator's pools.
    args.warmup = args.warmup or (3 if gpu and not args.quick else 1)
    args.steps_per_round = args.steps_per_round or (5 if gpu and not args.quick else 1)
    size = quick_size() if args.quick else full_size()
    if args.batch:
        size = dataclasses.replace(size, batch=args.batch)
    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    started = time.time()

    parts = [f"Machine: {machine_description(device)}. Size: {size.name} "
             f"({size.model.num_layers} layers, hidden {size.model.hidden_size}, {size.model.num_heads} heads), "
             f"micro-batch {size.batch}, {size.regions} regions + {size.text} text tokens, {precision}, "
             f"AdamW (fused where supported) for both models."]
    from vltrain.model.attention import resolve_auto
    auto_name, why = resolve_auto(device.type, size.model.attention_dropout)
    parts.append(f"`attention_backend=auto` here → `{auto_name}` ({why}).")
    zero = None
    if not args.no_zero:
        # First, while this process holds no model: 2 ranks of the full model beside the
        # throughput section's five models and optimizers would not fit a 24 GB machine.
        log("ZeRO memory: 2 ranks")
        zero_md, zero = zero_section(size, args)
        log(zero_md)
    tput_md, tput = throughput_section(size, device, args)
    parts += ["", "### Training step throughput", "", tput_md]
    if zero is not None:
        parts += ["", "### Model + optimizer state per rank (ZeRO, 2 ranks)", "", zero_md]
    log("\n".join(parts))                  # a partial report, in case a later section fails
    gc.collect()
    log("attention micro-benchmark")
    attn_md, attn = attention_section(size, device, args)
    last_md, last = last_block_section(size, device, args)
    parts += ["", "### Attention micro-benchmark (forward + backward)", "", attn_md,
              "", "### Last block at the masked positions only (forward + backward)", "", last_md, "",
              f"_Generated by `python benchmarks/train_throughput.py{' --quick' if args.quick else ''}` in "
              f"{(time.time() - started) / 60:.1f} min._"]
    emit_report("\n".join(parts), args.out)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(throughput=tput, zero=zero, attention=attn, last_block=last), f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
