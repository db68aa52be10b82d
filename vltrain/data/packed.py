"""One shared-memory buffer per batch between a DataLoader worker and the trainer.

Why: a worker hands its batch to the trainer by pickling it through a queue, and PyTorch
moves every tensor storage into its own shared-memory segment, whose file descriptor the
receiving process fetches over a fresh Unix-socket connection to the worker. A pretraining
batch has ~14 tensors, so the trainer's process paid ~14 of those round trips per batch
(plus as many pins with ``pin_memory``), on the host cores that launch the GPU work.
Packed, the worker allocates one shared buffer, copies each tensor into it once (the copy
``share_memory_`` would have made anyway), and the trainer fetches one descriptor and takes
views.

Freeing that shared memory is the other cost: the process that drops the last reference
gives the pages back to the kernel (~50 ms for a 190 MB base-size batch of 256 on our
2-core CPU), and it does so inside a tensor's deallocation, holding the GIL, so with
``pin_memory`` the pinning thread stalled the training thread's kernel launches for that
long every step. ``pin_memory`` therefore releases the shared pages itself, after copying
them, in a system call made without the GIL (:func:`release_shared_pages`).

The worker's own copy of the batch is the third: the collator assembles it in new tensors
(~190 MB at base size and a batch of 256) that ``pack`` copies and drops. Memory that large
is mapped fresh for every batch, and each 4 KB page faults on first touch: ~30% of a
worker's collate-and-pack time per sample at that size. So in a worker the collator takes
its large tensors from a :class:`ScratchPool`, which hands the same ones back, zeroed, for
the next batch.

The packed form only crosses the process boundary: ``VLDataLoader`` packs in its workers and
unpacks before yielding, so every consumer still sees a ``Batch``. ``benchmarks/loader.py``
measures all three costs.
"""
from __future__ import annotations

import ctypes
import dataclasses
import functools
import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Callable

import torch

from vltrain.data.batch import Batch

ALIGN = 64          # every view starts on a cache line (and any dtype's alignment)
_MADV_REMOVE = 9    # Linux: free the pages (and backing shared memory) of the range


@dataclass
class PackedBatch:
    buffer: torch.Tensor          # (nbytes,) uint8, in shared memory when packed in a worker
    layout: tuple                 # ((field, task_key or None, dtype, shape, offset), ...)
    fields: dict                  # Batch fields that are not tensors
    task: dict                    # task entries that are not tensors

    def pin_memory(self) -> "PackedBatch":
        """One pin for the whole batch (torch's DataLoader calls this with pin_memory=True)."""
        return self.moved(lambda buf: buf.pin_memory())

    def moved(self, copy: Callable[[torch.Tensor], torch.Tensor]) -> "PackedBatch":
        """The batch with ``copy(buffer)`` as its buffer; this one's shared pages are given
        back to the kernel without the GIL, and this object is left empty (its ``unpack``
        raises), since its memory is gone."""
        moved = dataclasses.replace(self, buffer=copy(self.buffer))
        if self.buffer.is_shared():
            release_shared_pages(self.buffer)
        self.buffer = None
        return moved

    def unpack(self) -> Batch:
        """The batch, every tensor a view of ``buffer``."""
        if self.buffer is None:
            raise RuntimeError("PackedBatch.unpack: this batch was moved (pin_memory); unpack the moved copy")
        kw: dict[str, Any] = dict(self.fields)
        task = dict(self.task)
        for name, key, dtype, shape, offset in self.layout:
            n = _nbytes(dtype, shape)
            t = self.buffer[offset:offset + n].view(dtype).view(shape)
            if key is None:
                kw[name] = t
            else:
                task[key] = t
        return Batch(**kw, task=task)


def _nbytes(dtype: torch.dtype, shape) -> int:
    n = dtype.itemsize
    for s in shape:
        n *= s
    return n


