"""Checkpoint save and load: time and bytes per rank, ZeRO 0..3, beside a plain torch.save.

    python benchmarks/checkpoint_io.py [--quick] [--rounds 5] [--out F.md] [--update-benchmarks]

What a stop signal's checkpoint must fit in: Slurm's GraceTime on preemption, KillWait after a
cancel or the time limit (README, "Preemption"); the run logs each save's time too
(``perf/checkpoint_save_s``). Two gloo ranks on CPU (spawned here), the base-size model in
fp32 after one training step, written to ``--dir`` (default: a temporary folder on the disk
of ``/tmp``). Rows:
  * vltrain's save (``vltrain.engine.checkpoint.save``: DeepSpeed's ``save_checkpoint`` on
    every rank, the per-rank state, the completion record) and DeepSpeed's
    ``load_checkpoint`` + the rank state, for ZeRO-0/1/2/3 as ``vltrain/run.py`` builds them;
  * the peer: what a hand-written trainer does, rank 0 ``torch.save`` of the model's and
    torch AdamW's state dicts (same model, same step), and ``torch.load`` of it.
Times are the median over ``--rounds`` saves (each into a fresh tag, the page cache written
back and dropped after each where the machine allows it: root); ``--quick`` uses the debug
model (CI).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import Size, emit_report, full_size, machine_description, make_batch, markdown_table, \
    median, quick_size, run_two_ranks  # noqa: E402

SECTION = "## Checkpoint save and load"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _drop_caches() -> bool:
    """Write back and drop the page cache (root only), so a load reads the disk, as a
    resumed job on another node does."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _rank_bytes(tag_dir: str, world: int) -> list[int]:
    """Bytes of the files each rank wrote: DeepSpeed's ``zero_pp_rank_<r>_*`` and our
    ``vltrain_rank<r>.pt`` by rank r; ``mp_rank_00_model_states.pt`` (ZeRO 0-2), the config
    and the completion record by rank 0."""
    out = [0] * world
    for name in os.listdir(tag_dir):
        m = re.search(r"zero_pp_rank_(\d+)_", name) or re.search(r"rank(\d{5})\.pt$", name)
        out[int(m.group(1)) if m else 0] += os.path.getsize(os.path.join(tag_dir, name))
    return out


def worker(out: str, quick: bool, rounds: int, where: str) -> None:
    """One rank: per ZeRO stage, build + one step, then ``rounds`` saves and loads; the peer
    on rank 0. Rank 0 writes the JSON."""
    import torch.distributed as dist
    from benchmarks.train_throughput import stepped_zero_engine
    from vltrain.config import Config
    from vltrain.engine import checkpoint as ckpt
    from vltrain.engine.distributed import init_distributed
    from vltrain.model import VLModel
    from vltrain.tasks.pretrain import PretrainTask

    info = init_distributed(600)
    size: Size = quick_size() if quick else full_size()
    cfg = Config(model=size.model)
    cfg.train.micro_batch_size = size.batch
    batch = make_batch(size, seed=1 + info.rank).to("cpu")
    res: dict = {"size": size.name, "rounds": rounds, "stages": {}}

    sync_times: list[float] = []      # every rank syncs its files (a collective: the slowest's time)
    sync_written = ckpt.sync_written

    def timed_sync_written(*args) -> None:
        t0 = time.perf_counter()
        sync_written(*args)
        sync_times.append(time.perf_counter() - t0)
    ckpt.sync_written = timed_sync_written

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    for stage in (0, 1, 2, 3):
        log(f"rank {info.rank}: ZeRO-{stage}")
        engine, res["num_params"] = stepped_zero_engine(cfg, stage, info.world, batch)
        save_dir = os.path.join(where, f"zero{stage}")
        saves, loads, cold = [], [], True
        del sync_times[:]
        for r in range(rounds):
            tag = f"step_{r + 1:08d}"
            saves.append(timed(lambda: ckpt.save(
                engine, save_dir, tag, step=r + 1, cfg=cfg, rank_state={"loader": {}},
                info={"world_size": info.world, "zero_stage": stage}, rank=info.rank,
                keep_last=rounds)))
            if info.rank == 0:
                cold = _drop_caches() and cold
            loads.append(timed(lambda: (engine.load_checkpoint(save_dir, tag=tag),
                                        ckpt.load_rank_state(os.path.join(save_dir, tag), info.rank, info.world, info.world))))
        tag_dir = os.path.join(save_dir, f"step_{rounds:08d}")
        res["stages"][str(stage)] = {"save_s": median(saves), "sync_s": median(sync_times) if sync_times else None,
                                     "load_s": median(loads), "saves": saves,
                                     "loads": loads, "rank_bytes": _rank_bytes(tag_dir, info.world),
                                     "total_bytes": _dir_bytes(tag_dir), "cold_load": cold}
        engine.destroy()
        engine = None
        gc.collect()
        if info.rank == 0:
            shutil.rmtree(save_dir, ignore_errors=True)

    if info.rank == 0:   # the peer: one process, the whole model + AdamW state in one file
        log("rank 0: peer torch.save / torch.load")
        torch.manual_seed(0)
        task = PretrainTask(VLModel(cfg.model), cfg.objectives)
        opt = torch.optim.AdamW(task.parameters(), lr=1e-4)
        loss, _ = task(batch)
        loss.backward()
        opt.step()
        saves, syncs, loads, cold = [], [], [], True
        for r in range(rounds):
            # a new file each round, as each of vltrain's saves is a new tag: rewriting one file
            # in place makes ext4 start its write-back at close() (auto_da_alloc), which hid
            # most of the fsync's work (0.04 s against ~0.5 s for vltrain's new files)
            path = os.path.join(where, f"peer{r}.pt")
            t0 = time.perf_counter()
            torch.save({"model": task.state_dict(), "optimizer": opt.state_dict()}, path)
            t1 = time.perf_counter()
            ckpt.sync_tree(where)    # synced as vltrain's are (its folder holds only this file now)
            saves.append(time.perf_counter() - t0)
            syncs.append(time.perf_counter() - t1)
            cold = _drop_caches() and cold
            t0 = time.perf_counter()
            state = torch.load(path, map_location="cpu", weights_only=True)
            task.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            loads.append(time.perf_counter() - t0)
            size = os.path.getsize(path)
            os.remove(path)
        res["peer"] = {"save_s": median(saves), "sync_s": median(syncs), "load_s": median(loads),
                       "saves": saves, "loads": loads, "total_bytes": size, "cold_load": cold}
        with open(out, "w") as f:
            json.dump(res, f)
    dist.barrier()


