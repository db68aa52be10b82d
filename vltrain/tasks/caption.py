"""Image captioning (VLP): seq2seq fine-tuning, self-critical training, decoding, COCO scoring.

Training (``task.scst=false``): VLP's seq2seq objective with λ = 1 — every example is
``[CLS] r1..rN [SEP] w1..wT [STOP]`` in seq2seq mode and masked LM runs on the caption tokens
and [STOP] only (``objectives.mlm_prob`` / ``max_pred``), cross-entropy with optional label
smoothing (``task.label_smoothing``). The caption collator forces λ = 1 and no region masking:
another ``objectives.seq2seq_prob``, ``objectives.mrc`` or ``data.max_sequence`` is refused
as the config loads (``vltrain.config.check_task_keys``).

Self-critical (``task.scst=true``, start from a fine-tuned checkpoint with ``train.init_from``):
see ``vltrain.tasks.scst``; rewards use CIDEr-D with document frequencies of
``task.scst_references`` (a JSON ``{image_id: [captions]}``) or, when empty, of data.train.

Evaluation (``Trainer.validate`` on data.val, and ``mode=eval``): captions decoded with the
KV cache — greedy (``task.val_beam_size``, default 1) during training, ``task.beam_size``
(default 5, as VLP's test decoding) in ``mode=eval`` — with ``task.max_len``, ``min_len``,
``length_penalty``, ``no_repeat_ngram``; scored per image against all its references with
``vltrain.metrics.caption.caption_scores`` (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE when
it can run). Files (``vltrain.tasks.evaluation.write_results``): ``predictions.json``
``{sample_id: {image_id, caption}}``, the COCO results file ``captions_results.json``
``[{"image_id", "caption"}]`` (numeric ids as ints), and ``metrics.json``.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn
import torch.nn.functional as F

from vltrain.data.batch import Batch
from vltrain.data.collate import PretrainCollator
from vltrain.decoding import DecodeOptions, DecodeTokens, decode
from vltrain.engine.signals import STOP, ValidationInterrupted, children_take_stop_signals
from vltrain.monitor import accuracy
from vltrain.objectives.reduce import MASKED_TOKENS, reduce_loss
from vltrain.tasks.base import TaskSpec, mlm_work

log = logging.getLogger(__name__)

SUBMISSION_FILE = "captions_results.json"
SCORED = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")


# ------------------------------------------------------------------------------ data

class CaptionCollator(PretrainCollator):
    """The pretraining collator with λ = 1 (every example seq2seq) and no region masking;
    each batch also carries ``task["image_id"]`` (list of str) and ``task["references"]``
    (every reference caption of each image): SCST rewards and evaluation need them."""

    def __init__(self, tokenizer, data, objectives, seed, streams=None, require_cls_probs=False, **model_dims):
        objectives = dataclasses.replace(objectives, seq2seq_prob=1.0, mrc=False)
        super().__init__(tokenizer, data, objectives, seed, streams, require_cls_probs=require_cls_probs,
                         **model_dims)

    def _check_stream(self, info) -> None:
        if info.meta and info.meta.get("kind") != "captions":
            raise ValueError(f"dataset {info.name} has kind {info.meta.get('kind')!r}, but task.name=caption "
                             "needs a 'captions' dataset (data_tools/convert_captions.py)")
        super()._check_stream(info)

    def _example(self, sample, text_ids):
        ex = super()._example(sample, text_ids)
        ex.references = [str(c) for c in sample["captions"]]
        image_id = sample.get("image_id")
        ex.image_id = str(image_id) if image_id not in (None, "") else str(ex.sample_id)
        return ex

    def _assemble(self, exs):
        batch = super()._assemble(exs)
        batch.task["image_id"] = [e.image_id for e in exs]
        batch.task["references"] = [e.references for e in exs]
        return batch


def make_caption_collator(cfg, tokenizer, infos, train: bool) -> CaptionCollator:
    need_cls = cfg.model.region_embedding == "vlp" and cfg.model.use_cls_probs
    return CaptionCollator(tokenizer, cfg.data, cfg.objectives, cfg.train.seed, infos,
                           require_cls_probs=need_cls, num_classes=cfg.model.num_region_classes,
                           feat_dim=cfg.model.region_feat_dim)


# ------------------------------------------------------------------------------ module

def decode_options(task_cfg, beam_size: int) -> DecodeOptions:
    opts = DecodeOptions(beam_size=beam_size, max_len=task_cfg.max_len, min_len=task_cfg.min_len,
                         length_penalty=task_cfg.length_penalty, no_repeat_ngram=task_cfg.no_repeat_ngram)
    try:
        opts.check()
    except ValueError as e:
        raise ValueError(f"task.*: {e}") from None
    return opts


def caption_positions(batch: Batch) -> torch.Tensor:
    """The masked caption positions the cross-entropy reads (empty when none)."""
    return batch.mlm_positions if batch.mlm_positions is not None else batch.input_ids.new_zeros(0)


class CaptionTask(nn.Module):
    """forward(batch) -> (loss, metrics): seq2seq MLM cross-entropy, or the SCST loss when
    built with a ``SelfCritical``; forward(batch, predict=True) -> decoded captions."""

    def __init__(self, model, objectives, tokens: DecodeTokens, label_smoothing: float = 0.0, scst=None):
        super().__init__()
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"task.label_smoothing must be in [0, 1), got {label_smoothing}")
        self.model = model
        self.objectives = objectives
        self.tokens = tokens
        self.label_smoothing = label_smoothing
        self.scst = scst
        self.predict_options = DecodeOptions()
        self.sync_steps = False          # decode a fixed number of steps on every rank (ZeRO-3)

    def xe_loss(self, batch: Batch, per_example: bool = False):
        positions = caption_positions(batch)
        out = self.model(batch.input_ids, batch.token_type_ids, batch.attention_mask,
                         region_feats=batch.region_feats, region_boxes=batch.region_boxes,
                         region_cls_probs=batch.region_cls_probs, region_mask=batch.region_mask,
                         mode=batch.mode, image_feat=batch.image_feat, text_positions=positions)
        h = out.text_selected                        # final states at the masked positions only
        B, T = batch.input_ids.shape
        total = h.sum() * 0.0                        # keeps every rank's backward identical
        metrics = {}
        if positions.numel():
            logits = self.model.mlm_logits(h).float()
            per_tok = F.cross_entropy(logits, batch.mlm_labels, reduction="none",
                                      label_smoothing=self.label_smoothing)
            rows = positions // T
            d = batch.token_divisors
            loss = reduce_loss(per_tok, rows, B, self.objectives.loss_reduction,
                               divisor=None if d is None else d[MASKED_TOKENS])
            total = total + loss
            metrics.update(loss_mlm=loss.detach(), mlm_acc=accuracy(logits.argmax(-1), batch.mlm_labels))
            if per_example:
                nll = F.cross_entropy(logits.detach(), batch.mlm_labels, reduction="none")
                sums = nll.new_zeros(B).index_add_(0, rows, nll)
                cnt = nll.new_zeros(B).index_add_(0, rows, torch.ones_like(nll))
                metrics["nll"] = sums / cnt.clamp(min=1)
                metrics["nll_count"] = cnt
        else:
            # Nothing masked here (objectives.mask_sampling=bernoulli can pick no token in a small
            # micro-batch) while other ranks have targets: the MLM head gets zero gradients too,
            # so that every rank reduces (ZeRO-3: gathers) the same parameters.
            total = total + self.model.mlm_logits(h[:0]).sum()
            if batch.token_divisors is not None and self.objectives.loss_reduction == "token":
                metrics["loss_mlm"] = torch.zeros((), device=total.device)   # its share of the step's token mean
        metrics["loss"] = total.detach()
        return total, metrics

    def _partitioned(self) -> bool:
        """ZeRO-3 partitions parameters (they carry ``ds_id``): every module call gathers them
        collectively, so every rank must decode the same number of steps."""
        return self.sync_steps or hasattr(self.model.embeddings.word.weight, "ds_id")

    def forward(self, batch: Batch, predict: bool = False):
        if predict:
            res = decode(self.model, batch, self.tokens, self.predict_options, early_exit=not self._partitioned())
            with torch.no_grad():
                _, m = self.xe_loss(batch, per_example=True)
            return {"tokens": res.tokens, "stopped": res.stopped, "nll": m.get("nll"),
                    "nll_count": m.get("nll_count")}
        if self.scst is not None:
            self.scst.sync_steps = self._partitioned()
            return self.scst.loss(self.model, batch)
        return self.xe_loss(batch)


def build_caption(cfg, model) -> CaptionTask:
    from vltrain.tokenization import Tokenizer
    t = cfg.task
    tok = Tokenizer(cfg.data.vocab, cfg.data.casing)
    decode_options(t, t.beam_size)                   # fail on bad decoding settings at build time
    scst = None
    if t.scst and cfg.mode == "train":
        from vltrain.engine.distributed import from_main_rank
        from vltrain.tasks.scst import SelfCritical, read_caption_references
        source = t.scst_references or cfg.data.train
        # read by rank 0 (COCO's: ~35 MB, from the object store) and broadcast to every rank
        refs = from_main_rank(lambda: read_caption_references(source, cfg.data.download_timeout), long_wait=True)
        log.info("self-critical training: CIDEr-D document frequencies from %d images of %s", len(refs), source)
        scst = SelfCritical(refs, tok, decode_options(t, 1), samples=t.scst_samples,
                            source=f"task.scst_references={source}" if t.scst_references else f"data.train={source}")
    return CaptionTask(model, cfg.objectives, DecodeTokens.from_tokenizer(tok), t.label_smoothing, scst)


# ------------------------------------------------------------------------------ evaluation

def _zero_stage(trainer) -> int:
    return int(((getattr(trainer, "ds_config", None) or {}).get("zero_optimization") or {}).get("stage", 0))


def _coco_id(image_id: str):
    """COCO's evaluation server wants integer image ids; keep anything else as it is."""
    return int(image_id) if str(image_id).isdigit() else image_id


