"""One job per run folder: the main rank holds an exclusive lock on ``<run folder>/.vltrain.lock``.

Two jobs with one ``run_name`` (the same sbatch submitted twice, a manual resubmit beside a
requeued job) would otherwise both write there: the second resumes the first's live
checkpoint, their saves delete each other's staging folders, ``best/`` and ``latest`` flip
between them, and a second job that starts over moves the first's checkpoints aside under its
feet (the first then dies on a missing file). The lock is ``flock``'s: the kernel drops it when
its holder dies, SIGKILL included, so it is never stale on the holder's node. The file says
who holds it (host, pid, Slurm job, since when), for the message that refuses the second job.

Across nodes it holds where the shared filesystem's locks do (NFSv4, GPFS, Lustre mounted with
``flock``); where they are per node (BeeGFS's default, Lustre's ``localflock``) only a second
job on the same node is seen, and where there are none (Lustre without ``flock``) the run
says so and goes on unguarded. A requeued job whose run before the requeue still holds the
lock (its node lost to the network: NFS frees the lock when its lease ends, ~90 s) waits for
it, up to ``SAME_JOB_WAIT_S``, then exits to be requeued again; another step of the same
allocation (a second ``srun`` in one ``salloc``) is another job. Training only: an evaluation
writes no checkpoints, and one of a training run's ``best/`` beside the run must not stop it.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import time

from vltrain.data.errors import StorageUnavailable

log = logging.getLogger(__name__)

LOCK_FILE = ".vltrain.lock"
SAME_JOB_WAIT_S = 300.0
_HELD: dict[tuple, int] = {}    # (st_dev, st_ino) of a run folder -> fd (a later Trainer of the process reuses it)
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunFolderInUse(ValueError):
    """Another live job holds the run folder (or this job cannot write there)."""


def _holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(h: dict) -> str:
    parts = [f"host {h.get('host', '?')}", f"pid {h.get('pid', '?')}"]
    if h.get("slurm_job"):
        parts.append(f"Slurm job {h['slurm_job']}" + (f" (run {h['slurm_restart'] + 1})" if h.get("slurm_restart")
                                                     else ""))
    if h.get("since"):
        parts.append(time.strftime("since %Y-%m-%d %H:%M:%S UTC", time.gmtime(h["since"])))
    return ", ".join(parts)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _earlier_run_of_this_job(holder: dict, job: str, restart: int) -> bool:
    """The holder is this Slurm job before a requeue (``SLURM_RESTART_COUNT`` counts them), not
    another step of the same allocation running now (a second ``srun`` in one ``salloc``)."""
    return bool(job) and holder.get("slurm_job") == job and int(holder.get("slurm_restart", 0)) < restart


def hold_run_lock(run_dir: str, run_name: str) -> None:
    """Lock ``run_dir`` for this process (the main rank) until ``release_run_lock`` or its end,
    or raise ``RunFolderInUse`` naming the job that holds it (``StorageUnavailable`` for an
    earlier run of this Slurm job, before its requeue, that still holds it after
    ``SAME_JOB_WAIT_S``)."""
    try:
        st = os.stat(run_dir)
    except OSError as e:
        raise RunFolderInUse(f"run_name={run_name}: cannot use its folder {run_dir} ({e.strerror or e})") from None
    key = (st.st_dev, st.st_ino)          # a folder deleted and made again is a new one: locked again
    if key in _HELD:
        return
    path = os.path.join(run_dir, LOCK_FILE)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFolderInUse(f"run_name={run_name}: cannot write in its folder {run_dir} ({e.strerror or e}); "
                             "set output_root to a writable folder") from None
    try:
        locked = _try_lock(fd)
    except OSError as e:
        if e.errno not in _NO_LOCKS:
            os.close(fd)
            raise
        log.warning("%s: this filesystem has no file locks (%s): a second job with run_name=%s would not be "
                    "noticed", path, e.strerror, run_name)
        os.close(fd)
        return
    job, restart = os.environ.get("SLURM_JOB_ID", ""), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    deadline, waited = time.monotonic() + SAME_JOB_WAIT_S, False
    while not locked and _earlier_run_of_this_job(_holder(fd), job, restart) and time.monotonic() < deadline:
        if not waited:
            log.warning("%s is held by this Slurm job's run before its requeue (%s): waiting up to %.0f s for it "
                        "to end", run_dir, _describe(_holder(fd)), SAME_JOB_WAIT_S)
            waited = True
        time.sleep(2.0)
        locked = _try_lock(fd)
    if not locked:
        holder = _holder(fd)
        os.close(fd)
        if _earlier_run_of_this_job(holder, job, restart):
            raise StorageUnavailable(f"{run_dir} is still held by this Slurm job's run before its requeue "
                                     f"({_describe(holder)}) after {SAME_JOB_WAIT_S:.0f} s")
        raise RunFolderInUse(f"run_name={run_name}: its folder {run_dir} is in use by another job "
                             f"({_describe(holder)}); two jobs in one run folder overwrite each other's "
                             "checkpoints. Stop that job first, or give this one another run_name")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job, "slurm_restart": restart,
          "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _HELD[key] = fd


def release_run_lock(run_dir: str) -> None:
    """Let another job have ``run_dir`` (this process's training in it has ended: a notebook or
    a harness that trained once lives on)."""
    try:
        st = os.stat(run_dir)
    except OSError:
        return
    fd = _HELD.pop((st.st_dev, st.st_ino), None)
    if fd is not None:
        os.close(fd)               # closing the only fd of the open file drops its flock
