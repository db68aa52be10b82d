"""Fine-tuning heads (pure torch): VQA (VLP's MLP, VL-BERT's MLM-initialised classifier) and
grounding's per-region scorer. Multiple choice uses the model's own ``cls_head``."""
from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch
import torch.nn as nn

from vltrain.model.embeddings import init_bert_


class VLPAnswerHead(nn.Module):
    """VLP's VQA classifier on ``h_[CLS] * h_[SEP]``: Linear(H, 2H) -> ReLU -> Linear(2H, A).

    The sigmoid is in the loss (``binary_cross_entropy_with_logits``), as in VLP's code.
    """

    def __init__(self, hidden: int, num_answers: int, std: float = 0.02):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, num_answers))
        self.apply(lambda m: init_bert_(m, std))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class MLMAnswerHead(nn.Module):
    """VL-BERT's VQA classifier on the final state of the ``[MASK]`` after the question:
    MLM transform (dense -> act -> LayerNorm) -> dropout -> Linear(H, A).

    Initialised from the model's (pretrained) MLM head: the transform is a copy of
    ``mlm_head.transform`` (VL-BERT's ``CLASSIFIER_TYPE: mlm``), and row ``a`` of the decoder is
    the mean tied word embedding of answer ``a``'s word pieces (VL-BERT's
    ``CLASSIFIER_PRETRAINED``); its bias is their mean MLM bias where VL-BERT's starts at 0, so
    at step 0 the logit of a one-piece answer is exactly the MLM logit of that word at the ``[MASK]``.
    """

    def __init__(self, model, answer_piece_ids: Sequence[Sequence[int]], dropout: float):
        super().__init__()
        self.transform = copy.deepcopy(model.mlm_head.transform)
        self.dropout = nn.Dropout(dropout)
        h = model.config.hidden_size
        self.decoder = nn.Linear(h, len(answer_piece_ids))
        with torch.no_grad():
            word = model.embeddings.word.weight
            bias = model.mlm_head.bias
            for a, pieces in enumerate(answer_piece_ids):
                if not pieces:
                    raise ValueError(f"answer {a} of the answer vocabulary has no word pieces")
                idx = torch.as_tensor(list(pieces), dtype=torch.long)
                self.decoder.weight[a].copy_(word[idx].float().mean(0))
                self.decoder.bias[a] = bias[idx].float().mean()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.dropout(self.transform(x)))


class RegionScoreHead(nn.Module):
    """VL-BERT's RefCOCO+ scorer on each region's final state: the masked-region head's
    transform, then Linear(H, 1).

    As VL-BERT's RefCOCO+ recipe: its ``final_mlp`` starts from the pretrained masked-RoI head's
    transform (``mvrc_head.transform -> final_mlp.0``), no dropout (``CLASSIFIER_DROPOUT: 0``),
    and a Xavier-uniform scoring layer with zero bias. Ours copies ``model.mrc_head.transform``
    (dense -> act -> LayerNorm; VL-BERT's transform has no LayerNorm)."""

    def __init__(self, model):
        super().__init__()
        self.transform = copy.deepcopy(model.mrc_head.transform)
        self.score = nn.Linear(model.config.hidden_size, 1)
        nn.init.xavier_uniform_(self.score.weight)
        nn.init.zeros_(self.score.bias)

    def forward(self, region_hidden: torch.Tensor) -> torch.Tensor:
        return self.score(self.transform(region_hidden)).squeeze(-1)


def expand_regions(batch, k: int) -> dict:
    """Region inputs of ``batch`` repeated ``k`` times per example (B*k rows, as views where
    possible): multiple choice scores K texts against one image without K copies on the host."""
    def rep(x: Optional[torch.Tensor]):
        if x is None:
            return None
        return x[:, None].expand(x.shape[0], k, *x.shape[1:]).reshape(x.shape[0] * k, *x.shape[1:])
    return dict(region_feats=rep(batch.region_feats), region_boxes=rep(batch.region_boxes),
                region_cls_probs=rep(batch.region_cls_probs), region_mask=rep(batch.region_mask),
                image_feat=rep(batch.image_feat))