def score_captions(references: dict, candidates: dict, final: bool) -> tuple[dict, dict]:
    """(numeric metrics for TensorBoard/best checkpoint, everything for metrics.json).

    ``final`` (``mode=eval``): the COCO protocol or an error; Java is required (PTB tokenizer,
    METEOR) and SPICE runs when its jars are there. Validation during training skips SPICE
    (minutes of CoreNLP parsing on rank 0 while the other ranks wait in a collective) and,
    without Java, reports CIDEr-D with the pure-Python tokenizer under its own name,
    ``CIDEr_simple``: not comparable with published CIDEr, so the ``best`` checkpoint (kept by
    CIDEr) is not updated from it."""
    from vltrain.metrics.caption import CiderD, JavaNotFoundError, caption_scores
    try:
        with children_take_stop_signals():      # USR1 ends the Java scorers (_score_on_main)
            full = caption_scores(references, candidates, spice=None if final else False)
    except JavaNotFoundError as e:
        if final:
            raise
        log.warning("caption metrics: %s; validation reports CIDEr_simple (CIDEr-D, pure-Python tokenizer) "
                    "only, and the best checkpoint is not updated", e)
        ids = list(candidates)
        cider = CiderD({i: references[i] for i in ids}, tokenize="simple")
        full = {m: None for m in SCORED}
        full["CIDEr_simple"] = float(cider([(i, candidates[i]) for i in ids]).mean())
        full["status"] = f"Java missing ({e}); CIDEr_simple = CIDEr-D with simple_tokenize, COCO metrics unavailable"
        full["SPICE_status"] = "unavailable: no Java"
    if full.get("SPICE") is None:
        log.info("SPICE %s", full.get("SPICE_status"))
    numeric = {k: float(v) for k, v in full.items() if k in SCORED + ("CIDEr_simple",) and v is not None}
    return numeric, full


