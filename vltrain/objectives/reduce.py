"""Loss reduction over gathered positions: per token (BERT) or per example.

Token means divide by the optimizer step's count when the trainer gives it
(``Batch.token_divisors``, vltrain/engine/step_feed.py): the loss of a global batch is then
the same however it is split into micro-batches and ranks."""
from __future__ import annotations

from typing import Optional

import torch

# Batch.token_divisors: masked text tokens in text-only rows, in rows with an image; masked
# regions (the three token_counts gives; a fine-tuning task's loss items instead, as its
# TaskSpec.step_counts gives them: grounding's real regions); all masked text tokens
# (step_divisors adds it)
TEXT_ROW_TOKENS, IMAGE_ROW_TOKENS, REGIONS, MASKED_TOKENS = range(4)


def text_only_rows(batch) -> torch.Tensor:
    """(B,) bool: rows without any region (VL-BERT's text-only samples), on the batch's device."""
    if batch.region_mask is not None:
        return ~batch.region_mask.any(1)
    # no mask: every row has the regions given (the model's default), or none at all
    return torch.full((batch.batch_size,), batch.region_feats is None, dtype=torch.bool,
                      device=batch.input_ids.device)


def token_counts(batch) -> list[float]:
    """What each token mean of ``batch`` divides by on its own, in ``token_divisors`` order; from
    the host batch (the collator's positions), so a step's counts cost no device work."""
    text = 0.0
    masked = 0 if batch.mlm_positions is None else batch.mlm_positions.numel()
    if masked:
        rows = batch.mlm_positions // batch.input_ids.shape[1]
        text = float(text_only_rows(batch)[rows].sum())
    regions = 0 if batch.mrc_positions is None else batch.mrc_positions.numel()
    return [text, masked - text, float(regions)]


def step_divisors(counts: torch.Tensor, parts: int) -> torch.Tensor:
    """``Batch.token_divisors`` of a step: ``counts``, token_counts summed over the step's
    micro-batches and ranks, then all masked text tokens (MASKED_TOKENS, the sum of the two
    kinds), each divided by ``parts`` (ranks x micro-batches). Each is clamped to 1 (a kind
    the step lacks sums to 0 whatever it is divided by), the total only after its sum: the two
    kinds clamped apart and then added made a step without text-only rows (every run without
    data.text_train) divide by its count + 1."""
    total = torch.cat([counts, counts[:REGIONS].sum(0, keepdim=True)])
    return total.clamp(min=1.0) / parts


def reduce_loss(per_item: torch.Tensor, example_index: torch.Tensor, batch_size: int, how: str,
                weights: Optional[torch.Tensor] = None, examples: Optional[torch.Tensor] = None,
                divisor: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over items (``token``), or the mean over examples of each example's mean (``example``).

    ``token`` with ``divisor`` (the step's item count per micro-batch and rank, from
    ``Batch.token_divisors``): the sum over items divided by it, so every item of the step
    weighs the same, as in one batch of the global size. Without: this micro-batch's mean.

    ``example`` makes the loss independent of how a global batch is split into micro-batches,
    so gradient accumulation 2 x (B/2) equals 1 x B exactly (given dropout 0).

    ``weights`` (0/1 per item) and ``examples`` (bool per example) restrict both means to a
    subset: ``per_item`` must already be 0 outside it; an empty subset gives 0. The subset's
    size varies between micro-batches, so this loses ``example``'s accumulation invariance.
    """
    if how == "token":
        if divisor is not None:
            return per_item.sum() / divisor
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
