"""A process standing in for a rank, with a real DataLoader started as VLDataLoader starts its
workers (vltrain/data/worker_signals.py) or as torch does by default; run by
tests/test_worker_signals.py. A file, not ``-c`` code: forkserver workers import the rank's
main module (as ``__mp_main__``) to find ``Slow`` and ``SlowStart``.

    python tests/worker_rank.py MODE INIT [SIGNALS... | TMPDIR]

MODE: foreign | early | shutdown | epochs | rank_killed; INIT: ours | torch_default | slow_start.
"""
import os
import subprocess
import sys
import time

from torch.utils.data import DataLoader, Dataset, get_worker_info

from vltrain.data.worker_signals import WorkerStart, worker_context


class Slow(Dataset):
    def __init__(self, stuck_from=None):
        self.stuck_from = stuck_from

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if self.stuck_from is not None and i >= self.stuck_from:
            time.sleep(1000)      # stuck: only a signal ends this worker
        time.sleep(0.2)
        # what the worker sees: the rank's environment and temporary directory at iter() time
        import tempfile
        return {"i": i, "env": os.environ.get("VLTRAIN_TEST_EPOCH", ""), "tmp": tempfile.gettempdir(),
                "ppid": os.getppid(), "worker": get_worker_info().id}


class SlowStart:
    """The worker's set-up before our init function, made long."""

    def __init__(self):
        self.init = WorkerStart()

    def __call__(self, worker_id):
        print("WORKER UP", flush=True)
        time.sleep(1.5)
        self.init(worker_id)


def _loader(init, stuck_from=None):
    if init == "torch_default":
        return DataLoader(Slow(stuck_from), batch_size=None, num_workers=1)
    return DataLoader(Slow(stuck_from), batch_size=None, num_workers=1, multiprocessing_context=worker_context())


def _iter(loader, init):
    """``iter(loader)`` with the init function made at iter() time, as VLDataLoader does."""
    if init != "torch_default":
        loader.worker_init_fn = SlowStart() if init == "slow_start" else WorkerStart()
    return iter(loader)


def _threads(pid):
    return len(os.listdir(f"/proc/{pid}/task"))


def main(mode, init):
    loader = _loader(init, stuck_from=2 if mode == "shutdown" else None)
    it = _iter(loader, init)
    worker = it._workers[0]
    if mode == "early":
        time.sleep(0.7)               # inside SlowStart, before WorkerStart
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
        got = [b["i"] for b in it]
        print("GOT", got, "worker exit", worker.exitcode, flush=True)
        return
    first = next(it)
    got = [first["i"]]
    if mode == "foreign":
        for sig in sys.argv[3:] or ["TERM"]:          # sender: `kill`, not the rank
            subprocess.run(["kill", f"-{sig}", str(worker.pid)], check=True)
        got += [b["i"] for b in it]
        print("GOT", got, "worker exit", worker.exitcode, flush=True)
    elif mode == "shutdown":
        got.append(next(it)["i"])
        time.sleep(0.5)               # the worker is now inside the stuck sample
        t0 = time.time()
        del it                        # torch's shutdown: join, then terminate() from this rank
        # the elapsed time only for the record: torch's join (5 s) then terminate(); the worker's
        # sample sleeps 1000 s and its rank lives, so nothing else could have ended it
        print("GOT", got, "worker alive", worker.is_alive(), "exit", worker.exitcode,
              "after", f"{time.time() - t0:.1f}s", flush=True)
    elif mode == "epochs":
        # the worker's parent: a single-threaded forkserver, not this (multi-threaded) rank
        server = first["ppid"]
        print("RANK", os.getpid(), "threads", _threads(os.getpid()), "SERVER", server, "threads", _threads(server),
              flush=True)
        list(it)
        # Slurm's SIGTERM reaches the forkserver too; the next epoch's workers still start.
        subprocess.run(["kill", "-TERM", str(server)], check=True)
        os.environ["VLTRAIN_TEST_EPOCH"] = "2"
        os.environ["TMPDIR"] = sys.argv[3]
        import tempfile
        tempfile.tempdir = None       # as a rank whose TMPDIR was set before its first gettempdir()
        second = list(_iter(loader, init))
        print("EPOCH2", [b["i"] for b in second], "env", {b["env"] for b in second}, "tmp", {b["tmp"] for b in second},
              "server", {b["ppid"] for b in second} == {server}, flush=True)
    elif mode == "rank_killed":
        print("WORKER", worker.pid, "SERVER", first["ppid"], flush=True)
        time.sleep(1000)              # the test kills this process with SIGKILL


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
