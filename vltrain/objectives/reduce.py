"""Loss reduction over gathered positions: per token (BERT) or per example."""
from __future__ import annotations

import torch


def reduce_loss(per_item: torch.Tensor, example_index: torch.Tensor, batch_size: int, how: str) -> torch.Tensor:
    """Mean over items (``token``), or the mean over examples of each example's mean (``example``).

    ``example`` makes the loss independent of how a global batch is split into micro-batches,
    so gradient accumulation 2 x (B/2) equals 1 x B exactly (given dropout 0).
    """
    if how == "token":
        return per_item.mean()
    if how != "example":
        raise ValueError(f"objectives.loss_reduction={how!r}; choose 'token' or 'example'")
    sums = per_item.new_zeros(batch_size).index_add_(0, example_index, per_item)
    counts = per_item.new_zeros(batch_size).index_add_(0, example_index, torch.ones_like(per_item))
    # An example without items adds 0 / 1. (Selecting the examples that have items with a
    # boolean mask would give a value-dependent shape: a host sync on the GPU every step.)
    return (sums / counts.clamp(min=1)).sum() / batch_size
