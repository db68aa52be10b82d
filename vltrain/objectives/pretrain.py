"""Pretraining objectives: masked LM (both papers) and masked region classification (VL-BERT)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vltrain.config import ObjectivesConfig
from vltrain.data.batch import Batch
from vltrain.monitor import accuracy
from vltrain.objectives.reduce import reduce_loss


def mlm_loss(model, hidden, batch: Batch, T: int, how: str, separate_text: bool = False):
    """Cross-entropy of the tied MLM head at the masked positions; ``hidden`` (M, H) holds the
    final states there (``VLModelOutput.text_selected``), T the batch's text length.

    ``separate_text`` (VL-BERT): the masked tokens of text-only rows and of image-text rows are
    reduced apart and the two losses added, as VL-BERT's mlm_loss_aux + mlm_loss_wvc (each
    from its own batch there). A text-only row has ~4x a caption's masked tokens, so one mean
    over all of them would leave MLM with visual clues a small share of the gradient. The two
    means are per micro-batch (VL-BERT's per GPU batch, which always holds both kinds): a
    kind absent from a micro-batch adds 0, so a small ``data.text_proportion`` x micro-batch
    weighs the text term below 1 (the VL-BERT recipe's 0.5 x 32 misses a kind with
    probability 2^-31).
    """
    B = batch.input_ids.shape[0]
    logits = model.mlm_logits(hidden).float()
    per_tok = F.cross_entropy(logits, batch.mlm_labels, reduction="none")
    rows = batch.mlm_positions // T
    acc = accuracy(logits.argmax(-1), batch.mlm_labels)
    if not separate_text:
        return reduce_loss(per_tok, rows, B, how), acc
    if batch.region_mask is not None:
        text_row = ~batch.region_mask.any(1)
    else:   # no mask: every row has the regions given (the model's default), or none at all
        text_row = torch.full((B,), batch.region_feats is None, dtype=torch.bool, device=per_tok.device)
    loss = per_tok.new_zeros(())
    for kind in (text_row, ~text_row):
        # the other kind's tokens weigh 0 and its rows count as absent, with fixed shapes (no
        # selection by value: a host sync on the GPU)
        w = kind[rows].to(per_tok.dtype)
        loss = loss + reduce_loss(per_tok * w, rows, B, how, weights=w, examples=kind)
    return loss, acc


def mrc_loss(model, hidden, batch: Batch, N: int, how: str):
    """Soft cross-entropy against the detector's class distribution at the masked regions;
    ``hidden`` (M, H) holds their final states (``VLModelOutput.region_selected``)."""
    B = batch.input_ids.shape[0]
    logp = F.log_softmax(model.mrc_head(hidden).float(), dim=-1)
    target = batch.mrc_targets.float()
    per_region = -(target * logp).sum(-1)
    loss = reduce_loss(per_region, batch.mrc_positions // N, B, how)
    acc = accuracy(logp.argmax(-1), target.argmax(-1))
    return loss, acc


def loss_positions(batch: Batch, cfg: ObjectivesConfig):
    """(text, region) positions the pretraining losses read: the model computes its last
    block only there. Empty (not None) when an objective has nothing to predict."""
    text = batch.mlm_positions if cfg.mlm and batch.mlm_positions is not None else None
    regions = batch.mrc_positions if (cfg.mrc and batch.region_feats is not None
                                      and batch.mrc_positions is not None) else None
    if text is None:
        text = batch.input_ids.new_zeros(0)
    return text, regions


def pretrain_losses(model, batch: Batch, cfg: ObjectivesConfig):
    """Forward the batch; return (weighted total loss, {name: detached scalar tensor}).

    Metrics stay on the device (no host sync); the monitor reads them at log intervals.
    """
    text_pos, region_pos = loss_positions(batch, cfg)
    out = model(batch.input_ids, batch.token_type_ids, batch.attention_mask,
                region_feats=batch.region_feats, region_boxes=batch.region_boxes,
                region_cls_probs=batch.region_cls_probs, region_mask=batch.region_mask,
                mode=batch.mode, image_feat=batch.image_feat, region_ids=batch.region_ids,
                text_positions=text_pos, region_positions=region_pos)
    # Zero that stays in the graph: a micro-batch with nothing masked still runs backward
    # through every block, so every rank joins the same gradient collectives.
    total = out.text_selected.sum() * 0.0
    metrics = {}
    T = batch.input_ids.shape[1]
    if text_pos.numel():
        loss, acc = mlm_loss(model, out.text_selected, batch, T, cfg.loss_reduction, cfg.separate_text_mlm)
        total = total + cfg.mlm_weight * loss
        metrics.update(loss_mlm=loss.detach(), mlm_acc=acc)
    elif cfg.mlm:
        # Nothing masked here (objectives.mask_sampling=bernoulli can pick no token in a small
        # micro-batch) while other ranks have targets: the MLM head gets zero gradients too.
        total = total + model.mlm_logits(out.text_selected[:0]).sum()
    if out.region_selected is not None and out.region_selected.shape[0]:
        N = batch.region_feats.shape[1]
        loss, acc = mrc_loss(model, out.region_selected, batch, N, cfg.loss_reduction)
        total = total + cfg.mrc_weight * loss
        metrics.update(loss_mrc=loss.detach(), mrc_acc=acc)
    elif cfg.mrc:
        # No region to classify here (a text-only micro-batch), but other ranks have some:
        # the head gets zero gradients, so every rank reduces the same ones (see _region_anchor).
        total = total + model.mrc_head(out.text_selected[:0]).sum()
    metrics["loss"] = total.detach()
    return total, metrics
