"""Multiple choice in VL-BERT's VCR format: for each choice, ``[CLS] question [SEP] answer [SEP]``
with the image; the model's ``cls_head`` (pooled ``[CLS]`` -> one score) scores the pair, trained
with cross-entropy of the softmax over the choices (``task.mc_loss=softmax``) or, as VL-BERT's
VCR recipe does (``CLASSIFIER_SIGMOID``), binary cross-entropy of each choice's score against
"is the right one", averaged over the choices (``sigmoid``). All choices of a sample run as one
(B*K)-row forward; the regions are expanded on the device, not copied K times on the host.

Evaluation: accuracy (percent) of the highest-scoring choice; ``predictions.json`` holds each
sample's choice probabilities (the VCR leaderboard's inputs), prediction and label.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from vltrain.data.batch import Batch
from vltrain.objectives.reduce import REGIONS, reduce_loss
from vltrain.tasks.base import TaskSpec, Work, row_regions, work_of
from vltrain.tasks.collate_tasks import MCCollator
from vltrain.tasks.evaluation import predict_split, write_results
from vltrain.tasks.heads import expand_regions


def real_choices(task: dict) -> torch.Tensor:
    """(B, K) bool: the choices the sigmoid loss averages over (a sample's own, of labelled samples)."""
    return task["choice_valid"] & (task["label"] >= 0)[:, None]


class MultipleChoiceTask(nn.Module):
    """forward(batch) -> (loss, metrics); forward(batch, predict=True) -> {"scores": (B, K)}
    with -inf for padded choices."""

    def __init__(self, model, loss: str = "softmax"):
        super().__init__()
        self.model = model
        self.loss = loss

    def forward(self, batch: Batch, predict: bool = False):
        t = batch.task
        B, K, T = t["choice_ids"].shape
        linked = t.get("choice_regions")
        out = self.model(t["choice_ids"].reshape(B * K, T), t["choice_type"].reshape(B * K, T),
                         t["choice_mask"].reshape(B * K, T), mode="bidirectional", **expand_regions(batch, K),
                         text_regions=None if linked is None else linked.reshape(B * K, T))
        scores = self.model.cls_head(out.text_hidden[:, 0]).view(B, K).float()
        scores = scores.masked_fill(~t["choice_valid"], float("-inf"))
        if predict:
            return {"scores": scores}
        label = t["label"]
        if self.loss == "sigmoid":
            # masked mean, not boolean indexing: that would read the count back to the host
            real = real_choices(t)
            right = F.one_hot(label.clamp(min=0), K).to(scores.dtype)
            per = F.binary_cross_entropy_with_logits(scores.masked_fill(~real, 0.0), right, reduction="none")
            d = batch.token_divisors      # the step's real choices (see refs.py)
            loss = reduce_loss((per * real).flatten(), None, B, "token", weights=real.flatten(),
                               divisor=None if d is None else d[REGIONS])
        else:
            loss = F.cross_entropy(scores, label, ignore_index=-1)
        acc = (scores.argmax(1) == label).float().mean()
        return loss, {"loss": loss.detach(), "mc_acc": acc.detach()}


def evaluate_mc(trainer, split: str) -> dict:
    def collect(batch, out):
        probs = torch.softmax(out["scores"], dim=1)
        labels = batch.task["label"].tolist()
        valid = batch.task["choice_valid"]
        recs = {}
        for i, sid in enumerate(batch.sample_id.tolist()):
            p = probs[i, valid[i]].tolist()
            pred = int(out["scores"][i].argmax())
            rec = {"image_id": batch.task["image_id"][i], "probs": p, "pred": pred}
            if labels[i] >= 0:
                rec["label"] = labels[i]
            recs[sid] = rec
        return recs

    preds, counts = predict_split(trainer, split, collect)
    labeled = [r for r in preds.values() if "label" in r]
    metrics = {"num_samples": float(len(preds))}
    if labeled:
        metrics["accuracy"] = 100.0 * sum(r["pred"] == r["label"] for r in labeled) / len(labeled)
        metrics["chance"] = 100.0 * sum(1.0 / len(r["probs"]) for r in labeled) / len(labeled)
    write_results(trainer, split, metrics, preds, counts)
    return metrics


def mc_work(cfg, batch: Batch) -> Work:
    """K sequences per sample, each with the sample's regions; the choices that pad a sample
    to the batch's K are computed but are not work (``choice_valid``)."""
    text = batch.task["choice_mask"].sum(dim=2)                          # (B, K)
    regions = row_regions(cfg, batch)
    lengths = text + (regions.unsqueeze(1) if torch.is_tensor(regions) else regions)
    return work_of(lengths * batch.task["choice_valid"])


SPEC = TaskSpec("mc", build_module=lambda cfg, model: MultipleChoiceTask(model, cfg.task.mc_loss),
                make_collator=lambda cfg, tok, infos, train: MCCollator(cfg, tok, infos, train),
                evaluate=evaluate_mc, best_metric="accuracy", higher_is_better=True, work=mc_work,
                model_heads=lambda cfg: ("cls_head",), token_mean=lambda cfg: cfg.task.mc_loss == "sigmoid",
                step_counts=lambda b: [0.0, 0.0, float(real_choices(b.task).sum())])