def release_shared_pages(buffer: torch.Tensor) -> bool:
    """Give the pages of ``buffer``'s shared-memory storage back to the kernel now, in a
    ctypes call (which runs without the GIL); its later deallocation then has nothing left to
    free. The storage reads as zeros afterwards: only for a buffer nobody reads again.
    Linux only; elsewhere (or if the call fails) nothing happens and False is returned."""
    if not sys.platform.startswith("linux"):
        return False
    storage = buffer.untyped_storage()
    if storage.nbytes() == 0:
        return False
    # A shared storage is its own mmap, so its start is page-aligned, as madvise requires.
    return _madvise()(storage.data_ptr(), storage.nbytes(), _MADV_REMOVE) == 0


@functools.lru_cache(maxsize=1)
def _madvise():
    fn = ctypes.CDLL(None, use_errno=True).madvise
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return fn


def shared_buffer(nbytes: int) -> torch.Tensor:
    """A new (nbytes,) uint8 tensor in its own shared-memory segment."""
    storage = torch.UntypedStorage._new_shared(max(nbytes, 1))     # a segment cannot be empty
    return torch.empty(0, dtype=torch.uint8).set_(storage)[:nbytes]


def pack(batch: Batch) -> PackedBatch:
    """Copy every tensor of ``batch`` into one new shared-memory buffer."""
    entries, fields, task = [], {}, {}
    for f in dataclasses.fields(batch):
        v = getattr(batch, f.name)
        if f.name == "task":
            for k, t in v.items():
                if isinstance(t, torch.Tensor):
                    entries.append((f.name, k, t))
                else:
                    task[k] = t
        elif isinstance(v, torch.Tensor):
            entries.append((f.name, None, v))
        else:
            fields[f.name] = v
    layout, offset = [], 0
    for name, key, t in entries:
        if t.device.type != "cpu" or t.is_sparse:
            where = f"task.{key}" if key is not None else name
            raise ValueError(f"pack: batch field {where} must be a dense CPU tensor, got {t.device} {t.layout}")
        layout.append((name, key, t.dtype, tuple(t.shape), offset))
        offset += (_nbytes(t.dtype, t.shape) + ALIGN - 1) // ALIGN * ALIGN
    # Allocated in shared memory directly: pickling it to the trainer then copies nothing.
    packed = PackedBatch(shared_buffer(offset), tuple(layout), fields, task)
    views = packed.unpack()
    for name, key, t in entries:
        (views.task[key] if key is not None else getattr(views, name)).copy_(t)
    return packed


class ScratchPool:
    """Zeroed CPU tensors for a DataLoader worker's batch assembly, recycled between batches.

    ``zeros(shape, dtype)`` gives a tensor back from the previous batch if one of that shape
    and dtype is free (zeroed in place: its pages are mapped already), else a new one.
    ``recycle()`` declares every tensor handed out since the last call free again: only for
    a caller that no longer holds them or any view of them (``PackInWorkers``, once ``pack``
    has copied the batch). Keeps at most ``keep`` free tensors: by default one batch's region
    features and class distributions, memory the worker needs at its peak anyway (~190 MB at
    base size and a batch of 256); with ``data.pad_to`` other than ``bucket`` the region count
    varies, and a tensor is reused only when its shape comes back."""

    def __init__(self, keep: int = 2):
        self.keep = keep
        self._free: OrderedDict = OrderedDict()      # (shape, dtype) -> tensor
        self._out: list = []
        self.reused = 0

    def zeros(self, shape, dtype: torch.dtype) -> torch.Tensor:
        key = (tuple(shape), dtype)
        t = self._free.pop(key, None)
        if t is None:
            t = torch.zeros(key[0], dtype=dtype)
        else:
            t.zero_()
            self.reused += 1
        self._out.append((key, t))
        return t

    def recycle(self) -> None:
        for key, t in self._out:
            self._free[key] = t
            self._free.move_to_end(key)
        self._out.clear()
        while len(self._free) > self.keep:
            self._free.popitem(last=False)

