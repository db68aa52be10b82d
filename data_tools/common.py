"""Shared pieces of the data tools: output location handling, the MDS writer, bad-input policy.

Every tool writes one MDS dataset per ``--out`` (a local folder or ``s3://bucket/prefix``;
other schemes streaming supports, such as ``gs://``, work through streaming's uploaders)
following :mod:`vltrain.data.schema`: the shards and ``index.json`` written by
``streaming.MDSWriter`` (zstd, xxh64 hashes) and ``vltrain_meta.json`` beside them.

Credentials are never taken from flags and never written anywhere: boto3 (and streaming)
read them from the environment (``AWS_ACCESS_KEY_ID`` ..., ``S3_ENDPOINT_URL`` for an
S3-compatible endpoint).
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import shutil
import sys
import tempfile
import traceback
import urllib.parse
from collections import Counter
from typing import Any, Callable, Iterator

from vltrain.data import schema

COMPRESSION = "zstd"
HASHES = ["xxh64"]           # streaming verifies these at read time (validate_hash="xxh64")
DEFAULT_SIZE_LIMIT = "64mb"
MAX_SKIP_MESSAGES = 20       # skip warnings printed one by one, per kind; the rest counted (and listed in SKIPPED_FILE)
SKIPPED_FILE = schema.SKIPPED_FILE


class BadInputError(Exception):
    """Input that would produce a garbled sample. The message names the file/row/sample."""


class SkipCounter:
    """Either raises :class:`BadInputError` on bad input or (``skip_bad``) counts and reports it.

    ``category`` is a short stable key ("nan_features", "empty_caption", ...) so the meta and
    the final report can say how many of each kind were skipped. A skipped input may be one
    sample or many (an image without features drops all its questions): ``read``, which the
    tool counts in the unit its split is scored in (questions, expressions, lines, images),
    against the samples written says how many the dataset lacks.
    """

    def __init__(self, skip_bad: bool = False, stream=None, skip: frozenset = frozenset()):
        self.skip_bad = skip_bad
        self.skip = skip              # categories counted and skipped even without skip_bad
        self.counts: Counter[str] = Counter()
        self.stream = stream
        self.skipped: list[dict] = []     # every skip, for SKIPPED_FILE
        self.read = 0                     # input samples read (see above)

    @classmethod
    def from_args(cls, args) -> "SkipCounter":
        """``--skip-bad`` skips every kind of bad input; ``--skip-missing-features`` only images
        without features (Conceptual Captions: the URLs that no longer download), so that NaN,
        corrupt or mis-shaped features still stop the tool."""
        missing = getattr(args, "skip_missing_features", False)
        return cls(args.skip_bad, skip=frozenset({"no_features"}) if missing else frozenset())

    def bad(self, category: str, message: str) -> None:
        """Report one bad input. Raises unless skipping; returns when the caller should skip."""
        if not (self.skip_bad or category in self.skip):
            raise BadInputError(message)
        self.counts[category] += 1
        self.skipped.append({"reason": category, "input": message})
        out = self.stream or sys.stderr
        n = self.counts[category]       # per kind: 30 dead links must not hide the one NaN file
        if n <= MAX_SKIP_MESSAGES:
            print(f"skipping: {message}", file=out)
        elif n == MAX_SKIP_MESSAGES + 1:
            print(f"skipping: (further {category} messages suppressed; counted at the end, every one listed "
                  f"in the output's {SKIPPED_FILE})", file=out)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))

    def finish(self, writer: "DatasetWriter", unit: str | None) -> None:
        """Into ``writer``'s ``vltrain_meta.json``: the skip counts, and how many of the input's
        ``unit``s (``read``) the dataset lacks (None: its samples are not the input's, as text
        chunks); every skipped input into its SKIPPED_FILE."""
        writer.meta.update(skipped=self.as_dict(), skipped_total=self.total)
        if unit:
            writer.meta.update(input_unit=unit, input_samples=self.read,
                               samples_left_out=max(self.read - writer.count, 0))
        if self.skipped:
            writer.add_json(SKIPPED_FILE, self.skipped)

    def report(self, stream=None) -> None:
        out = stream or sys.stdout
        if self.total:
            detail = ", ".join(f"{k}: {v}" for k, v in sorted(self.counts.items()))
            print(f"skipped {self.total} bad input(s) ({detail}; each in the output's {SKIPPED_FILE})", file=out)
        else:
            print("skipped 0 bad inputs", file=out)


# ---------------------------------------------------------------- locations

def is_remote(path: str) -> bool:
    """True for ``scheme://...`` locations (s3://, gs://, ...), False for local paths."""
    return urllib.parse.urlparse(path).scheme not in ("", "file")


