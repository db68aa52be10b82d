"""Collators of the understanding tasks: raw MDS samples (kinds ``vqa``, ``mc``, ``refs``) -> ``Batch``.

They reuse the pretraining collator's region handling (validation, ``max_regions`` cut,
padding, class distributions, whole-image feature), its bad-sample protocol (a
``BadSampleError`` names the dataset and sample; with ``data.skip_bad_samples`` the sample is
dropped and reported to ``VLDataLoader`` under ``SKIPPED_KEY``) and ``set_epoch``. No masking:
every example is bidirectional (VLP's λ = 0 for VQA; VL-BERT never uses seq2seq).

Text layouts (regions are spliced in by the model right after ``[CLS]``):
  vqa, ``task.vqa_head=vlp``     ``[CLS] [SEP] question [STOP]``; the head reads [CLS] and [SEP]
  vqa, ``task.vqa_head=vlbert``  ``[CLS] question [SEP] [MASK] [STOP]``, [MASK] part segment B
  mc                            one row per choice: ``[CLS] question [SEP] answer [SEP]``
                                (answer segment B), pairs trimmed longest-first to fit
  refs                          ``[CLS] expression [SEP]``

Batch fields (``Batch.task``):
  vqa   ``vqa_targets`` (B, A) soft scores, ``answer_pos`` (B,) text index the head reads,
        ``question_id`` (B,); eval collators also ``answers`` (list of raw annotator answers) and
        ``answer_type`` (list of str, the official answer type; "" where the dataset has none)
  mc    ``choice_ids``/``choice_type``/``choice_mask`` (B, K, T), ``choice_valid`` (B, K),
        ``label`` (B,) (-1 = unlabeled), ``choice_regions`` (B, K, T) when a VL-BERT model reads
        a dataset with object references (the region each token's reference names, -1 none);
        the top-level text fields hold choice 0's row, so ``batch_size`` counts samples (the
        loader's resume arithmetic relies on it)
  refs  ``target_box`` (B, 4), ``region_labels`` (B, N) = IoU(region, target) >= 0.5 (VL-BERT's
        training labels), ``target_region`` (B,) (-1 when cut by ``max_regions``),
        ``image_size`` (B, 2) as (w, h)
  all eval collators: ``image_id`` (list of str)
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch

from vltrain.data.batch import MODE_BIDIRECTIONAL, Batch
from vltrain.data import masking
from vltrain.data.collate import SKIPPED_KEY, PretrainCollator, StreamInfo, _Example
from vltrain.data.errors import BadSampleError

_EMPTY = np.zeros(0, np.int64)
IOU_POSITIVE = 0.5


class TaskCollator(PretrainCollator):
    """Base of the task collators. Subclasses set ``kind``/``task`` and implement
    ``example(sample) -> (_Example, extra dict)`` and ``finish(batch, extras)``."""

    kind = ""
    task = ""

    def __init__(self, cfg, tokenizer, infos, train: bool):
        need_cls = cfg.model.region_embedding == "vlp" and cfg.model.use_cls_probs
        objectives = dataclasses.replace(cfg.objectives, mlm=False, mrc=False)
        self.train = bool(train)
        self.task_cfg = cfg.task
        super().__init__(tokenizer, cfg.data, objectives, cfg.train.seed, infos, require_cls_probs=need_cls,
                         num_classes=cfg.model.num_region_classes, feat_dim=cfg.model.region_feat_dim)

    def _check_stream(self, info: StreamInfo) -> None:
        meta = info.meta
        if not meta:
            return
        if meta.get("kind") != self.kind:
            raise ValueError(f"dataset {info.name} has kind {meta.get('kind')!r}, but task.name={self.task} "
                             f"needs a {self.kind!r} dataset (data_tools/convert_*.py or make_synthetic.py)")
        # The class-distribution checks are the pretraining collator's (cls_prob / obj_labels).
        super()._check_stream(StreamInfo(info.name, {**meta, "kind": "captions"}))

    # ------------------------------------------------------------------ helpers
    def _words(self, info, sample, col: str) -> list[int]:
        return self._tagged(info, sample, self._get(info, sample, col), None, f"column '{col}'")[0]

    def _tagged(self, info, sample, text, refs, what: str) -> tuple[list[int], list[int]]:
        """WordPiece ids of ``text`` (``what`` names it in errors) and, per id, the region its
        reference in ``refs`` ([char_start, char_end, region] triples) names (-1: none)."""
        self._text_ok(info, sample, text, what)
        if not refs:
            ids = self.tok.encode(text)
            regions = [-1] * len(ids)
        else:
            enc = self.tok.text(text, return_offsets_mapping=True)
            ids, regions = enc["input_ids"], [-1] * len(enc["input_ids"])
            for ref in refs:
                if not (isinstance(ref, list) and len(ref) == 3 and all(type(v) is int for v in ref)
                        and 0 <= ref[0] < ref[1] <= len(text) and ref[2] >= -1):
                    raise self._bad(info, sample, f"{what}: reference {ref!r} is not [char_start, char_end, "
                                                  f"region] within its {len(text)} characters")
                for j, (a, b) in enumerate(enc["offset_mapping"]):
                    if a < ref[1] and b > ref[0]:
                        regions[j] = ref[2]
        return ids, regions

    def _image_example(self, info, sample, ids: list[int], ttype: list[int], cut_text: bool) -> _Example:
        feats, boxes, cls, image_feat, cut_regions = self._regions(info, sample)
        return _Example(int(self._get(info, sample, "sample_id")), np.asarray(ids, np.int64),
                        np.asarray(ttype, np.int64), MODE_BIDIRECTIONAL, _EMPTY, _EMPTY,
                        feats=feats, boxes=boxes, cls=cls, image_feat=image_feat,
                        cut_text=cut_text, cut_regions=cut_regions)

    def _pair(self, a: list[int], b: list[int], budget: int) -> tuple[list[int], list[int]]:
        """Trim the longer of two texts one piece at a time until both fit (BERT's rule)."""
        a, b = list(a), list(b)
        while len(a) + len(b) > budget:
            (a if len(a) > len(b) else b).pop()
        return a, b

    # ------------------------------------------------------------------ batch
    def example(self, sample: dict):
        raise NotImplementedError

    def finish(self, batch: Batch, extras: list[dict]) -> None:
        raise NotImplementedError

    def __call__(self, samples: list[dict]) -> Batch:
        exs, extras, skipped = [], [], []
        for smp in samples:
            try:
                ex, extra = self.example(smp)
            except BadSampleError as e:
                if not self.data.skip_bad_samples:
                    raise
                skipped.append(str(e))
                continue
            exs.append(ex)
            extras.append(extra)
        batch = self._assemble(exs)
        if exs:
            self.finish(batch, extras)
            if not self.train:
                batch.task["image_id"] = [x["image_id"] for x in extras]
        if skipped:
            batch.task[SKIPPED_KEY] = skipped
        return batch


class VQACollator(TaskCollator):
    kind = task = "vqa"

    def __init__(self, cfg, tokenizer, infos, train: bool):
        super().__init__(cfg, tokenizer, infos, train)
        self.num_answers = int(cfg.task.num_answers)
        self.layout = cfg.task.vqa_head
        self.question_noise = int(cfg.task.vqa_question_noise)

    def example(self, sample):
        s, info = self._stream_of(sample)
        question = self._words(info, sample, "question")
        L = self.data.max_text_len
        if self.layout == "vlp":
            words = question[: L - 3]
            ids = [self.cls_id, self.sep_id, *words, self.stop_id]
            ttype = [0] * len(ids)
            pos = 1                                               # the [SEP] after the regions
            noisy = range(2, len(ids))                            # the words and [STOP], as VLP's loader
        else:
            words = question[: L - 4]
            ids = [self.cls_id, *words, self.sep_id, self.mask_id, self.stop_id]
            ttype = [0] * (len(words) + 2) + [1, 1]
            pos = len(words) + 2                                  # the [MASK]
            noisy = range(1, len(words) + 1)
        tids = np.asarray(self._get(info, sample, "target_ids")).reshape(-1).astype(np.int64)
        tsc = np.asarray(self._get(info, sample, "target_scores")).reshape(-1).astype(np.float32)
        if tids.shape != tsc.shape:
            raise self._bad(info, sample, f"target_ids {tids.shape} and target_scores {tsc.shape} differ")
        if not np.isfinite(tsc).all():
            raise self._bad(info, sample, "target_scores has NaN/inf values")
        if len(tsc) and (tsc.min() < 0 or tsc.max() > 1):
            raise self._bad(info, sample, f"target_scores {tsc.tolist()} outside [0, 1] (VQA soft scores: "
                                          "the official accuracy of the answer, 0.3/0.6/0.9/1 for 1/2/3/4+ of 10 "
                                          "annotators)")
        keep = tsc > 0                         # [0]/[0.0] is the "no in-vocabulary answer" placeholder
        tids, tsc = tids[keep], tsc[keep]
        if len(np.unique(tids)) < len(tids):
            raise self._bad(info, sample, f"target_ids {tids.tolist()} name an answer twice")
        if len(tids) and (tids.min() < 0 or tids.max() >= self.num_answers):
            raise self._bad(info, sample, f"target_ids {tids.tolist()} outside [0, {self.num_answers}): the "
                                          f"dataset's answer vocabulary is larger than task.num_answers")
        ex = self._image_example(info, sample, ids, ttype, len(words) < len(question))
        if self.train and self.question_noise and len(noisy):
            rng = masking.sample_rng(self.seed, self.epoch, ex.sample_id, s)
            at = rng.choice(np.asarray(noisy), size=min(self.question_noise, len(noisy)), replace=False)
            masking.apply_mlm(rng, ex.ids, at, self.mask_id, self.random_pool,
                              self.obj.mask_token_prob, self.obj.random_token_prob)
        extra = {"qid": int(sample.get("question_id", ex.sample_id)), "tids": tids, "tsc": tsc, "pos": pos,
                 "image_id": str(sample.get("image_id", ""))}
        if not self.train:
            answers = sample.get("answers") or []
            if not isinstance(answers, list):   # a plain string was scored letter by letter
                raise self._bad(info, sample, f"column 'answers' must list the annotators' answers, got {answers!r}")
            extra["answers"] = [str(a) for a in answers]
            # optional column: datasets converted before it existed have none
            extra["answer_type"] = str(sample.get("answer_type") or "")
        return ex, extra

    def finish(self, batch, extras):
        B = len(extras)
        targets = torch.zeros(B, self.num_answers, dtype=torch.float32)
        for i, x in enumerate(extras):
            targets[i, torch.from_numpy(x["tids"])] = torch.from_numpy(x["tsc"])
        batch.task["vqa_targets"] = targets
        batch.task["answer_pos"] = torch.tensor([x["pos"] for x in extras], dtype=torch.long)
        batch.task["question_id"] = torch.tensor([x["qid"] for x in extras], dtype=torch.long)
        if not self.train:
            batch.task["answers"] = [x["answers"] for x in extras]
            batch.task["answer_type"] = [x["answer_type"] for x in extras]


class MCCollator(TaskCollator):
    kind = task = "mc"

    def __init__(self, cfg, tokenizer, infos, train: bool):
        super().__init__(cfg, tokenizer, infos, train)
        # VL-BERT gives the words of an object reference that object's region feature; VLP's
        # text has no visual feature, so its datasets' reference columns go unused.
        self.link_refs = cfg.model.region_embedding == "vlbert"

    def example(self, sample):
        s, info = self._stream_of(sample)
        choices = self._get(info, sample, "choices")
        if not isinstance(choices, list) or len(choices) < 2:
            raise self._bad(info, sample, f"column 'choices' must list at least 2 answers, got {choices!r}")
        label = int(self._get(info, sample, "label"))
        if not -1 <= label < len(choices):
            raise self._bad(info, sample, f"label {label} outside [0, {len(choices)}) (-1 = unlabeled)")
        if label == -1 and self.train:       # it would train nothing, and a split of them trains NaN
            raise self._bad(info, sample, "label -1 (unlabeled: a test split?) in a training split")
        linked = self.link_refs and sample.get("question_refs") is not None
        choice_refs = sample.get("choice_refs") if linked else None
        if linked and not (isinstance(choice_refs, list) and len(choice_refs) == len(choices)):
            raise self._bad(info, sample, f"column 'choice_refs' must hold one list per choice, got {choice_refs!r}")
        q, rq = self._tagged(info, sample, self._get(info, sample, "question"),
                             sample.get("question_refs") if linked else None, "column 'question'")
        rows, types, regions, cut, answers = [], [], [], False, []
        for k, c in enumerate(choices):
            a, ra = self._tagged(info, sample, c, choice_refs[k] if linked else None, f"choice {k}")
            answers.append((a, ra))
            qa, aa = self._pair(q, a, self.data.max_text_len - 3)     # each keeps a prefix
            cut = cut or len(qa) + len(aa) < len(q) + len(a)
            rows.append([self.cls_id, *qa, self.sep_id, *aa, self.sep_id])
            types.append([0] * (len(qa) + 2) + [1] * (len(aa) + 1))
            regions.append([-1, *rq[:len(qa)], -1, *ra[:len(aa)], -1])
        # Another choice that tokenizes as the answer (its word-pieces and object links) gets the
        # same score: trained, the loss cannot fall below log 2; scored, the tie goes to the lower
        # index, whichever is right. Refused in training; an evaluation scores every sample of its
        # split (the official count). (Answers that only data.max_text_len's cut makes alike are
        # the config's, counted as cut text: refusing them would stop a run at the first.)
        same = [k for k in range(len(answers)) if self.train and k != label and answers[k] == answers[label]]
        if same:
            raise self._bad(info, sample, f"choice {same[0]} tokenizes as the answer (choice {label}): "
                                          "no model can tell them apart")
        ex = self._image_example(info, sample, rows[0], types[0], cut)
        extra = {"rows": rows, "types": types, "label": label, "image_id": str(sample.get("image_id", ""))}
        if linked:
            stored = len(self._get(info, sample, "features"))
            bad = [r for row in regions for r in row if r >= stored]
            if bad:
                raise self._bad(info, sample, f"an object reference names region {bad[0]}, but the sample "
                                              f"has {stored} regions")
            # a region cut by data.max_regions: the words keep the whole image's feature
            extra["regions"] = [[r if r < len(ex.feats) else -1 for r in row] for row in regions]
        return ex, extra

    def finish(self, batch, extras):
        B = len(extras)
        K = max(len(x["rows"]) for x in extras)
        T = self._text_len(max(len(r) for x in extras for r in x["rows"]))
        ids = torch.full((B, K, T), self.pad_id, dtype=torch.long)
        ttype = torch.zeros((B, K, T), dtype=torch.long)
        mask = torch.zeros((B, K, T), dtype=torch.long)
        valid = torch.zeros((B, K), dtype=torch.bool)
        for i, x in enumerate(extras):
            for k, (r, t) in enumerate(zip(x["rows"], x["types"])):
                ids[i, k, :len(r)] = torch.tensor(r)
                ttype[i, k, :len(t)] = torch.tensor(t)
                mask[i, k, :len(r)] = 1
                valid[i, k] = True
        batch.task.update(choice_ids=ids, choice_type=ttype, choice_mask=mask, choice_valid=valid,
                          label=torch.tensor([x["label"] for x in extras], dtype=torch.long))
        if any("regions" in x for x in extras):
            regions = torch.full((B, K, T), -1, dtype=torch.long)
            for i, x in enumerate(extras):
                for k, r in enumerate(x.get("regions", ())):
                    regions[i, k, :len(r)] = torch.tensor(r)
            batch.task["choice_regions"] = regions


class RefsCollator(TaskCollator):
    kind = task = "refs"

    def example(self, sample):
        s, info = self._stream_of(sample)
        expression = self._words(info, sample, "expression")
        words = expression[: self.data.max_text_len - 2]
        ids = [self.cls_id, *words, self.sep_id]
        box = np.asarray(self._get(info, sample, "target_box"), dtype=np.float32).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise self._bad(info, sample, f"column 'target_box' must be 4 finite numbers, got {box.tolist()}")
        self._boxes_ok(info, sample, "target_box", box)
        ex = self._image_example(info, sample, ids, [0] * len(ids), len(words) < len(expression))
        region = int(self._get(info, sample, "target_region"))
        if region >= len(ex.feats):
            region = -1                       # cut by data.max_regions: only the box is known
        size = (int(sample.get("image_w", 0) or 0), int(sample.get("image_h", 0) or 0))
        return ex, {"box": box, "region": region, "size": size, "image_id": str(sample.get("image_id", ""))}

    def finish(self, batch, extras):
        from vltrain.metrics.accuracy import box_iou
        target = torch.from_numpy(np.stack([x["box"] for x in extras]))
        B, N = batch.region_mask.shape
        labels = torch.zeros(B, N, dtype=torch.float32)
        for i in range(B):
            n = int(batch.region_mask[i].sum())
            iou = box_iou(batch.region_boxes[i, :n], target[i:i + 1])[:, 0]
            labels[i, :n] = (iou >= IOU_POSITIVE).float()
        batch.task.update(target_box=target, region_labels=labels,
                          target_region=torch.tensor([x["region"] for x in extras], dtype=torch.long),
                          image_size=torch.tensor([x["size"] for x in extras], dtype=torch.long))
