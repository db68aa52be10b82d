"""BERT's post-LayerNorm transformer block, its weights held in two flat parameters.

Why flat: DeepSpeed's ZeRO-1/2 do Python work and launch kernels *per parameter* every step
(a gradient hook, a copy into the reduce bucket, a norm, a copy back into the bf16 weights).
BERT's twelve tensors per block made that ~3x the model's own host time on an H100, enough
to leave the GPU waiting (BENCHMARKS.md). Each block therefore owns two parameters,
``matrices`` (the four weight matrices, weight-decayed) and ``vectors`` (biases and LayerNorm
parameters, not decayed), and takes named views of them in ``forward``. One ``split`` per
flat parameter, so the backward writes each block's gradient with one concatenation; the
block stays the unit of gradient readiness (reductions overlap the backward as before) and
of ZeRO-3 gathering (every use of the weights is inside ``Block.__call__``).

Outside the module the weights keep BERT-shaped names, ``layers.{i}.qkv.weight`` etc.
(:func:`named_pieces`): consolidated and exported files, BERT loading and error messages use
those; only DeepSpeed's own checkpoints hold the flat parameters.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vltrain.config import ModelConfig
from vltrain.model.packed_dropout import packed_dropout

ACTIVATIONS = {
    "gelu": lambda x: F.gelu(x),                       # erf GELU, as BERT
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


class Weights(NamedTuple):
    """One block's weights, views of its two flat parameters (nn.Linear / nn.LayerNorm layout)."""
    qkv_weight: torch.Tensor        # (3h, h): BERT's query, key, value stacked along dim 0
    attn_out_weight: torch.Tensor   # (h, h)
    ffn_in_weight: torch.Tensor     # (I, h)
    ffn_out_weight: torch.Tensor    # (h, I)
    qkv_bias: torch.Tensor
    attn_out_bias: torch.Tensor
    attn_norm_weight: torch.Tensor
    attn_norm_bias: torch.Tensor
    ffn_in_bias: torch.Tensor
    ffn_out_bias: torch.Tensor
    ffn_norm_weight: torch.Tensor
    ffn_norm_bias: torch.Tensor


N_MATRICES = 4                      # the first four fields live in ``matrices``, the rest in ``vectors``


def piece_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of each ``Weights`` field, in layout order."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    return {"qkv_weight": (3 * h, h), "attn_out_weight": (h, h), "ffn_in_weight": (i, h), "ffn_out_weight": (h, i),
            "qkv_bias": (3 * h,), "attn_out_bias": (h,), "attn_norm_weight": (h,), "attn_norm_bias": (h,),
            "ffn_in_bias": (i,), "ffn_out_bias": (h,), "ffn_norm_weight": (h,), "ffn_norm_bias": (h,)}


def piece_name(field: str) -> str:
    """``Weights`` field -> the name its tensor had as a submodule parameter (``qkv.weight``)."""
    return ".".join(field.rsplit("_", 1))


def flat_layout(cfg: ModelConfig) -> dict[str, tuple[list[str], list[tuple], list[int]]]:
    """``matrices`` / ``vectors`` -> (``Weights`` fields, their shapes, their sizes), in order."""
    shapes = piece_shapes(cfg)
    out = {}
    for leaf, fields in (("matrices", list(shapes)[:N_MATRICES]), ("vectors", list(shapes)[N_MATRICES:])):
        out[leaf] = (fields, [shapes[f] for f in fields], [math.prod(shapes[f]) for f in fields])
    return out


def _split(flat: torch.Tensor, shapes, sizes) -> list[torch.Tensor]:
    return [t.view(s) for t, s in zip(flat.split(sizes), shapes)]


