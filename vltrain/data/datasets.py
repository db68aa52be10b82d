"""StreamingDataset for our MDS datasets: metadata, per-node caches, stream mixing, clear errors.

Node rank (which local cache a process uses) comes from the environment: ``GROUP_RANK``
(torchrun), ``NODE_RANK``, ``SLURM_NODEID``, else ``RANK // LOCAL_WORLD_SIZE``. Streaming
itself derives nodes from ``RANK``/``WORLD_SIZE``/``LOCAL_WORLD_SIZE`` (the ``deepspeed``
launcher does not set ``LOCAL_WORLD_SIZE``: the engine must export it), so those must agree.

Each (node, run, remote, index, role) gets its own cache folder
``<cache_dir>/node<N>/<run_name>/<hash>-<index hash>-<role>`` (``cache_dir_for``), so two
emulated nodes on one host never share one, two jobs on one node neither, a train and a val
loader over the same remote do not collide (streaming refuses two live datasets on one local
folder), and a dataset rewritten in place is read afresh.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

from streaming import Stream, StreamingDataset
from streaming.base.dataset import _ShardState
from streaming.base.storage import CloudDownloader

from vltrain.config import ConfigError
from vltrain.data import host_limits, schema, shm_prefix
from vltrain.data.collate import STREAM_KEY, UNREADABLE_KEY, StreamInfo
from vltrain.data import storage_faults
from vltrain.data.errors import CacheFull, DataError, MetaError, ShardError, StorageUnavailable
from vltrain.redact import redact
from vltrain.data.shm_tracking import untrack_streaming_segments
from vltrain.engine.distributed import from_main_rank

log = logging.getLogger(__name__)

_REMOTE_SCHEMES = ("s3://", "gs://", "oci://", "azure://", "azure-dl://", "hf://", "sftp://",
                   "dbfs:", "https://", "http://")


def is_remote(path: str) -> bool:
    return path.startswith(_REMOTE_SCHEMES)


def node_rank() -> int:
    """This process's node index (see module docstring for the variables read)."""
    for var in ("GROUP_RANK", "NODE_RANK", "SLURM_NODEID"):
        if os.environ.get(var, "") != "":
            return int(os.environ[var])
    return int(os.environ.get("RANK", 0)) // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def default_cache_root() -> str:
    """``data.cache_dir`` left empty: ``<temp dir>/vltrain_cache-<user>`` (``$TMPDIR`` honoured).
    Per user: the first job on a node creates its folders with that user's permissions, so a
    root shared by every user would fail the next user's job on that node."""
    try:
        import getpass
        user = getpass.getuser()
    except (KeyError, OSError):              # a container user without a passwd entry or $USER
        user = str(os.getuid())
    return os.path.join(tempfile.gettempdir(), f"vltrain_cache-{user}")


def cache_dir_for(cache_root: str, run_name: str, remote: str, digest: str, role: str = "train") -> str:
    """``<cache_root>/node<N>/<run_name>/<blake2s(remote)[:12]>-<digest>-<role>`` (``digest``:
    ``index_digest`` of its index.json; ``cache_root`` "": ``default_cache_root()``).

    Per run: streaming refuses two live datasets on one local folder, so two jobs sharing a
    node (a sweep, an eval beside training) each need their own; a requeued job keeps its
    name and finds its shards still there. Per index: streaming reads a cached ``index.json``
    instead of the remote one, so a dataset rewritten at the same path would otherwise be
    read from the old copy's index and shards."""
    h = hashlib.blake2s(remote.rstrip("/").encode(), digest_size=6).hexdigest()
    return os.path.join(cache_root or default_cache_root(), f"node{node_rank()}", run_name,
                        f"{h}-{digest}-{role}")


def index_digest(index_text: str) -> str:
    """A dataset's identity by its ``index.json`` (its shards and their sizes), not its path."""
    return hashlib.blake2s(index_text.encode(), digest_size=6).hexdigest()


