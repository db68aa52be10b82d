"""Streaming's shared-memory prefix registration, safe beside other jobs on the same host.

In mosaicml-streaming 0.13 every local rank picks the dataset's shared-memory prefix by
scanning /dev/shm (and filelocks under /tmp) on its own; the local leader then registers the
prefix it found, and each other rank attaches to the prefix *it* found. Another job on the node
creating or freeing streaming segments between those scans makes them disagree, and the rank
dies with "Internal error: shared memory prefix=N was not registered by local leader" while its
leader waits in a barrier (mosaicml/streaming#901; seen here when a job started beside a test's).

Here the other ranks look the leader's registration up by what it holds, their own local
directories (unique per run and node: ``node<N>/<run_name>/...``), retrying while it is not yet
visible; and the leader, if another job registered its prefix between the scan and the
registration, scans again. Every rank then holds a shared ``flock`` on its registration (the
LOCALS segment's file) for as long as it lives: the start-up sweep of leaked segments
(``datasets._clean_host_shm``) tells a live prefix by it even where it cannot see the
processes that map it (a job in another PID namespace sharing /dev/shm: Docker's
``--ipc=host``), and the kernel drops it when the rank dies, SIGKILL included. Everything
else is streaming's: the same scan (with its check that no other live dataset uses our local
directories), the same names and layout. Applied only while streaming's ``get_shm_prefix``
is the source this was written against (hash below).
"""
from __future__ import annotations

import fcntl
import functools
import logging
import os
from time import sleep

from vltrain.upstream import source_hash

log = logging.getLogger(__name__)

# sha256 of mosaicml-streaming 0.13.0's streaming.base.shared.prefix.get_shm_prefix source.
KNOWN_SOURCE = "df1d1d0a0cbbac9167f5a5684131c37d06ac673f44d343a27691c7e30ffa7cc3"
SHM_DIR = "/dev/shm"


_HELD: dict[int, int] = {}      # prefix -> fd of its LOCALS file, share-locked while this process lives


def _locals_file(prefix: int) -> str:
    from streaming.base.constant import LOCALS
    from streaming.base.shared.prefix import _get_path
    return os.path.join(SHM_DIR, _get_path(prefix, LOCALS))


def hold_registration(prefix: int) -> None:
    """A shared lock on ``prefix``'s LOCALS file for this process's life (a prefix used again
    replaces the fd of its earlier, unlinked file). No lock where /dev/shm has no such file."""
    try:
        fd = os.open(_locals_file(prefix), os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
    except OSError:
        os.close(fd)
        return
    old = _HELD.pop(prefix, None)
    if old is not None:
        os.close(old)
    _HELD[prefix] = fd


def registration_held(prefix: int) -> bool:
    """Whether a live process (ours, or one we cannot see) holds ``prefix``'s registration."""
    try:
        fd = os.open(_locals_file(prefix), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def _registered(hint: int) -> list[int]:
    """Prefixes to try for the leader's registration: ``hint`` first, then every LOCALS
    segment on the host (Linux lists them under /dev/shm), else the 64 after ``hint``."""
    from streaming.base.constant import LOCALS
    found = []
    if os.path.isdir(SHM_DIR):
        suffix = f"_{LOCALS}"
        for name in os.listdir(SHM_DIR):
            head = name[:-len(suffix)] if name.endswith(suffix) else ""
            if head.isdigit():
                found.append(int(head))
    else:
        found = list(range(hint + 1, hint + 65))
    return [hint] + sorted(set(found) - {hint})


def find_leaders_prefix(streams_local: list[str], hint: int, retry: int):
    """(prefix, SharedMemory) of the LOCALS segment that holds exactly ``streams_local``."""
    from streaming.base.constant import LOCALS, TICK
    from streaming.base.shared import SharedMemory
    from streaming.base.shared.prefix import _get_path, _unpack_locals
    for _ in range(1 + retry):
        for prefix in _registered(hint):
            try:
                shm = SharedMemory(_get_path(prefix, LOCALS), False)
            except (FileNotFoundError, PermissionError):
                continue
            try:
                their_locals, their_prefix = _unpack_locals(bytes(shm.buf))
            except (ValueError, UnicodeDecodeError):      # being written
                continue
            if their_locals == streams_local and their_prefix == prefix:
                return prefix, shm
        sleep(TICK)
    raise RuntimeError(f"streaming: no shared-memory registration by this node's local leader holds the local "
                       f"directories {streams_local} (looked at prefix {hint} and every registration on the host, "
                       f"{1 + retry} times)")


def get_shm_prefix(streams_local, streams_remote, world, retry: int = 100):
    """Streaming's ``get_shm_prefix`` with the two fixes of the module doc."""
    from streaming.base.constant import LOCALS, SHM_TO_CLEAN, TICK
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as sp
    sp._check_self(streams_local)

    def scan() -> int:
        return max(sp._check_and_find_retrying(streams_local, streams_remote, shm_name=name, retry=retry)
                   for name in SHM_TO_CLEAN)
    prefix_int = scan()          # every rank: also streaming's check of our local directories
    if sp.dist.is_available() and sp.dist.is_initialized():
        sp.dist.barrier()
    shm = None
    if world.is_local_leader:
        for attempt in range(1 + retry):
            data = sp._pack_locals(streams_local, prefix_int)
            try:
                shm = SharedMemory(sp._get_path(prefix_int, LOCALS), True, len(data))
                break
            except FileExistsError:          # another job registered it since our scan
                if attempt == retry:
                    raise
                sleep(TICK)
                prefix_int = scan()
        shm.buf[:len(data)] = data
        hold_registration(prefix_int)
    if sp.dist.is_available() and sp.dist.is_initialized():
        sp.dist.barrier()
    if not world.is_local_leader:
        prefix_int, shm = find_leaders_prefix(streams_local, prefix_int, retry)
        hold_registration(prefix_int)
    return prefix_int, shm


@functools.cache
def _known_version() -> bool:
    """streaming's ``get_shm_prefix`` is the source this was written against (logged once if not)."""
    from streaming.base.shared import prefix as sp
    if source_hash(sp.get_shm_prefix) == KNOWN_SOURCE:
        return True
    log.info("streaming's get_shm_prefix is not the version vltrain's fix was written against; "
             "keeping streaming's own (a job starting beside another on this host may hit "
             "mosaicml/streaming#901)")
    return False


def install() -> bool:
    """Use ``get_shm_prefix`` in streaming's dataset constructor; True if applied. Another
    streaming version keeps its own."""
    import streaming.base.dataset as sd
    if sd.get_shm_prefix is not get_shm_prefix and _known_version():
        sd.get_shm_prefix = get_shm_prefix
    return sd.get_shm_prefix is get_shm_prefix
