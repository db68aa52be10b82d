"""Data errors. Each takes one message string, so DataLoader workers can re-raise them intact."""
from __future__ import annotations


class DataError(RuntimeError):
    """A data problem; the message names the dataset and the shard or sample."""


class BadSampleError(DataError):
    """One sample is unusable (NaN/inf or wrong-shape features, missing column, empty text...)."""


class ShardError(DataError):
    """A shard could not be downloaded, validated (hash) or read (truncated/corrupt)."""


class MetaError(DataError):
    """``vltrain_meta.json`` is missing, unreadable, or disagrees with what the run needs."""


class StorageUnavailable(DataError):
    """The object store did not answer (connection refused, reset or timed out; a 5xx or
    throttling reply) for a shard or a dataset's metadata, after ``data.download_retry``
    tries. Transient by nature: ``run.py`` exits with ``EXIT_STORAGE`` and the Slurm
    templates requeue the job (a bounded number of times)."""


class CacheFull(DataError):
    """The local cache folder (``data.cache_dir``) had no room for a shard: not the shard's
    fault; the message names the folder, its free space and the keys to change."""