def _read_text(remote: str, name: str, timeout: float) -> str:
    """Text of file ``name`` in a local dataset folder or under a remote prefix."""
    if is_remote(remote):
        with tempfile.TemporaryDirectory(prefix="vltrain_meta_") as tmp:
            local = os.path.join(tmp, name)
            try:
                CloudDownloader.direct_download(remote.rstrip("/") + "/" + name, local, timeout)
                with open(local) as f:
                    return f.read()
            except Exception as e:  # noqa: BLE001 - every backend raises its own type
                if storage_faults.is_transient(e):
                    raise StorageUnavailable(f"dataset {remote}: cannot read {name}: {storage_faults.store_of(remote)} "
                                             f"did not answer ({type(e).__name__}: {e}); "
                                             f"{remote_hint(e, name)}") from e
                raise MetaError(f"dataset {remote}: cannot read {name} ({type(e).__name__}: "
                                f"{e}); {remote_hint(e, name)}") from e
    path = os.path.join(remote, name)
    if os.path.isfile(remote):
        raise MetaError(f"dataset {remote}: a file; give the dataset's folder (the one holding index.json and "
                        f"{schema.META_FILE}), e.g. {os.path.dirname(remote) or '.'}")
    if not os.path.isfile(path):
        what = "folder does not exist" if not os.path.isdir(remote) else f"no {name}"
        raise MetaError(f"dataset {remote}: {what}; is this a dataset written by data_tools?")
    with open(path) as f:
        return f.read()


# What to check, by the object-store client's exception (botocore's names; other backends
# fall through to the last line).
_REMOTE_HINTS = {
    "NoCredentialsError": "no credentials in this process's environment: export AWS_ACCESS_KEY_ID and "
                          "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) where the job starts (Slurm: before sbatch, or "
                          "sbatch --export=ALL,...)",
    "PartialCredentialsError": "incomplete credentials: set both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
    "EndpointConnectionError": "the object store cannot be reached from this node: check S3_ENDPOINT_URL (for a "
                               "store other than AWS) and the network",
    "ConnectTimeoutError": "the object store does not answer: check S3_ENDPOINT_URL and the network",
    "ClientError": "check the bucket and the prefix (a dataset's root holds {name}, written by data_tools) "
                   "and that these credentials may read it",
}


def remote_hint(e: Exception, name: str) -> str:
    if storage_faults.is_denied(e):
        return storage_faults.DENIED_HINT
    for cls in type(e).__mro__:
        if cls.__name__ in _REMOTE_HINTS:
            return _REMOTE_HINTS[cls.__name__].format(name=name)
    return "is this a dataset written by data_tools?"


def hash_to_validate(setting: str, index_text: str, remote: str) -> Optional[str]:
    """The hash streaming checks each downloaded shard file against (``data.validate_hash``).

    ``auto``: xxh64 when the index records it for every shard file (data_tools writes it:
    a shard corrupted in storage or in transit then fails loudly, naming it, instead of
    feeding wrong features), else none; ``""``: none; anything else is required of the index."""
    if setting != "auto":
        return setting or None
    try:
        shards = json.loads(index_text)["shards"]
        files = [s["zip_data"] or s["raw_data"] for s in shards]
        ok = bool(files) and all("xxh64" in (f.get("hashes") or {}) for f in files)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise MetaError(f"dataset {remote}: index.json is unreadable ({e})") from e
    if not ok:
        log.info("dataset %s: its index records no xxh64 hashes; shards are not hash-checked", remote)
    return "xxh64" if ok else None


def count_samples(index_text: str, remote: str) -> int:
    """Number of samples of an MDS dataset, from its ``index.json``."""
    try:
        return int(sum(int(s["samples"]) for s in json.loads(index_text)["shards"]))
    except (ValueError, KeyError, TypeError) as e:
        raise MetaError(f"dataset {remote}: index.json is unreadable ({e})") from e


@dataclass(frozen=True)
class DatasetFacts:
    """What a run takes from a dataset's ``vltrain_meta.json`` and ``index.json``."""
    meta: dict
    digest: str                    # index_digest: its identity (cache folder, resume check)
    validate_hash: Optional[str]   # hash_to_validate's
    samples: int


def read_facts(remotes: list[str], d) -> dict[str, DatasetFacts]:
    """``DatasetFacts`` of each of ``remotes`` (``d``: the config's data section), read by rank 0
    and broadcast (``from_main_rank``; collective when torch.distributed is on).

    Why: an index.json lists every shard (~45 MB for CC12M in 64 MB shards); every rank
    downloading and parsing it was 23 GB from the object store at each start of 512 ranks,
    before streaming's own copy (one a node). Its errors are rank 0's, raised on every rank."""
    def read() -> dict[str, DatasetFacts]:
        out = {}
        for remote in dict.fromkeys(remotes):
            meta = read_meta(remote, d.download_timeout)
            index = _read_text(remote, "index.json", d.download_timeout)
            out[remote] = DatasetFacts(meta, index_digest(index), hash_to_validate(d.validate_hash, index, remote),
                                       count_samples(index, remote))
        return out
    return from_main_rank(read, long_wait=True)      # an index's download retried: minutes


