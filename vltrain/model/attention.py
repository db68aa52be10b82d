"""Self-attention masks and backends.

The mask is a property of the *sequence*, not of a layer: ``AttentionStructure`` is built
once per forward from (padding, seq2seq targets, per-example mode) and each backend turns
it into what its kernel takes, once per forward (``prepare``), before the layers run.
``eager`` is the reference every other backend is tested against.

Rules (q = query position, k = key position, "target" = seq2seq/left-to-right text token):
    allowed(q, k) = valid(k) and (not target(k) or (target(q) and k <= q))
so the prefix (regions, [CLS], [SEP], non-target text) is bidirectional, target tokens see
the prefix and earlier targets, and nobody in the prefix sees a target. Bidirectional
examples simply have no targets. [CLS] is always a valid non-target key, so no row is
fully masked and padding rows stay finite.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass
class AttentionStructure:
    """Per-forward description of who may attend to whom, in sequence order."""
    key_valid: torch.Tensor   # (B, L) bool: real token or region
    target: torch.Tensor      # (B, L) bool: causal target positions

    def dense_allowed(self) -> torch.Tensor:
        """(B, L, L) bool matrix of allowed (query, key) pairs."""
        L = self.key_valid.shape[1]
        idx = torch.arange(L, device=self.key_valid.device)
        causal = idx[None, :] <= idx[:, None]                       # (q, k): k <= q
        t_q = self.target[:, :, None]
        t_k = self.target[:, None, :]
        return self.key_valid[:, None, :] & (~t_k | (t_q & causal[None]))

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, L, L) additive mask: 0 where allowed, the dtype's minimum elsewhere."""
        allowed = self.dense_allowed()
        mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]


def _prepare_dense(structure: AttentionStructure, dtype: torch.dtype):
    return structure.additive_mask(dtype)


def eager_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """Reference: softmax(q k^T / sqrt(d) + mask) v, softmax in float32. q,k,v: (B, h, L, d)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * (q.shape[-1] ** -0.5)
    scores = scores + mask
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout_p > 0:
        probs = F.dropout(probs, p=dropout_p)
    return torch.matmul(probs, v)


def sdpa_attention(q, k, v, mask, dropout_p: float) -> torch.Tensor:
    """``torch.nn.functional.scaled_dot_product_attention`` with the same additive mask."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)


@dataclass(frozen=True)
class Backend:
    name: str
    prepare: Callable          # (AttentionStructure, dtype) -> backend-specific mask object
    attend: Callable           # (q, k, v, prepared, dropout_p) -> (B, h, L, d)


BACKENDS = {
    "eager": Backend("eager", _prepare_dense, eager_attention),
    "sdpa": Backend("sdpa", _prepare_dense, sdpa_attention),
}


def get_backend(name: str) -> Backend:
    if name not in BACKENDS:
        raise ValueError(f"model.attention_backend={name!r} is not available; "
                         f"choose one of {sorted(BACKENDS)}")
    return BACKENDS[name]