def join_location(base: str, *names: str) -> str:
    """Join a local folder or a remote prefix with relative names."""
    if is_remote(base):
        return "/".join([base.rstrip("/"), *[n.strip("/") for n in names]])
    return os.path.join(base, *names)


def _s3_client():
    import boto3
    # Credentials and region come from the environment / AWS config, never from us.
    return boto3.session.Session().client("s3", endpoint_url=os.environ.get("S3_ENDPOINT_URL") or None)


def upload_file(local_path: str, url: str) -> None:
    """Copy one local file to ``url`` (``s3://`` via boto3 honouring ``S3_ENDPOINT_URL``;
    other remote schemes via streaming's uploader; a local path is a plain copy)."""
    if not is_remote(url):
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        shutil.copyfile(local_path, url)
        return
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme == "s3":
        _s3_client().upload_file(local_path, parsed.netloc, parsed.path.lstrip("/"))
        return
    from streaming.base.storage import CloudUploader
    remote_dir, name = url.rsplit("/", 1)
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copyfile(local_path, os.path.join(tmp, name))
        CloudUploader.get((tmp, remote_dir), keep_local=True, exist_ok=True).upload_file(name)


def remote_has_index(url: str) -> bool:
    """Whether a remote prefix already holds an ``index.json``, listed through streaming's
    uploader for its scheme (s3://, gs://, oci://). Storage whose uploader cannot list
    (azure://, hf://, dbfs:, ...) is not checked: a warning says so, and it counts as empty."""
    from streaming.base.storage import CloudUploader
    key = "/".join([p for p in (urllib.parse.urlparse(url).path.strip("/"), "index.json") if p])
    with tempfile.TemporaryDirectory() as tmp:
        try:
            names = CloudUploader.get((tmp, url.rstrip("/")), exist_ok=True).list_objects("index.json") or []
        except NotImplementedError:
            print(f"warning: cannot tell whether {url} already holds a dataset (streaming cannot list that "
                  "storage): writing without the check", file=sys.stderr)
            return False
    return any(n.lstrip("/") == key for n in names)


def remove_remote_index(url: str) -> None:
    """Delete ``index.json`` under an ``s3://`` prefix (what makes the prefix a dataset)."""
    parsed = urllib.parse.urlparse(url)
    key = "/".join([p for p in (parsed.path.strip("/"), "index.json") if p])
    _s3_client().delete_object(Bucket=parsed.netloc, Key=key)


def download_file(url: str, local_path: str, timeout: float = 120.0) -> None:
    """Fetch one file from a local path or remote URL (through streaming's downloaders)."""
    if not is_remote(url):
        shutil.copyfile(url, local_path)
        return
    from streaming.base.storage import CloudDownloader
    if os.path.exists(local_path):
        os.remove(local_path)
    CloudDownloader.direct_download(url, local_path, timeout=timeout)


def read_text_location(url: str) -> str:
    """The text of a UTF-8 file at a local path or a remote URL (BadInputError naming it if unreadable)."""
    try:
        if not is_remote(url):
            with open(url, encoding="utf-8") as f:
                return f.read()
        with tempfile.TemporaryDirectory() as tmp:
            local = os.path.join(tmp, os.path.basename(urllib.parse.urlparse(url).path) or "file")
            download_file(url, local)
            with open(local, encoding="utf-8") as f:
                return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{url}: cannot read it ({type(e).__name__}: {e})") from e


def write_json_to(local_dir: str, remote_dir: str | None, name: str, obj: Any) -> str:
    """Write ``obj`` as ``name`` into ``local_dir`` and, if ``remote_dir``, upload it there."""
    path = os.path.join(local_dir, name)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
        f.write("\n")
    if remote_dir:
        upload_file(path, join_location(remote_dir, name))
    return path


# ---------------------------------------------------------------- the writer

