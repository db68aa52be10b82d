"""A bound on the wait for one batch: the job fails instead of hanging.

Collectives are bounded by ``train.dist_timeout_s``, but fetching a batch is not a
collective: at the start of every epoch mosaicml-streaming's workers on a node meet in a
shared-memory barrier (``SharedBarrier``) that waits without a timeout. A rank that dies
just then (OOM-killed, a node fault, SIGKILL) leaves its node peers' workers waiting forever,
and their trainers blocked in the DataLoader, where no collective can time out. Launchers
that kill the whole job when one task dies hide this; plain ``srun`` tasks without
``--kill-on-bad-exit`` and hand-started ranks do not.

``FetchWatchdog.waiting()`` arms a deadline around one fetch; a daemon thread checks it and,
past the deadline, logs what was waited for, terminates this process's DataLoader workers
and exits the process with status 1. The process cannot raise instead: its main thread is
inside the DataLoader's queue wait (or, with ``num_workers=0``, inside streaming's barrier
loop). Nothing is lost: checkpoints are never written during a fetch, and a checkpoint
without its completion record is never ``latest``.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from contextlib import contextmanager

log = logging.getLogger(__name__)

EXIT_CODE = 1


class FetchWatchdog:
    def __init__(self, timeout_s: float, what: str, store: str = ""):
        self.timeout_s = float(timeout_s)
        self.what = what                       # e.g. "data.train=s3://bucket/pretrain"
        self.store = store or "the storage"    # e.g. "S3 endpoint http://10.0.0.5:9000"
        self._deadline = None
        self._lock = threading.Lock()
        self._thread = None

    @contextmanager
    def waiting(self):
        if self.timeout_s <= 0:
            yield
            return
        self._start()
        with self._lock:
            self._deadline = time.monotonic() + self.timeout_s
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None

    def _start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._watch, name="vltrain-fetch-watchdog", daemon=True)
            self._thread.start()

    def _watch(self) -> None:
        tick = min(1.0, self.timeout_s / 10)
        while True:
            time.sleep(tick)
            with self._lock:
                expired = self._deadline is not None and time.monotonic() > self._deadline
                if expired:
                    self._fire()                   # does not return

    def _fire(self) -> None:
        rank = os.environ.get("RANK", "0")
        # A store that does not answer at all fails sooner, as StorageUnavailable (exit 69),
        # after data.download_retry tries of data.download_timeout each; here it answers slowly.
        log.error("rank %s: no batch from %s for %.0f s (train.dist_timeout_s): exiting so that the job "
                  "fails instead of hanging. Either %s serves the data this slowly (each download "
                  "within data.download_timeout; raise train.dist_timeout_s), or a rank on this node "
                  "died (or one of its DataLoader workers did) while the data loaders started an "
                  "epoch, which leaves mosaicml-streaming's shared barrier waiting for it forever "
                  "(its log has the cause). The checkpoints are intact: resume with "
                  "train.resume=auto.", rank, self.what, self.timeout_s, self.store)
        children = multiprocessing.active_children()     # DataLoader workers stuck in the barrier
        for child in children:
            child.terminate()
        for child in children:             # reap them: no zombie or orphan left spinning
            child.join(5)
            if child.is_alive():
                child.kill()
                child.join(5)
        log.error("rank %s: terminated DataLoader worker processes %s", rank, [c.pid for c in children])
        for h in logging.getLogger().handlers:
            h.flush()
        os._exit(EXIT_CODE)
