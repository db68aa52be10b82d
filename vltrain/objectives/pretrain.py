"""Pretraining objectives: masked LM (both papers) and masked region classification (VL-BERT)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vltrain.config import ObjectivesConfig
from vltrain.data.batch import Batch
from vltrain.objectives.reduce import reduce_loss


def mlm_loss(model, text_hidden, batch: Batch, how: str):
    """Cross-entropy of the tied MLM head, computed only at the masked positions."""
    B, T, H = text_hidden.shape
    hidden = text_hidden.reshape(B * T, H).index_select(0, batch.mlm_positions)
    logits = model.mlm_logits(hidden).float()
    per_tok = F.cross_entropy(logits, batch.mlm_labels, reduction="none")
    loss = reduce_loss(per_tok, batch.mlm_positions // T, B, how)
    acc = (logits.argmax(-1) == batch.mlm_labels).float().mean()
    return loss, acc


def mrc_loss(model, region_hidden, batch: Batch, how: str):
    """Soft cross-entropy against the detector's class distribution at the masked regions."""
    B, N, H = region_hidden.shape
    hidden = region_hidden.reshape(B * N, H).index_select(0, batch.mrc_positions)
    logp = F.log_softmax(model.mrc_head(hidden).float(), dim=-1)
    target = batch.mrc_targets.float()
    per_region = -(target * logp).sum(-1)
    loss = reduce_loss(per_region, batch.mrc_positions // N, B, how)
    acc = (logp.argmax(-1) == target.argmax(-1)).float().mean()
    return loss, acc


def pretrain_losses(model, batch: Batch, cfg: ObjectivesConfig):
    """Forward the batch; return (weighted total loss, {name: detached scalar tensor}).

    Metrics stay on the device (no host sync); the monitor reads them at log intervals.
    """
    out = model(batch.input_ids, batch.token_type_ids, batch.attention_mask,
                region_feats=batch.region_feats, region_boxes=batch.region_boxes,
                region_cls_probs=batch.region_cls_probs, region_mask=batch.region_mask,
                mode=batch.mode, image_feat=batch.image_feat)
    # Zero that stays in the graph: a micro-batch with nothing masked still runs backward, so
    # every rank joins the same gradient collectives.
    total = out.text_hidden.sum() * 0.0
    metrics = {}
    if cfg.mlm and batch.mlm_positions is not None and batch.mlm_positions.numel():
        loss, acc = mlm_loss(model, out.text_hidden, batch, cfg.loss_reduction)
        total = total + cfg.mlm_weight * loss
        metrics.update(loss_mlm=loss.detach(), mlm_acc=acc.detach())
    if (cfg.mrc and out.region_hidden is not None and batch.mrc_positions is not None
            and batch.mrc_positions.numel()):
        loss, acc = mrc_loss(model, out.region_hidden, batch, cfg.loss_reduction)
        total = total + cfg.mrc_weight * loss
        metrics.update(loss_mrc=loss.detach(), mrc_acc=acc.detach())
    metrics["loss"] = total.detach()
    return total, metrics
