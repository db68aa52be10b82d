"""VQA fine-tuning and evaluation, both papers' heads (``task.vqa_head``):

  vlp     VLP: ``Linear -> ReLU -> Linear`` on ``h_[CLS] * h_[SEP]`` (the [SEP] between the
          regions and the question), sigmoid / binary cross-entropy against the soft scores.
  vlbert  VL-BERT: a ``[MASK]`` after the question (``[CLS] q [SEP] [MASK] [STOP]``) whose final
          state goes through a head initialised from the model's MLM head (see
          ``heads.MLMAnswerHead``); same loss.

The answer vocabulary is the dataset's ``answer_vocab.json`` (index = class id); its size must
equal ``task.num_answers`` (3129 for VQA v2 as VLP/VL-BERT use it). The loss is BCE summed over
answers and averaged over questions (VLP's ``BCE-mean x num_answers``).

Evaluation: argmax answer per question, scored twice (see ``score_answer``): ``accuracy``, the
official vqaEval.py metric (the one reported as best), and ``accuracy_normalized``, the
LXMERT / VL-BERT code's val score; unlabeled questions (test-dev/test) get predictions only.
Where the dataset has answer types (``answer_type`` column), also vqaEval.py's per-answer-type
official accuracies (``answer_type_metrics``: ``accuracy_yes_no``, ``accuracy_number``,
``accuracy_other``); datasets converted before that column existed have none.
Files: ``predictions.json`` (by sample id) and the submission ``vqa_results.json`` =
``[{"question_id", "answer"}]``.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from vltrain.data.batch import Batch
from vltrain.tasks.base import TaskSpec
from vltrain.tasks.collate_tasks import VQACollator
from vltrain.tasks.evaluation import predict_split, write_results
from vltrain.tasks.heads import MLMAnswerHead, VLPAnswerHead

VQA_HEADS = ("vlp", "vlbert")
_VOCAB_DIFFERS = ("{split}: its answer_vocab.json differs from {theirs}, so class ids would name other answers; "
                  "convert every split with --answer-vocab <the training split's answer_vocab.json>")
SUBMISSION_FILE = "vqa_results.json"


def read_answer_vocab(remote: str, timeout: float = 60.0) -> list[str]:
    """``answer_vocab.json`` of a VQA dataset (local folder or remote prefix)."""
    from vltrain.data.datasets import _read_text, read_meta
    from vltrain.data.errors import MetaError
    from vltrain.data.schema import ANSWER_VOCAB_FILE
    try:
        text = _read_text(remote, ANSWER_VOCAB_FILE, timeout)
    except MetaError:
        kind = read_meta(remote, timeout).get("kind")    # another kind of dataset: say that instead
        if kind != "vqa":
            raise MetaError(f"dataset {remote} has kind {kind!r}, but task.name=vqa needs a 'vqa' dataset "
                            "(data_tools/convert_vqa.py)") from None
        raise
    try:
        vocab = json.loads(text)
    except json.JSONDecodeError as e:
        raise MetaError(f"dataset {remote}: {ANSWER_VOCAB_FILE} is not valid JSON: {e}") from e
    if not isinstance(vocab, list) or not all(isinstance(a, str) for a in vocab) or not vocab:
        raise MetaError(f"dataset {remote}: {ANSWER_VOCAB_FILE} must be a non-empty JSON list of strings")
    return vocab


def split_vocab(cfg, split: str) -> list[str]:
    """``read_answer_vocab`` of ``data.<split>``, its errors naming that key (as the loader's)."""
    from vltrain.data.errors import DataError
    path = getattr(cfg.data, split, "")
    if not path:
        raise ValueError(f"task.name=vqa reads its answer vocabulary from data.{split}, which is empty")
    try:
        return read_answer_vocab(path, cfg.data.download_timeout)
    except DataError as e:
        raise type(e)(f"data.{split}: {e}") from None


class VQATask(nn.Module):
    """forward(batch) -> (loss, metrics); forward(batch, predict=True) -> {"logits": (B, A)}."""

    def __init__(self, model, head: str, answers: list[str], tokenizer=None):
        super().__init__()
        if head not in VQA_HEADS:
            raise ValueError(f"task.vqa_head={head!r}; choose one of {list(VQA_HEADS)}")
        self.model = model
        self.head_type = head
        self.answers = list(answers)      # plain attribute: not part of the state dict
        h, n = model.config.hidden_size, len(answers)
        if head == "vlp":
            self.head = VLPAnswerHead(h, n, model.config.initializer_range)
        else:
            pieces = [tokenizer.encode(a) for a in answers]
            self.head = MLMAnswerHead(model, pieces, model.config.hidden_dropout)

    def forward(self, batch: Batch, predict: bool = False):
        out = self.model(batch.input_ids, batch.token_type_ids, batch.attention_mask,
                         region_feats=batch.region_feats, region_boxes=batch.region_boxes,
                         region_cls_probs=batch.region_cls_probs, region_mask=batch.region_mask,
                         mode=batch.mode, image_feat=batch.image_feat)
        h = out.text_hidden
        rows = torch.arange(h.shape[0], device=h.device)
        at = h[rows, batch.task["answer_pos"]]           # [SEP] (vlp) or [MASK] (vlbert)
        logits = self.head(h[:, 0] * at if self.head_type == "vlp" else at).float()
        if predict:
            return {"logits": logits}
        target = batch.task["vqa_targets"].float()
        loss = F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / max(1, logits.shape[0])
        score = target.gather(1, logits.argmax(1, keepdim=True)).mean()
        return loss, {"loss": loss.detach(), "vqa_score": score.detach()}


def vocab_sha256(vocab: list[str]) -> str:
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()


def build_vqa(cfg, model) -> VQATask:
    # the head's vocabulary: data.train's, or in eval mode the evaluated split's
    split = "train" if cfg.mode == "train" else cfg.task.eval_split
    vocab = split_vocab(cfg, split)
    sha = vocab_sha256(vocab)
    # Evaluation: another vocabulary than the head's is the cause to name first; its size
    # (below) would only send the user to task.num_answers and then here.
    if cfg.task.answer_vocab_sha256 and cfg.task.answer_vocab_sha256 != sha:
        if cfg.mode == "train":       # set in the config (a run's saved config.yaml carries its own)
            fix = ("a resumed run needs the dataset it trained on" if cfg.train.resume else
                   "training on data.train sets the key: leave it unset (task.answer_vocab_sha256=)")
            raise ValueError(f"config key 'task.answer_vocab_sha256': {cfg.task.answer_vocab_sha256} is not the "
                             f"answer vocabulary of data.train ({sha}); {fix}")
        raise ValueError(_VOCAB_DIFFERS.format(split=f"data.{split}", theirs="the one the head was trained on "
                                               "(task.answer_vocab_sha256 of train.init_from's config)"))
    if len(vocab) != cfg.task.num_answers:
        raise ValueError(f"the answer vocabulary of data.{split} has {len(vocab)} answers but "
                         f"task.num_answers={cfg.task.num_answers}; set task.num_answers={len(vocab)}")
    if cfg.mode == "train":
        # class ids must mean the same answers in the validation split: checked now, not at the
        # first validation thousands of steps in (data.test is checked by its mode=eval, above)
        if cfg.data.val and split_vocab(cfg, "val") != vocab:
            raise ValueError(_VOCAB_DIFFERS.format(split="data.val", theirs="data.train's"))
        cfg.task.answer_vocab_sha256 = sha           # saved with every checkpoint's config
    tok = None
    if cfg.task.vqa_head == "vlbert":
        from vltrain.tokenization import Tokenizer
        tok = Tokenizer(cfg.data.vocab, cfg.data.casing)
    return VQATask(model, cfg.task.vqa_head, vocab, tok)


def score_answer(answer: str, gt: list[str]) -> dict[str, float]:
    """One question's scores: ``accuracy`` is the official vqaEval.py metric (ground truth as
    annotated); ``accuracy_normalized`` normalises the ground truth like the training targets
    (the soft-score convention of the LXMERT / VL-BERT code; more lenient)."""
    from vltrain.metrics.vqa import vqa_accuracy
    return {"accuracy": vqa_accuracy(answer, gt),
            "accuracy_normalized": vqa_accuracy(answer, gt, normalize_gt=True)}


def answer_type_metrics(records: Iterable[dict]) -> dict[str, float]:
    """``accuracy_<answer type>`` (percent; non-alphanumerics of the type as ``_``: ``yes/no`` ->
    ``accuracy_yes_no``) over the scored prediction records that have an answer type: vqaEval.py's
    ``perAnswerType``, the mean official accuracy of the type's questions. Empty when no record
    has a type (a test split, or a dataset converted before the ``answer_type`` column)."""
    from vltrain.metrics.vqa import per_type_accuracy
    typed = [r for r in records if "accuracy" in r and r.get("answer_type")]
    per_type = per_type_accuracy(dict(enumerate(r["accuracy"] for r in typed)),
                                 dict(enumerate(r["answer_type"] for r in typed)))
    return {"accuracy_" + re.sub(r"[^0-9A-Za-z]", "_", t): acc for t, acc in sorted(per_type.items())}


def evaluate_vqa(trainer, split: str) -> dict:
    """VQA accuracies (percent, see ``score_answer``) over ``split``, each question once across
    ranks."""
    module = trainer.engine.module

    def collect(batch, out):
        pred = out["logits"].argmax(1).tolist()
        qids = batch.task["question_id"].tolist()
        recs = {}
        for i, sid in enumerate(batch.sample_id.tolist()):
            answer = module.answers[pred[i]]
            rec = {"question_id": qids[i], "image_id": batch.task["image_id"][i], "answer": answer,
                   "answer_type": batch.task["answer_type"][i]}
            gt = batch.task["answers"][i]
            if gt:
                rec.update(score_answer(answer, gt))
            recs[sid] = rec
        return recs

    preds, counts = predict_split(trainer, split, collect)
    scored = [r for r in preds.values() if "accuracy" in r]
    metrics = {"num_samples": float(len(preds))}
    if scored:
        for key in ("accuracy", "accuracy_normalized"):
            metrics[key] = 100.0 * sum(r[key] for r in scored) / len(scored)
        metrics["num_scored"] = float(len(scored))
        metrics.update(answer_type_metrics(scored))
    submission = sorted(({"question_id": r["question_id"], "answer": r["answer"]} for r in preds.values()),
                        key=lambda r: r["question_id"])
    write_results(trainer, split, metrics, preds, counts, {SUBMISSION_FILE: submission})
    return metrics


def make_vqa_collator(cfg, tokenizer, infos, train):
    return VQACollator(cfg, tokenizer, infos, train)


SPEC = TaskSpec("vqa", build_module=build_vqa, make_collator=make_vqa_collator, evaluate=evaluate_vqa,
                best_metric="accuracy", higher_is_better=True, model_heads=lambda cfg: ())