def read_meta(remote: str, timeout: float = 60.0) -> dict:
    """Contents of ``vltrain_meta.json`` of a dataset in a local folder or at a remote prefix."""
    if not remote:
        raise MetaError("no dataset path given (data.train / data.val / data.text_train)")
    text = _read_text(remote, schema.META_FILE, timeout)
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetaError(f"dataset {remote}: {schema.META_FILE} is not valid JSON: {e}") from e
    if meta.get("kind") not in schema.KINDS:
        raise MetaError(f"dataset {remote}: {schema.META_FILE} has unknown kind {meta.get('kind')!r}")
    if meta.get("version", 0) > schema.META_VERSION:
        raise MetaError(f"dataset {remote}: {schema.META_FILE} version {meta.get('version')} is newer "
                        f"than this vltrain understands ({schema.META_VERSION})")
    return meta


class VLStreamingDataset(StreamingDataset):
    """``StreamingDataset`` that tags samples with their stream and fails loudly.

    * every sample gets ``_stream`` (its stream index), so the collator keys randomness and
      names the dataset in errors;
    * a shard that fails to download, decompress or pass its hash check raises ``ShardError``
      naming the shard file and the dataset (streaming 0.13 only logs background-thread
      failures and ends the epoch early); the bad local copy is deleted so a retry re-downloads;
      a store that did not answer raises ``StorageUnavailable`` instead (worth a requeue);
    * a shard whose local size disagrees with ``index.json`` (truncated), or that cannot be read,
      raises ``ShardError``, and its cached copy is deleted;
    * its ranks agree on their shared-memory prefix beside other jobs on the host
      (``vltrain/data/shm_prefix.py``).
    """

    def __init__(self, *args, **kwargs):
        shm_prefix.install()
        untrack_streaming_segments()      # before its segments exist
        super().__init__(*args, **kwargs)
        self._size_checked: set[int] = set()
        self._bg_error: Optional[BaseException] = None

    # -- helpers
    def _shard_files(self, shard_id: int):
        stream = self.streams[int(self.stream_per_shard[shard_id])]
        root = os.path.join(stream.local, stream.split)
        for raw, zipped in self.shards[shard_id].file_pairs:
            yield stream, os.path.join(root, raw.basename), raw, \
                (os.path.join(root, zipped.basename) if zipped else None)

    def _describe(self, shard_id: int) -> str:
        stream = self.streams[int(self.stream_per_shard[shard_id])]
        names = ", ".join(raw.basename + (f" ({z.basename})" if z else "")
                          for raw, z in self.shards[shard_id].file_pairs)
        return f"dataset {stream.remote or stream.local}: shard {names}"

    def _check_size(self, shard_id: int) -> None:
        for _, path, raw, _ in self._shard_files(shard_id):
            if os.path.isfile(path):
                size = os.path.getsize(path)
                if size != raw.bytes:
                    raise ShardError(f"{self._describe(shard_id)} is truncated or corrupt: local copy "
                                     f"{path} has {size} bytes, index.json says {raw.bytes}"
                                     f"{self._drop_cached(shard_id)}")
        self._size_checked.add(shard_id)

    def _remove_local(self, shard_id: int) -> bool:
        """Delete the shard's files from the cache: a later run must not trust them. Never
        where a stream reads its dataset in place (no remote): they are the dataset itself."""
        removed = False
        for stream, path, _, zpath in self._shard_files(shard_id):
            if stream.remote in (None, stream.local):
                return False
            for p in (path, zpath):
                if p and os.path.isfile(p):
                    try:
                        os.remove(p)
                        removed = True
                    except OSError:
                        pass
        return removed

    def _drop_cached(self, shard_id: int) -> str:
        """For a shard that is there but unreadable: without this, every later run on this
        cache would fail the same way. The text says so, for the error message."""
        return "; its cached copy was removed, so a rerun downloads it again" if self._remove_local(shard_id) else ""

    # -- overrides
    def prepare_shard(self, shard_id: int, blocking: bool = True) -> None:
        try:
            super().prepare_shard(shard_id, blocking)
        except Exception as e:  # noqa: BLE001
            # Unblock other workers waiting on this shard (they retry and fail the same way),
            # and drop the bad local files: a later run must not trust them.
            try:
                if self._shard_states[shard_id] == _ShardState.PREPARING:
                    self._shard_states[shard_id] = _ShardState.REMOTE
            except Exception:  # noqa: BLE001
                pass
            self._remove_local(shard_id)
            if isinstance(e, DataError):
                raise
            if storage_faults.is_transient(e):
                stream = self.streams[int(self.stream_per_shard[shard_id])]
                raise StorageUnavailable(
                    f"{self._describe(shard_id)} could not be downloaded: {storage_faults.store_of(stream.remote)} "
                    f"did not answer in {stream.download_retry} tries (data.download_retry) "
                    f"({type(e).__name__}: {e})") from e
            full = host_limits.disk_full(e)
            if full is not None:
                local = self.streams[int(self.stream_per_shard[shard_id])].local
                raise CacheFull(f"{self._describe(shard_id)} could not be written to the cache folder {local}: its "
                                f"filesystem is full ({host_limits.free_mib(local)} MiB free; {full}). Point "
                                "data.cache_dir at a larger disk, free space there, or set data.cache_limit (e.g. "
                                "20gb) so older shards are evicted") from e
            what = "failed its hash check (corrupt shard or download)" if "Checksum failure" in str(e) \
                else "could not be downloaded or decompressed"
            hint = f"; {storage_faults.DENIED_HINT}" if storage_faults.is_denied(e) else ""
            raise ShardError(f"{self._describe(shard_id)} {what} ({type(e).__name__}: {e}){hint}") from e

    def get_item(self, sample_id: int, retry: int = 7):
        if self._bg_error is not None:
            raise self._bg_error
        shard_id, _ = self.spanner[sample_id]
        try:
            sample = super().get_item(sample_id, retry)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            if self._bg_error is not None:
                raise self._bg_error from e
            self._check_size(shard_id)
            if isinstance(e, (UnicodeDecodeError, json.JSONDecodeError)):
                # The shard's bytes are as written (right size, a str / json column that is not
                # UTF-8 or JSON): one bad sample, for the collator to skip or report; the cached
                # copy stays, as a rerun would read the same
                return {UNREADABLE_KEY: f"{self._describe(shard_id)}: sample {sample_id}: a text column does "
                                        f"not decode ({type(e).__name__}: {e}): it was written so",
                        STREAM_KEY: int(self.stream_per_shard[shard_id])}
            # Right size, unreadable (corrupt after decompression, hash check off): drop the
            # cached copy, or every later run on this cache fails the same way.
            raise ShardError(f"{self._describe(shard_id)}: cannot read sample {sample_id} "
                             f"({type(e).__name__}: {e}){self._drop_cached(shard_id)}") from e
        if shard_id not in self._size_checked:
            self._check_size(shard_id)
        sample[STREAM_KEY] = int(self.stream_per_shard[shard_id])
        return sample

    def on_exception(self, future) -> None:
        # Streaming re-raises inside the future's callback (only logged) and lets the epoch end
        # early; we record the error, stop the other threads, and raise it from the iterator.
        exc = future.exception()
        if exc is None:
            return
        if self._bg_error is None:
            self._bg_error = exc if isinstance(exc, DataError) else \
                ShardError(f"dataset background download failed: {type(exc).__name__}: {exc}")
        self._event.set()

    # A background thread that raises never reports its exit, and streaming's end-of-epoch
    # ``_Iterator.exit()`` then waits for it forever: report it on the way out.
    def _prepare_thread(self, it) -> None:
        try:
            super()._prepare_thread(it)
        except BaseException:
            it.on_exit()
            raise

    def _ready_thread(self, it) -> None:
        try:
            super()._ready_thread(it)
        except BaseException:
            it.on_exit()
            raise

    def __iter__(self):
        yield from super().__iter__()
        if self._bg_error is not None:   # streaming ends the epoch quietly; we do not
            raise self._bg_error


