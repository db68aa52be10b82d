"""Credentials out of everything vltrain prints or writes.

Keys come from the environment only (README, "Object storage"): an object-store URL or
``S3_ENDPOINT_URL`` typed with its ``user:password@`` is refused where it enters (config
keys, converter arguments; ``credentials_errors``). Any other URL with one (``sftp://``, a
saved config's) would otherwise reach config.yaml, checkpoints, TensorBoard, logs and error
messages. One rule for all of them: in ``scheme://<info>@...`` the ``<info>`` (up to the last ``@`` before
whitespace) becomes ``***`` when it holds a ``:`` (user:password; AWS secrets may hold ``/``
and ``@``) or no ``/`` (a bare user). An ``@`` inside a path (``s3://bucket/img@0.npz``, VCR's
file names) is kept. Also masked, wherever they appear: a presigned URL's signature and
credential parameters (``X-Amz-Signature=...``) and the value given a secret's name
(``AWS_SECRET_ACCESS_KEY=...``, a credentials file's ``aws_secret_access_key = ...``, a dict's
``'AWS_SESSION_TOKEN': '...'``). slurm/common.sh's ``vltrain_redact`` applies the same rules
(tests/test_redact.py holds them to these).
"""
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import threading
import traceback
import warnings
from typing import Optional

_USERINFO = re.compile(r"([A-Za-z][\w+.-]*://)(\S*)@")
_QUERY_SECRET = re.compile(r"([?&](?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)"
                           r"|signature|sig|awsaccesskeyid)=)[^&#\s]+", re.I)
# the value after a secret's name (also with a prefix, MY_HF_TOKEN) in an environment
# assignment, a credentials file's line or a dict's item, any case, on one line:
# AWS_SECRET_ACCESS_KEY=x, aws_secret_access_key = x, {'AWS_SESSION_TOKEN': 'x y'}
_SECRET_NAMES = ("AWS_SECRET_ACCESS_KEY|AWS_SESSION_TOKEN|HF_TOKEN|HUGGING_FACE_HUB_TOKEN|GCS_SECRET"
                 "|AZURE_ACCOUNT_ACCESS_KEY|DATABRICKS_TOKEN|COMET_API_KEY|WANDB_API_KEY")
_ENV_SECRET = re.compile(r"([A-Za-z0-9_]*(?:%s)[\"']?[ \t]*[=:][ \t]*)(\"[^\"\n]*\"|'[^'\n]*'|[^\s\"',}]+)"
                         % _SECRET_NAMES, re.I)


def redact(text: str) -> str:
    def sub(m: re.Match) -> str:
        info = m.group(2)
        return m.group(1) + "***@" if ":" in info or "/" not in info else m.group(0)
    text = _USERINFO.sub(sub, text)
    return _ENV_SECRET.sub(r"\1***", _QUERY_SECRET.sub(r"\1***", text))


def redact_tree(obj):
    """``obj`` with every string inside dicts, lists and tuples redacted."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redact_tree(v) for v in obj)
    return obj


class RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) with credentials redacted."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def setup_logging(worker: Optional[int] = None) -> None:
    """A rank's logging (or, with ``worker``, one of its DataLoader workers', which would
    otherwise print through Python's last-resort handler: bare, unredacted): every line says
    which job and rank (and worker) wrote it, with credentials redacted."""
    from vltrain.engine.distributed import launch_rank
    rank = launch_rank()
    job = os.environ.get("SLURM_JOB_ID", "-")
    where = f"rank={rank}" if worker is None else f"rank={rank} worker={worker}"
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter(f"%(asctime)s job={job} {where} %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if rank == "0" else logging.WARNING, handlers=[handler], force=True)
    install_excepthook()
    # Python warnings through the same handler (job, rank, redacted; each once per place, as
    # Python shows them), on every rank: one may be that rank's own (its data, its device).
    # DeepSpeed's use of a collective torch deprecated is none of the user's business.
    logging.captureWarnings(True)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)
    # (botocore: "Found credentials in environment variables" once per S3 client)
    for noisy in ("DeepSpeed", "deepspeed", "streaming", "torch.distributed", "botocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Every rank listed in train.profile_ranks says where its profile is and what it found.
    logging.getLogger("vltrain.profiling").setLevel(logging.INFO)


class RedactingArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are redacted: "unrecognized arguments: ..." quotes what was
    typed, before any logging is set up (a URL with user:password@ where a flag was expected)."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {redact(message)}\n")


def install_excepthook() -> None:
    """An uncaught exception's traceback, printed redacted (its message may hold a URL), in the
    main thread and in any other (streaming's download and upload threads)."""
    def hook(kind, value, tb):
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))

    def thread_hook(args):
        if args.exc_type is SystemExit:          # as threading's own hook: silent
            return
        name = args.thread.name if args.thread is not None else "?"
        sys.stderr.write(redact(f"Exception in thread {name}:\n"
                                + "".join(traceback.format_exception(args.exc_type, args.exc_value,
                                                                     args.exc_traceback))))
    sys.excepthook = hook
    threading.excepthook = thread_hook


# Object stores whose clients take credentials from the environment only. The user:password@
# of such a URL is never read: botocore takes "KEY:SECRET@bucket" for the bucket's name and
# quotes it, secret and all, in its errors (which no URL pattern can redact). Refused up front.
# (sftp:// is left alone: streaming reads its user and password from the URL.)
_ENV_CREDENTIAL_SCHEMES = ("s3", "gs", "oci", "azure", "azure-dl", "dbfs", "hf")
_HOW = ("give credentials in the environment (for s3://: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or "
        "AWS_PROFILE); a URL's user:password@ is not read, and the S3 client would print it in its errors")


def _has_userinfo(url: str) -> bool:
    m = _USERINFO.match(url.strip())
    return bool(m) and redact(m.group(0)) != m.group(0) and m.group(2) != "***"   # *** = redacted before


def url_credentials_error(where: str, value: str) -> Optional[str]:
    """A message naming ``where`` if ``value`` is an object-store URL with credentials in it."""
    scheme = value.strip().split("://", 1)[0].lower() if "://" in value else ""
    if scheme in _ENV_CREDENTIAL_SCHEMES and _has_userinfo(value):
        return f"{where}: {redact(value)} has credentials in the URL; {_HOW}"
    return None


def endpoint_credentials_error(environ=os.environ) -> Optional[str]:
    """A message if ``S3_ENDPOINT_URL`` has credentials in it (the client signs with the keys
    from the environment; the endpoint's user:password@ would only reach its errors)."""
    url = environ.get("S3_ENDPOINT_URL") or ""
    if _has_userinfo(url):
        return f"S3_ENDPOINT_URL={redact(url)} has credentials in the URL; {_HOW}"
    if "://" not in url and "@" in url:     # KEY:SECRET@host: botocore quotes it as an invalid endpoint
        return f"S3_ENDPOINT_URL=***@{url.rsplit('@', 1)[1]} has credentials in it; {_HOW}"
    return None


def credentials_errors(named) -> list[str]:
    """Messages for every (name, value) pair whose value (a string, or a list of them) is an
    object-store URL with credentials, then for ``S3_ENDPOINT_URL``."""
    out = []
    for where, value in named:
        for v in value if isinstance(value, (list, tuple)) else [value]:
            msg = url_credentials_error(where, v) if isinstance(v, str) else None
            if msg:
                out.append(msg)
    msg = endpoint_credentials_error()
    return out + ([msg] if msg else [])