def _check_references(split: str, refs: dict) -> None:
    if not refs:
        raise ValueError(f"data.{split}: no image to caption (the split is empty)")
    empty = [i for i, r in refs.items() if not r]
    if empty:
        raise ValueError(f"data.{split}: {len(empty)} image(s) without a reference caption, e.g. image_id "
                         f"{', '.join(map(str, empty[:5]))}: CIDEr needs every image's references")


def _score_on_main(split: str, refs: dict, cands: dict, final: bool) -> tuple[dict, dict, str | None]:
    """(numeric, full, error) of the scoring on rank 0; an error is re-raised on every rank.

    During training, a scoring failure after a stop signal arrived is an interruption: Slurm's
    USR1 reaches every process of the step, the metrics' Java children (PTB tokenizer, METEOR,
    SPICE) included, which it ends. That validation then has no scores (``full["interrupted"]``):
    the run checkpoints with it still due, exits 75, and the resumed run runs it first.
    (``mode=eval`` ignores USR1, so its children inherit that.)"""
    try:
        _check_references(split, refs)
    except ValueError as e:
        return {}, {}, f"{type(e).__name__}: {e}"
    try:
        numeric, full = score_captions(refs, cands, final=final)
        return numeric, full, None
    except Exception as e:  # noqa: BLE001 - reported to every rank by the caller
        if STOP.requested and not final:
            log.warning("caption scoring cut short by the stop signal (%s: %s): this validation has no scores",
                        type(e).__name__, e)
            return {}, {"status": f"not scored: the stop signal ended the scorer ({type(e).__name__})",
                        "interrupted": True}, None
        return {}, {}, f"{type(e).__name__}: {e}"