# ---------------------------------------------------------------------------- building

SHM_DIR = "/dev/shm"
# Younger segments may be a starting job's, created but not yet mapped (microseconds) or its
# registration not yet locked (shm_prefix.hold_registration): the sweep waits until they are
# this old and looks again, rather than leave them: a job restarted right after a SIGKILL
# (its segments created seconds before) meets its own leaked registration, which streaming
# refuses ("Reused local directory") until this sweep removes it. (Segments a killed rank's
# workers still map, for up to 5 s after it, are not waited for.)
SHM_MIN_AGE_S = 5.0


def _mapped_shm_names() -> set:
    """Names under /dev/shm that a live process maps (every process whose maps we can read:
    all of ours, which are the only segments we could unlink anyway)."""
    names = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    i = line.find(SHM_DIR + "/")
                    if i >= 0:
                        names.add(line[i + len(SHM_DIR) + 1:].split()[0])
        except OSError:          # gone, or another user's
            continue
    return names


def _remove_old(folder: str, names: list[str]) -> tuple[list[str], float]:
    """Unlink the files ``names`` of ``folder`` older than ``SHM_MIN_AGE_S`` (younger ones may be
    a starting job's); returns those removed and the seconds until the youngest kept is that old
    (0: none kept). One that vanished or is another user's stays."""
    now, removed, wait = time.time(), [], 0.0
    for name in names:
        path = os.path.join(folder, name)
        try:
            age = now - os.stat(path).st_mtime
            if age < SHM_MIN_AGE_S:
                wait = max(wait, min(SHM_MIN_AGE_S, SHM_MIN_AGE_S - age))   # a future mtime: one wait
                continue
            os.unlink(path)
            removed.append(name)
        except OSError:
            continue
    return removed, wait


