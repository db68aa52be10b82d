"""``model.compile=true``: ``torch.compile`` each transformer block, in place.

Why per block (as torchtitan does) rather than the whole model: the 12 blocks share one
code object and Dynamo inlines module parameters as inputs, so one graph is traced and
compiled once and serves every layer (compile time of one block, not of the model); the
data-dependent parts outside the blocks (mask building, gathering masked positions,
varlen packing) stay eager, where they cost nothing and cause no graph breaks.

``nn.Module.compile`` compiles in place: parameter names and the state dict are unchanged
(no ``_orig_mod.`` prefix), so checkpoints, BERT weight loading and DeepSpeed's ZeRO
parameter hooks see the same module tree (ZeRO-1/2/3: the same losses as eager on 2 ranks,
checked by benchmarks/train_throughput.py). Call it *before* ``deepspeed.initialize``.

Shapes: the default (automatic dynamic) compiles the first length it sees statically and,
if another length follows, one dynamic-length graph; with ``data.pad_to=bucket`` that is at
most two graphs, whatever the number of buckets.
"""
from __future__ import annotations

import logging

import torch.nn as nn

log = logging.getLogger(__name__)


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Compile every block of ``model.layers`` in place; returns ``model``."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .layers to compile")
    for block in layers:
        block.compile(**compile_kwargs)
    log.info("model.compile=true: torch.compile applied to %d transformer blocks", len(layers))
    return model


def maybe_compile(model: nn.Module) -> nn.Module:
    """``compile_blocks(model)`` when ``model.config.compile`` is set, else ``model`` as is."""
    if getattr(model.config, "compile", False):
        compile_blocks(model)
    return model


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(b, "_compiled_call_impl", None) is not None for b in getattr(model, "layers", ()))


__all__ = ["compile_blocks", "maybe_compile", "is_compiled"]