def evaluate_caption(trainer, split: str) -> dict:
    """Decode every image of ``split`` once across ranks and score against all references.

    Validation during training decodes with ``task.val_beam_size`` (greedy by default);
    ``mode=eval`` with ``task.beam_size``. Returns CIDEr etc. (fractions, x1 as
    pycocoevalcap) plus ``loss`` (masked-token cross-entropy on the same batches)."""
    from vltrain.engine.distributed import from_main_rank
    from vltrain.tasks.evaluation import predict_split, write_results

    cfg = trainer.cfg
    module = trainer.engine.module
    beam = cfg.task.beam_size if cfg.mode == "eval" else cfg.task.val_beam_size
    module.predict_options = decode_options(cfg.task, beam)
    module.sync_steps = _zero_stage(trainer) == 3
    tok = trainer.tokenizer

    def collect(batch, out):
        recs = {}
        nll, cnt = out.get("nll"), out.get("nll_count")
        for i, sid in enumerate(batch.sample_id.tolist()):
            rec = {"image_id": batch.task["image_id"][i], "caption": tok.decode(out["tokens"][i]),
                   "references": batch.task["references"][i]}
            if nll is not None and float(cnt[i]) > 0:
                rec["nll"] = float(nll[i])
            recs[sid] = rec
        return recs

    preds, counts = predict_split(trainer, split, collect)
    refs, cands = {}, {}
    for rec in preds.values():
        refs[rec["image_id"]] = rec["references"]
        cands[rec["image_id"]] = rec["caption"]
    nlls = [r["nll"] for r in preds.values() if "nll" in r]

    # Scored on rank 0 only (Java, METEOR's JVM); every rank gets the same numbers, so the
    # `best` checkpoint decision agrees everywhere. The others wait for them up to
    # MAIN_RANK_WAIT_S (from_main_rank), not train.dist_timeout_s: SPICE on a COCO-size split
    # runs for minutes to an hour on one core.
    numeric, full, err = from_main_rank(lambda: _score_on_main(split, refs, cands, final=trainer.cfg.mode == "eval"),
                                        trainer.info.is_main, long_wait=True)
    if err:
        raise RuntimeError(f"caption scoring failed on rank 0: {err}")
    if full.get("interrupted"):         # the same on every rank (broadcast)
        raise ValidationInterrupted(f"data.{split}: {full['status']}")
    metrics = dict(numeric)
    if nlls:
        metrics["loss"] = sum(nlls) / len(nlls)
    metrics["num_images"] = float(len(cands))
    records = {sid: {"image_id": r["image_id"], "caption": r["caption"]} for sid, r in preds.items()}
    submission = sorted(({"image_id": _coco_id(i), "caption": c} for i, c in cands.items()),
                        key=lambda r: (str(type(r["image_id"])), r["image_id"]))
    write_results(trainer, split, {**full, **metrics, "decoding": dataclasses.asdict(module.predict_options)},
                  records, counts, {SUBMISSION_FILE: submission})
    return metrics


SPEC = TaskSpec("caption", build_module=build_caption, make_collator=make_caption_collator,
                work=lambda cfg, batch: None if cfg.task.scst else mlm_work(cfg, batch, caption_positions(batch)),
                evaluate=evaluate_caption, best_metric="CIDEr", higher_is_better=True,
                model_heads=lambda cfg: ("mlm_head",),
                token_mean=lambda cfg: cfg.objectives.loss_reduction == "token" and not cfg.task.scst)
