"""Training objectives: each returns (loss, metrics) from model outputs and a Batch."""
from vltrain.objectives.pretrain import pretrain_losses

__all__ = ["pretrain_losses"]
