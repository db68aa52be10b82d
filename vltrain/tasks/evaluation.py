"""Shared evaluation plumbing for tasks: one pass over a split on every rank, predictions keyed
by sample id (each sample once across ranks), and the result files of one evaluation.

Files of one evaluation, written by rank 0 under ``<run_dir>/eval/<split>_step<NNNNNNNN>/``:
  ``metrics.json``       {"task", "split", "step", "init_from", "num_samples", "truncated", "skipped",
                         "repeated_ids", "converter_skipped", "converter_left_out", "metrics"}
                         (repeated_ids: samples of the split left unscored because another sample
                         has their sample_id; truncated: how many of the samples had
                         their text cut to data.max_text_len / their regions to data.max_regions;
                         skipped: how many bad samples data.skip_bad_samples left out, not in
                         num_samples; converter_skipped: the bad inputs data_tools --skip-bad left
                         out of the split's dataset, by reason, from its vltrain_meta.json: where
                         those were whole questions/images, the official scorers would count them;
                         converter_left_out: {"samples_left_out", "input_samples", "input_unit"},
                         how many of the input's questions / expressions / images that makes)
  ``predictions.json``   {sample_id: prediction record}, sorted by sample id
  + the task's submission file(s) (e.g. VQA's ``vqa_results.json``)
"""
from __future__ import annotations

import logging
import os
from typing import Callable

import torch

from vltrain.data import schema
from vltrain.data.collate import TRUNCATED_KEY
from vltrain.monitor import Ratio
from vltrain.tasks.base import gather_predictions, write_json

log = logging.getLogger(__name__)


@torch.no_grad()
def predict_split(trainer, split: str, collect: Callable) -> tuple[dict, dict]:
    """Run the task module with ``predict=True`` over ``split`` on every rank; return the union
    of ``collect(host_batch, outputs) -> {sample_id: record}`` over all ranks (on every rank),
    and ``{"text": n, "regions": m, "skipped": k, "converter_skipped": {reason: n}}``: how many
    of those samples the collator cut, how many bad samples it skipped (each once, though
    streaming's padding may give one to two ranks), and what the split's converter skipped.

    Every batch is forwarded, repeats included: with ZeRO-3 the forward is a collective, so
    every rank must run the same number of them (streaming gives each rank an equal share,
    padded with repeated samples; the dict keeps one record per sample id).
    """
    loader = trainer.eval_loader(split)
    engine = trainer.engine
    was_training = engine.training
    engine.eval()
    local: dict = {}
    cut: tuple[set, set] = (set(), set())
    try:
        for batch in loader:
            for ids, more in zip(cut, batch.task.get(TRUNCATED_KEY, ((), ()))):
                ids.update(more)
            outputs = engine(trainer.to_device(batch), predict=True)
            outputs = {k: v.float().cpu() if isinstance(v, torch.Tensor) else v for k, v in outputs.items()}
            local.update(collect(batch, outputs))
    finally:
        if was_training:
            engine.train()
    merged, (text, regions, skipped) = gather_predictions(local, (*cut, set(loader.skipped_in_pass)),
                                                          trainer.info.world)
    converted: dict = {}
    left_out = {"samples_left_out": 0, "input_samples": 0, "input_unit": ""}
    for info in loader.collator.streams:
        for reason, n in (info.meta.get("skipped") or {}).items():
            converted[reason] = converted.get(reason, 0) + int(n)
        for key in ("samples_left_out", "input_samples"):      # datasets converted before them lack them
            left_out[key] += int(info.meta.get(key) or 0)
        left_out["input_unit"] = info.meta.get("input_unit") or left_out["input_unit"]
    # Samples sharing an id with another were scored once between them (the dict keeps one):
    # the split's sample count tells how many (the converters refuse such ids; a reader does not)
    repeated = max(int(loader.dataset.num_samples) - len(merged) - len(skipped), 0)
    return merged, {"text": len(text), "regions": len(regions), "skipped": len(skipped),
                    "repeated_ids": repeated, "converter_skipped": converted, "converter_left_out": left_out}


def first_seen_counts(per_rank: list[list[list[int]]]) -> list[list[int]]:
    """For the sample ids of every rank's batches (``per_rank[rank][batch]``), how many in each
    batch are counted: each id once in all, where it first occurs in (rank, batch) order.
    Streaming pads every rank's share to the same length with other ranks' samples, so the
    same sample can come up on two ranks (and twice in one batch)."""
    seen: set[int] = set()
    out = []
    for batches in per_rank:
        counts = []
        for ids in batches:
            new = set(ids) - seen
            seen |= new
            counts.append(len(new))
        out.append(counts)
    return out


