"""The micro-batches of each optimizer step, counted before the step's first one trains.

Why: ``objectives.loss_reduction=token`` is BERT's mean over the batch's masked tokens, and
the batch an optimizer step trains on is the global one, every micro-batch of every rank.
Each micro-batch dividing by its own count weighs a token of a sparse micro-batch above one
of a dense micro-batch, so the gradient and the loss depended on how the global batch was
split: a resume on another world size (``grad_accum`` recomputed) moved the loss 0.2-1%, and
VL-BERT's separate text MLM, whose text-only rows a small micro-batch may lack, up to 29%.
Here each micro-batch divides its sum by the step's count / (ranks x micro-batches), which
DeepSpeed's gradient mean (over ranks, and 1/grad_accum per backward) turns into the sum
over the step divided by the step's count, however it is split.

The counts come from the host batches (the collator's positions), so the feed pulls a step's
micro-batches from the loader when the first one is due, sums their counts, and sends them
with the batches; the sum over ranks is one small all-reduce per step on the device, issued
when the step's first batch is taken into use, without a host sync. The pulled batches wait
on the host (the loader's ``prefetch_factor`` covers a step: vltrain/data/loader.py).

A step never takes batches of two epochs in one count: the loader's epoch ends after a whole
number of steps, and a count stops at an epoch's end (``EPOCH_END``), so the batches held back
at a save are all of one epoch, as the loader's state needs. A micro-batch skipped for a
non-finite loss is replaced by the next batch (``extend``), trained with the divisor of the
count it was pulled in: that step's weights are off by the difference, the next is exact.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from vltrain.data.batch import Batch
from vltrain.data.loader import STAND_IN_KEY
from vltrain.engine.device_copy import DeviceCopier, InFlight
from vltrain.objectives.reduce import token_counts

EPOCH_END = object()            # what the trainer's batch stream yields between epochs
COUNTS_KEY = "_step_counts"     # Batch.task: the step's token counts on this rank (a tensor, copied with it)
STEP_KEY = "_step"              # Batch.task: (which count, how many micro-batches it covers)


class StepFeed:
    """``fetch()`` -> the next micro-batch's copy (InFlight); ``take(inflight)`` -> the batch
    with its step's ``token_divisors``. ``counting`` False: batches pass one at a time."""

    def __init__(self, batches: Iterator, copier: DeviceCopier, grad_accum: int, world: int, counting: bool,
                 data_wait: Callable):
        self._batches, self._copier, self._data_wait = batches, copier, data_wait
        self.group_size = grad_accum if counting else 1
        self.world = world
        self.counting = counting
        self._pending: collections.deque[Batch] = collections.deque()
        self._due = 0                  # batches still to hand out under the current count
        self._count = 0                # which count the batches handed out now carry
        self._opened = False           # the last batch handed out opened its count
        self._tags: dict = {}         # what the batches of the current count carry
        self._reduced: Optional[tuple[int, torch.Tensor]] = None

    @property
    def held(self) -> int:
        """Batches pulled from the loader and not handed out yet (a save's ``held_back``)."""
        return len(self._pending)

    def _pull(self) -> Optional[Batch]:
        """The next batch of this epoch, or None at its end."""
        with self._data_wait():
            b = next(self._batches)
        return None if b is EPOCH_END else b

    def _open(self) -> None:
        """Pull the next step's batches (up to the epoch's end) and count them."""
        while len(self._pending) < self.group_size:
            b = self._pull()
            if b is None:
                if self._pending:
                    break            # the epoch ends inside this count: the next epoch's batches count apart
                continue
            self._pending.append(b)
        self._due = len(self._pending)
        if not self.counting:
            return
        self._count += 1
        sums = [0.0, 0.0, 0.0]
        for b in self._pending:
            if not b.task.get(STAND_IN_KEY):        # a repeated batch standing in for bad samples counts 0
                sums = [a + c for a, c in zip(sums, token_counts(b))]
        self._tags = {STEP_KEY: (self._count, self._due), COUNTS_KEY: torch.tensor(sums, dtype=torch.float32)}
        self._pending = collections.deque(self._tagged(b) for b in self._pending)

    def _tagged(self, b: Batch) -> Batch:
        return dataclasses.replace(b, task={**b.task, **self._tags}) if self._tags else b

    def fetch(self) -> InFlight:
        """Start the copy of the next micro-batch."""
        self._opened = self._due == 0
        if self._opened:
            self._open()
        elif not self._pending:      # one more than counted (extend): the next batch, under this count
            b = self._pull()
            while b is None:
                b = self._pull()
            self._pending.append(self._tagged(b))
        self._due -= 1
        return self._copier.start(self._pending.popleft())

    def extend(self, prefetched: bool) -> None:
        """The micro-batch just trained was skipped: the step takes one more. ``prefetched``:
        the trainer fetched the next batch already; if it opened the next step's count, it
        becomes this step's last and the next step counts from the batch after it."""
        if prefetched and self._opened:
            self._due = 0
            self._opened = False
        else:
            self._due += 1

    def take(self, inflight: InFlight) -> Batch:
        """The batch on the device, with the step's divisors summed over ranks (the first of a
        step issues the all-reduce, the others reuse it)."""
        batch = inflight.get()
        counts = batch.task.get(COUNTS_KEY)
        if counts is None:
            return batch
        count, size = batch.task[STEP_KEY]
        if self._reduced is None or self._reduced[0] != count:
            total = counts.clone()
            if self.world > 1 and dist.is_initialized():
                dist.all_reduce(total)
            # a kind the step lacks: its sum is 0 whatever it is divided by
            self._reduced = (count, total.clamp(min=1.0) / (self.world * size))
        batch.token_divisors = self._reduced[1]
        return batch
