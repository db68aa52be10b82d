"""Which object-store failures pass (worth a requeue), which are refusals, and the store's name.

Streaming re-raises the client's exception as it came, except that it rewrites a 403's
message into its "not found" text; botocore's reply code still tells them apart.
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

# Reply codes of a store that is there but cannot serve now (S3's names and HTTP statuses).
_BUSY = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
         "Throttling", "ThrottlingException", "RequestLimitExceeded"}
# Reply codes of credentials refused: a session token that expired mid-run, a changed policy.
_DENIED = {"403", "AccessDenied", "ExpiredToken", "InvalidAccessKeyId", "InvalidToken", "SignatureDoesNotMatch",
           "TokenRefreshRequired"}
# botocore's connection-level failures (by name: other backends never import botocore).
_NETWORK = {"EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionClosedError",
            "ResponseStreamingError", "IncompleteReadError", "ProxyConnectionError"}


def _chain(e: BaseException) -> Iterator[BaseException]:
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def reply_code(e: BaseException) -> Optional[str]:
    """The store's error code (botocore ``ClientError.response``), if it answered."""
    for x in _chain(e):
        response = getattr(x, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", "")) or None
    return None


def is_transient(e: BaseException) -> bool:
    """The store could not be reached or was busy; a later try may succeed."""
    if reply_code(e) in _BUSY:
        return True
    for x in _chain(e):
        if isinstance(x, (ConnectionError, TimeoutError)) or any(c.__name__ in _NETWORK for c in type(x).__mro__):
            return True
    return False


def is_denied(e: BaseException) -> bool:
    return reply_code(e) in _DENIED


def store_of(remote: str) -> str:
    """The store that serves ``remote``, as the user configured it (credentials redacted)."""
    from vltrain.redact import redact
    if remote.startswith("s3://"):
        url = os.environ.get("S3_ENDPOINT_URL")
        return f"S3 endpoint {redact(url)}" if url else "AWS S3 (S3_ENDPOINT_URL unset)"
    scheme, _, rest = remote.partition("://")
    return redact(f"{scheme}://{rest.split('/', 1)[0]}")


DENIED_HINT = ("the store refused these credentials (HTTP 403: an expired AWS_SESSION_TOKEN, rotated keys, or a "
               "changed bucket policy), whatever streaming's text above says")