def _clean_host_shm() -> list[str]:
    """Unlink streaming's shared-memory segments that no live process maps (leaked by crashed
    or killed runs); returns their names.

    Streaming's own ``clean_stale_shared_memory`` unlinks *every* streaming segment on the
    host, including those of another job running there (on a shared node that breaks the
    other job's next epoch or dataloader worker), and stops at the first unused prefix, so
    leaks above a gap stay. This sweep keeps anything a process we can see maps, every
    segment of a prefix whose registration a live rank holds (``shm_prefix.registration_held``:
    also a job in another PID namespace), and what is younger than ``SHM_MIN_AGE_S``: it waits
    (at most that long) until those are old enough and looks again, keeping what is then mapped,
    held or younger still."""
    from streaming.base.constant import SHM_TO_CLEAN
    if not os.path.isdir(SHM_DIR) or not os.path.isdir("/proc"):
        return []                # not Linux: leave streaming's segments alone
    pattern = re.compile(r"^\d{6}_(%s)$" % "|".join(map(re.escape, SHM_TO_CLEAN)))
    removed = []
    for last in (False, True):      # young ones: wait until they are old enough, then look again
        candidates = [n for n in os.listdir(SHM_DIR) if pattern.match(n)]
        if not candidates:
            break
        in_use = _mapped_shm_names()
        held = {p for p in {n[:6] for n in candidates} if shm_prefix.registration_held(int(p))}
        gone, wait = _remove_old(SHM_DIR, [n for n in candidates if n not in in_use and n[:6] not in held])
        removed += gone
        if not wait or last:
            break
        log.info("waiting %.1f s for young unused streaming shared memory (a run that just ended, or one "
                 "starting) before sweeping it", wait)
        time.sleep(wait)
    if removed:
        log.info("removed %d stale streaming shared-memory segments (%s ...)", len(removed), removed[0])
    return removed


def _clean_host_filelocks() -> list[str]:
    """Remove streaming's barrier/cache lock files (``<tmp>/NNNNNN_barrier_filelock`` ...) of
    prefixes with no streaming segment left on the host (finished or crashed runs'); returns
    their names. Streaming never removes them and its prefix scan skips every prefix that has
    one: on a long-lived node each run left ~4 files and started its prefixes above all of them
    (past 9,000 after ~4,000 runs on one machine). A live run's prefix keeps its segments, so
    its lock files stay; files younger than ``SHM_MIN_AGE_S`` (a starting job's) stay too."""
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    if not os.path.isdir(SHM_DIR):
        return []
    lock = re.compile(r"^(\d{6})_(%s|%s)$" % (re.escape(BARRIER_FILELOCK), re.escape(CACHE_FILELOCK)))
    live = {n[:6] for n in os.listdir(SHM_DIR) if re.match(r"^\d{6}_", n)}
    tmp = tempfile.gettempdir()
    removed, _ = _remove_old(tmp, [n for n in os.listdir(tmp) if (m := lock.match(n)) and m.group(1) not in live])
    if removed:
        log.info("removed %d stale streaming lock files under %s (%s ...)", len(removed), tmp, removed[0])
    return removed


