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
says so and goes on unguarded. A requeued job whose previous run still holds the lock (its
node lost to the network: NFS frees the lock when its lease ends, ~90 s) waits for it, up to
``SAME_JOB_WAIT_S``, then exits to be requeued again.
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
_HELD: dict[str, int] = {}      # run folder -> fd: held until the process ends (a later Trainer reuses it)
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
        parts.append(f"Slurm job {h['slurm_job']}")
    if h.get("since"):
        parts.append(time.strftime("since %Y-%m-%d %H:%M:%S UTC", time.gmtime(h["since"])))
    return ", ".join(parts)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def hold_run_lock(run_dir: str, run_name: str) -> None:
    """Lock ``run_dir`` for this process (the main rank) until it exits, or raise
    ``RunFolderInUse`` naming the job that holds it (``StorageUnavailable`` for a previous
    run of this same Slurm job that still holds it after ``SAME_JOB_WAIT_S``)."""
    key = os.path.realpath(run_dir)
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
    job = os.environ.get("SLURM_JOB_ID", "")
    deadline, waited = time.monotonic() + SAME_JOB_WAIT_S, False
    while not locked and job and _holder(fd).get("slurm_job") == job and time.monotonic() < deadline:
        if not waited:
            log.warning("%s is held by a previous run of this Slurm job (%s): waiting up to %.0f s for it to end",
                        run_dir, _describe(_holder(fd)), SAME_JOB_WAIT_S)
            waited = True
        time.sleep(2.0)
        locked = _try_lock(fd)
    if not locked:
        holder = _holder(fd)
        os.close(fd)
        if job and holder.get("slurm_job") == job:
            raise StorageUnavailable(f"{run_dir} is still held by a previous run of this Slurm job "
                                     f"({_describe(holder)}) after {SAME_JOB_WAIT_S:.0f} s")
        raise RunFolderInUse(f"run_name={run_name}: its folder {run_dir} is in use by another job "
                             f"({_describe(holder)}); two jobs in one run folder overwrite each other's "
                             "checkpoints. Stop that job first, or give this one another run_name")
    me = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": job, "since": time.time()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(me).encode(), 0)
    _HELD[key] = fd
