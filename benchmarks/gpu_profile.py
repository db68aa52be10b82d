"""Where a training step's GPU time goes: torch profiler over a few steps of ours and the peer.

    python benchmarks/gpu_profile.py --batch 64 [--backend sdpa] [--compile] [--quick]

Profiles ours (compile off, and on with --compile) and the peer. Prints, per model, the
step's wall time, the summed CUDA kernel time (wall minus that is time the GPU waited for
the host) and the top kernels by total CUDA time. Same models, batch and precision as
benchmarks/train_throughput.py (bf16 autocast on CUDA). A diagnosis aid for the throughput
table, not a figure of its own.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import full_size, make_batch, quick_size, sync  # noqa: E402
from benchmarks.train_throughput import build_ours, build_peer  # noqa: E402


def profile_runner(runner, device, steps: int, top: int) -> str:
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):                       # compile, autotune, allocator pools
        runner.step()
    sync(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            runner.step()
        sync(device)
        wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    kernel_us = sum(getattr(e, attr) for e in events if e.device_type == torch.autograd.DeviceType.CUDA) \
        if device.type == "cuda" else float("nan")
    head = (f"{runner.model} [{runner.label}]: step {wall * 1e3:.2f} ms, CUDA kernels "
            f"{kernel_us / steps / 1e3:.2f} ms/step ({kernel_us / steps / 1e6 / wall:.0%} of the step busy)")
    table = events.table(sort_by=attr, row_limit=top, max_name_column_width=70)
    return head + "\n" + table


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--backend", default="sdpa")
    p.add_argument("--compile", action="store_true", help="profile ours with compile=true too")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    size = dataclasses.replace(quick_size() if args.quick else full_size(), batch=args.batch)
    batch = make_batch(size, seed=0)
    n_pred = int(batch.mlm_positions.numel())
    builds = [lambda: build_ours(size, args.backend, False, batch, device, n_pred)]
    if args.compile:
        builds.append(lambda: build_ours(size, args.backend, True, batch, device, n_pred))
    builds.append(lambda: build_peer(size, batch, device, n_pred))
    for build in builds:
        r = build()
        print(profile_runner(r, device, args.steps, args.top), flush=True)
        from torch._dynamo.utils import counters
        if counters["graph_break"]:
            print("graph breaks:", dict(counters["graph_break"]), flush=True)
        del r
        torch.cuda.empty_cache() if device.type == "cuda" else None
    return 0


if __name__ == "__main__":
    sys.exit(main())
