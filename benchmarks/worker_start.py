"""DataLoader workers forked by the rank (torch's default) vs by a forkserver (vltrain's).

    python benchmarks/worker_start.py [--samples 400] [--rank-gb 0 8] [--out worker_start.md]

Every ``iter()`` of a loader starts its workers anew (each epoch, each validation). For each
start method, rank size (memory the rank has touched, standing in for a training process's
model, optimizer and pinned buffers: a fork copies its page tables) and worker count, the
same loader (VLDataLoader over MDS shards, the pretraining collator, base-size samples) is
timed from ``iter()`` to its first batch and over a whole pass. A forkserver worker gets the
dataset and collate function pickled; their sizes are printed too (streaming's dataset grows
with its shard count). The forkserver's own start (it imports torch, streaming and our data
code once per rank) is timed separately: it overlaps whatever the rank does after building
its loaders.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit_report, markdown_table  # noqa: E402
from benchmarks.loader import write_all  # noqa: E402


def _start_and_pass(loader, repeats: int) -> tuple[float, float]:
    """(median ms from iter() to the first batch, samples/s over the whole pass)."""
    firsts, rates = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        it = iter(loader)
        n = len(next(it).input_ids)
        firsts.append((time.perf_counter() - t0) * 1e3)
        for b in it:
            n += len(b.input_ids)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(firsts), statistics.median(rates)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=400)
    ap.add_argument("--regions", type=int, default=100)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rank-gb", type=float, nargs="+", default=[0, 8],
                    help="memory the rank touches before its loaders start (GB)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: CI checks the table is complete")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.regions, args.dim, args.batch, args.rank_gb, args.repeats = 48, 10, 16, 8, [0, 0.05], 2
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from multiprocessing.reduction import ForkingPickler
    from vltrain.config import load_config
    from vltrain.data.collate import PretrainCollator, StreamInfo
    from vltrain.data.datasets import build_dataset
    from vltrain.data.loader import PackInWorkers, VLDataLoader, prepare_streaming_once
    from vltrain.data.worker_signals import worker_context
    from vltrain.tokenization import Tokenizer

    t0 = time.perf_counter()
    ctx = worker_context()
    ctx.Process(target=os.getpid).start()                 # the forkserver's start: its imports
    for p in ctx.active_children():
        p.join()
    server_s = time.perf_counter() - t0

    tok = Tokenizer("bert-base-uncased")
    rows, sizes = [], None
    with tempfile.TemporaryDirectory(prefix="vltrain_workerstart_") as root:
        mds, meta, _ = write_all(root, args.samples, args.regions, args.dim, 1601, layouts=("mds",))
        prepare_streaming_once()
        ballast = []
        for gb in args.rank_gb:
            ballast.clear()
            if gb:
                ballast.append(torch.ones(int(gb * 1e9 / 4)))      # touched: resident while the rows run
            for workers in args.workers:
                for method in ("fork", "forkserver"):
                    cfg = load_config(None, [f"data.train={mds}", f"data.cache_dir={root}/c{gb}{workers}{method}",
                                             f"model.region_feat_dim={args.dim}", "model.num_region_classes=1601",
                                             f"data.max_regions={args.regions}", "objectives.mrc=true"])
                    collator = PretrainCollator(tok, cfg.data, cfg.objectives, 0, [StreamInfo(mds, meta)])
                    ds, _ = build_dataset(cfg, args.batch)
                    if sizes is None:
                        sizes = []
                        for obj in (ds, PackInWorkers(collator)):
                            buf = io.BytesIO()
                            ForkingPickler(buf).dump(obj)
                            sizes.append(len(buf.getvalue()))
                        sizes.append(len(ds.shards))
                    loader = VLDataLoader(ds, collator=collator, batch_size=args.batch, num_workers=workers,
                                          drop_last=True, persistent_workers=False, prefetch_factor=2,
                                          multiprocessing_context=method if method == "fork" else ctx)
                    _start_and_pass(loader, 1)                              # the shards decompressed
                    first, rate = _start_and_pass(loader, args.repeats)
                    label = "fork from the rank (torch's default)" if method == "fork" else "forkserver (vltrain)"
                    rows.append([label, f"{gb:g}", str(workers), f"{first:,.0f}", f"{rate:,.0f}"])
                    del loader, ds
                    print(rows[-1], flush=True)
    table = markdown_table(["workers started by", "rank GB", "workers", "iter() to first batch ms",
                            "samples/s over a pass"], rows)
    note = (f"\n{args.samples} samples ({args.regions} regions x {args.dim} fp16), batch {args.batch}, median of "
            f"{args.repeats} passes. Pickled for each forkserver worker: the dataset {sizes[0]:,} bytes "
            f"({sizes[2]} shards), the collate function {sizes[1]:,} bytes. The forkserver's start "
            f"(once per rank): {server_s:.1f} s.\n")
    emit_report(table + note, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
