"""Pretraining objectives: masked LM (both papers) and masked region classification (VL-BERT)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vltrain.config import ObjectivesConfig
from vltrain.data.batch import Batch
from vltrain.monitor import accuracy
from vltrain.objectives.reduce import IMAGE_ROW_TOKENS, MASKED_TOKENS, REGIONS, TEXT_ROW_TOKENS, reduce_loss, \
    text_only_rows


def mlm_loss(model, hidden, batch: Batch, T: int, how: str, separate_text: bool = False):
    """Cross-entropy of the tied MLM head at the masked positions; ``hidden`` (M, H) holds the
    final states there (``VLModelOutput.text_selected``), T the batch's text length.

    ``separate_text`` (VL-BERT): the masked tokens of text-only rows and of image-text rows are
    reduced apart and the two losses added, as VL-BERT's mlm_loss_aux + mlm_loss_wvc (each
    from its own batch there). A text-only row has ~4x a caption's masked tokens, so one mean
    over all of them would leave MLM with visual clues a small share of the gradient. With
    ``Batch.token_divisors`` (training, ``token``) each mean is over the optimizer step's
    tokens of its kind, so a micro-batch without one kind still weighs both terms right;
    without (evaluation, ``example``), per micro-batch: a kind absent from it adds 0.
    """
    B = batch.input_ids.shape[0]
    logits = model.mlm_logits(hidden).float()
    per_tok = F.cross_entropy(logits, batch.mlm_labels, reduction="none")
    rows = batch.mlm_positions // T
    acc = accuracy(logits.argmax(-1), batch.mlm_labels)
    d = batch.token_divisors
    if not separate_text:
        return reduce_loss(per_tok, rows, B, how, divisor=None if d is None else d[MASKED_TOKENS]), acc
    text_row = text_only_rows(batch)
    loss = per_tok.new_zeros(())
    for kind, which in ((text_row, TEXT_ROW_TOKENS), (~text_row, IMAGE_ROW_TOKENS)):
        # the other kind's tokens weigh 0 and its rows count as absent, with fixed shapes (no
        # selection by value: a host sync on the GPU)
        w = kind[rows].to(per_tok.dtype)
        loss = loss + reduce_loss(per_tok * w, rows, B, how, weights=w, examples=kind,
                                  divisor=None if d is None else d[which])
    return loss, acc


def mrc_loss(model, hidden, batch: Batch, N: int, how: str):
    """Soft cross-entropy against the detector's class distribution at the masked regions;
    ``hidden`` (M, H) holds their final states (``VLModelOutput.region_selected``)."""
    B = batch.input_ids.shape[0]
    logp = F.log_softmax(model.mrc_head(hidden).float(), dim=-1)
    target = batch.mrc_targets.float()
    per_region = -(target * logp).sum(-1)
    divisor = None if batch.token_divisors is None else batch.token_divisors[REGIONS]
    loss = reduce_loss(per_region, batch.mrc_positions // N, B, how, divisor=divisor)
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
    # A share of the step's token mean (Batch.token_divisors): a micro-batch without targets
    # adds 0 to it, so it reports 0, not nothing (which the monitor's mean would leave out).
    step_mean = batch.token_divisors is not None and cfg.loss_reduction == "token"
    T = batch.input_ids.shape[1]
    if text_pos.numel():
        loss, acc = mlm_loss(model, out.text_selected, batch, T, cfg.loss_reduction, cfg.separate_text_mlm)
        total = total + cfg.mlm_weight * loss
        metrics.update(loss_mlm=loss.detach(), mlm_acc=acc)
    elif cfg.mlm:
        # Nothing masked here (objectives.mask_sampling=bernoulli can pick no token in a small
        # micro-batch) while other ranks have targets: the MLM head gets zero gradients too.
        total = total + model.mlm_logits(out.text_selected[:0]).sum()
        if step_mean:
            metrics["loss_mlm"] = torch.zeros((), device=total.device)
    if out.region_selected is not None and out.region_selected.shape[0]:
        N = batch.region_feats.shape[1]
        loss, acc = mrc_loss(model, out.region_selected, batch, N, cfg.loss_reduction)
        total = total + cfg.mrc_weight * loss
        metrics.update(loss_mrc=loss.detach(), mrc_acc=acc)
    elif cfg.mrc:
        # No region to classify here (a text-only micro-batch), but other ranks have some:
        # the head gets zero gradients, so every rank reduces the same ones (see _region_anchor).
        total = total + model.mrc_head(out.text_selected[:0]).sum()
        if step_mean:
            metrics["loss_mrc"] = torch.zeros((), device=total.device)
    metrics["loss"] = total.detach()
    return total, metrics
