"""The one batch contract that crosses data -> model -> objectives -> engine.

Text layout (BERT conventions): ``input_ids = [CLS] [SEP] w1 .. wT [STOP]`` for image-text
samples (regions are inserted by the model right after ``[CLS]``, giving VLP's
``[CLS] r1..rN [SEP] w1..wT [STOP]``) and ``[CLS] w1 .. wT [SEP]`` for text-only samples,
which is exactly a BERT input. In seq2seq mode the target tokens are the text tokens with
``token_type_ids == 1`` (UniLM's segment B); everything else is the bidirectional prefix.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

import torch

MODE_BIDIRECTIONAL = 0
MODE_SEQ2SEQ = 1
MODE_LEFT_TO_RIGHT = 2
MODE_NAMES = {"bidirectional": MODE_BIDIRECTIONAL, "seq2seq": MODE_SEQ2SEQ,
              "left_to_right": MODE_LEFT_TO_RIGHT}


@dataclass
class Batch:
    """B = batch, T = text length, N = regions, C = detector classes, A = answers."""

    sample_id: torch.Tensor                       # (B,) int64
    input_ids: torch.Tensor                       # (B, T) int64
    token_type_ids: torch.Tensor                  # (B, T) int64; 1 marks seq2seq targets
    attention_mask: torch.Tensor                  # (B, T) int64, 1 = real token
    mode: torch.Tensor                            # (B,) int64, MODE_*
    region_feats: Optional[torch.Tensor] = None   # (B, N, D) float, zeroed where region-masked
    region_boxes: Optional[torch.Tensor] = None   # (B, N, 4) float32, normalised x1,y1,x2,y2
    region_cls_probs: Optional[torch.Tensor] = None  # (B, N, C) as stored (float16); cast on device
    region_mask: Optional[torch.Tensor] = None    # (B, N) bool, real vs padded regions
    image_feat: Optional[torch.Tensor] = None     # (B, D) whole-image feature (VL-BERT), optional
    # VL-BERT under MRC: the word id whose embedding each region gets, [IMG] or, where its
    # input was zeroed, [MASK] (VL-BERT's mask word embedding); None = [IMG] everywhere.
    region_ids: Optional[torch.Tensor] = None     # (B, N) int64
    # MLM: flat indices into the (B*T) text positions, and the original ids there.
    mlm_positions: Optional[torch.Tensor] = None  # (M,) int64
    mlm_labels: Optional[torch.Tensor] = None     # (M,) int64
    # Masked region classification: flat indices into (B*N) regions, soft targets.
    mrc_positions: Optional[torch.Tensor] = None  # (R,) int64
    mrc_targets: Optional[torch.Tensor] = None    # (R, C) soft targets, as stored (float16)
    # Training with objectives.loss_reduction=token: what each token mean divides a sum by, the
    # optimizer step's count over all its micro-batches and ranks per micro-batch (order in
    # vltrain/objectives/reduce.py; set by vltrain/engine/step_feed.py). None: the batch's own.
    token_divisors: Optional[torch.Tensor] = None  # (4,) float32
    # Task fields (filled by task collators).
    task: dict = field(default_factory=dict)

    def _map(self, fn) -> "Batch":
        """A new Batch with ``fn(tensor, name)`` applied to every tensor (task fields named
        ``task.<key>``)."""
        kw = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "task":
                kw["task"] = {k: fn(t, f"task.{k}") if isinstance(t, torch.Tensor) else t for k, t in v.items()}
            else:
                kw[f.name] = fn(v, f.name) if isinstance(v, torch.Tensor) else v
        return Batch(**kw)

    def tensors(self):
        """Every tensor of the batch (task fields too)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            for t in (v.values() if f.name == "task" else (v,)):
                if isinstance(t, torch.Tensor):
                    yield t

    def to(self, device, non_blocking: bool = True, float_dtype: Optional[torch.dtype] = None) -> "Batch":
        """Move every tensor; floating region inputs optionally cast (e.g. to bf16)."""
        def move(x, name):
            x = x.to(device, non_blocking=non_blocking)
            cast = name in ("region_feats", "image_feat") and float_dtype is not None and x.is_floating_point()
            return x.to(float_dtype) if cast else x
        return self._map(move)

    def pin_memory(self) -> "Batch":
        """Called by torch's DataLoader (pin_memory=True) so host->device copies are async."""
        return self._map(lambda t, name: t.pin_memory())

    @property
    def batch_size(self) -> int:
        return self.input_ids.shape[0]
