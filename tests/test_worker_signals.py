"""DataLoader workers: how they start and SIGTERM (vltrain/data/worker_signals.py), in a real
DataLoader run by a child process standing in for a rank (tests/worker_rank.py):

  foreign      SIGTERM and SIGUSR1 to the worker from another process (Slurm signalling every
               process of a job): with our start the rank reads every sample; with torch's
               default SIGTERM fails the rank with "DataLoader worker ... killed by signal:
               Terminated"
  early        the same SIGTERM while the worker is still setting up, before its init function
               has run (a new epoch's workers starting as the job is preempted): survived
               because the forkserver forks workers with SIGTERM blocked
  shutdown     a worker stuck in a sample while its rank drops the loader: torch's shutdown
               ends it with SIGTERM from the rank, which must still work
  epochs       workers come from a single-threaded forkserver, not the multi-threaded rank; the
               forkserver outlives a SIGTERM; the next epoch's workers see the rank's
               environment and temporary directory as they are at that iter()
  rank_killed  the rank dies (SIGKILL): its workers end on their own
"""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.fixtures.corpus import script_env
from tests.fixtures.procs import alive

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "tests", "worker_rank.py")


def _rank(mode, init, *extra, env=None):
    return subprocess.run([sys.executable, SCRIPT, mode, init, *extra], cwd=REPO, env=env or script_env(),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("init", ["ours", "torch_default"])
def test_a_foreign_sigterm_leaves_the_worker_running(init):
    # ours: Slurm's SIGTERM and SIGUSR1 (--signal=USR1@T and `scancel --signal=USR1` reach every
    # process of the step), both to the worker
    p = _rank("foreign", init, *(["TERM", "USR1"] if init == "ours" else ["TERM"]))
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
    # no bound on the time: the CI once took over 20 s here (5 s on a quiet machine, and under a
    # full load of both cores); the subprocess timeout still catches a shutdown that hangs
    assert p.stdout.split(" after ")[0] == "GOT [0, 1] worker alive False exit 0", p.stdout + p.stderr


def test_workers_come_from_a_forkserver_that_outlives_sigterm_and_follows_the_rank(tmp_path):
    env = script_env()
    del env["OMP_NUM_THREADS"]       # a rank as srun starts it: BLAS/OpenMP pools of one thread per core
    p = _rank("epochs", "ours", str(tmp_path), env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = dict(line.split(" ", 1) for line in p.stdout.splitlines() if line.startswith(("RANK", "EPOCH2")))
    rank = lines["RANK"].split()
    assert rank[3] == "SERVER" and rank[0] != rank[4], p.stdout          # not forked by the rank
    assert int(rank[2]) > 1 and rank[5] == "threads" and rank[6] == "1", p.stdout   # the rank has threads; it has one
    assert lines["EPOCH2"] == f"[0, 1, 2, 3, 4, 5] env {{'2'}} tmp {{'{tmp_path}'}} server True", p.stdout


def test_the_workers_of_a_killed_rank_end():
    rank = subprocess.Popen([sys.executable, SCRIPT, "rank_killed", "ours"], cwd=REPO, env=script_env(),
                            stdout=subprocess.PIPE, text=True)
    try:
        line = rank.stdout.readline().split()
        assert line[0] == "WORKER" and line[2] == "SERVER", line
        worker, server = int(line[1]), int(line[3])
        assert alive(worker) and alive(server)
    finally:
        rank.send_signal(signal.SIGKILL)
        rank.wait()
    deadline = time.time() + 30                 # torch's worker watchdog looks every 5 s
    while (alive(worker) or alive(server)) and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(server), "the forkserver outlived its rank"
    assert not alive(worker), "the worker outlived its rank"


@pytest.mark.parametrize("pidfd", [True, False])
def test_rank_liveness_with_and_without_pidfds(pidfd, monkeypatch):
    from vltrain.data.worker_signals import _rank_alive
    if not pidfd:                                  # kernels before Linux 5.3
        monkeypatch.delattr(os, "pidfd_open")
    child = subprocess.Popen(["sleep", "60"])
    alive = _rank_alive(child.pid)
    assert alive()
    child.kill()
    child.wait()
    assert not alive() and not _rank_alive(child.pid)()


def test_run_py_lets_the_forkserver_import_vltrain(tmp_path):
    """`python /path/to/vltrain/run.py` from elsewhere, vltrain neither installed nor on
    PYTHONPATH: the forkserver (a new interpreter) must still import its preload module."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = ("import os, runpy; runpy.run_path(os.environ['RUN_PY'], run_name='as_script'); "
            "print(os.environ['PYTHONPATH'])")
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env=dict(env, RUN_PY=os.path.join(REPO, "vltrain", "run.py")), timeout=60)
    assert p.returncode == 0 and p.stdout.strip().split(os.pathsep)[0] == REPO, p.stdout + p.stderr


def test_a_forked_process_and_a_dead_forkserver_get_a_new_one():
    """Ranks forked from a process that had started a forkserver (pytest here, a fork-based
    launcher elsewhere) inherit multiprocessing's record of it, which is not their child; and a
    forkserver that died (killed) must be replaced, not fail every later loader."""
    code = textwrap.dedent("""
        import os, signal, sys, time
        from multiprocessing import forkserver
        from vltrain.data.worker_signals import worker_context
        def run():
            p = worker_context().Process(target=sys.exit, args=(7,))
            p.start(); p.join()
            return p.exitcode
        assert run() == 7
        first = forkserver._forkserver._forkserver_pid
        child = os.fork()
        if child == 0:
            code = run() == 7 and forkserver._forkserver._forkserver_pid not in (None, first)
            os._exit(0 if code else 3)
        assert os.waitpid(child, 0)[1] == 0, "the forked process could not start a worker"
        os.kill(first, signal.SIGKILL)
        time.sleep(0.5)
        assert run() == 7 and forkserver._forkserver._forkserver_pid != first
        print("OK", flush=True)
    """)
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=script_env(), capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0 and p.stdout.strip() == "OK", p.stdout + p.stderr


FROZEN = textwrap.dedent("""
    import gc, torch
    from vltrain.data.worker_signals import worker_context

    class Frozen(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return gc.get_freeze_count()

    if __name__ == "__main__":
        loader = torch.utils.data.DataLoader(Frozen(), num_workers=1, multiprocessing_context=worker_context())
        print("FROZEN", min(int(x) for x in loader))
""")


def test_workers_inherit_the_forkservers_imports_frozen(tmp_path):
    """What the forkserver imported is out of the workers' garbage collector (gc.freeze): a full
    collection in a worker (after ~300 forks, every worker's start) touched all of it, copying
    ~100 MB of shared pages per worker and taking 0.25 s."""
    script = tmp_path / "frozen.py"
    script.write_text(FROZEN)
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=script_env(), capture_output=True, text=True,
                       timeout=300)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("FROZEN ")]
    assert r.returncode == 0 and lines, r.stdout[-2000:] + r.stderr[-3000:]
    assert int(lines[0].split()[1]) > 100_000, lines       # torch alone is ~10^5 objects


LOGS = textwrap.dedent("""
    import logging, torch
    from vltrain.data.worker_signals import WorkerStart, worker_context

    class Logs(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            logging.getLogger("streaming").warning("retrying sftp://ann:hunter2@host/shard.00000.mds")
            return i

    if __name__ == "__main__":
        from vltrain.redact import setup_logging
        setup_logging()
        loader = torch.utils.data.DataLoader(Logs(), num_workers=1, multiprocessing_context=worker_context(),
                                             worker_init_fn=WorkerStart())
        print("READ", list(loader))
""")


def test_workers_log_as_their_rank_does_redacted(tmp_path):
    """A worker's log lines (streaming's retries, ours) carry the job, rank and worker and are
    redacted, as the rank's are; before, a worker printed them bare through Python's
    last-resort handler, credentials and all."""
    script = tmp_path / "logs.py"
    script.write_text(LOGS)
    env = dict(script_env(), RANK="3", SLURM_JOB_ID="77")
    r = subprocess.run([sys.executable, str(script)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "READ [tensor([0])]" in r.stdout, r.stdout[-2000:] + r.stderr[-3000:]
    assert "hunter2" not in r.stderr, r.stderr
    assert " job=77 rank=3 worker=0 WARNING streaming: retrying sftp://***@host/shard.00000.mds" in r.stderr, r.stderr
