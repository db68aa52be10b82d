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
