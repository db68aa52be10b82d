"""How DataLoader workers start, and why they outlive a SIGTERM meant for their rank.

Forked by a forkserver. A rank has threads (gloo/NCCL, streaming's downloads, pin memory, our
watchdogs), and a fork copies only the thread that forks: a lock another thread held at that
moment stays held in the child for good. A stress test of the trainer saw it (3 of 454
validations hung, the new worker stuck in ``os.fork`` on such a lock, until the fetch
watchdog ended the job). So workers are forked by multiprocessing's forkserver, one
single-threaded process per rank that imports torch, streaming and our data code once
(``vltrain.data.forkserver_preload``); Python 3.14 made it Linux's default for this reason. A
worker gets the dataset and collate function pickled (streaming's dataset is built for it),
the rank's working directory and ``sys.path`` (multiprocessing's own), and from
``WorkerStart`` the rank's environment and temporary directory at ``iter()`` time, as a fork
would have given it.

SIGTERM. Slurm ends a job (preemption with ``GraceTime``, the time limit, ``scancel``) by
sending SIGTERM to every process of it, the workers and the forkserver too. torch's worker
handler exits quietly only when the signal comes from its own rank; from anyone else it dies,
its rank then raises "DataLoader worker ... is killed by signal: Terminated" in the middle of
a step, and the checkpoint the rank was about to write on that same SIGTERM is lost. So the
forkserver blocks SIGTERM before anything else (it lives on, and its forks start with it
blocked: no window before the worker's own set-up in which the signal could end it, e.g. a
new epoch's workers starting just as the job is preempted), and a thread in each worker takes
it with ``sigtimedwait``, which tells who sent it: its rank (shutting the loader down) -> exit
at once, as torch's handler does; anyone else -> ignored, because the rank got the same
signal and stops at the next step boundary, shutting its workers down itself
(vltrain/engine/signals.py). SIGUSR1, the ranks' other stop signal, is ignored in workers
and forkserver alike. The same thread ends the worker when its rank has died: torch's
watchdog looks at the worker's parent, the forkserver, which multiprocessing keeps alive as
long as any of its workers lives. SIGKILL (Slurm's after KillWait / GraceTime) ends a worker
as always.
"""
from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.forkserver
import os
import select
import signal
import tempfile
import threading

PRELOAD = "vltrain.data.forkserver_preload"


def worker_context() -> multiprocessing.context.BaseContext:
    """The ``multiprocessing_context`` of our DataLoaders (``num_workers > 0``)."""
    ctx = multiprocessing.get_context("forkserver")
    # One forkserver per process, started by its first user: preloads set later do not reach it.
    preload = list(getattr(multiprocessing.forkserver._forkserver, "_preload_modules", []))
    if PRELOAD not in preload:
        ctx.set_forkserver_preload(preload + [PRELOAD])
    _forget_unusable_forkserver(multiprocessing.forkserver._forkserver)
    # Started now, its imports (seconds) overlap what the rank does before its first iter().
    multiprocessing.forkserver.ensure_running()
    return ctx


def _forget_unusable_forkserver(server) -> None:
    """multiprocessing checks its forkserver with ``waitpid``, which fails (ChildProcessError)
    in a process forked from the one that started it (ranks forked from a process that had
    loaders, as a test harness or a fork-based launcher does): the state is the parent's. Drop
    it there, and after the forkserver died; ``ensure_running`` then starts a new one."""
    pid = server._forkserver_pid
    if pid is None:
        return
    try:
        gone = os.waitpid(pid, os.WNOHANG)[0] != 0          # ours, and it has exited (now reaped)
    except ChildProcessError:
        gone = True                                         # the parent's
    if gone:
        os.close(server._forkserver_alive_fd)     # our copy: it must not keep the parent's one alive
        server._forkserver_pid = server._forkserver_address = server._forkserver_alive_fd = None


def shield_signals() -> None:
    """SIGTERM blocked (taken by ``_watch``), SIGUSR1 ignored: in the forkserver, before its
    imports, so its forks start that way; and again in each worker, for a forkserver started
    without our preload. SIGUSR1 (Slurm's --signal=USR1@T, `scancel --signal=USR1`, sent to
    every process of the step) asks the ranks to checkpoint: its default action would end the
    worker, and the rank with it (a forked worker inherited the rank's handler)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


def _rank_alive(rank: int):
    """``() -> bool``: whether ``rank`` still runs. A pidfd where the kernel has them (Linux
    5.3+; immune to the pid's reuse), else a signal-0 probe."""
    try:
        fd = os.pidfd_open(rank)
    except ProcessLookupError:
        return lambda: False
    except (AttributeError, OSError):
        def probe():
            try:
                os.kill(rank, 0)
                return True
            except ProcessLookupError:
                return False
        return probe
    poller = select.poll()               # not select(): fds above 1023 in a process with many open
    poller.register(fd, select.POLLIN)
    return lambda: not poller.poll(0)    # readable once it has exited


def _watch(rank: int) -> None:
    """SIGTERM from the rank, or the rank gone -> exit; SIGTERM from anyone else -> ignored.
    Every 5 s, as torch's worker watchdog (which looks at the parent: here the forkserver,
    which lives as long as any worker does)."""
    alive = _rank_alive(rank)
    while True:
        info = signal.sigtimedwait({signal.SIGTERM}, 5.0)
        if (info is None and not alive()) or (info is not None and info.si_pid == rank):
            os._exit(0)


class WorkerStart:
    """``worker_init_fn``, made by the rank at ``iter()``. Runs in the worker before it loads
    anything: threads started later (OpenMP, streaming's downloads) inherit the blocked mask,
    so none of them can take SIGTERM with the default action."""

    def __init__(self):
        self.rank = os.getpid()
        self.environ = dict(os.environ)
        self.tempdir = tempfile.gettempdir()

    def __repr__(self) -> str:     # never the environment (S3 keys)
        return f"WorkerStart(rank={self.rank})"

    def __call__(self, worker_id: int) -> None:
        shield_signals()
        threading.Thread(target=_watch, args=(self.rank,), daemon=True, name=f"rank-watch-worker{worker_id}").start()
        os.environ.clear()
        os.environ.update(self.environ)
        tempfile.tempdir = self.tempdir
        from vltrain.redact import setup_logging   # the rank's (its RANK, SLURM_JOB_ID are back)
        setup_logging(worker=worker_id)
        from vltrain.data.shm_tracking import untrack_streaming_segments
        if untrack_streaming_segments():    # what the worker creates from now on is not tracked, but:
            # a forkserver another user of this process started first, without our preload: the
            # dataset's segments this worker attached to as it unpickled it are registered with
            # the rank's tracker, which unlinks them by name once the rank and its workers end.
            logging.getLogger(__name__).warning(
                "DataLoader worker %d started from a forkserver without %s: streaming's shared memory it "
                "attached to is in the resource tracker, which may unlink it after the run (harmless unless "
                "another job takes the same names meanwhile)", worker_id, PRELOAD)
