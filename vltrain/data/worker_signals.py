"""DataLoader workers outlive a SIGTERM that is meant for their rank.

Slurm ends a job (preemption with ``GraceTime``, the time limit, ``scancel``) by sending
SIGTERM to every process of it, the ranks' DataLoader workers too. torch's worker handler
exits quietly only when the signal comes from its own rank; from anyone else it dies, its rank
then raises "DataLoader worker ... is killed by signal: Terminated" in the middle of a step,
and the checkpoint the rank was about to write on that same SIGTERM is lost.

So workers are forked with SIGTERM blocked (``forking_workers``: no window between the fork
and the worker's own set-up in which the signal could end it, e.g. a new epoch's workers
starting just as the job is preempted), and a thread in each takes it with ``sigwaitinfo``,
which tells who sent it: its rank (shutting the loader down) -> exit at once, as torch's
handler does; anyone else -> ignored, because the rank got the same signal and stops at the
next step boundary, shutting its workers down itself (vltrain/engine/signals.py). A worker
whose rank dies is still ended by torch's watchdog, and SIGKILL (Slurm's after KillWait /
GraceTime) by nothing else.
"""
from __future__ import annotations

import contextlib
import os
import signal
import threading


@contextlib.contextmanager
def forking_workers():
    """Around ``DataLoader.__iter__`` (where workers are forked): the forks inherit SIGTERM
    blocked. This process gets a SIGTERM that arrived meanwhile once the block ends."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _take_sigterm(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo({signal.SIGTERM})
        if info.si_pid == parent:
            os._exit(0)


def ignore_foreign_sigterm(worker_id: int) -> None:
    """``worker_init_fn``. Runs in the worker before it loads anything: threads started
    later (OpenMP, streaming's downloads) inherit the blocked mask, so none of them can take
    the signal with the default action."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_take_sigterm, args=(os.getppid(),), daemon=True,
                     name=f"sigterm-worker{worker_id}").start()