def named_pieces(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """``state`` with every ``<p>layers.{i}.matrices`` / ``.vectors`` replaced by its pieces
    under the submodule names (``<p>layers.{i}.qkv.weight`` ...), as views (no copy); other
    entries unchanged. Sizes are checked against ``cfg`` (the config the state was saved with)."""
    out: dict[str, torch.Tensor] = {}
    layout = flat_layout(cfg)
    for name, t in state.items():
        stem, _, leaf = name.rpartition(".")
        if leaf not in layout or not stem.rpartition(".")[0].endswith("layers"):
            out[name] = t
            continue
        fields, shapes, sizes = layout[leaf]
        if t.numel() != sum(sizes):
            raise ValueError(f"{name}: {t.numel()} elements, the model config (hidden_size={cfg.hidden_size}, "
                             f"intermediate_size={cfg.intermediate_size}) needs {sum(sizes)}")
        for f, piece in zip(fields, _split(t, shapes, sizes)):
            out[f"{stem}.{piece_name(f)}"] = piece
    return out


def _torch_dropout(y: torch.Tensor, p: float) -> torch.Tensor:
    # a branch, not F.dropout(y, p, p > 0): once train (0.1) and eval (0.0) have both run, Dynamo
    # makes p symbolic, and F.dropout refuses the symbolic bool: a graph break in every block
    return F.dropout(y, p, True) if p > 0 else y


def layer_forward(w: Weights, x: torch.Tensor, mask, backend, rows, num_heads: int, act,
                  eps: float, p_attn: float, p_hidden: float, packed_masks: bool = False) -> torch.Tensor:
    """x = LN(x + Attn(x)); x = LN(x + FFN(x)), BERT's semantics. ``rows`` = (b_idx, q_idx):
    the output (M, H) at those rows only: attention runs at every position (the same backend
    and mask, one kernel call) and only the rows' attention output, residual, norms and FFN —
    about three quarters of the block's FLOPs at BERT's shapes — are computed (the last block
    of a loss that reads a few positions, MLM/MRC). Attending for the M rows alone would need
    each row's keys/values gathered per row (M x L x H copies), which cost more on a GPU than
    the attention they save (H100 profile, BENCHMARKS.md). ``packed_masks``: the hidden
    dropouts draw bit-packed keep masks (``model.hidden_dropout_masks=packed``, packed_dropout.py)."""
    B, L, H = x.shape
    # unbind on the (B, L, 3, h, d) view, then transpose: backward stacks dq, dk, dv straight
    # into the fused layout (one copy), where a permute-first split needs two.
    qkv = F.linear(x, w.qkv_weight, w.qkv_bias).view(B, L, 3, num_heads, H // num_heads)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    a = backend.attend(q, k, v, mask, p_attn).transpose(1, 2).reshape(B, L, H)
    if rows is not None:
        x, a = x[rows], a[rows]
    drop = packed_dropout if packed_masks else _torch_dropout
    x = F.layer_norm(x + drop(F.linear(a, w.attn_out_weight, w.attn_out_bias), p_hidden),
                     (H,), w.attn_norm_weight, w.attn_norm_bias, eps)
    f = F.linear(act(F.linear(x, w.ffn_in_weight, w.ffn_in_bias)), w.ffn_out_weight, w.ffn_out_bias)
    return F.layer_norm(x + drop(f, p_hidden), (H,), w.ffn_norm_weight, w.ffn_norm_bias, eps)


class Block(nn.Module):
    """One transformer layer: ``matrices`` and ``vectors`` (see the module docstring)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.hidden_size % cfg.num_heads:
            raise ValueError(f"model.hidden_size={cfg.hidden_size} is not divisible by "
                             f"model.num_heads={cfg.num_heads}")
        if cfg.hidden_act not in ACTIVATIONS:
            raise ValueError(f"model.hidden_act={cfg.hidden_act!r}; choose one of {sorted(ACTIVATIONS)}")
        self.cfg = cfg
        # computed once: weights() runs on every forward (the host-time path)
        self._layout = flat_layout(cfg)
        self.matrices = nn.Parameter(torch.empty(sum(self._layout["matrices"][2])))
        self.vectors = nn.Parameter(torch.empty(sum(self._layout["vectors"][2])))
        self.num_heads = cfg.num_heads
        self.act = ACTIVATIONS[cfg.hidden_act]
        self.hidden_dropout = cfg.hidden_dropout
        self.attention_dropout = cfg.attention_dropout
        self.packed_masks = cfg.hidden_dropout_masks == "packed"
        self.run = layer_forward            # model.compile swaps in the compiled function (compile.py)
        self.reset_parameters(cfg.initializer_range)

    def reset_parameters(self, std: float) -> None:
        """BERT's initialisation: N(0, std) weights, zero biases, unit LayerNorm scales."""
        w = self.weights()
        with torch.no_grad():
            for name, t in w._asdict().items():
                if name.endswith("_weight") and "norm" not in name:
                    t.normal_(0.0, std)
                elif "norm_weight" in name:
                    t.fill_(1.0)
                else:
                    t.zero_()

    def weights(self) -> Weights:
        _, ms, msz = self._layout["matrices"]
        _, vs, vsz = self._layout["vectors"]
        return Weights(*_split(self.matrices, ms, msz), *_split(self.vectors, vs, vsz))

    def forward(self, x: torch.Tensor, mask, backend, rows: Optional[tuple] = None,
                eager: bool = False) -> torch.Tensor:
        """The block at every position (B, L, H), or at ``rows`` only (M, H) (``layer_forward``).
        ``backend`` is any object with ``attend(q, k, v, mask, p)`` (the model's attention
        backend, or the decoder's cached attention, which passes ``eager=True``: the compiled
        function is traced for the training shapes and backends only). The ``rows`` call runs
        eagerly too, as it was measured on the H100: its row count changes every batch."""
        fn = self.run if rows is None and not eager else layer_forward
        return fn(self.weights(), x, mask, backend, rows, self.num_heads, self.act, self.cfg.layer_norm_eps,
                  self.attention_dropout if self.training else 0.0, self.hidden_dropout if self.training else 0.0,
                  self.packed_masks)
