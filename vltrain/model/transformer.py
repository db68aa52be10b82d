"""BERT's post-LayerNorm transformer block with a fused QKV projection."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vltrain.config import ModelConfig
from vltrain.model.attention import Backend

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                       # erf GELU, as BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Block(nn.Module):
    """x = LN(x + Attn(x)); x = LN(x + FFN(x)) — BERT's parameter semantics."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by "
                             f"model.num_heads={cfg.num_heads}")
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"model.hidden_act={cfg.hidden_act!r}; choose one of {sorted(ACTIVATIONS)}")
        h = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(h, 3 * h)       # one matmul instead of three (BERT's q, k, v stacked)
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.ffn_in = nn.Linear(h, cfg.intermediate_size)
        self.ffn_out = nn.Linear(cfg.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.hidden_dropout = cfg.hidden_dropout
        self.attention_dropout = cfg.attention_dropout

    def forward(self, x: torch.Tensor, mask, backend: Backend) -> torch.Tensor:
        return self.after_attention(x, self.self_attention(x, mask, backend))

    def forward_at(self, x: torch.Tensor, b_idx: torch.Tensor, q_idx: torch.Tensor, mask,
                   backend: Backend) -> torch.Tensor:
        """The block's output (M, H) at rows ``(b_idx[m], q_idx[m])`` only. The last block of
        a loss that reads a few positions (MLM, MRC) needs nothing else: attention runs at
        every position as in ``forward`` (same backend and mask, one kernel call), and only
        the rows' attention output, residual, norms and FFN — about three quarters of the
        block's FLOPs at BERT's shapes — are computed. Attending for the M rows alone would
        need each row's keys/values gathered per row (M x L x H copies), which cost more on a
        GPU than the attention they save (H100 profile, BENCHMARKS.md). Not compiled
        (``model.compile`` compiles ``forward``)."""
        a = self.self_attention(x, mask, backend)
        return self.after_attention(x[b_idx, q_idx], a[b_idx, q_idx])

    def self_attention(self, x: torch.Tensor, mask, backend: Backend) -> torch.Tensor:
        """Multi-head attention at every position, before the output projection: (B, L, H)."""
        B, L, H = x.shape
        # unbind on the (B, L, 3, h, d) view, then transpose: backward stacks dq, dk, dv straight
        # into the fused layout (one copy), where a permute-first split needs two.
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, L, 3, self.num_heads, H // self.num_heads).unbind(2))
        p_attn = self.attention_dropout if self.training else 0.0
        return backend.attend(q, k, v, mask, p_attn).transpose(1, 2).reshape(B, L, H)

    def after_attention(self, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        """Output projection, residual + LayerNorm, FFN, residual + LayerNorm (any leading shape)."""
        p = self.hidden_dropout if self.training else 0.0
        x = self.attn_norm(x + F.dropout(self.attn_out(a), p, self.training))
        f = self.ffn_out(self.act(self.ffn_in(x)))
        return self.ffn_norm(x + F.dropout(f, p, self.training))