def metric_sums(batches: list, weights: list[int], keys: list[str], device) -> torch.Tensor:
    """[numerator sum of each of ``keys``..., denominator sum of each...] over one rank's
    validation ``batches`` (``(sample ids, {key: tensor or monitor.Ratio})``) weighted by
    ``weights`` (its ``first_seen_counts``): a plain metric weighs its batch's samples seen
    first; a ``Ratio`` (accuracy over masked tokens) its own denominator, in the share of the
    batch's samples seen first. Summed over ranks, numerator / denominator is the metric."""
    sums = torch.zeros(2 * len(keys), device=device)
    for (ids, metrics), w in zip(batches, weights):
        for i, k in enumerate(keys):
            m = metrics.get(k)
            if m is None:
                continue
            share = w / max(len(ids), 1)       # the batch's share of samples seen first
            num, den = (m.num * share, m.den * share) if isinstance(m, Ratio) else (m * w, w)
            sums[i] += num
            sums[len(keys) + i] += den
    return sums


def eval_dir(trainer, split: str) -> str:
    return os.path.join(trainer.run_dir, "eval", f"{split}_step{trainer.step:08d}")


def write_results(trainer, split: str, metrics: dict, predictions: dict, counts: dict,
                  files: dict | None = None) -> str:
    """Write one evaluation's files on rank 0 (see module docstring); returns the folder.
    ``counts``: predict_split's cut and skipped samples."""
    out = eval_dir(trainer, split)
    if trainer.info.is_main:
        for what, limit in (("text", "data.max_text_len"), ("regions", "data.max_regions")):
            if counts[what]:
                log.warning("%s evaluation: %d of %d samples have more %s than %s allows: the model saw "
                            "them cut (metrics.json: truncated)", split, counts[what], len(predictions),
                            what, limit)
        if counts["skipped"]:
            log.warning("%s evaluation: %d bad samples skipped (data.skip_bad_samples), not scored "
                        "(metrics.json: skipped)", split, counts["skipped"])
        if counts["repeated_ids"]:
            log.warning("%s evaluation: %d of the split's samples share a sample_id with another and were not "
                        "scored (one per id; metrics.json: repeated_ids): the dataset's sample ids repeat",
                        split, counts["repeated_ids"])
        left = counts["converter_left_out"]
        if left["samples_left_out"]:
            log.warning("%s evaluation: the split's converter left out %d of its input's %d %s (%.1f%%; %s; "
                        "metrics.json: converter_left_out, each input in the dataset's %s): the official scorer "
                        "counts them and these metrics do not", split, left["samples_left_out"],
                        left["input_samples"], left["input_unit"],
                        100 * left["samples_left_out"] / max(left["input_samples"], 1),
                        ", ".join(f"{k}: {v}" for k, v in sorted(counts["converter_skipped"].items())),
                        schema.SKIPPED_FILE)
        elif counts["converter_skipped"]:
            log.warning("%s evaluation: the split's dataset was converted with %d bad inputs left out (%s; "
                        "metrics.json: converter_skipped): where those were whole questions/images, the "
                        "official scorer would count them and these metrics do not", split,
                        sum(counts["converter_skipped"].values()),
                        ", ".join(f"{k}: {v}" for k, v in sorted(counts["converter_skipped"].items())))
        os.makedirs(out, exist_ok=True)
        write_json({str(k): predictions[k] for k in sorted(predictions)}, os.path.join(out, "predictions.json"))
        for name, obj in (files or {}).items():
            write_json(obj, os.path.join(out, name))
        write_json({"task": trainer.cfg.task.name, "split": split, "step": trainer.step,
                    "init_from": trainer.cfg.train.init_from, "num_samples": len(predictions),
                    "truncated": {k: counts[k] for k in ("text", "regions")}, "skipped": counts["skipped"],
                    "repeated_ids": counts["repeated_ids"],
                    "converter_skipped": counts["converter_skipped"],
                    "converter_left_out": counts["converter_left_out"], "metrics": metrics}, os.path.join(out, "metrics.json"))
        log.info("%s evaluation on %s (%d samples) written to %s", trainer.cfg.task.name, split,
                 len(predictions), out)
    return out