def clean_stale_shared_memory() -> None:
    """Remove streaming shared memory leaked by crashed runs (see ``_clean_host_shm``) and
    the lock files of prefixes nobody uses any more (``_clean_host_filelocks``).

    One process per *host* sweeps, then every rank meets at a barrier (so no rank builds a
    dataset while the sweep runs). Every rank must call it when torch.distributed is on.
    """
    import torch.distributed as dist
    ranks = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if ranks:
        hosts = [None] * dist.get_world_size()
        dist.all_gather_object(hosts, socket.gethostname())
    if not ranks or hosts.index(socket.gethostname()) == dist.get_rank():
        _clean_host_shm()
        _clean_host_filelocks()
    if ranks:
        dist.barrier()


class _NodeDist:
    """Stand-in for ``torch.distributed`` inside streaming's constructor: barriers on one node."""

    def __init__(self, group):
        import torch.distributed as dist
        self._dist, self._group = dist, group

    def is_available(self):
        return True

    def is_initialized(self):
        return True

    def barrier(self, *a, **k):
        self._dist.barrier(group=self._group)

    def __getattr__(self, name):
        return getattr(self._dist, name)


_NODE_GROUPS: dict = {}


@contextmanager
def _serialised_if_nodes_share_host():
    """Let emulated nodes sharing one host build their datasets one after another.

    Streaming's local leaders pick a shared-memory prefix, *then* meet at a global barrier,
    *then* register it: two leaders on one host pick the same prefix and the second dies with
    ``FileExistsError``. When several nodes share a host, we take a host-wide file lock around
    each node's construction and make streaming's barriers node-local. One node per host (real
    clusters): nothing changes.
    """
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    key = dist.get_world_size()
    if key not in _NODE_GROUPS:
        info = [None] * dist.get_world_size()
        dist.all_gather_object(info, (socket.gethostname(), node_rank()))
        nodes_per_host: dict = {}
        for host, node in info:
            nodes_per_host.setdefault(host, set()).add(node)
        shared = any(len(v) > 1 for v in nodes_per_host.values())
        groups = {}
        if shared:
            for node in sorted({n for _, n in info}):
                ranks = [r for r, (_, n) in enumerate(info) if n == node]
                groups[node] = dist.new_group(ranks, backend="gloo")
        _NODE_GROUPS[key] = (shared, groups)
    shared, groups = _NODE_GROUPS[key]
    if not shared:
        yield
        return
    import streaming.base.dataset as sd
    import streaming.base.shared.prefix as sp
    from filelock import FileLock
    group = groups[node_rank()]
    lock = FileLock(os.path.join(tempfile.gettempdir(), "vltrain_streaming_init.lock"))
    leader = int(os.environ.get("LOCAL_RANK", 0)) == 0
    if leader:
        lock.acquire()
    saved = sd.dist, sp.dist
    try:
        dist.barrier(group=group)
        sd.dist = sp.dist = _NodeDist(group)
        yield
        dist.barrier(group=group)
    finally:
        sd.dist, sp.dist = saved
        if leader:
            lock.release()
    dist.barrier()


MAX_TEXT_VISITS = 8   # more visits of a text corpus per epoch than this is a misconfigured mix


def split_remotes(cfg, split: str = "train") -> list[str]:
    """The datasets ``split`` reads: data.train (+ data.text_train) or ``data.<split>``."""
    d = cfg.data
    if split == "train":
        if not d.train:
            raise MetaError("data.train is empty: set it to an MDS folder or s3:// prefix")
        return [d.train] + ([d.text_train] if d.text_train else [])
    if not getattr(d, split):
        raise MetaError(f"data.{split} is empty")
    return [getattr(d, split)]


