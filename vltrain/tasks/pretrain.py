"""Pretraining task: the module DeepSpeed wraps — a VLModel plus its objectives."""
from __future__ import annotations

import torch.nn as nn

from vltrain.config import ObjectivesConfig
from vltrain.data.batch import Batch
from vltrain.model import VLModel
from vltrain.objectives import pretrain_losses


class PretrainTask(nn.Module):
    """forward(batch) -> (loss, metrics). The engine never needs to know the objectives."""

    def __init__(self, model: VLModel, objectives: ObjectivesConfig):
        super().__init__()
        self.model = model
        self.objectives = objectives

    def forward(self, batch: Batch):
        return pretrain_losses(self.model, batch, self.objectives)


def pretrain_heads(o: ObjectivesConfig) -> tuple[str, ...]:
    """The model's heads pretraining runs (the MFU's N leaves the others out): the MLM head with
    ``objectives.mlm``, the region classifier with ``objectives.mrc``; never the ``[CLS]`` scorer."""
    return tuple(h for h, on in (("mlm_head", o.mlm), ("mrc_head", o.mrc)) if on)