class DatasetWriter:
    """One MDS dataset being written: ``write(sample)``, ``add_json(name, obj)``, ``meta``."""

    def __init__(self, mds_writer, out: str, kind: str, columns: dict[str, str], meta: dict):
        self._w = mds_writer
        self.out = out
        self.kind = kind
        self.columns = columns
        self.meta = meta
        self.count = 0
        self._extra: dict[str, Any] = {}
        self._ids: set[int] = set()
        # a captions dataset's references, which self-critical training reads instead of the
        # shards: one JSON line a sample, written as it goes (CC's millions in no memory)
        self._refs = None
        if kind == "captions":
            self.meta["references_file"] = schema.REFERENCES_FILE
            self._refs = open(os.path.join(mds_writer.local, schema.REFERENCES_FILE), "w", encoding="utf-8")

    def write(self, sample: dict[str, Any]) -> None:
        missing = set(self.columns) - set(sample)
        extra = set(sample) - set(self.columns)
        if missing or extra:
            # A programming error in a tool, not bad input: fail loudly.
            raise ValueError(f"sample {sample.get('sample_id')} does not match the {self.kind} schema: "
                             f"missing {sorted(missing)}, unexpected {sorted(extra)}")
        sid = int(sample["sample_id"])
        if sid in self._ids:
            raise BadInputError(f"duplicate sample_id {sid} in {self.out} (image/question ids must be unique)")
        self._ids.add(sid)
        self._w.write(sample)
        self.count += 1
        if self._refs is not None:
            self._refs.write(json.dumps([schema.references_key(sample), [str(c) for c in sample["captions"]]]) + "\n")

    def close_references(self, remote: str | None) -> None:
        """The references file complete (and uploaded, for a remote dataset), or closed on a failure
        (``remote`` None: the partial output is removed)."""
        if self._refs is None:
            return
        self._refs.close()
        if remote:
            upload_file(self._refs.name, join_location(remote, schema.REFERENCES_FILE))

    def add_json(self, name: str, obj: Any) -> None:
        """An extra JSON file written beside the shards (e.g. the answer vocabulary)."""
        self._extra[name] = obj

    @property
    def shard_count(self) -> int:
        return len(self._w.shards)


@functools.cache
def _index_last_writer():
    from streaming import MDSWriter     # imported on first use: the tools' --help stays fast

    class IndexLastWriter(MDSWriter):
        """streaming 0.13's MDSWriter uploads ``index.json`` once the last shard's upload has
        *started* (its queue is empty), in parallel with it: a failed or killed last upload then
        leaves an index that names a missing shard, a dataset that looks complete. Here every
        shard upload has finished, and none failed, before the index is written."""

        def _upload_failed(self) -> RuntimeError:
            return RuntimeError(f"uploading a shard to {self.remote} failed (see the error above); "
                                "index.json not written, so the dataset is not marked complete")

        def write(self, sample) -> None:
            # An upload that fails while samples are still being written (a slow writer, a
            # quick failure): streaming's own check says only "One of the threads failed".
            if self.remote and self.event.is_set():
                self.cancel_future_jobs()
                raise self._upload_failed()
            super().write(sample)

        def _write_index(self) -> None:
            if self.remote:
                from concurrent.futures import ThreadPoolExecutor
                self.executor.shutdown(wait=True)
                if self.event.is_set():
                    raise self._upload_failed()
                self.executor = ThreadPoolExecutor(max_workers=1)     # for the index itself
            super()._write_index()
    return IndexLastWriter


def _remove_partial(local: str) -> None:
    shutil.rmtree(local, ignore_errors=True)


