"""One job per run folder (vltrain/engine/run_lock.py), with real processes holding the lock.
The 2-rank refusal of a second job is test_engine_faults' ``run_folder_in_use``."""
import errno
import fcntl
import os
import signal
import subprocess
import sys

import pytest

from tests.fixtures.corpus import REPO
from vltrain.data.errors import StorageUnavailable
from vltrain.engine import run_lock
from vltrain.engine.run_lock import RunFolderInUse, hold_run_lock

HOLD = ("import os, sys, time; from vltrain.engine.run_lock import hold_run_lock; "
        "os.makedirs(sys.argv[1], exist_ok=True); hold_run_lock(sys.argv[1], 'r'); print('held', flush=True); "
        "time.sleep(float(sys.argv[2]))")


def _holder(run_dir, seconds=600, job=""):
    env = dict(os.environ, SLURM_JOB_ID=job) if job else {k: v for k, v in os.environ.items() if k != "SLURM_JOB_ID"}
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir), str(seconds)], cwd=REPO, env=env,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "held\n"
    return p


def test_a_killed_holder_frees_the_folder_at_once(tmp_path, monkeypatch):
    """SIGKILL (Slurm's after its grace time, the OOM killer) leaves no stale lock: a restart
    right after it takes the folder."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    p = _holder(tmp_path)
    with pytest.raises(RunFolderInUse, match=rf"is in use by another job \(host .*, pid {p.pid}, since "):
        hold_run_lock(str(tmp_path), "r")
    p.send_signal(signal.SIGKILL)
    p.wait()
    hold_run_lock(str(tmp_path), "r")
    hold_run_lock(str(tmp_path), "r")         # a later Trainer of this process: its own lock, kept
    assert str(os.getpid()) in (tmp_path / ".vltrain.lock").read_text()


def test_a_requeue_waits_for_its_previous_run_then_asks_to_be_requeued(tmp_path, monkeypatch):
    """A previous run of the same Slurm job still holding the folder (its node cut off; NFS
    frees the lock when the lease ends) is waited for; past the wait, exit to be requeued
    (StorageUnavailable), not refused as a second job (which Slurm would not requeue)."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(run_lock, "SAME_JOB_WAIT_S", 1.0)
    p = _holder(tmp_path / "a", job="4242")
    try:
        with pytest.raises(StorageUnavailable, match=r"still held by a previous run of this Slurm job \(host .*, "
                                                     rf"pid {p.pid}, Slurm job 4242, since .*\) after 1 s"):
            hold_run_lock(str(tmp_path / "a"), "r")
    finally:
        p.kill()
        p.wait()
    # the previous run goes during the wait: this one takes over
    monkeypatch.setattr(run_lock, "SAME_JOB_WAIT_S", 60.0)
    p = _holder(tmp_path / "b", seconds=3, job="4242")
    hold_run_lock(str(tmp_path / "b"), "r")
    p.wait()
    # another job's holder is refused at once, whatever the wait
    q = _holder(tmp_path / "c", job="77")
    try:
        with pytest.raises(RunFolderInUse, match=r"Slurm job 77"):
            hold_run_lock(str(tmp_path / "c"), "r")
    finally:
        q.kill()
        q.wait()


def test_a_filesystem_without_locks_runs_unguarded_and_says_so(tmp_path, monkeypatch, caplog):
    """Lustre mounted without ``flock`` answers ENOSYS: warned, not fatal."""
    def no_locks(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")
    monkeypatch.setattr(fcntl, "flock", no_locks)
    hold_run_lock(str(tmp_path), "r")
    assert "this filesystem has no file locks (Function not implemented): a second job with run_name=r would " \
           "not be noticed" in caplog.text


def test_a_folder_it_cannot_write_in_is_named(tmp_path):
    """A run folder that exists but is not writable (another user's, a read-only mount)."""
    target = "/proc/self"                # root writes anywhere on a normal filesystem: not in /proc
    if os.geteuid() != 0:
        target = str(tmp_path / "ro")
        os.mkdir(target, mode=0o555)
    with pytest.raises(RunFolderInUse, match=rf"run_name=r: cannot write in its folder {target} \("):
        hold_run_lock(target, "r")
