"""The DeepSpeed engine's host time per step, beside the model's own loop, where the host dominates.

    python benchmarks/engine_overhead.py [--layers 12] [--rounds 15] [--quick] [--out F.md]

On an H100 at micro-batch 256 the engine step (ZeRO-2, bf16) took 87-90 ms against 69 ms
for the same model's own loop: DeepSpeed's ZeRO-1/2 do Python work and launch kernels per
parameter (a gradient hook, a bucket copy, a norm, a copy back to the bf16 weights), and the
GPU waited for the host. That overhead depends on the number of parameter tensors and layers,
not on the hidden size, so this script measures it on any machine with BERT-base's layer count
and a tiny hidden size (32), batch 2, fp32: the step's compute is negligible and what is left
is host time. Rows: the model's own loop (torch's fused AdamW) and the engine under ZeRO-0/1/2
as ``vltrain/run.py`` builds it; all in one process, timed round-robin. Beside the times, two
counts per step that do not depend on the machine's load: Python function calls (cProfile)
and aten operators dispatched (torch profiler; on a GPU each is a kernel launch or more).

A second table: the trainer's step feed (vltrain/engine/step_feed.py, the step's token counts
under ``objectives.loss_reduction=token``) per micro-batch, beside the same feed passing
batches through (``example``), at a base-size micro-batch (64 x 100 regions + 40 tokens) and
grad_accum 1 and 8: host time only (one rank, batches already collated; the all-reduce of the
counts, one per step on the device, is not in it).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import Size, emit_report, machine_description, make_batch, markdown_table, median, \
    time_interleaved  # noqa: E402
from benchmarks.train_throughput import build_engine, build_ours, init_single_process_group  # noqa: E402
from vltrain.config import ModelConfig, debug_model_config  # noqa: E402
from vltrain.engine.device_copy import DeviceCopier  # noqa: E402
from vltrain.engine.step_feed import EPOCH_END, StepFeed  # noqa: E402
from vltrain.objectives.reduce import token_counts  # noqa: E402


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def host_work(step, steps: int = 5) -> tuple[float, float]:
    """(Python function calls, aten operators) per step."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(steps):
        step()
    prof.disable()
    calls = pstats.Stats(prof).total_calls / steps
    with profile(activities=[ProfilerActivity.CPU]) as tp:
        for _ in range(steps):
            step()
    ops = sum(e.count for e in tp.key_averages() if e.key.startswith("aten::")) / steps
    return calls, ops


def feed_times(grad_accum: int, rounds: int, steps: int) -> tuple[list[float], list[float]]:
    """Seconds per micro-batch of ``StepFeed.fetch`` + ``take``: counting, passing through;
    interleaved rounds of ``steps`` optimizer steps each, an epoch ending every 10 steps."""
    batch = make_batch(Size("base", ModelConfig(), batch=64, regions=100, text=40), seed=1)

    def stream():
        while True:
            for _ in range(10 * grad_accum):
                yield batch
            yield EPOCH_END
    feeds = [StepFeed(stream(), DeviceCopier(torch.device("cpu")), grad_accum, 1, counts, contextlib.nullcontext)
             for counts in (token_counts, None)]
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(rounds + 1):                             # round 0 warms up
        for feed, out in zip(feeds, times):
            t0 = time.perf_counter()
            for _ in range(steps * grad_accum):
                feed.take(feed.fetch())
            if i:
                out.append((time.perf_counter() - t0) / (steps * grad_accum))
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=12, help="transformer layers (BERT-base: 12)")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--steps-per-round", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="2 layers, 3 rounds of 2 steps (CI)")
    p.add_argument("--out", help="write the Markdown report here too")
    args = p.parse_args(argv)
    if args.quick:
        args.layers, args.rounds, args.steps_per_round = 2, 3, 2
    device = torch.device("cpu")
    torch.set_num_threads(1)            # host time of one process, as a GPU job's launching thread
    model = debug_model_config(num_layers=args.layers, hidden_size=32, num_heads=2, intermediate_size=64)
    size = Size(f"{args.layers} layers, hidden 32", model, batch=2, regions=4, text=6)
    batch = make_batch(size, seed=0)
    preds = int(batch.mlm_positions.numel())
    init_single_process_group(device)

    log("building: the model's own loop")
    own = build_ours(size, "sdpa", False, batch, device, preds, bf16_weights=False)
    own.label = "model's own loop (fused AdamW)"
    runners = [own]
    for stage in (0, 1, 2):
        log(f"building: DeepSpeed engine ZeRO-{stage}")
        r = build_engine(size, batch, device, preds, stage=stage)
        r.label = f"DeepSpeed engine, ZeRO-{stage}" + (" (vltrain/run.py's default)" if stage == 2 else "")
        runners.append(r)
    time_interleaved(runners, device, warmup=3, rounds=args.rounds, log=log, steps_per_round=args.steps_per_round)

    n_tensors = sum(1 for q in own.module.parameters() if q.requires_grad)
    ref = median(own.times)
    work = [host_work(r.step) for r in runners]
    rows = [[r.label, median(r.times) * 1e3, median(r.times) / ref, (median(r.times) - ref) * 1e3, calls, ops]
            for r, (calls, ops) in zip(runners, work)]
    md = [f"Machine: {machine_description(device)}. Model: {size.name} ({n_tensors} parameter tensors), "
          f"batch {size.batch} x {size.seq_len} positions, fp32; {args.rounds} rounds of {args.steps_per_round} "
          "steps, interleaved.", "",
          markdown_table(["configuration", "step ms (median)", "× own loop", "engine's extra ms",
                          "Python calls / step", "aten ops / step"], rows)]
    feed_rows = []
    for accum in (1, 8):
        counting, passing = (median(t) * 1e6 for t in feed_times(accum, args.rounds, 20))
        feed_rows.append([accum, counting, passing, counting - passing])
    md += ["", "The step feed per micro-batch (base-size micro-batch 64 x 100 regions + 40 tokens, host time, "
           f"one rank; median of {args.rounds} rounds of 20 steps, interleaved):", "",
           markdown_table(["grad_accum", "µs, counting (token means)", "µs, passing through (example)",
                           "counting's extra µs"], feed_rows)]
    emit_report("\n".join(md), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
