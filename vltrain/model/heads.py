"""Pretraining heads. Each maps gathered hidden states to logits; losses live in objectives/."""
from __future__ import annotations

import torch
import torch.nn as nn

from vltrain.config import ModelConfig
from vltrain.model.embeddings import WordEmbedding
from vltrain.model.transformer import ACTIVATIONS


class Transform(nn.Module):
    """BERT's prediction-head transform: dense -> activation -> LayerNorm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        return self.norm(self.act(self.dense(x)))


class MLMHead(nn.Module):
    """BERT's MLM head, decoder tied to the word embeddings; run only on masked positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = Transform(cfg)
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, hidden: torch.Tensor, word: WordEmbedding) -> torch.Tensor:
        return word(self.transform(hidden), logits=True) + self.bias


class RegionClassHead(nn.Module):
    """Masked region classification (VL-BERT): logits over the detector's classes."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = Transform(cfg)
        self.decoder = nn.Linear(cfg.hidden_size, cfg.num_region_classes)

    def forward(self, hidden):
        return self.decoder(self.transform(hidden))


class Pooler(nn.Module):
    """BERT's pooler: tanh(W h_[CLS])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, cls_hidden):
        return torch.tanh(self.dense(cls_hidden))


class ClsScoreHead(nn.Module):
    """One score from the pooled [CLS] state: image-text matching / multiple choice."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pooler = Pooler(cfg)
        self.dropout = nn.Dropout(cfg.hidden_dropout)
        self.score = nn.Linear(cfg.hidden_size, 1)

    def forward(self, cls_hidden):
        return self.score(self.dropout(self.pooler(cls_hidden))).squeeze(-1)
