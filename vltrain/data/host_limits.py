"""A run that failed for want of a host resource, told as such: disk space (the cache's, a
checkpoint's: ``disk_full``), host memory and /dev/shm for the data loader.

Why: torch reports a DataLoader worker the kernel killed as "DataLoader worker (pid(s) N)
exited unexpectedly", and a full /dev/shm as "unable to allocate shared memory(shm) ... No
space left on device" or an ENOSPC from a semaphore: nothing says that the host ran out of
memory (the OOM killer's SIGKILL) or that /dev/shm, through which the workers pass every
batch, is too small (a container's default is 64 MB; a base-size VLP micro-batch of 64 is
~50 MB, and each worker queues ``prefetch_factor`` of them). The error is still a failure
(exit 1, not requeued): it would recur.
"""
from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from typing import Iterable, Optional

SHM = "/dev/shm"


class HostLimitError(RuntimeError):
    """The host ran out of memory or shared memory for the data loader; the message says which."""


def shm_state() -> str:
    try:
        u = shutil.disk_usage(SHM)
    except OSError:
        return f"{SHM} cannot be read"
    return f"{SHM}: {u.total / 2**20:.0f} MiB, {u.free / 2**20:.0f} MiB free"


SHM_ADVICE = ("give the job more shared memory (docker run --shm-size=16g or --ipc=host; Kubernetes: an "
              "emptyDir with medium: Memory on /dev/shm), or lower data.num_workers or train.micro_batch_size")


def _is_shm_exhaustion(e: BaseException) -> bool:
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return True          # a semaphore or segment the workers need: they live in /dev/shm
    text = str(e)
    return "shared memory" in text and ("No space left" in text or "errno 28" in text.lower())


def explain(e: BaseException, workers: Iterable = ()) -> Optional[HostLimitError]:
    """A HostLimitError naming what ran out, for ``e`` raised by the loader (its worker
    processes ``workers``, for their exit codes); None when ``e`` is something else."""
    if _is_shm_exhaustion(e):
        return HostLimitError(f"the data loader ran out of shared memory ({shm_state()}): {SHM_ADVICE}")
    # what a worker's death shows as first: torch's words, or the queue's end under the batch it sent
    # (not "Caught ... in DataLoader worker process N": an error the worker raised, re-raised here)
    symptom = "DataLoader worker (pid" in str(e) or isinstance(e, (EOFError, ConnectionError))
    for pid, code in _dead(list(workers), wait_s=2.0 if symptom else 0.0):
        if code == -signal.SIGKILL:
            return HostLimitError(
                f"data loader worker (pid {pid}) was killed (SIGKILL), most likely by the kernel's OOM killer: "
                "the host ran out of memory (check `dmesg` or `sacct -o MaxRSS`); lower data.num_workers or "
                "train.micro_batch_size, or ask for more memory per task")
        if code == -signal.SIGBUS:
            return HostLimitError(f"data loader worker (pid {pid}) died of SIGBUS, which a full {SHM} causes "
                                  f"({shm_state()}): {SHM_ADVICE}")
    return None


def _dead(workers: list, wait_s: float) -> list[tuple[int, int]]:
    """(pid, exit code) of the workers that ended. A worker's end is reported by the forkserver
    asynchronously, so the error its death caused (torch's "exited unexpectedly", or a reset
    connection to the batch it was handing over) can come first: wait for it a little."""
    deadline = time.monotonic() + wait_s
    while True:
        dead = [(w.pid, w.exitcode) for w in workers if w.exitcode not in (None, 0)]
        if dead or time.monotonic() >= deadline:
            return dead
        time.sleep(0.05)


def disk_full(e: BaseException) -> Optional[str]:
    """The ENOSPC / EDQUOT in ``e`` or what it was raised from, as text; else None."""
    for _ in range(8):             # the chain's first links: the write that failed is near
        if e is None:
            break
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"{type(e).__name__}: {e}"
        e = e.__cause__ or e.__context__
    return None


def free_mib(path: str) -> str:
    """The free space of ``path``'s filesystem in MiB, as text ("?" when it cannot be read)."""
    try:
        return f"{shutil.disk_usage(path).free / 2**20:.0f}"
    except OSError:
        return "?"


def check_shm(num_workers: int) -> Optional[str]:
    """A warning when /dev/shm is smaller than the data loader's workers are likely to need."""
    try:
        total = shutil.disk_usage(SHM).total if os.path.isdir(SHM) else None
    except OSError:
        return None
    if total is None or num_workers == 0 or total >= 1 << 30:
        return None
    return (f"{shm_state()}, less than 1 GiB, with data.num_workers={num_workers}: the workers pass every batch "
            f"through it and streaming keeps its registries there; a run can die of SIGBUS or ENOSPC. "
            f"{SHM_ADVICE[0].upper()}{SHM_ADVICE[1:]}")