def stream_remotes(cfg, facts: dict[str, DatasetFacts], split: str = "train") -> list[tuple[str, Optional[int]]]:
    """``[(remote, choose)]`` for ``split``; ``choose`` None = every sample once per epoch.

    Mixing (``data.text_train``): an epoch is one pass over the image-text data plus
    ``K = round(n_image_text * p / (1 - p))`` text-only samples (``p = data.text_proportion``),
    so a fraction ``p`` of the epoch is text and no image-text sample repeats within an epoch
    (a repeat would get the same caption and masks: randomness is keyed on the epoch).

    A text corpus of ``m < K`` samples is visited ``ceil(K / m)`` times per epoch: each visit is
    a stream of its own (every sample once, the last visit a random ``K mod m`` of them), so
    repeats get their own stream index and so their own masks (streaming's up-sampling of one
    stream would repeat the sample id, and with it the masks). At most ``MAX_TEXT_VISITS``.
    """
    d = cfg.data                       # (split_remotes, read before, refused an empty one)
    if split == "train":
        if d.text_train:               # (text_proportion in (0, 1): config.check_values)
            n = facts[d.train].samples
            k = max(1, int(round(n * d.text_proportion / (1.0 - d.text_proportion))))
            m = facts[d.text_train].samples
            if m == 0:
                raise MetaError(f"data.text_train ({d.text_train}) holds no samples")
            full, rest = divmod(k, m)
            if full + bool(rest) > MAX_TEXT_VISITS:
                raise ValueError(
                    f"data.text_proportion={d.text_proportion} asks for {k} text samples per epoch "
                    f"(beside {n} image-text samples) but data.text_train ({d.text_train}) holds {m}: "
                    f"each would be read {k / m:.1f} times an epoch (at most {MAX_TEXT_VISITS}); "
                    f"use a larger text corpus or a lower data.text_proportion")
            return [(d.train, None)] + [(d.text_train, None)] * full + ([(d.text_train, rest)] if rest else [])
        return [(d.train, None)]
    return [(getattr(d, split), None)]


def build_dataset(cfg, batch_size: int, split: str = "train", shuffle: Optional[bool] = None
                  ) -> tuple[VLStreamingDataset, list[StreamInfo]]:
    """The ``StreamingDataset`` of ``split`` and one ``StreamInfo`` (remote + meta) per stream.

    Call ``clean_stale_shared_memory()`` once (every rank) before the first build.
    """
    d = cfg.data
    shuffle = d.shuffle if shuffle is None else shuffle
    infos, streams, identity = [], [], []
    facts = read_facts(split_remotes(cfg, split), d)      # a text corpus read several times: once
    for remote, choose in stream_remotes(cfg, facts, split):
        visit = sum(i.name == remote for i in infos)          # streaming wants a folder per stream
        fact = facts[remote]
        infos.append(StreamInfo(remote, fact.meta))
        role = split if not visit else f"{split}-visit{visit}"
        streams.append(Stream(remote=remote if is_remote(remote) else os.path.abspath(remote),
                              local=cache_dir_for(d.cache_dir, cfg.run_name, remote, fact.digest, role),
                              choose=choose, validate_hash=fact.validate_hash))
        # (saved in checkpoints: an sftp:// password never)
        identity.append({"dataset": redact(remote), "choose": choose, "index": fact.digest})
    kw = dict(streams=streams, batch_size=batch_size, shuffle=shuffle,
              shuffle_seed=int(cfg.train.seed) % (2 ** 32),
              download_timeout=float(d.download_timeout), download_retry=int(d.download_retry))
    if d.cache_limit:
        from streaming.base.util import bytes_to_int
        try:
            bytes_to_int(d.cache_limit)       # else streaming's error names data.train's stream
        except ValueError as e:
            raise ConfigError(f"config key 'data.cache_limit': {e}") from None
        kw["cache_limit"] = d.cache_limit
    if d.num_canonical_nodes > 0:
        kw["num_canonical_nodes"] = d.num_canonical_nodes
    with _serialised_if_nodes_share_host():
        ds = VLStreamingDataset(**kw)
    # What the data order is made of, for a resume's check (loader.load_state_dict): each
    # stream's index.json (its shards' sizes) and share; not its path (a moved copy is the same).
    ds.identity = [dict(s, samples=int(n)) for s, n in zip(identity, ds.samples_per_stream)]
    return ds, infos