def run_ranks(args) -> dict:
    where = tempfile.mkdtemp(prefix="vltrain_ckpt_io_", dir=args.dir)
    out = os.path.join(where, "result.json")
    try:
        run_two_ranks([os.path.abspath(__file__), "--worker", out, "--rounds", str(args.rounds), "--dir", where]
                      + (["--quick"] if args.quick else []), "checkpoint worker", args.timeout)
        with open(out) as f:
            return json.load(f)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def report(res: dict, args) -> str:
    mb = 1e6
    rows = []
    for st in ("0", "1", "2", "3"):
        r = res["stages"][st]
        rows.append([f"vltrain save, ZeRO-{st}" + (" (run.py's default)" if st == "2" else ""),
                     r["save_s"], r["sync_s"], r["load_s"], max(r["rank_bytes"]) / mb, r["total_bytes"] / mb])
    p = res["peer"]
    rows.append(["peer: rank 0 torch.save(model + AdamW state dicts), then fsync", p["save_s"], p["sync_s"],
                 p["load_s"], p["total_bytes"] / mb, p["total_bytes"] / mb])
    cold = all(r["cold_load"] for r in (*res["stages"].values(), p))
    st = res["stages"]
    zero0, zero2, zero3, peer = st["0"], st["2"], st["3"], res["peer"]
    lines = [SECTION, "",
             f"Measured {time.strftime('%Y-%m-%d')} on {machine_description(torch.device('cpu'))}; "
             f"`python benchmarks/checkpoint_io.py{' --quick' if args.quick else ''}`: {res['size']} model, "
             f"{res['num_params'] / 1e6:.1f} M parameters, fp32, 2 ranks (gloo, DeepSpeed on CPU, one thread each), "
             f"after one training step; median of {res['rounds']} saves and loads.", "",
             markdown_table(["checkpoint", "save s", "of which fsync s", "load s", "MB written by the busiest rank", "MB in all"], rows),
             "",
             f"- The save is what a stop signal must fit in: under Slurm give preemption a `GraceTime` (and "
             f"`KillWait` for cancels and the time limit) above one step plus the run's `perf/checkpoint_save_s`. "
             f"Here ZeRO-2 (the default) took {zero2['save_s']:.2f} s, the peer {peer['save_s']:.2f} s. Every save "
             f"ends with its files fsynced (vltrain: each by the rank that wrote it, before the completion record, "
             f"so that neither a killed save nor a node's power lost right after one leaves a tag marked complete "
             f"with data still in the page cache); \"of which fsync\" is that part, without which a save "
             f"returns as soon as the kernel holds the data (hand-written trainers usually stop there). Here "
             f"both ranks share one node, whose page cache holds every file either way; what each rank "
             f"syncing only its own files saves (rather than each node's first rank syncing all of them) is "
             f"on many nodes over a shared filesystem: one open and fsync per file, not one per file and node.",
             f"- ZeRO-1/2 write the fp32 master weights beside the model's, in fp32 training a second copy of them "
             f"({zero2['total_bytes'] / mb:,.0f} MB in all against ZeRO-0's {zero0['total_bytes'] / mb:,.0f} MB); "
             f"ZeRO-3 writes only each rank's partitions, its busiest rank {max(zero3['rank_bytes']) / mb:,.0f} MB "
             f"against ZeRO-0's {max(zero0['rank_bytes']) / mb:,.0f} MB (rank 0 writes all of a ZeRO-0 "
             f"checkpoint). With more ranks the per-rank share keeps falling, written in parallel.",
             "- Spread of the saves over the rounds (min–max s), this VM's page cache and disk being shared: "
             + "; ".join(f"{name} {min(r['saves']):.2f}–{max(r['saves']):.2f}" for name, r in
                         (*((f"ZeRO-{k}", v) for k, v in st.items()), ("peer", peer))) + ".",
             f"- Loads read {'a cold page cache (dropped after each save)' if cold else 'the page cache (could not drop it: not root)'};"
             f" a resumed job on another node reads the file system instead."]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the debug model (CI)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dir", default=None, help="where to write the checkpoints (default: the system temp dir)")
    p.add_argument("--timeout", type=float, default=3600)
    p.add_argument("--out", help="write the Markdown section here too")
    p.add_argument("--update-benchmarks", action="store_true", help="write the section into BENCHMARKS.md")
    p.add_argument("--worker", metavar="JSON", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker, args.quick, args.rounds, args.dir)
        return 0
    res = run_ranks(args)
    text = report(res, args)
    emit_report(text, args.out, SECTION if args.update_benchmarks else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
