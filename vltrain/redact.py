"""Credentials out of everything vltrain prints or writes.

Keys come from the environment only (README, "Object storage"), but a URL typed with its
``user:password@`` (``s3://KEY:SECRET@bucket/x``, ``S3_ENDPOINT_URL=http://user:pw@host``)
would otherwise reach config.yaml, checkpoints, TensorBoard, logs and error messages. One
rule for all of them: in ``scheme://<info>@...`` the ``<info>`` (up to the last ``@`` before
whitespace) becomes ``***`` when it holds a ``:`` (user:password; AWS secrets may hold ``/``
and ``@``) or no ``/`` (a bare user). An ``@`` inside a path (``s3://bucket/img@0.npz``, VCR's
file names) is kept.
"""
from __future__ import annotations

import logging
import re
import sys
import traceback

_USERINFO = re.compile(r"([A-Za-z][\w+.-]*://)(\S*)@")


def redact(text: str) -> str:
    def sub(m: re.Match) -> str:
        info = m.group(2)
        return m.group(1) + "***@" if ":" in info or "/" not in info else m.group(0)
    return _USERINFO.sub(sub, text)


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


def install_excepthook() -> None:
    """An uncaught exception's traceback, printed redacted (its message may hold a URL)."""
    def hook(kind, value, tb):
        sys.stderr.write(redact("".join(traceback.format_exception(kind, value, tb))))
    sys.excepthook = hook
