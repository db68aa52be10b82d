"""Loss reduction over gathered positions: per token (BERT) or per example."""
from __future__ import annotations

from typing import Optional

import torch


def reduce_loss(per_item: torch.Tensor, example_index: torch.Tensor, batch_size: int, how: str,
                weights: Optional[torch.Tensor] = None, examples: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over items (``token``), or the mean over examples of each example's mean (``example``).

    ``example`` makes the loss independent of how a global batch is split into micro-batches,
    so gradient accumulation 2 x (B/2) equals 1 x B exactly (given dropout 0).

    ``weights`` (0/1 per item) and ``examples`` (bool per example) restrict both means to a
    subset: ``per_item`` must already be 0 outside it; an empty subset gives 0. The subset's
    size varies between micro-batches, so this loses ``example``'s accumulation invariance.
    """
    if how == "token":
        return per_item.mean() if weights is None else per_item.sum() / weights.sum().clamp(min=1)
    if how != "example":
        raise ValueError(f"objectives.loss_reduction={how!r}; choose 'token' or 'example'")
    ones = torch.ones_like(per_item) if weights is None else weights
    sums = per_item.new_zeros(batch_size).index_add_(0, example_index, per_item)
    counts = per_item.new_zeros(batch_size).index_add_(0, example_index, ones)
    # An example without items adds 0 / 1. (Selecting the examples that have items with a
    # boolean mask would give a value-dependent shape: a host sync on the GPU every step.)
    n = batch_size if examples is None else examples.sum().clamp(min=1)
    return (sums / counts.clamp(min=1)).sum() / n
