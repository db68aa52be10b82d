"""Shared memory a DataLoader worker attaches to is not the worker's to unlink.

A worker gets streaming's dataset pickled, and with it the ``multiprocessing.shared_memory``
segments the rank's dataset holds; unpickling one attaches to it (``SharedMemory(name,
create=False)``), and CPython (3.11, 3.12; 3.13 too, where unpickling keeps ``track=True``)
then registers the name with the resource tracker the worker shares with its rank. Nothing
unregisters it (streaming's fix only covers attachments made by its own constructor), so when
the rank and its workers are gone the tracker unlinks every such name, whoever owns it by then:
on a non-leader rank that is the local leader's live segments (the trackers' "leaked
shared_memory ... No such file" report at the end of every multi-rank run), and a job that
started on the host in the meantime and took the same prefix would lose its own
(FileNotFoundError: '/000000_barrier' in a worker). The creator of a segment still registers
it, so a killed rank's segments are still cleaned up by its tracker.
"""
from __future__ import annotations

import functools
import threading
from multiprocessing import resource_tracker, shared_memory

_attaching = threading.local()


def untrack_attachments() -> None:
    """Attachments (``create=False``) of this process and its forks register nothing with the
    resource tracker. Idempotent. Per thread: a segment another thread creates meanwhile is
    still registered (its ``unlink`` unregisters it; an unknown name would make the tracker
    print a KeyError traceback)."""
    init = shared_memory.SharedMemory.__init__
    if getattr(init, "untracked_attachments", False):
        return
    register = resource_tracker.register

    def register_unless_attaching(name, rtype):
        if rtype == "shared_memory" and getattr(_attaching, "on", False):
            return None
        return register(name, rtype)

    @functools.wraps(init)
    def attach_untracked(self, name=None, create=False, size=0, *args, **kwargs):
        _attaching.on = not create
        try:
            init(self, name, create, size, *args, **kwargs)
        finally:
            _attaching.on = False

    attach_untracked.untracked_attachments = True
    resource_tracker.register = register_unless_attaching
    shared_memory.SharedMemory.__init__ = attach_untracked
