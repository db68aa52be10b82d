"""``model.compile=true``: ``torch.compile`` the transformer layer function.

Why the layer rather than the whole model (as torchtitan compiles per block): every block
runs the same function (``transformer.layer_forward``) on its own weights, passed in as
inputs, so one graph is traced and compiled once and serves every layer (compile time of one
block, not of the model); the data-dependent parts outside the blocks (mask building,
gathering masked positions, varlen packing) stay eager, where they cost nothing and cause no
graph breaks. Parameter names and the state dict are unchanged, so checkpoints, BERT weight
loading and DeepSpeed's ZeRO parameter hooks see the same module tree (ZeRO-1/2/3: the same
losses as eager on 2 ranks, checked by benchmarks/train_throughput.py). Call it *before*
``deepspeed.initialize``. The decoder's cached attention calls the blocks with
``eager=True``: the compiled function only ever sees training's shapes and backends.

Shapes: the default (automatic dynamic) compiles the first length it sees statically and,
if another length follows, one dynamic-length graph; with ``data.pad_to=bucket`` that is at
most two graphs, whatever the number of buckets. The last block of a loss that reads a few
rows (``rows=``, MLM/MRC) runs eagerly: its number of rows changes from batch to batch.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from vltrain.model.transformer import layer_forward

log = logging.getLogger(__name__)


def compile_blocks(model: nn.Module, **compile_kwargs) -> nn.Module:
    """Run every block of ``model.layers`` through one compiled ``layer_forward``; returns ``model``."""
    layers = getattr(model, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .layers to compile")
    compiled = torch.compile(layer_forward, **compile_kwargs)
    for block in layers:
        block.run = compiled
    log.info("model.compile=true: torch.compile applied to the layer function of %d transformer blocks",
             len(layers))
    return model


def maybe_compile(model: nn.Module) -> nn.Module:
    """``compile_blocks(model)`` when ``model.config.compile`` is set, else ``model`` as is."""
    if getattr(model.config, "compile", False):
        compile_blocks(model)
    return model


def is_compiled(model: nn.Module) -> bool:
    return any(getattr(b, "run", layer_forward) is not layer_forward for b in getattr(model, "layers", ()))


__all__ = ["compile_blocks", "maybe_compile", "is_compiled"]
