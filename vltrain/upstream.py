"""Guard for vltrain's replacements of upstream functions (DeepSpeed's step readbacks,
streaming's shared-memory prefix): each is applied only while the upstream source is the one
it was written against, compared by this hash; another version keeps its own code."""
from __future__ import annotations

import hashlib
import inspect


def source_hash(fn) -> str:
    """sha256 of ``fn``'s source, or "unknown" where no source is installed (not the known code)."""
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()
    except (OSError, TypeError):
        return "unknown"
