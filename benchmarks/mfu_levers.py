"""What each MFU lever gains at a fixed micro-batch: one run, configurations interleaved.

    python benchmarks/mfu_levers.py --batch 256 [--autotune] [--engine] [--quick] [--out F.md]

Rows, all ours with compiled blocks and sdpa unless a row says otherwise (the best of benchmarks/train_throughput.py):
  autocast        fp32 weights, bf16 autocast, torch's fused AdamW (the throughput table's row;
                  on CPU, the --quick plumbing check, fp32 without autocast)
  bf16 weights    weights, gradients and AdamW state in bf16, no autocast (an upper bound of
                  DeepSpeed's bf16 mode, which adds an fp32 master copy and its update)
  bf16 weights, 2x batch          the same at twice the micro-batch
  bf16 weights, triton attention  the same with vltrain's Triton attention kernels (the mask
                                  computed in the tile), 32- and 64-wide blocks (CUDA; on CPU
                                  only in Triton's interpreter, TRITON_INTERPRET=1)
  bf16 weights, max-autotune      ``mode="max-autotune-no-cudagraphs"``: Inductor may fuse bias
                                  and GELU into Triton GEMM templates (--autotune; compiles long)
  batch from host memory          bf16 weights, the batch copied from pinned host memory every
                                  step (fp16 region inputs, as the loader gives them): on the
                                  compute stream vs a side stream (DeviceCopier) vs a side
                                  stream during the previous forward, as the trainer (--h2d)
  DeepSpeed engine                ZeRO-2 on one rank, bf16, as vltrain/run.py trains (--engine);
                                  beside it the same engine with DeepSpeed's own ZeRO step (which
                                  reads the gradient norm back), and with that and DeepSpeed's
                                  default throughput timer (which synchronizes the device twice
                                  per step): vltrain's engine before it took both out; and at
                                  grad_accum 2 (micro-batch samples twice a step), the bf16
                                  gradients summed in fp32 (vltrain) vs in bf16 (DeepSpeed's
                                  default); fp32 on CPU: one row
  peer            transformers' VisualBertForPreTraining, bf16 autocast (as in the throughput table;
                  the "× peer" column's reference), and with bf16 weights (as ours' bf16-weights rows)
  dropout's RNG   (--rng) what the hidden dropouts' random numbers cost inside the compiled
                  blocks (Inductor draws one Philox call per element where a fused kernel is 2-D,
                  e.g. dropout + residual + LayerNorm, and keeps 1 of its 4 outputs): the blocks
                  without hidden dropout (attention dropout kept), and with Inductor's
                  ``fallback_random`` (ATen's RNG kernels, 4 numbers per call, one more pass over
                  memory) and ``align_random_eager`` (where the installed torch has it), and with
                  ``model.hidden_dropout_masks=packed`` (vltrain's bit-packed masks, 8 elements per
                  Philox call: vltrain/model/packed_dropout.py)
With --diagnose, what-if rows (no compile; no dropout) and engine variants (ZeRO-2 with
DeepSpeed's default bf16.check_grad_overflow=true, with overlap_comm on (the default before
it became "auto": off on one rank); ZeRO-1; ZeRO-1
with overlap_comm and contiguous_gradients off, which registers no per-parameter gradient
hooks; ZeRO-0).
Then a torch-profiler breakdown of the autocast, bf16-weights and engine steps by kernel class
(GEMM, attention, Triton (compiled elementwise), optimizer, other) and the time the GPU waited
for the host.
MFU: ``vltrain.monitor``'s formula over the spec dense bf16 peak, as in the throughput table.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import (Runner, emit_report, full_size, machine_description, make_batch,  # noqa: E402
                               markdown_table, median, quick_size, runs_here, sync, time_interleaved)
from benchmarks.train_throughput import build_engine, build_ours, build_peer, init_single_process_group  # noqa: E402

ACCUM = 2      # micro-batches a step in the engine's gradient-accumulation rows


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def kernel_breakdown(runner: Runner, device, steps: int = 3, top_n: int = 12) -> str:
    """Device time by kernel class and the GPU's idle time per step (vltrain.profiling, the
    same summary ``train.profile_steps`` writes for a real job)."""
    from torch.profiler import ProfilerActivity, profile

    from vltrain.profiling import summarize
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        sync(device)
        wall = time.perf_counter() - t0
    return summarize(prof, steps, wall).class_table(top_n)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--autotune", action="store_true", help="add the max-autotune row (long compile)")
    p.add_argument("--engine", action="store_true", help="add the DeepSpeed engine row (bf16, ZeRO-2)")
    p.add_argument("--diagnose", action="store_true", help="add what-if rows: no compile, no dropout")
    p.add_argument("--rng", action="store_true",
                   help="add rows on the hidden dropouts' RNG: none, Inductor's fallback_random, align_random_eager, "
                        "vltrain's packed masks")
    p.add_argument("--h2d", action="store_true",
                   help="add rows whose batch is copied from pinned host memory every step: on the "
                        "compute stream vs on a side stream (DeviceCopier) vs on a side stream during the "
                        "previous step's forward (the trainer)")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="debug size (CI / CPU plumbing check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="write the Markdown report here too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    base = quick_size() if args.quick else full_size()
    sizes = {k: dataclasses.replace(base, batch=b) for k, b in (("1x", args.batch), ("2x", 2 * args.batch))}
    batches = {k: make_batch(s, seed=0) for k, s in sizes.items()}
    preds = {k: int(b.mlm_positions.numel()) for k, b in batches.items()}

    def mk(label, key="1x", bf16=True, ck=None, backend="sdpa", **over):
        log(f"building: {label}")
        r = build_ours(sizes[key], backend, ck is not False, batches[key], device, preds[key], bf16_weights=bf16,
                       compile_kwargs=ck or None, **over)
        r.label = label
        r.batch = sizes[key].batch
        return r

    def mk_triton(block):
        """bf16 weights with the ``triton`` attention backend in ``block``-wide blocks (a module
        setting: each step sets it; Dynamo keeps one graph per value); None, logged, where its
        first step fails (kernels that have not run on this kind of GPU before)."""
        from vltrain.model import triton_attention as T
        r = mk(f"bf16 weights, triton attention ({block}-wide blocks)", ck=static, backend="triton")
        step = r.step
        r.step = lambda: (setattr(T, "BLOCK", block), step())[1]
        err = runs_here(r, device)
        if err:
            log(f"row left out: {r.label}: {err}")
            return None
        return r

    # Every row of ours compiles with dynamic=False and the 2x-batch row comes last: the blocks
    # of all rows share one Dynamo cache, and an automatic-dynamic recompile for the second
    # batch size would otherwise serve (slower) dynamic-shape kernels to rows built before it.
    torch._dynamo.config.recompile_limit = 64
    static = dict(dynamic=False)
    amp = "fp32 weights, " + ("bf16 autocast" if device.type == "cuda" else "no autocast (CPU)")
    runners = [mk(amp, bf16=False, ck=static), mk("bf16 weights", ck=static)]
    from vltrain.model import triton_attention
    triton_rows = []
    if triton_attention.runs_on(device.type):
        triton_rows = [r for r in (mk_triton(b) for b in (32, 64)) if r is not None]
        runners += triton_rows
    if args.autotune:
        runners.append(mk("bf16 weights, max-autotune", ck=dict(mode="max-autotune-no-cudagraphs", dynamic=False)))
    if args.diagnose:       # what-if rows: not configurations to train with
        runners += [mk("diagnose: bf16 weights, no compile", ck=False),
                    mk(f"diagnose: {amp}, no dropout", bf16=False, ck=static, hidden_dropout=0.0,
                       attention_dropout=0.0),
                    mk("diagnose: bf16 weights, no dropout", ck=static, hidden_dropout=0.0, attention_dropout=0.0)]
    if args.rng:            # each option compiles its own graph (Dynamo recompiles for another backend)
        import torch._inductor.config as inductor_config
        runners.append(mk(f"diagnose: bf16 weights, no hidden dropout (attention dropout {base.model.attention_dropout} kept)",
                          ck=static, hidden_dropout=0.0))
        runners.append(mk("bf16 weights, packed hidden-dropout masks (model.hidden_dropout_masks=packed)",
                          ck=static, hidden_dropout_masks="packed"))
        for opt in ("fallback_random", "align_random_eager"):
            if not hasattr(inductor_config, opt):
                log(f"row left out: this torch's Inductor has no config.{opt}")
                continue
            r = mk(f"bf16 weights, Inductor {opt}=True", ck=dict(dynamic=False, options={opt: True}))
            try:        # compiles here: an option this torch cannot build costs its row, not the run's
                r.step()
                sync(device)
            except Exception as e:  # noqa: BLE001
                log(f"row left out: Inductor {opt}=True: {type(e).__name__}: {str(e)[:300]}")
                continue
            runners.append(r)
    if args.h2d:            # the batch's host-to-device copy, as the trainer does it and as it did before
        runners += [mk("bf16 weights, batch from host memory, copied on the compute stream",
                       ck=static, host_copy="compute-stream"),
                    mk("bf16 weights, batch from host memory, copied on a side stream",
                       ck=static, host_copy="side-stream"),
                    mk("bf16 weights, batch from host memory, copied on a side stream during the previous "
                       "forward (vltrain)", ck=static, host_copy="side-stream-ahead")]
    if args.engine:
        try:
            init_single_process_group(device)
            # What vltrain takes out of DeepSpeed's step: the norm checks it reads back before each
            # step (vltrain/engine/ds_readbacks.py), and its throughput timer, which synchronizes
            # the device at every forward and step (off in vltrain's resolved ds_config)
            timer = {"timers": {"throughput": {"enabled": True, "synchronized": True}}}
            variants = [(2, {}, ""),
                        (2, {}, ", DeepSpeed's own step (reads the norm back)", True),
                        (2, timer, ", DeepSpeed's own step and throughput timer (vltrain before)", True)]
            if args.diagnose:      # which part of the engine costs what
                variants += [(2, {"bf16": {"check_grad_overflow": True}},     # DeepSpeed's default
                              ", bf16.check_grad_overflow=true"),
                             (2, {"zero_optimization": {"overlap_comm": True}}, ", overlap_comm=true"),
                             (1, {}, ""),
                             # no per-parameter gradient hooks: DeepSpeed reduces after backward
                             (1, {"zero_optimization": {"overlap_comm": False, "contiguous_gradients": False}},
                              ", no gradient hooks"),
                             (0, {}, "")]
            precision = "bf16" if device.type == "cuda" else "fp32"
            variants = [(stage, keys, tag, bool(readbacks), 1) for stage, keys, tag, *readbacks in variants]
            # Two micro-batches a step: the bf16 run's gradients summed in fp32 (vltrain's resolved
            # ds_config at grad_accum > 1) vs in bf16 (DeepSpeed's default): what the sum costs
            accum = f", grad_accum {ACCUM}"
            variants += [(2, {}, accum + (", fp32 gradient sum (vltrain)" if device.type == "cuda" else ""),
                          False, ACCUM)]
            if device.type == "cuda":
                variants += [(2, {"data_types": {"grad_accum_dtype": "bf16"}},
                              accum + ", bf16 gradient sum (DeepSpeed's default)", False, ACCUM)]
            for stage, keys, tag, readbacks, ga in variants:
                log(f"building: DeepSpeed engine ZeRO-{stage}{tag}")
                r = build_engine(sizes["1x"], batches["1x"], device, preds["1x"], stage=stage, ds_keys=keys,
                                 ds_readbacks=readbacks, grad_accum=ga)
                r.label, r.batch = f"DeepSpeed engine (ZeRO-{stage}, {precision}{tag})", ga * args.batch
                runners.append(r)
        except Exception as e:  # noqa: BLE001 — e.g. FusedAdam cannot be built: report, go on
            import traceback
            log(f"engine row left out: {type(e).__name__}: {str(e)[:300]}\n{traceback.format_exc()[-3000:]}")
    log("building: peer (VisualBertForPreTraining, bf16 autocast)")
    peer = build_peer(sizes["1x"], batches["1x"], device, preds["1x"])
    amp_name = "bf16 autocast" if device.type == "cuda" else "fp32"
    peer.label, peer.batch = f"peer: VisualBertForPreTraining ({amp_name}, eager)", args.batch
    runners.append(peer)
    peer16 = build_peer(sizes["1x"], batches["1x"], device, preds["1x"], bf16_weights=True)
    peer16.label, peer16.batch = "peer: VisualBertForPreTraining (bf16 weights, eager)", args.batch
    runners.append(peer16)
    runners.append(mk(f"bf16 weights, micro-batch {2 * args.batch}", key="2x", ck=static))
    from vltrain.monitor import device_peak_tflops
    peak = device_peak_tflops("bf16") if device.type == "cuda" else None

    def report(rounds: int) -> list[str]:
        ref_sps = runners[0].batch / median(runners[0].times)
        peer_sps = peer.batch / median(peer.times)
        rows = []
        for r in runners:
            t = median(r.times)
            tflops = r.flops_per_step / t / 1e12
            sps = r.batch / t
            rows.append([r.label, r.batch // r.grad_accum, sps, t * 1e3, tflops,
                         100 * tflops / peak if peak else float("nan"), sps / ref_sps, sps / peer_sps])
        return [f"Machine: {machine_description(device)}. Size: {base.name}, {base.regions} regions + {base.text} "
                f"text tokens, sdpa unless a row says otherwise, compiled blocks; {rounds} rounds of "
                f"{args.steps_per_round} steps, interleaved.",
                "", markdown_table(["configuration", "micro-batch", "samples/s", "step ms", "TFLOP/s", "MFU %",
                                    "× first row", "× peer"], rows)]

    def partial(done: int) -> None:
        """The table so far into --out after each round, and the whole table before the
        profiles: a time limit that ends the run (the GPU suite's) keeps it; the finished run
        overwrites it."""
        if args.out:
            note = (f"(cut short: {done} of {args.rounds} rounds done)" if done < args.rounds
                    else "(kernel profiles pending)")
            with open(args.out, "w") as f:
                f.write("\n".join(report(done) + ["", note]) + "\n")

    time_interleaved(runners, device, warmup=3, rounds=args.rounds, log=log,
                     steps_per_round=args.steps_per_round, on_round=partial)
    md = report(args.rounds)
    engines = [r for r in runners if r.engine is not None][:1]
    for r in runners[:2] + triton_rows[-1:] + engines:
        log(f"profiling: {r.label}")
        breakdown = kernel_breakdown(r, device)
        what = "Kernel" if device.type == "cuda" else "Operator"
        md += ["", f"{what} time per step, `{r.label}` at micro-batch {args.batch} (torch profiler, 3 steps):",
               "", breakdown]
    emit_report("\n".join(md), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
