"""Preemption: a signal sets a flag; ranks agree on stopping at the next step boundary.

Under ``srun`` every task receives the signal Slurm sends (``--signal=USR1@T`` or
``scancel --signal=USR1 JOBID``). The ``deepspeed`` launcher forwards SIGINT/SIGTERM to its
children (terminating them), so prefer SIGUSR1 sent to the ranks themselves, or run one
``srun`` task per GPU as our sbatch templates do. One rank seeing the signal is enough:
the flag is max-reduced across ranks with the other per-step flags. Slurm signals every
process of the step, so a rank keeps the signals from the processes it starts
(``StopFlag.shield_children``).
"""
from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from multiprocessing import resource_tracker

from vltrain.engine.distributed import launch_rank

log = logging.getLogger(__name__)

# Exit code of a run that stopped on a signal after checkpointing: EX_TEMPFAIL from
# sysexits.h ("temporary failure, try again"). The sbatch templates requeue on it.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class ValidationInterrupted(RuntimeError):
    """A validation a stop signal cut short (the caption scorers' Java ended by USR1), raised
    on every rank alike: the trainer checkpoints with the validation still due, and the
    resumed run runs it first."""


class StopFlag:
    """Set by SIGUSR1/SIGTERM; read at step boundaries."""

    def __init__(self):
        self.signum = None
        self._receiver = None

    def install(self) -> "StopFlag":
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        return self

    def shield_children(self) -> None:
        """The stop signals reach this process, not the processes it starts (run.py, once, after
        ``install``). Slurm sends USR1 (``--signal=USR1@T``, ``scancel --signal=USR1``) and TERM
        (``scancel``, time limit, preemption) to every process of the step, and a helper started
        with the default action dies of it: multiprocessing's resource tracker (relaunched, its
        registrations lost: "Some resources might leak", streaming's shared memory among them),
        Inductor's compile-worker sidecar (later compiles fail: "Attempting to use a closed
        pool"), Triton's ptxas, DeepSpeed's op builds. Blocked signals stay blocked across fork
        and exec, so the main thread blocks them (every thread and process it starts inherits
        that) and one thread of ours leaves them unblocked to take them; the handler still runs
        in the main thread, where Python runs every signal handler. DataLoader workers have
        their own rules (vltrain/data/worker_signals.py); children meant to end on a stop
        signal start inside ``children_take_stop_signals``."""
        if self._receiver is not None:
            return
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        # Started now, shielded: CPython's tracker start unblocks SIGINT/SIGTERM in the calling
        # thread when done (whatever the mask was), hence blocking again after it. Started later,
        # by the first user of shared memory, it would unblock TERM in that thread.
        resource_tracker.ensure_running()
        signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        self._receiver = threading.Thread(target=_take_stop_signals, daemon=True, name="vltrain-stop-signals")
        self._receiver.start()

    def _handle(self, signum, frame):
        if self.signum is None:
            # Slurm signals every task: said by rank 0, the others at INFO. The launcher's rank:
            # no import in a handler that may run in the middle of torch's (a signal during
            # start-up: it broke that import, or was lost)
            log.log(logging.WARNING if launch_rank() == "0" else logging.INFO,
                    "received %s: will checkpoint and exit at the next step boundary", signal.Signals(signum).name)
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def exiting(self) -> None:
        """The stop is done (checkpoint committed): later USR1/TERM are ignored while the
        process exits. srun ends the step with SIGTERM as soon as the first rank exits 75
        (--kill-on-bad-exit); arriving once Python has begun to finalize (default handlers
        again), it would end a rank with 143, which reads like a crash. SIGKILL still ends it."""
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)

    def not_preemptible(self) -> None:
        """For work that does not stop on a signal (``mode=eval``): SIGUSR1 is ignored, and so
        by the processes it starts (an ignored signal stays ignored across exec; a handled one
        does not), e.g. the caption metrics' Java, which USR1 would otherwise end. SIGTERM
        ends the process at once again (Slurm's ``scancel``, time limit): with no checkpoint
        to write, waiting for the next step boundary would only delay the end."""
        signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _take_stop_signals() -> None:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    while True:
        time.sleep(3600)     # the kernel delivers USR1/TERM here; Python's C handler flags them


@contextlib.contextmanager
def children_take_stop_signals():
    """Processes started inside (from the main thread) take USR1/TERM as any process does,
    undoing ``shield_children`` for them: the caption scorers' Java, which USR1 is meant to end
    (vltrain/tasks/caption.py: the validation is then repeated after the resume)."""
    old = signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


# One per process: run.py installs it first thing, so a signal that arrives while the job is
# still starting (imports, engine build) is kept and honoured at the first step boundary.
STOP = StopFlag()
