"""What a task is, to the engine: a module to train, a collator, and an evaluation.

The engine (``vltrain.engine.build`` / ``trainer``) only talks to a ``TaskSpec``; each task
(pretrain, caption, vqa, mc, refs) registers one in ``vltrain.tasks.TASKS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch.nn as nn

from vltrain.model.vl_model import region_slots
from vltrain.objectives.reduce import token_counts


@dataclass(frozen=True)
class TaskSpec:
    name: str
    # (cfg, model: VLModel) -> nn.Module whose forward(batch) returns (loss, {name: scalar tensor})
    build_module: Callable[..., nn.Module]
    # (cfg, tokenizer, stream infos, train: bool) -> collate_fn returning a Batch; None = pretraining's
    make_collator: Optional[Callable] = None
    # (trainer, split) -> {metric: float}: task metrics on a held-out split (each sample once,
    # across ranks), predictions written under the run dir; None = mean of the module's metrics
    evaluate: Optional[Callable] = None
    # the validation metric that picks the `best` checkpoint, and whether higher is better
    best_metric: str = "loss"
    higher_is_better: bool = False
    # (cfg, batch) -> Work: what the throughput and MFU counters see, or None where that
    # depends on what the step computes (self-critical training decodes captions of
    # data-dependent length): then no tokens/s and no MFU are reported. Unset = one sequence
    # per sample (text + region slots), no MLM logits.
    work: Optional[Callable] = None
    # (cfg) -> the model's heads (VLModel's mlm_head, mrc_head, cls_head) the task runs; the
    # others are left out of the MFU's N, and the task's own heads are in it (flop_params)
    model_heads: Callable = lambda cfg: ()
    # (cfg) -> whether the training loss holds means over items of varying count (reduce_loss
    # ``token`` at batch.mlm_positions / mrc_positions; grounding's regions): the trainer then
    # counts each optimizer step's items before it trains (Batch.token_divisors,
    # vltrain/engine/step_feed.py), so the loss is the same however the step is split.
    token_mean: Callable = lambda cfg: False
    # (host batch) -> its counts in token_divisors order (objectives.reduce.token_counts: masked
    # tokens and regions; a task averaging other items puts their count in the REGIONS slot)
    step_counts: Callable = token_counts


class Work(NamedTuple):
    """The real (non-padding) tokens of one batch, as the throughput and MFU counters see them:
    device scalars, summed without a host sync. Padding is not work the model needs (MFU counts
    the model FLOPs of the tokens trained on, PaLM's definition; a text-only row padded to an
    image row's length would otherwise count ~2x)."""
    tokens: object                # real tokens of all sequences: text, regions, VL-BERT's slots
    tokens_sq: object             # the sum over sequences of their real length squared (attention)
    mlm_rows: int = 0             # rows whose vocabulary logits the MLM head computes


def row_regions(cfg, batch):
    """(B,) real region positions of each row: its regions and, in a row with an image, the
    model's slots around them (VL-BERT's whole-image region and [END]); 0 without regions.
    No ``region_mask``: every row has all the regions given (the model's default)."""
    if batch.region_feats is None or batch.region_feats.shape[1] == 0:
        return 0
    slots = sum(region_slots(cfg.model))
    if batch.region_mask is None:
        return batch.region_feats.shape[1] + slots
    return batch.region_mask.sum(dim=1) + slots * batch.region_mask.any(dim=1)


def work_of(lengths, mlm_rows: int = 0) -> Work:
    """``Work`` of sequences with real ``lengths`` (a device tensor, any shape)."""
    lengths = lengths.double()
    return Work(lengths.sum(), (lengths * lengths).sum(), mlm_rows)


def batch_work(spec: Optional[TaskSpec], batch, cfg) -> Optional[Work]:
    if spec is not None and spec.work is not None:
        return spec.work(cfg, batch)
    return work_of(batch.attention_mask.sum(dim=1) + row_regions(cfg, batch))


def mlm_work(cfg, batch, text_positions) -> Work:
    """Losses that read vocabulary logits at a few text positions (pretraining's MLM, caption
    fine-tuning): give the very positions the loss passes (``objectives.pretrain.loss_positions``)."""
    return batch_work(None, batch, cfg)._replace(mlm_rows=0 if text_positions is None else text_positions.numel())


def gather_predictions(local: dict, cut: tuple[set, set], world: int) -> tuple[dict, tuple[set, set]]:
    """Union of every rank's ``{sample_id: prediction}``, each sample kept once, and of its
    ``cut`` (sample ids whose text / regions the collator cut), in one gather.

    Streaming pads each rank's share of an epoch with repeated samples, so the same id may
    arrive from two ranks: the predictions are identical (same weights, same input), and
    the dict keeps one. Returns the full dict and sets on every rank.
    """
    import torch.distributed as dist
    if world <= 1 or not dist.is_initialized():
        return dict(local), cut
    parts = [None] * world
    dist.all_gather_object(parts, (local, cut))
    merged: dict = {}
    for preds, _ in parts:
        merged.update(preds)
    return merged, tuple(set().union(*(c[i] for _, c in parts)) for i in range(len(cut)))


def write_json(obj, path: str) -> None:
    """Write JSON atomically (temp file + rename)."""
    import json
    import os
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)
