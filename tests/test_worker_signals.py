"""DataLoader workers and SIGTERM (vltrain/data/worker_signals.py), in a real DataLoader run
by a child process standing in for a rank:

  foreign   SIGTERM to the worker from another process (Slurm signalling every process of a
            job): with our worker_init_fn the rank reads every sample; with torch's default
            the rank fails with "DataLoader worker ... killed by signal: Terminated"
  early     the same SIGTERM while the worker is still setting up, before its init function
            has run (a new epoch's workers starting as the job is preempted): survived only
            because the rank forks its workers with SIGTERM blocked
  shutdown  a worker stuck in a sample while its rank drops the loader: torch's shutdown
            ends it with SIGTERM from the rank, which must still work
"""
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RANK = textwrap.dedent("""
    import os, subprocess, sys, time
    from torch.utils.data import DataLoader, Dataset
    from vltrain.data.worker_signals import forking_workers, ignore_foreign_sigterm
    mode, init = sys.argv[1], sys.argv[2]

    def slow_start(worker_id):        # the worker's set-up before our init function, made long
        print("WORKER UP", flush=True)
        time.sleep(1.5)
        ignore_foreign_sigterm(worker_id)

    class Slow(Dataset):
        def __len__(self):
            return 6
        def __getitem__(self, i):
            if mode == "shutdown" and i >= 2:
                time.sleep(1000)      # stuck: only a signal ends this worker
            time.sleep(0.2)
            return i

    init_fn = {"ours": ignore_foreign_sigterm, "torch_default": None, "slow_start": slow_start}[init]
    loader = DataLoader(Slow(), batch_size=1, num_workers=1, worker_init_fn=init_fn)
    if mode == "early":
        with forking_workers():
            it = iter(loader)
        worker = it._workers[0]
        time.sleep(0.7)               # inside slow_start
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)
        got = [int(b) for b in it]
        print("GOT", got, "worker exit", worker.exitcode, flush=True)
        sys.exit(0)
    it = iter(loader)
    got = [int(next(it))]
    worker = it._workers[0]
    if mode == "foreign":
        subprocess.run(["kill", "-TERM", str(worker.pid)], check=True)   # sender: `kill`, not the rank
        got += [int(b) for b in it]
        print("GOT", got, "worker exit", worker.exitcode, flush=True)
    else:
        got.append(int(next(it)))
        time.sleep(0.5)               # the worker is now inside the stuck sample
        t0 = time.time()
        del it                        # torch's shutdown: join, then terminate() from this rank
        print("GOT", got, "worker alive", worker.is_alive(), "exit", worker.exitcode,
              "within", time.time() - t0 < 20, flush=True)
""")


def _rank(mode, init):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-c", RANK, mode, init], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("init", ["ours", "torch_default"])
def test_a_foreign_sigterm_leaves_the_worker_running(init):
    p = _rank("foreign", init)
    if init == "ours":
        # every sample read; the worker ended normally once the epoch was done
        assert p.returncode == 0 and p.stdout.strip() == "GOT [0, 1, 2, 3, 4, 5] worker exit 0", p.stdout + p.stderr
    else:
        # the reason this module exists: torch's worker dies of it, and takes the rank with it
        assert p.returncode != 0 and "killed by signal: Terminated" in p.stderr, p.stdout + p.stderr


def test_a_sigterm_before_the_init_function_leaves_the_worker_running():
    p = _rank("early", "slow_start")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.split("\n")[-2] == "GOT [0, 1, 2, 3, 4, 5] worker exit 0", p.stdout + p.stderr


def test_the_ranks_own_shutdown_still_ends_a_stuck_worker():
    p = _rank("shutdown", "ours")
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.strip() == "GOT [0, 1] worker alive False exit 0 within True", p.stdout + p.stderr
