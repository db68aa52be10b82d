"""Host-to-device batch copies on a side CUDA stream.

Why: a ``non_blocking`` copy from pinned memory is still ordered on the stream it is issued
on. Issued on the compute stream, the copy of batch i+1 waits behind step i's kernels and
step i+1's kernels wait behind the copy, so the GPU computes nothing while it runs (a
base-size VLP batch of 256 is ~190 MB of fp16 region features and class distributions: a
few ms per step over PCIe). Issued on a side stream while the GPU is still busy with the
previous micro-step, the copy overlaps that work. The trainer starts the copy of the next
batch right after queuing a micro-step's forward (see Trainer.train), and the compute stream
waits for it only when that batch is taken into use (``InFlight.get``): a wait inserted when
the copy is issued would hold up the backward and step queued after it whenever the copy
runs longer than the forward.

``record_stream`` tells the caching allocator that the copied tensors are used on the
compute stream, so their memory is not handed out again before that use has finished. The
pinned host buffers are safe already: PyTorch's pinned-memory allocator keeps a buffer until
the copies issued from it have completed. And the side stream needs no wait for the compute
stream before copying: the caching allocator gives a stream only blocks it allocated itself
(or whose recorded uses have finished), so the copy never writes memory a queued kernel reads.
"""
from __future__ import annotations

from typing import Optional

import torch

from vltrain.data.batch import Batch


class InFlight:
    """A batch on the device whose copy may still be running on the copier's stream."""

    def __init__(self, batch: Batch, event: Optional[torch.cuda.Event] = None,
                 device: Optional[torch.device] = None):
        self._batch, self._event, self._device = batch, event, device

    def get(self) -> Batch:
        """The batch, usable on the current stream (which waits for the copy; no host sync)."""
        if self._event is not None:
            compute = torch.cuda.current_stream(self._device)
            compute.wait_event(self._event)
            for t in self._batch.tensors():
                t.record_stream(compute)
            self._event = None
        return self._batch


class DeviceCopier:
    """``copier.start(batch)`` -> InFlight (the copy issued); ``copier(batch)`` -> the batch on
    ``device`` (region features cast to ``float_dtype``), ready on the current stream."""

    def __init__(self, device: torch.device, float_dtype: Optional[torch.dtype] = None):
        self.device = torch.device(device)
        self.float_dtype = float_dtype
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def start(self, batch: Batch) -> InFlight:
        if self.stream is None:
            return InFlight(batch.to(self.device, float_dtype=self.float_dtype))
        with torch.cuda.stream(self.stream):
            out = batch.to(self.device, non_blocking=True, float_dtype=self.float_dtype)
            done = torch.cuda.Event()
            done.record(self.stream)
        return InFlight(out, done, self.device)

    def __call__(self, batch: Batch) -> Batch:
        return self.start(batch).get()
