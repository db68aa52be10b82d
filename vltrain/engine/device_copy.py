"""Host-to-device batch copies on a side CUDA stream.

Why: a ``non_blocking`` copy from pinned memory is still ordered on the stream it is issued
on. Issued on the compute stream, the copy of batch i+1 waits behind step i's kernels and
step i+1's kernels wait behind the copy, so the GPU computes nothing while it runs (a
base-size VLP batch of 256 is ~190 MB of fp16 region features and class distributions: a
few ms per step over PCIe). Issued on a side stream while the GPU is still busy with the
previous micro-step, the copy overlaps that work; the compute stream waits for it only where
the batch is first used. The trainer fetches and copies the next batch right after queuing a
micro-step's backward (before DeepSpeed's step, which reads the gradient norm back), so the
copy runs beside the backward.

``record_stream`` tells the caching allocator that the copied tensors are used on the
compute stream, so their memory is not handed out again before that use has finished. The
pinned host buffers are safe already: PyTorch's pinned-memory allocator keeps a buffer until
the copies issued from it have completed.
"""
from __future__ import annotations

from typing import Optional

import torch

from vltrain.data.batch import Batch


class DeviceCopier:
    """``copier(batch)`` -> the batch on ``device`` (region features cast to ``float_dtype``)."""

    def __init__(self, device: torch.device, float_dtype: Optional[torch.dtype] = None):
        self.device = torch.device(device)
        self.float_dtype = float_dtype
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

    def __call__(self, batch: Batch) -> Batch:
        if self.stream is None:
            return batch.to(self.device, float_dtype=self.float_dtype)
        with torch.cuda.stream(self.stream):
            out = batch.to(self.device, non_blocking=True, float_dtype=self.float_dtype)
        compute = torch.cuda.current_stream(self.device)
        compute.wait_stream(self.stream)
        for t in out.tensors():
            t.record_stream(compute)
        return out
