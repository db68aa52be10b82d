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

Counts follow DeepSpeed's steps (``grad_accum`` micro-batches each): a micro-batch skipped
for a non-finite loss is replaced by the next batch (``extend``) under the step's count, so
that step's weights are off by the difference and the next step is counted whole again. A
count stops at an epoch's end (``EPOCH_END``; the epoch ends after a whole number of steps
unless a skip moved them by one): the batches held back at a save are all of one epoch, as
the loader's state needs, and a step across the end takes two counts, each weighed by its
share of the step's micro-batches.
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
from vltrain.objectives.reduce import step_divisors

EPOCH_END = object()            # what the trainer's batch stream yields between epochs
COUNTS_KEY = "_step_counts"     # Batch.task of a count's first batch: its token counts on this rank (copied with it)
STEP_KEY = "_step"              # Batch.task: (which count, how many micro-batches it covers)


class StepFeed:
    """``fetch()`` -> the next micro-batch's copy (InFlight); ``take(inflight)`` -> the batch
    with its step's ``token_divisors``. ``counts``: a host batch's counts (``token_counts``, or
    the task's ``TaskSpec.step_counts``); None: batches pass one at a time."""

    def __init__(self, batches: Iterator, copier: DeviceCopier, grad_accum: int, world: int,
                 counts: Optional[Callable[[Batch], list]], data_wait: Callable):
        self._batches, self._copier, self._data_wait = batches, copier, data_wait
        self.grad_accum, self.world, self.counts = grad_accum, world, counts
        self.counting = counts is not None
        self._pending: collections.deque[Batch] = collections.deque()   # pulled, of the current count
        self._left = 0                 # micro-batches the current step still takes (0: the next starts one)
        self._in_count = 0             # how many more are handed out under the current count
        self._started_step = False     # the last batch handed out started a step
        self._count = 0                # which count the batches handed out now carry
        self._tags: dict = {}          # what they carry
        self._first: Optional[dict] = None   # what the first of them carries (the counts), until handed out
        self._reduced: Optional[tuple[int, torch.Tensor]] = None
        # pinned: a copy from pageable memory may hold the host until the copy stream gets to it
        # (asked once: without a driver each ask dlopens the CUDA library, ~30-100 µs)
        self._pin = torch.cuda.is_available()

    @property
    def held(self) -> int:
        """Batches pulled from the loader and not handed out yet (a save's ``held_back``)."""
        return len(self._pending)

    def _pull(self) -> Optional[Batch]:
        """The next batch of this epoch, or None at its end."""
        with self._data_wait():
            b = next(self._batches)
        return None if b is EPOCH_END else b

    def _next_batch(self) -> Batch:
        """The next batch, in the next epoch if this one has ended."""
        b = self._pull()
        while b is None:
            b = self._pull()
        return b

    def _open(self) -> None:
        """Count the step's next batches: the ``_left`` it still takes, or those up to the epoch's
        end (the next epoch's count apart: a count's batches are of one epoch)."""
        while len(self._pending) < self._left:
            b = self._pull()
            if b is None:
                if self._pending:
                    break
                continue
            self._pending.append(b)
        size = min(len(self._pending), self._left)
        sums = [0.0, 0.0, 0.0]
        for b in list(self._pending)[:size]:
            if not b.task.get(STAND_IN_KEY):        # a repeated batch standing in for bad samples counts 0
                sums = [a + c for a, c in zip(sums, self.counts(b))]
        self._count += 1
        counts = torch.tensor(sums, dtype=torch.float32)
        self._first = {STEP_KEY: (self._count, size), COUNTS_KEY: counts.pin_memory() if self._pin else counts}
        self._tags = {STEP_KEY: (self._count, size)}
        self._in_count = size

    def fetch(self) -> InFlight:
        """Start the copy of the next micro-batch."""
        if not self.counting:
            return self._copier.start(self._next_batch())
        self._started_step = self._left == 0
        if self._started_step:
            self._left = self.grad_accum
        if self._in_count == 0:
            self._open()
        elif not self._pending:      # one more than counted (extend): the next batch, under this count
            self._pending.append(self._next_batch())
        self._left -= 1
        self._in_count -= 1
        b = self._pending.popleft()
        tags, self._first = self._first or self._tags, None     # the counts travel with the count's first
        return self._copier.start(dataclasses.replace(b, task={**b.task, **tags}))

    def extend(self, prefetched: bool) -> None:
        """The micro-batch just trained was skipped: the step takes one more. ``prefetched``:
        the trainer fetched the next batch already; if that one started the next step, it
        becomes this step's last instead (under the next step's count), and the next step
        starts, and is counted, from the batch after it."""
        if not self.counting:
            return
        if prefetched and self._started_step:
            self._left = self._in_count = 0
            self._started_step = False
        else:
            self._left += 1
            self._in_count += 1

    def take(self, inflight: InFlight) -> Batch:
        """The batch on the device, with the step's divisors summed over ranks (the first of a
        step issues the all-reduce, the others reuse it)."""
        batch = inflight.get()
        if STEP_KEY not in batch.task:
            return batch
        count, size = batch.task[STEP_KEY]
        if self._reduced is None or self._reduced[0] != count:       # the count's first batch
            total = batch.task[COUNTS_KEY].clone()
            if self.world > 1 and dist.is_initialized():
                dist.all_reduce(total)
            self._reduced = (count, step_divisors(total, self.world * size))
        batch.token_divisors = self._reduced[1]
        return batch


def stand_in_shares(metrics: dict) -> dict:
    """What a stand-in micro-batch (the loader's repeat for an all-bad one, trained at weight 0)
    adds to its step's logged losses under the step's token means: 0 each. The other
    micro-batches divide by the step's micro-batches, this one included; left out of the
    step's mean, it would raise it by grad_accum / (grad_accum - 1)."""
    return {k: v * 0.0 for k, v in metrics.items() if k.startswith("loss")}
