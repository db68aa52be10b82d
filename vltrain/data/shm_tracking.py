"""Streaming's shared memory stays out of the resource tracker: no tracker unlinks it by name.

CPython registers every ``multiprocessing.shared_memory`` segment a process creates or
attaches to with the resource tracker it shares with its children (a DataLoader worker
attaches when it unpickles its dataset), and when they are all gone the tracker unlinks every
name still registered, whoever owns that name by then. Streaming unregisters only the
attachments its own constructor makes. So:

- a non-leader rank's tracker unlinked its leader's live segments as the rank ended (the
  "leaked shared_memory ... No such file" lines that ended every multi-rank run);
- a rank that died alone (the OOM killer takes the rank, not its workers) left a tracker that
  unlinked the rank's names once the workers had noticed and gone, seconds later: a job that
  started on the host meanwhile (its start-up sweep removes segments nobody maps) and took the
  same prefix lost its own (``FileNotFoundError: '/000000_barrier'`` in its worker).

Here streaming's segments (``NNNNNN_<name>``, streaming's names) are neither registered nor
unregistered, in the rank (``VLStreamingDataset``) and in its workers (the forkserver's
preload; a worker from a forkserver without it says so). A run that ends unlinks its segments
(streaming's exit handler); a killed one leaves them (bytes to kilobytes each, but for the
epoch's sample ids, 8 bytes a sample: tens of MB for a CC3M-size epoch, kept only while the
workers share out an epoch's start) to the next start-up sweep on the host
(vltrain/data/datasets.py: ``_clean_host_shm``), as a Slurm job's did already (the step's
processes, its trackers too, are killed together). Other shared memory is tracked as CPython does.
"""
from __future__ import annotations

import re
from multiprocessing import resource_tracker

# streaming.base.constant.SHM_TO_CLEAN of mosaicml-streaming 0.13, spelled out: this module is
# imported by the workers' forkserver before anything heavy (tests/test_shm_tracking.py compares).
STREAMING_SEGMENTS = ("locals", "barrier", "next_epoch", "cache_usage", "shard_states", "shard_access_times",
                      "resume", "epoch_shape", "epoch_data")
_STREAMING_NAME = re.compile(r"/?\d{6}_(%s)" % "|".join(STREAMING_SEGMENTS))


def is_streaming_segment(name: str) -> bool:
    """``name`` (CPython's, with its leading '/') is one of streaming's segments."""
    return _STREAMING_NAME.fullmatch(name) is not None


def untrack_streaming_segments() -> bool:
    """From now on this process (and its forks) registers and unregisters no streaming segment
    with the resource tracker. Idempotent: True if it was not so before."""
    if getattr(resource_tracker.register, "untracks_streaming", False):
        return False
    register, unregister = resource_tracker.register, resource_tracker.unregister

    def register_others(name, rtype):
        if rtype == "shared_memory" and is_streaming_segment(name):
            return None
        return register(name, rtype)

    def unregister_others(name, rtype):       # one never registered: the tracker prints a KeyError
        if rtype == "shared_memory" and is_streaming_segment(name):
            return None
        return unregister(name, rtype)

    register_others.untracks_streaming = True
    resource_tracker.register, resource_tracker.unregister = register_others, unregister_others
    return True
