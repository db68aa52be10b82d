"""Memory and start time that a dataset's shard count costs every process that holds it.

    python benchmarks/shard_metadata.py [--shards 1000 8000] [--update-benchmarks]

streaming's dataset keeps a reader object per shard (its files, sizes, hashes, columns) in
every rank and, pickled and rebuilt, in every DataLoader worker at each ``iter()`` (epoch,
validation). For datasets of N one-sample shards (the converters' writer, a tiny
``--size-limit``), this measures per shard: index.json bytes, Python memory of the rank's
dataset (tracemalloc), bytes pickled for a worker, and the worker's unpickle time and memory;
for vltrain's ``build_dataset`` and, as the peer, streaming's own ``StreamingDataset`` over the
same index. Then projects the figures to a CC12M-size region-feature corpus.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import os
import pickle
import sys
import tempfile
import time
import tracemalloc

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit_report  # noqa: E402
from vltrain.profiling import markdown_table  # noqa: E402

SECTION = "## Shard metadata per process"
CC12M = 12_000_000          # samples
SAMPLE_MB = 0.4             # 100 regions x 2048 float16 features, before compression


def _traced(build):
    """(object, bytes of Python memory it holds, seconds) of ``build()``."""
    gc.collect()
    tracemalloc.start()
    t0 = time.perf_counter()
    obj = build()
    dt = time.perf_counter() - t0
    gc.collect()
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return obj, held, dt


def write_shards(out: str, n: int) -> str:
    """``n`` captions samples, one a shard (2 regions, 8-wide features), hashed as the converters do."""
    from benchmarks.loader import make_samples
    from data_tools.common import open_writer
    from vltrain.data import schema
    meta = schema.make_meta("captions", 8, 5, ("cls_prob",))
    with open_writer(out, "captions", ("cls_prob",), meta, size_limit=1 << 10) as w:
        for s in make_samples(n, 2, 8, 5):
            w.write(s)
    return out


def measure(path: str, cache: str) -> dict[str, dict]:
    from streaming import StreamingDataset
    from vltrain.config import Config
    from vltrain.data.datasets import build_dataset
    cfg = Config()
    cfg.data.train, cfg.data.cache_dir = path, cache
    cfg.model.region_feat_dim, cfg.model.num_region_classes = 8, 5
    builds = {"vltrain build_dataset": lambda: build_dataset(cfg, 4)[0],
              "peer: streaming StreamingDataset": lambda: StreamingDataset(local=path, batch_size=4)}
    out = {}
    for name, build in builds.items():
        ds, held, build_s = _traced(build)
        blob = pickle.dumps(ds)
        worker, worker_held, unpickle_s = _traced(lambda: pickle.loads(blob))
        out[name] = {"shards": len(ds.shards), "held": held, "pickled": len(blob), "worker_held": worker_held,
                     "unpickle_s": unpickle_s, "build_s": build_s}
        del ds, worker
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=int, nargs="+", default=[1000, 8000])
    p.add_argument("--quick", action="store_true", help="small counts (CI): the table is complete")
    p.add_argument("--out", help="write the Markdown section here too")
    p.add_argument("--update-benchmarks", action="store_true", help="write the section into BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.quick:
        args.shards = [40, 120]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import streaming
    rows, per_shard = [], {}
    with tempfile.TemporaryDirectory(prefix="vltrain_shardmeta_") as root:
        for n in args.shards:
            path = write_shards(os.path.join(root, f"ds{n}"), n)
            index = os.path.getsize(os.path.join(path, "index.json"))
            for name, m in measure(path, os.path.join(root, f"cache{n}")).items():
                k = m["shards"]
                per_shard[name] = {"index": index / k, "held": m["held"] / k, "worker": m["worker_held"] / k,
                                   "unpickle_ms": 1e3 * m["unpickle_s"] / k}
                rows.append([name, f"{k:,}", f"{index / k:,.0f}", f"{m['held'] / k / 1024:.2f}",
                             f"{m['pickled'] / k:,.0f}", f"{m['worker_held'] / k / 1024:.2f}",
                             f"{1e3 * m['unpickle_s'] / k:.3f}", f"{m['build_s']:.2f}"])
                print(rows[-1], flush=True)
    ours = per_shard["vltrain build_dataset"]
    proj = []
    for limit_mb in (64, 256):
        shards = CC12M / max(1, int(limit_mb / SAMPLE_MB))
        proj.append(f"at `--size-limit {limit_mb}mb` ~{shards / 1e3:,.0f}k shards: index.json "
                    f"~{shards * ours['index'] / 1e6:,.0f} MB, ~{shards * ours['worker'] / 2**20:,.0f} MB in each "
                    f"rank and worker ({72 * shards * ours['worker'] / 2**30:,.1f} GB on a node of 8 ranks x 8 "
                    f"workers), each worker start ~{shards * ours['unpickle_ms'] / 1e3:,.1f} s of unpickling")
    text = "\n".join([
        SECTION, "",
        f"Measured {datetime.date.today()}, `python benchmarks/shard_metadata.py` (streaming "
        f"{streaming.__version__}, Python {sys.version.split()[0]}): datasets of one-sample shards written by the converters' "
        f"writer, read locally; per shard: index.json bytes, the rank's dataset (Python memory, tracemalloc), "
        f"what a forkserver DataLoader worker is sent, and its unpickling (memory and time; every `iter()` "
        f"starts workers anew: each epoch, each validation).", "",
        markdown_table(["dataset object", "shards", "index.json B/shard", "rank KB/shard", "pickled B/shard",
                        "worker KB/shard", "worker unpickle ms/shard", "build s"], rows), "",
        f"- vltrain's dataset costs what streaming's own does per shard: the reader objects are streaming's. "
        f"Projected to a CC12M-size corpus of region features ({CC12M / 1e6:.0f} M samples of ~{SAMPLE_MB} MB "
        f"before compression): " + "; ".join(proj) + ". The converters' default is 64 MB; a corpus of that "
        "size is better written with `--size-limit 256mb` (each shard download 4x larger: the cache's "
        "headroom, `data.cache_limit`, grows with it).",
    ])
    emit_report(text, args.out, SECTION if args.update_benchmarks else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
