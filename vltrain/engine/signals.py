"""Preemption: a signal sets a flag; ranks agree on stopping at the next step boundary.

Under ``srun`` every task receives the signal Slurm sends (``--signal=USR1@T`` or
``scancel --signal=USR1 JOBID``). The ``deepspeed`` launcher forwards SIGINT/SIGTERM to its
children (terminating them), so prefer SIGUSR1 sent to the ranks themselves, or run one
``srun`` task per GPU as our sbatch templates do. One rank seeing the signal is enough:
the flag is max-reduced across ranks with the other per-step flags.
"""
from __future__ import annotations

import logging
import signal

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

    def install(self) -> "StopFlag":
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum is None:
            log.warning("received %s: will checkpoint and exit at the next step boundary",
                        signal.Signals(signum).name)
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


# One per process: run.py installs it first thing, so a signal that arrives while the job is
# still starting (imports, engine build) is kept and honoured at the first step boundary.
STOP = StopFlag()
