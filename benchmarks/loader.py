"""Data-path throughput: our streaming loader with collation vs the reference code's layouts.

    python benchmarks/loader.py [--samples 1000] [--regions 100] [--dim 2048] [--classes 1601] [--out loader.md]

Every reader produces the same pretraining batches (the same ``PretrainCollator``:
tokenise, mode, MLM, region masking, padding) from the same samples; what differs is
where the region features come from:

  ours   MDS shards (zstd, float16) read through ``StreamingDataset`` from its local cache
  hdf5   one HDF5 file, (N, regions, dim) float16, random access per sample (LXMERT/VLP style)
  npy    one ``.npy`` per image (VL-BERT / bottom-up style), random order

each with 1 and 2 DataLoader workers, measured in the same run. Then one worker with the
collator's large tensors new every batch vs recycled (vltrain's ``ScratchPool``); what the
trainer's process pays per batch from a worker (each tensor in its own shared-memory
segment, torch's default, vs VLDataLoader's one packed buffer); and how long a thread that
frees a batch's shared memory holds up the training thread (plain deallocation vs vltrain's
GIL-free release).
Every sample also carries its regions' class distributions (fp16, ``--classes`` 1601 as
VLP's Visual Genome detector: another ~320 KB at 100 regions, read from the same files as
the features in every layout). The figure that matters on a GPU node: at 100 regions x 2048
fp16 (~400 KB/sample), 5,700 samples/s per H100 needs ~2.3 GB/s of features per GPU, so
``workers per GPU = needed / (rate per worker)``.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit_report  # noqa: E402
from vltrain.data.collate import PretrainCollator  # noqa: E402

GPU_SAMPLES_PER_S = 5700            # 45% MFU on one H100 at vltrain.monitor's 7.83e10 FLOPs/sample


def make_samples(n, regions, dim, classes=1601, seed=0, words=10):
    """Caption samples with realistic region sizes (features and class distributions float16)."""
    from tests.fixtures.mds import WORDS
    rng = np.random.default_rng(seed)
    for i in range(n):
        xy = rng.random((regions, 2)) * 0.5
        p = rng.random((regions, classes)) + 1e-3
        yield {"sample_id": i, "image_id": f"img{i}", "image_w": 640, "image_h": 480,
               "features": rng.standard_normal((regions, dim)).astype(np.float16),
               "boxes": np.concatenate([xy, xy + 0.3], 1).astype(np.float32),
               "cls_prob": (p / p.sum(1, keepdims=True)).astype(np.float16),
               "captions": [" ".join(rng.choice(WORDS, words)) for _ in range(5)]}


def write_all(root, n, regions, dim, classes, layouts=("mds", "hdf5", "npy"), words=10):
    """The same samples as MDS shards (our writer), one HDF5 file, and one .npy per image
    (``layouts``: which of them)."""
    import contextlib
    import h5py
    from data_tools.common import open_writer
    from vltrain.data import schema
    mds = os.path.join(root, "mds")
    meta = schema.make_meta("captions", dim, classes, ("cls_prob",))
    side = []
    with contextlib.ExitStack() as stack:
        w = stack.enter_context(open_writer(mds, "captions", ("cls_prob",), meta)) if "mds" in layouts else None
        if "hdf5" in layouts:
            h5 = stack.enter_context(h5py.File(os.path.join(root, "feats.h5"), "w"))
            feats = h5.create_dataset("features", (n, regions, dim), dtype="float16", chunks=(1, regions, dim))
            cls = h5.create_dataset("cls_prob", (n, regions, classes), dtype="float16", chunks=(1, regions, classes))
        if "npy" in layouts:
            os.makedirs(os.path.join(root, "npy"))
        for s in make_samples(n, regions, dim, classes, words=words):
            i = s["sample_id"]
            if w is not None:
                w.write(s)
            if "hdf5" in layouts:
                feats[i], cls[i] = s["features"], s["cls_prob"]
            if "npy" in layouts:
                np.save(os.path.join(root, "npy", f"{i}.npy"), s["features"])
                np.save(os.path.join(root, "npy", f"{i}_cls.npy"), s["cls_prob"])
            side.append({k: v for k, v in s.items() if k not in ("features", "cls_prob")})
    return mds, meta, side


class FileDataset(torch.utils.data.Dataset):
    """The reference layouts: features and class distributions from HDF5 / .npy files (as the
    papers' code reads them), captions and boxes from a side table."""

    def __init__(self, side, kind, root):
        self.side, self.kind, self.root = side, kind, root
        self.h5 = None

    def __len__(self):
        return len(self.side)

    def __getitem__(self, i):
        s = dict(self.side[i])
        if self.kind == "hdf5":
            if self.h5 is None:               # opened per worker process
                import h5py
                self.h5 = h5py.File(os.path.join(self.root, "feats.h5"), "r")
            s["features"], s["cls_prob"] = self.h5["features"][i], self.h5["cls_prob"][i]
        else:
            s["features"] = np.load(os.path.join(self.root, "npy", f"{i}.npy"))
            s["cls_prob"] = np.load(os.path.join(self.root, "npy", f"{i}_cls.npy"))
        return s


def timed(loader, limit):
    n, nbytes = 0, 0
    t0 = time.perf_counter()
    for batch in loader:
        n += batch.batch_size
        nbytes += batch.region_feats.numel() * batch.region_feats.element_size()
        if n >= limit:
            break
    dt = time.perf_counter() - t0
    return n / dt, nbytes / dt / 1e6


def receive_cost(loader, step_s):
    """What ``next(loader)`` costs the trainer's process while the workers are ahead (it sleeps
    ``step_s`` per batch, as a GPU step would): median main-thread CPU ms and wall ms per batch.
    The previous batch is freed inside the timed span, as in a training loop."""
    it = iter(loader)
    batch = next(it)
    cpu, wall = [], []
    while True:
        time.sleep(step_s)
        c, w = time.thread_time(), time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            break
        cpu.append(time.thread_time() - c)
        wall.append(time.perf_counter() - w)
    del it, batch
    return float(np.median(cpu)) * 1e3, float(np.median(wall)) * 1e3, len(cpu)


class FreshCollator(PretrainCollator):
    """The collator as before vltrain recycled its large tensors in workers: ``scratch``
    stays None whatever ``PackInWorkers`` sets (the peer of the recycling rows). At module
    level: workers unpickle it (they import this script as ``__mp_main__``)."""
    scratch = property(lambda self: None, lambda self, value: None)


def make_fresh_collator(base: PretrainCollator) -> FreshCollator:
    fresh = object.__new__(FreshCollator)
    fresh.__dict__.update({k: v for k, v in vars(base).items() if k != "scratch"})
    return fresh


def free_stall(nbytes: int, release: bool, reps: int = 3) -> tuple[float, float]:
    """A thread drops a batch-sized shared-memory buffer (as the pinning thread does after
    copying a batch) while another thread spins (the training thread launching kernels):
    median ms the drop takes, and the longest the spinning thread was held up (the GIL). With
    ``release`` the pages are first given back by vltrain's GIL-free ``release_shared_pages``."""
    import threading
    from vltrain.data.packed import release_shared_pages, shared_buffer
    bufs = [shared_buffer(nbytes).fill_(1) for _ in range(reps)]     # written, as a worker writes a batch
    stop, worst, took = threading.Event(), [0.0], []

    def spin():
        last = time.perf_counter()
        while not stop.is_set():
            now = time.perf_counter()
            worst[0] = max(worst[0], now - last)
            last = now

    def drop():
        while bufs:
            b = bufs.pop()
            t0 = time.perf_counter()
            if release:
                release_shared_pages(b)
            del b
            took.append(time.perf_counter() - t0)
            time.sleep(0.05)

    spinner = threading.Thread(target=spin)
    spinner.start()
    time.sleep(0.05)
    dropper = threading.Thread(target=drop)
    dropper.start()
    dropper.join()
    stop.set()
    spinner.join()
    return float(np.median(took)) * 1e3, worst[0] * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--regions", type=int, default=100)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--classes", type=int, default=1601,
                    help="detector classes of the class distributions (Visual Genome's 1600 + background)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--step-s", type=float, default=0.25,
                    help="the trainer's step time in the receive-cost rows (workers stay ahead)")
    ap.add_argument("--out", default=None, help="write the Markdown table here too")
    args = ap.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    from vltrain.config import load_config
    from vltrain.data.collate import PretrainCollator, StreamInfo
    from vltrain.data.datasets import build_dataset
    from vltrain.data.loader import VLDataLoader, prepare_streaming_once
    from vltrain.tokenization import Tokenizer

    tok = Tokenizer("bert-base-uncased")
    rows = []
    with tempfile.TemporaryDirectory(prefix="vltrain_loaderbench_") as root:
        t0 = time.time()
        mds, meta, side = write_all(root, args.samples, args.regions, args.dim, args.classes)
        print(f"wrote {args.samples} samples ({args.regions}x{args.dim} fp16) three ways in "
              f"{time.time() - t0:.0f}s", flush=True)
        for workers in (1, 2):
            cfg = load_config(None, [f"data.train={mds}", f"data.cache_dir={root}/cache{workers}",
                                     f"model.region_feat_dim={args.dim}", f"model.num_region_classes={args.classes}",
                                     f"data.max_regions={args.regions}", "objectives.mrc=true",
                                     f"data.num_workers={workers}"])
            collator = PretrainCollator(tok, cfg.data, cfg.objectives, 0, [StreamInfo(mds, meta)])
            prepare_streaming_once()
            ds, _ = build_dataset(cfg, args.batch)
            loader = VLDataLoader(ds, collator=collator, batch_size=args.batch, num_workers=workers,
                                  drop_last=True, persistent_workers=False, prefetch_factor=2)
            timed(loader, args.batch * 2)                      # warm the cache (shards decompressed)
            rows.append(("ours: MDS + StreamingDataset", workers, *timed(loader, args.samples - args.batch)))
            del loader, ds
            for kind in ("hdf5", "npy"):
                fds = FileDataset(side, kind, root)
                coll = PretrainCollator(tok, cfg.data, cfg.objectives, 0, [StreamInfo(kind, meta)])
                dl = torch.utils.data.DataLoader(fds, batch_size=args.batch, num_workers=workers,
                                                 collate_fn=coll, sampler=torch.utils.data.RandomSampler(fds),
                                                 drop_last=True, prefetch_factor=2)
                label = "HDF5 random access" if kind == "hdf5" else ".npy per image"
                rows.append((label, workers, *timed(dl, args.samples - args.batch)))
            print(f"workers={workers} done", flush=True)

        # What the trainer's process pays per batch: each tensor in its own shared segment
        # (torch's default) vs the batch packed into one (VLDataLoader's workers).
        receive = []
        for workers in (1, 2):
            for packed in (False, True):
                cfg = load_config(None, [f"data.train={mds}", f"data.cache_dir={root}/recv{workers}{packed}",
                                         f"model.region_feat_dim={args.dim}", f"model.num_region_classes={args.classes}",
                                         f"data.max_regions={args.regions}", "objectives.mrc=true"])
                collator = PretrainCollator(tok, cfg.data, cfg.objectives, 0, [StreamInfo(mds, meta)])
                loader = VLDataLoader(build_dataset(cfg, args.batch)[0], collator=collator, batch_size=args.batch,
                                      num_workers=workers, drop_last=True, prefetch_factor=2)
                if not packed:
                    loader.collate_fn = collator
                receive.append((workers, packed, *receive_cost(loader, args.step_s)))
                del loader

        # Single-process component costs (one core, no worker IPC): read one sample, collate one.
        torch.set_num_threads(1)
        cfg = load_config(None, [f"data.train={mds}", f"data.cache_dir={root}/cache_c",
                                 f"model.region_feat_dim={args.dim}", f"model.num_region_classes={args.classes}",
                                 f"data.max_regions={args.regions}", "objectives.mrc=true"])
        ds, _ = build_dataset(cfg, args.batch, shuffle=False)
        readers = {"ours: MDS + StreamingDataset": lambda i: ds[i],
                   "HDF5 random access": FileDataset(side, "hdf5", root).__getitem__,
                   ".npy per image": FileDataset(side, "npy", root).__getitem__}
        order = np.random.default_rng(0).permutation(args.samples)
        coll = PretrainCollator(tok, cfg.data, cfg.objectives, 0, [StreamInfo(mds, meta)])
        parts = []
        for name, read in readers.items():
            for i in order[:64]:
                read(int(i))                                   # warm caches / open files
            t0 = time.perf_counter()
            items = [read(int(i)) for i in order]
            t_read = (time.perf_counter() - t0) / len(order)
            t0 = time.perf_counter()
            for k in range(0, len(items) - args.batch + 1, args.batch):
                coll(items[k:k + args.batch])
            t_coll = (time.perf_counter() - t0) / (len(items) // args.batch * args.batch)
            parts.append((name, t_read * 1e3, t_coll * 1e3))
        del ds
        # A worker's batch assembly (collate + copy into the shared buffer) with the collator's
        # large tensors new every batch vs recycled, one worker, same run.
        assembly = []
        for b in (args.batch, 4 * args.batch):
            for recycled in (False, True, False, True):
                cfg = load_config(None, [f"data.train={mds}", f"data.cache_dir={root}/asm{b}{recycled}{len(assembly)}",
                                         f"model.region_feat_dim={args.dim}", f"model.num_region_classes={args.classes}",
                                         f"data.max_regions={args.regions}", "objectives.mrc=true"])
                collator = PretrainCollator(tok, cfg.data, cfg.objectives, 0, [StreamInfo(mds, meta)])
                loader = VLDataLoader(build_dataset(cfg, b)[0], batch_size=b, num_workers=1, drop_last=True,
                                      collator=collator if recycled else make_fresh_collator(collator),
                                      persistent_workers=False, prefetch_factor=2)
                timed(loader, 2 * b)
                assembly.append((b, recycled, timed(loader, args.samples - b)[0]))
                del loader

    per_sample_mb = args.regions * args.dim * 2 / 1e6
    cls_mb = args.regions * args.classes * 2 / 1e6
    stalls = []
    for b in (args.batch, 256):
        nbytes = int(b * (per_sample_mb + cls_mb) * 1e6)
        for release in (False, True):
            stalls.append((b, nbytes, release, *free_stall(nbytes, release)))
    need = GPU_SAMPLES_PER_S * per_sample_mb
    lines = [f"| reader (same collation) | workers | samples/s | features MB/s | workers per GPU for {GPU_SAMPLES_PER_S} samples/s |",
             "|---|---|---|---|---|"]
    for name, w, sps, mbs in rows:
        per_worker = sps / w
        lines.append(f"| {name} | {w} | {sps:,.0f} | {mbs:,.0f} | {GPU_SAMPLES_PER_S / per_worker:,.1f} |")
    lines += ["", "| reader, one process, one thread | read ms/sample | collate ms/sample | samples/s per core | cores per GPU for "
              f"{GPU_SAMPLES_PER_S} samples/s |", "|---|---|---|---|---|"]
    for name, r, c in parts:
        per_core = 1e3 / (r + c)
        lines.append(f"| {name} | {r:.3f} | {c:.3f} | {per_core:,.0f} | {GPU_SAMPLES_PER_S / per_core:.1f} |")
    lines += ["", "| one worker, collator's large tensors | batch | samples/s |", "|---|---|---|"]
    for b, recycled, sps in assembly:
        how = "recycled between batches (vltrain)" if recycled else "new every batch"
        lines.append(f"| {how} | {b} | {sps:,.0f} |")
    lines += ["", "| batch transfer (worker -> trainer) | workers | trainer's CPU ms per batch | next() wall ms "
              "| batches |",
              "|---|---|---|---|---|"]
    for w, packed, cpu, wall, n in receive:
        how = "packed: one shared buffer (vltrain)" if packed else "per tensor (torch's default)"
        lines.append(f"| {how} | {w} | {cpu:.2f} | {wall:.2f} | {n} |")
    lines += ["", "| freeing a batch's shared memory (pinning thread) | batch | MB | ms to free "
              "| longest stall of the training thread ms |",
              "|---|---|---|---|---|"]
    for b, nbytes, release, took, worst in stalls:
        how = ("pages given back without the GIL, then dropped (vltrain)" if release
               else "dropped (tensor deallocation, GIL held)")
        lines.append(f"| {how} | {b} | {nbytes / 1e6:,.0f} | {took:.1f} | {worst:.1f} |")
    table = "\n".join(lines)
    note = (f"\n{args.samples} samples, {args.regions} regions x {args.dim} fp16 = {per_sample_mb:.2f} MB/sample of "
            f"features plus {args.regions} x {args.classes} fp16 = {cls_mb:.2f} MB of class distributions, "
            f"batch {args.batch}; one H100 at {GPU_SAMPLES_PER_S} samples/s needs {need / 1e3:.2f} GB/s of features.\n")
    emit_report(table + note, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