@contextlib.contextmanager
def open_writer(out: str, kind: str, optional: tuple[str, ...] | list[str], meta: dict,
                *, size_limit: str | int = DEFAULT_SIZE_LIMIT, overwrite: bool = False
                ) -> Iterator[DatasetWriter]:
    """Open an MDS dataset of ``kind`` at ``out`` (local folder or ``s3://...``).

    ``meta`` is the :func:`vltrain.data.schema.make_meta` dict; the tool may update
    ``writer.meta`` while writing (counts, skips). On a clean exit the meta and extra JSON
    files are written first and ``index.json`` last, so a dataset with an index is complete.
    On an exception nothing is finalised: no index is written and the local partial output is
    removed, so a failed run never leaves a dataset that looks valid (``overwrite`` of an
    ``s3://`` dataset deletes its old ``index.json`` before writing, for the same reason; on
    other remote storage, which streaming's uploaders cannot delete from, it is refused).
    """
    optional = tuple(optional)
    columns = schema.columns_for(kind, optional)
    remote = out if is_remote(out) else None
    if remote and remote_has_index(out):
        if not overwrite:
            raise BadInputError(f"{out} already holds a dataset (index.json); pass --overwrite to replace it")
        if urllib.parse.urlparse(out).scheme != "s3":
            raise BadInputError(f"{out} already holds a dataset (index.json), and --overwrite replaces only s3:// "
                                "datasets in place (their old index.json is deleted first, so a replacement cut "
                                "short never looks complete): delete the prefix with your storage's tool (e.g. "
                                f"`gcloud storage rm -r {out}`) and run again")
        # The old index goes first: shards are replaced one by one under the same names, so an
        # overwrite cut short must not leave the old index pointing at a mix of old and new.
        remove_remote_index(out)
    if not remote:
        if os.path.isdir(out) and os.listdir(out) and not overwrite:
            raise BadInputError(f"output folder {out} is not empty (pass --overwrite to replace it)")
        if overwrite and os.path.isdir(out):
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
    mds = _index_last_writer()(out=out, columns=columns, compression=COMPRESSION, hashes=HASHES,
                               size_limit=size_limit)
    writer = DatasetWriter(mds, out, kind, columns, dict(meta))
    try:
        yield writer
    except BaseException:
        mds.cancel_future_jobs()
        writer.close_references(None)
        _remove_partial(mds.local)
        raise
    try:
        writer.close_references(remote)
        writer.meta["num_samples"] = writer.count
        for name, obj in writer._extra.items():
            write_json_to(mds.local, remote, name, obj)
        write_json_to(mds.local, remote, schema.META_FILE, writer.meta)
        mds.finish()
    except BaseException:
        if remote:
            _remove_partial(mds.local)
        raise


# ---------------------------------------------------------------- CLI helpers

def add_output_args(p: argparse.ArgumentParser, skip_bad: bool = True, size_limit: str = DEFAULT_SIZE_LIMIT,
                    size_why: str = "") -> None:
    p.add_argument("--out", required=True,
                   help="output dataset: a local folder (must be empty) or s3://bucket/prefix "
                        "(credentials and S3_ENDPOINT_URL from the environment)")
    p.add_argument("--size-limit", default=size_limit,
                   help=f"shard size limit before compression (default %(default)s{size_why})")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output (a non-empty local folder is emptied first; on s3:// "
                        "the old index.json is deleted first and the new one written last, so a replacement "
                        "cut short never looks complete)")
    if skip_bad:
        p.add_argument("--skip-bad", action="store_true",
                       help="skip bad inputs (counted, reported at the end and stored in the meta) "
                            "instead of stopping with an error")


def run_main(fn: Callable[[argparse.Namespace], None], parser: argparse.ArgumentParser,
             argv: list[str] | None) -> int:
    """Parse ``argv``, run ``fn``; bad input -> message on stderr and exit code 2. Log lines
    (streaming's uploader's) and, for a command line (``argv`` None: not a caller's own process,
    such as a test session's), other threads' tracebacks are printed redacted."""
    from vltrain.redact import RedactingFormatter, credentials_errors, install_excepthook, redact
    args = parser.parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])    # a no-op where logging is set up
    if argv is None:
        install_excepthook()
    names = {a.dest: (a.option_strings or [a.dest])[-1] for a in parser._actions}
    problems = credentials_errors((names.get(k, k), v) for k, v in vars(args).items())
    if problems:
        print("error: " + "; ".join(problems), file=sys.stderr)
        return 2
    try:
        fn(args)
    except BadInputError as e:
        print(redact(f"error: {e}"), file=sys.stderr)
        return 2
    except Exception as e:   # noqa: BLE001
        if type(e).__module__.startswith(("botocore", "boto3")):     # a missing bucket, wrong keys
            urls = ", ".join(f"{names.get(k, k)} {v}" for k, v in vars(args).items() if isinstance(v, str)
                             and "://" in v)
            print(redact(f"error: the object store answered {type(e).__name__}: {e} ({urls + ': ' if urls else ''}"
                         "does the bucket exist, and do AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / "
                         "S3_ENDPOINT_URL point at it?)"), file=sys.stderr)
            return 2
        # anything else: its traceback, minus credentials a URL in it may hold
        print(redact(traceback.format_exc()), file=sys.stderr)
        return 1
    return 0


def summarize(writer: DatasetWriter, skips: SkipCounter) -> None:
    print(f"wrote {writer.count} {writer.kind} samples in {writer.shard_count} shard(s) to {writer.out}")
    skips.report()
    left, unit = writer.meta.get("samples_left_out"), writer.meta.get("input_unit")
    if left:
        print(f"left out {left} of the input's {skips.read} {unit} ({100 * left / skips.read:.1f}%): "
              f"an official scorer counts them")
