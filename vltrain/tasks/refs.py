"""Grounding in VL-BERT's RefCOCO+ format: ``[CLS] expression [SEP]`` with the image; every
region's final state is scored (``heads.RegionScoreHead``), trained with binary cross-entropy
against VL-BERT's labels (region IoU with the ground-truth box >= 0.5), averaged over the real
regions. The prediction is the best-scoring region's box; accuracy (percent) = share of
expressions whose predicted box has IoU >= 0.5 with the ground truth; ``accuracy_pixel_inclusive``
is the same with VL-BERT's test code's IoU (boxes in pixels, one pixel added to each side). The
evaluation also reports the accuracy of always picking the largest region (a baseline any
model should beat).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vltrain.data.batch import Batch
from vltrain.objectives.reduce import REGIONS, reduce_loss
from vltrain.tasks.base import TaskSpec
from vltrain.tasks.collate_tasks import RefsCollator
from vltrain.tasks.evaluation import predict_split, write_results
from vltrain.tasks.heads import RegionScoreHead


class GroundingTask(nn.Module):
    """forward(batch) -> (loss, metrics); forward(batch, predict=True) -> {"scores": (B, N)}
    with -inf on padded regions."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.head = RegionScoreHead(model)

    def forward(self, batch: Batch, predict: bool = False):
        out = self.model(batch.input_ids, batch.token_type_ids, batch.attention_mask,
                         region_feats=batch.region_feats, region_boxes=batch.region_boxes,
                         region_cls_probs=batch.region_cls_probs, region_mask=batch.region_mask,
                         mode=batch.mode, image_feat=batch.image_feat)
        scores = self.head(out.region_hidden).float()
        real = batch.region_mask
        if predict:
            return {"scores": scores.masked_fill(~real, float("-inf"))}
        labels = batch.task["region_labels"].float()
        per = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
        # the mean over the optimizer step's real regions (its count from the trainer: a mean per
        # micro-batch changed with the split, e.g. on a resume at another world size)
        d = batch.token_divisors
        loss = reduce_loss((per * real).flatten(), None, per.shape[0], "token", weights=real.flatten(),
                           divisor=None if d is None else d[REGIONS])
        pick = scores.masked_fill(~real, float("-inf")).argmax(1, keepdim=True)
        acc = labels.gather(1, pick).mean()
        return loss, {"loss": loss.detach(), "ground_acc": acc.detach()}


def _largest(boxes: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    return area.masked_fill(~real, -1.0).argmax(1)


def evaluate_refs(trainer, split: str) -> dict:
    from vltrain.metrics.accuracy import grounding_accuracy, paired_box_iou

    def collect(batch, out):
        rows = torch.arange(batch.batch_size)
        pick = out["scores"].argmax(1)
        boxes = batch.region_boxes.float()
        pred = boxes[rows, pick]
        big = boxes[rows, _largest(boxes, batch.region_mask)]
        gt = batch.task["target_box"]
        iou = paired_box_iou(pred, gt)
        wh = batch.task["image_size"].float().repeat(1, 2)
        recs = {}
        for i, sid in enumerate(batch.sample_id.tolist()):
            recs[sid] = {"image_id": batch.task["image_id"][i], "region": int(pick[i]),
                         "box": pred[i].tolist(), "box_pixels": (pred[i] * wh[i]).tolist(),
                         "iou": float(iou[i]), "target_box": gt[i].tolist(),
                         "target_box_pixels": (gt[i].float() * wh[i]).tolist(), "largest_box": big[i].tolist()}
        return recs

    preds, counts = predict_split(trainer, split, collect)
    recs = [preds[k] for k in sorted(preds)]
    gt = [r["target_box"] for r in recs]
    metrics = {"num_samples": float(len(recs)),
               "accuracy": 100.0 * grounding_accuracy([r["box"] for r in recs], gt),
               # as VL-BERT's test code scores (its paper's figure): one pixel added to each side
               "accuracy_pixel_inclusive": 100.0 * grounding_accuracy(
                   [r["box_pixels"] for r in recs], [r["target_box_pixels"] for r in recs], pixel_inclusive=True),
               "largest_region_accuracy": 100.0 * grounding_accuracy([r["largest_box"] for r in recs], gt)}
    write_results(trainer, split, metrics, preds, counts)
    return metrics


SPEC = TaskSpec("refs", build_module=lambda cfg, model: GroundingTask(model),
                make_collator=lambda cfg, tok, infos, train: RefsCollator(cfg, tok, infos, train),
                evaluate=evaluate_refs, best_metric="accuracy", higher_is_better=True, model_heads=lambda cfg: (),
                token_mean=lambda cfg: True, step_counts=lambda b: [0.0, 0.0, float(b.region_mask.sum())])
