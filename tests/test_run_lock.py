"""One job per run folder (vltrain/engine/run_lock.py), with real processes holding the lock.
The 2-rank refusal of a second job is test_engine_faults' ``run_folder_in_use``."""
import errno
import fcntl
import os
import re
import signal

import pytest

from tests.fixtures.procs import run_folder_holder
from vltrain.data.errors import StorageUnavailable
from vltrain.engine import run_lock
from vltrain.engine.run_lock import RunFolderInUse, hold_run_lock, release_run_lock


def test_a_killed_holder_frees_the_folder_at_once(tmp_path, monkeypatch):
    """SIGKILL (Slurm's after its grace time, the OOM killer) leaves no stale lock: a restart
    right after it takes the folder."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    p = run_folder_holder(tmp_path)
    with pytest.raises(RunFolderInUse, match=rf"is in use by another job \(host .*, pid {p.pid}, since "):
        hold_run_lock(str(tmp_path), "r")
    p.send_signal(signal.SIGKILL)
    p.wait()
    hold_run_lock(str(tmp_path), "r")
    hold_run_lock(str(tmp_path), "r")         # a later Trainer of this process: its own lock, kept
    assert str(os.getpid()) in (tmp_path / ".vltrain.lock").read_text()


def test_a_requeue_waits_for_its_run_before_then_asks_to_be_requeued(tmp_path, monkeypatch):
    """This Slurm job's run before its requeue (SLURM_RESTART_COUNT lower) still holding the
    folder (its node cut off; NFS frees the lock when the lease ends) is waited for; past the
    wait, exit to be requeued (StorageUnavailable), not refused as a second job (which Slurm
    would not requeue). Another step of the same allocation running now (same restart count, a
    second srun in one salloc) is another job: refused at once."""
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setattr(run_lock, "SAME_JOB_WAIT_S", 1.0)
    p = run_folder_holder(tmp_path / "a", job="4242", restart=0)
    try:
        with pytest.raises(StorageUnavailable, match=r"still held by this Slurm job's run before its requeue \(host "
                                                     rf".*, pid {p.pid}, Slurm job 4242, since .*\) after 1 s"):
            hold_run_lock(str(tmp_path / "a"), "r")
    finally:
        p.kill()
        p.wait()
    # the run before goes during the wait: this one takes over
    monkeypatch.setattr(run_lock, "SAME_JOB_WAIT_S", 60.0)
    p = run_folder_holder(tmp_path / "b", seconds=3, job="4242", restart=0)
    hold_run_lock(str(tmp_path / "b"), "r")
    p.wait()
    # another job, or another step of this one, is refused at once, whatever the wait
    for job, restart, who in (("77", 0, "Slurm job 77,"), ("4242", 1, "Slurm job 4242 (run 2),")):
        q = run_folder_holder(tmp_path / f"c{job}", job=job, restart=restart)
        try:
            with pytest.raises(RunFolderInUse, match=re.escape(who)):
                hold_run_lock(str(tmp_path / f"c{job}"), "r")
        finally:
            q.kill()
            q.wait()


def test_a_released_or_new_folder_is_locked_anew(tmp_path, monkeypatch):
    """A process that trained once and lives on (a notebook) lets the folder go when its
    training ends; a folder deleted and made again under the same path is locked again."""
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    import shutil
    d = tmp_path / "run"
    d.mkdir()
    hold_run_lock(str(d), "r")
    shutil.rmtree(d)
    d.mkdir()
    hold_run_lock(str(d), "r")
    assert str(os.getpid()) in (d / ".vltrain.lock").read_text()
    release_run_lock(str(d))
    p = run_folder_holder(d)                       # another process takes it now
    p.kill()
    p.wait()


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
