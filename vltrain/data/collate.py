"""The pretraining collator: raw MDS sample dicts (kinds ``captions`` and ``text``) -> ``Batch``.

Per sample (all randomness from ``masking.sample_rng(seed, epoch, sample_id, stream)``, drawn in
this order: caption choice, mode, MLM positions, MLM corruption, masked regions):
  * captions: one caption drawn per visit; ``[CLS] [SEP] w1..wT [STOP]`` with
    ``T <= max_text_len - 3`` (VLP: the model splices the regions in after [CLS], giving
    ``[CLS] regions [SEP] caption [STOP]``); for a VL-BERT model, ``[CLS] w1..wT [SEP]``
    with ``T <= max_text_len - 2``, the layout of VL-BERT's text-only samples and of every
    VL-BERT fine-tuning input (no [SEP] between the regions and the text). Mode seq2seq with
    probability ``objectives.seq2seq_prob``, else bidirectional. In seq2seq mode the caption
    tokens and the closing token get token_type 1 (targets).
  * text: ``[CLS] w1..wT [SEP]`` with ``T <= max_text_len - 2``; always bidirectional.
  * MLM: ``n_mask = min(max_pred, max(1, round(mlm_prob * n_tokens)))`` with ``n_tokens`` the
    number of word-pieces of the (truncated) caption/text, *not* counting specials. Candidates
    are those word-pieces plus, for VLP-layout captions, the [STOP] token (as VLP/UniLM: the
    model must learn to predict the end). Chosen tokens: 80% [MASK], 10% random non-special token, 10% kept.
    ``objectives.mask_sampling=bernoulli`` (VL-BERT's code): each word (``whole_word_mask``) or
    piece is chosen with probability ``mlm_prob``, no ``max_pred`` and possibly none, and the
    80/10/10 choice is made once per word.
  * MRC (``objectives.mrc``): ``max(1, round(mrc_prob * n_regions))`` regions are predicted
    (``bernoulli``: each with probability ``mrc_prob``, possibly none);
    of them a share ``mrc_zero_prob`` (VL-BERT: 90%) have their features and class
    distributions zeroed in the input (the distribution is the target, so it must not leak
    through the VLP class-embedding term), the rest are left as they are (VL-BERT's 10%);
    boxes are kept, as in VL-BERT. For a VL-BERT model a zeroed region's word embedding is
    ``[MASK]``'s instead of ``[IMG]``'s (``region_ids``, ``objectives.mrc_mask_word``; VL-BERT's
    code gives it a learned mask word embedding), so the model is told which regions it must
    reconstruct. A VL-BERT model's whole-image feature is then the mean of
    the regions not zeroed (as VL-BERT computes it), given as ``image_feat``; regions that
    ``data.max_sequence`` leaves out count in that mean too (VL-BERT averages every box before
    its ``seq_len`` cut), with or without MRC. A
    stored whole-image feature would show the masked regions to a VL-BERT model's text
    (VL-BERT zeroes their pixels before extracting it), so MRC refuses
    ``data.image_feature=stored`` there on a dataset that has one.
  * Hard class targets (``data.hard_class_targets``, datasets with bottom-up ``objects_id``
    but no ``cls_prob``): one-hot at column ``label + 1``, column 0 being background, as in
    ``cls_prob`` (bottom-up's ``objects_id`` is the argmax over the non-background classes).

``region_feats`` keep the stored dtype (float16): cast on device with ``Batch.to(float_dtype=)``.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from vltrain.data.batch import MODE_BIDIRECTIONAL, MODE_SEQ2SEQ, Batch
from vltrain.data.errors import BadSampleError
from vltrain.data import masking, schema
from vltrain.data.packed import ScratchPool

# Keys the reader adds to every sample (see datasets.VLStreamingDataset.get_item).
STREAM_KEY = "_stream"
# Set by the dataset on a sample whose stored text does not decode: the collator makes it a bad
# sample (skipped and counted with data.skip_bad_samples, else the run's error)
UNREADABLE_KEY = "_unreadable"
# Key in ``Batch.task`` carrying skipped-sample messages from the worker to the loader.
SKIPPED_KEY = "_skipped"
# Key in ``Batch.task``: (sample ids whose text was cut to data.max_text_len, sample ids whose
# regions were cut to data.max_regions), present when either is non-empty; the trainer counts
# them for the batches it trains on, an evaluation counts each sample once (ids: streaming
# repeats samples across ranks), the loader warns the first time.
TRUNCATED_KEY = "_truncated"


@dataclass
class StreamInfo:
    """What the collator knows about one input stream: its name (remote) and its meta."""
    name: str
    meta: dict = field(default_factory=dict)

    @property
    def kind(self) -> Optional[str]:
        return self.meta.get("kind")


@dataclass
class _Example:
    sample_id: int
    ids: np.ndarray                 # (L,) int64, already corrupted by MLM
    ttype: np.ndarray               # (L,) int64
    mode: int
    mlm_pos: np.ndarray             # in-row positions
    mlm_lab: np.ndarray
    feats: Optional[np.ndarray] = None      # (n, D) as stored (may be read-only)
    boxes: Optional[np.ndarray] = None      # (n, 4) float32
    cls: Optional[np.ndarray] = None        # (n, C) as stored, or one-hot float32
    mrc_pos: Optional[np.ndarray] = None    # region indices to predict
    mrc_zero: Optional[np.ndarray] = None   # (len(mrc_pos),) bool: its input zeroed
    image_feat: Optional[np.ndarray] = None
    # the regions data.max_sequence left out: their feature sum (D,) float32 and count, which
    # VL-BERT's whole-image mean includes
    rest_sum: Optional[np.ndarray] = None
    rest_n: int = 0
    cut_text: bool = False                  # text longer than data.max_text_len allows
    cut_regions: bool = False               # more regions than data.max_regions


def share_budget(n_text: int, n_regions: int, budget: int, min_text: int = 2) -> tuple[int, int]:
    """(text tokens, regions) kept of ``n_text`` + ``n_regions`` under a joint ``budget``, VL-BERT's
    rule (its pretraining datasets' "truncate seq to max len"): while together they exceed it, drop a
    region if the regions outnumber the text tokens, else a text token; at least ``min_text``
    text tokens (the layout's special ones: VL-BERT's [CLS] [SEP], VLP's [CLS] [SEP] [STOP]) and
    1 region stay. About 50 regions and the caption at VL-BERT's 64. The
    regions this drops are not counted as cut (``data/truncated_regions``): that is the design;
    text it drops is (a long caption loses words)."""
    t, r = n_text, n_regions
    while t + r > budget and t > 0 and r > 0:
        if r > t:
            r -= 1
        else:
            t -= 1
    return max(t, min_text), max(r, 1)


def _has_cls_prob(meta: dict, sample: dict) -> bool:
    """The dataset stores detector class distributions (its meta says so; a meta-less one: the sample has them)."""
    return bool(meta.get("has_cls_prob") or (not meta and "cls_prob" in sample))


def _ids_by(exs: list[_Example], key) -> str:
    """``"8 (sample_id 1, 4), 16 (sample_id 7)"``: which samples of a batch have which value."""
    groups: dict = {}
    for e in exs:
        groups.setdefault(key(e), []).append(str(e.sample_id))
    return ", ".join(f"{k} (sample_id {', '.join(v)})" for k, v in sorted(groups.items()))


def random_token_pool(tokenizer) -> np.ndarray:
    """Ids MLM may substitute: the whole vocabulary minus specials and ``[...]`` reserved slots."""
    special = set(tokenizer.special_ids)
    bracket = re.compile(r"^\[.*\]$")
    ids = [i for t, i in tokenizer.hf.get_vocab().items() if i not in special and not bracket.match(t)]
    return np.array(sorted(ids), dtype=np.int64)


class PretrainCollator:
    """Picklable ``collate_fn``: a list of raw sample dicts -> one ``Batch``.

    Args:
        tokenizer: ``vltrain.tokenization.Tokenizer``.
        data: ``DataConfig`` (max_text_len, max_regions, pad_to, buckets, skip_bad_samples,
            hard_class_targets).
        objectives: ``ObjectivesConfig`` (seq2seq_prob, mlm*, max_pred, whole_word_mask, mrc*).
        seed: the run seed (``train.seed``); keys every random choice with epoch and sample id.
        streams: one ``StreamInfo`` per stream of the dataset, in stream order; samples carry
            their stream index under ``_stream`` (0 when absent).
        require_cls_probs: the model needs ``region_cls_probs`` (VLP class-embedding term).
        vlbert: the model is VL-BERT-style (``model.region_embedding=vlbert``): captions as
            ``[CLS] w1..wT [SEP]`` instead of VLP's ``[CLS] [SEP] w1..wT [STOP]``, and the
            whole-image feature reaches the text (VLP's model does not read it).
        num_classes: the model's class count (``model.num_region_classes``): the width class
            distributions must have, and the count for hard class targets.
        feat_dim: the model's region feature dim (``model.region_feat_dim``); a sample with
            another is bad (caught here, naming it, rather than as a shape error in the model).
    """

    def __init__(self, tokenizer, data, objectives, seed: int,
                 streams: Optional[Sequence[StreamInfo]] = None, require_cls_probs: bool = False,
                 vlbert: bool = False, num_classes: Optional[int] = None,
                 feat_dim: Optional[int] = None, image_box: bool = False):
        self.tok = tokenizer
        self.data = data
        self.obj = objectives
        self.seed = int(seed)
        self.epoch = 0
        self.streams = list(streams) if streams else [StreamInfo("<unnamed dataset>", {})]
        self.require_cls_probs = require_cls_probs
        self.vlbert = bool(vlbert)
        # the model's whole-image region (model.vlbert_image_box) takes one of data.max_sequence's
        # positions, as VL-BERT's code counts it among the boxes
        self.image_box = int(image_box)
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        # Set in DataLoader workers (PackInWorkers): where the large batch tensors come from.
        self.scratch: Optional[ScratchPool] = None
        self.cls_id, self.sep_id, self.stop_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.stop_id
        self.mask_id, self.pad_id = tokenizer.mask_id, tokenizer.pad_id
        self.random_pool = random_token_pool(tokenizer)
        if data.max_text_len < 4:
            raise ValueError(f"data.max_text_len={data.max_text_len} leaves no room for text "
                             "after [CLS] [SEP] ... [STOP]")
        if data.image_feature not in ("stored", "regions_mean"):
            raise ValueError(f"data.image_feature must be 'stored' or 'regions_mean', got {data.image_feature!r}")
        if data.pad_to not in ("longest", "bucket"):
            raise ValueError(f"data.pad_to must be 'longest' or 'bucket', got {data.pad_to!r}")
        self.buckets = sorted(int(b) for b in data.buckets)
        if data.pad_to == "bucket" and (not self.buckets or self.buckets[-1] < data.max_text_len):
            raise ValueError(f"data.buckets={data.buckets} must include a length >= "
                             f"data.max_text_len={data.max_text_len}")
        for info in self.streams:
            self._check_stream(info)

    # ------------------------------------------------------------------ configuration checks
    def _needs_classes(self) -> bool:
        return bool(self.obj.mrc) or self.require_cls_probs

    def _check_stream(self, info: StreamInfo) -> None:
        """Fail at build time (not at step 1000) when a stream cannot give what the run needs."""
        meta = info.meta
        if not meta or meta.get("kind") == "text":
            return
        if meta.get("kind") not in ("captions",):
            raise ValueError(f"dataset {info.name}: kind {meta.get('kind')!r} cannot be used for "
                             "pretraining (expected 'captions' or 'text')")
        if self.vlbert and self.obj.mrc and meta.get("has_image_feature") and self.data.image_feature == "stored":
            raise ValueError(
                f"dataset {info.name} has a whole-image feature (image_feature), extracted from the "
                "unmasked image: with objectives.mrc=true it would show the masked regions to the text "
                "(VL-BERT zeroes their pixels before extracting it). Set data.image_feature=regions_mean "
                "(the mean of the real region features, masked ones zeroed; use it for fine-tuning too)")
        if self._needs_classes() and not meta.get("has_cls_prob"):
            needs = (["objectives.mrc=true"] if self.obj.mrc else []) + \
                (["the model's class-embedding term"] if self.require_cls_probs else [])
            off = (["objectives.mrc=false"] if self.obj.mrc else []) + \
                (["model.use_cls_probs=false model.geometry_conf=false"] if self.require_cls_probs else [])
            if self.data.hard_class_targets and meta.get("has_obj_labels"):
                if not (meta.get("num_classes") or self.num_classes):
                    raise ValueError(f"dataset {info.name}: data.hard_class_targets needs the class "
                                     "count (num_classes in vltrain_meta.json or model.num_region_classes)")
                return
            hint = ("; the dataset has obj_labels: set data.hard_class_targets=true to use them as "
                    "one-hot targets" if meta.get("has_obj_labels") else "")
            # a feature file without them (bottom-up TSVs by default): every way out at once
            hint += ("; convert with them (--tsv-fields ...,cls_prob, or a cls_prob array in each .npz), or "
                     f"train without them: {' '.join(off)}"
                     + (" (the detector-confidence input comes from them too)" if self.require_cls_probs else ""))
            raise ValueError(f"dataset {info.name} has no 'cls_prob' column (detector class "
                             f"distribution), which {' and '.join(needs)} need{'s' if len(needs) == 1 else ''}{hint}")

    def set_epoch(self, epoch: int) -> None:
        """The epoch keys all randomness; set it before creating the epoch's iterator."""
        self.epoch = int(epoch)

    # ------------------------------------------------------------------ per sample
    def _stream_of(self, sample: dict) -> tuple[int, StreamInfo]:
        if UNREADABLE_KEY in sample:
            raise BadSampleError(sample[UNREADABLE_KEY])
        s = int(sample.get(STREAM_KEY, 0))
        if not 0 <= s < len(self.streams):
            raise ValueError(f"sample has stream index {s} but the collator knows "
                             f"{len(self.streams)} stream(s)")
        return s, self.streams[s]

    @staticmethod
    def _kind(sample: dict, info: StreamInfo) -> str:
        if info.kind:
            return info.kind
        if "captions" in sample:
            return "captions"
        if "text" in sample:
            return "text"
        raise BadSampleError(f"dataset {info.name}: sample_id {sample.get('sample_id', '?')}: "
                             "has neither a 'captions' nor a 'text' column")

    def _bad(self, info: StreamInfo, sample: dict, what: str) -> BadSampleError:
        return BadSampleError(f"dataset {info.name}: sample_id {sample.get('sample_id', '?')}: {what}")

    def _get(self, info, sample, col):
        if col not in sample or sample[col] is None:
            raise self._bad(info, sample, f"missing column '{col}'")
        return sample[col]

    def _finite(self, info, sample, col, arr) -> None:
        if not _all_finite(arr):
            n_bad = int((~np.isfinite(arr.astype(np.float32))).sum())
            raise self._bad(info, sample, f"column '{col}' has {n_bad} NaN/inf values")

    def _floats(self, info, sample, col, arr: np.ndarray) -> np.ndarray:
        """``arr`` if it holds floating-point numbers (a batch takes its tensor's dtype from its
        first sample: an integer one zeroed the fractions of the others)."""
        if arr.dtype.kind != "f":
            raise self._bad(info, sample, f"column '{col}' has dtype {arr.dtype}, expected floating point "
                                          "(data_tools write float16)")
        return arr

    def _boxes_ok(self, info, sample, col: str, boxes: np.ndarray) -> None:
        """Boxes (x1, y1, x2, y2) normalised to [0, 1] with x1 <= x2, y1 <= y2: pixel boxes or
        swapped corners trained silently (a grounding target then matched no region)."""
        outside, swapped = schema.box_faults(boxes)
        if outside.any():
            lo, hi = float(boxes.min()), float(boxes.max())
            raise self._bad(info, sample, f"column '{col}' holds values in [{lo:.4g}, {hi:.4g}]; boxes are "
                                          "normalised by the image size to [0, 1] (pixel boxes? see the "
                                          "converter's image size)")
        if swapped.any():
            raise self._bad(info, sample, f"column '{col}' has boxes with x2 < x1 or y2 < y1; expected "
                                          "(x1, y1, x2, y2)")

    def _text_ok(self, info, sample, text, what: str) -> str:
        """``text`` if it is a non-blank string the tokenizer can take: a lone surrogate (a
        character cut in half in a JSON column) made it raise a TypeError naming no sample."""
        if not isinstance(text, str):
            raise self._bad(info, sample, f"{what} is not text: {text!r}")
        if not text.strip():
            raise self._bad(info, sample, f"{what} is empty: {text!r}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise self._bad(info, sample, f"{what} is not valid Unicode (a lone surrogate at character "
                                              f"{e.start}: a character cut in half?): {text!r}") from None
        # every caption of a sample, not only the one an epoch draws: else the sample fails
        # (or is skipped) in some epochs and not others
        if not schema.yields_tokens(text, self.tok.strip_accents):
            raise self._bad(info, sample, f"{what} is empty after tokenisation (only characters BERT's "
                                          f"tokenizer drops): {ascii(text)}")
        return text

    def _regions(self, info: StreamInfo, sample: dict, by_confidence: bool = False):
        """Validated (feats, boxes, cls or None, image_feat or None, cut), cut to max_regions;
        ``by_confidence``: first ordered by the detector's confidence (the highest class
        probability, highest first; stored order where the sample has no class distribution),
        as VL-BERT's pretraining orders them before its joint cut."""
        meta = info.meta
        feats = self._floats(info, sample, "features", np.asarray(self._get(info, sample, "features")))
        if feats.ndim != 2:
            raise self._bad(info, sample, f"column 'features' has shape {feats.shape}, expected (N, D)")
        n, d = feats.shape
        if n == 0:
            raise self._bad(info, sample, "image has zero regions")
        if meta.get("feature_dim") and d != meta["feature_dim"]:
            raise self._bad(info, sample, f"column 'features' has dim {d}, but the dataset's "
                                          f"vltrain_meta.json says feature_dim={meta['feature_dim']}")
        if self.feat_dim and d != self.feat_dim:
            raise self._bad(info, sample, f"column 'features' has dim {d}, but "
                                          f"model.region_feat_dim={self.feat_dim}")
        boxes = np.asarray(self._get(info, sample, "boxes"), dtype=np.float32)
        if boxes.shape != (n, 4):
            raise self._bad(info, sample, f"column 'boxes' has shape {boxes.shape}, expected ({n}, 4)")
        k = min(n, self.data.max_regions)
        # Class distributions (100 x 1601 fp16: more bytes than the features) are read only for
        # what uses them: region classification targets and VLP's class-embedding term.
        needed = self._needs_classes()
        # the order reads the stored distribution even where nothing else uses it (any width then)
        ordered = by_confidence and (needed or _has_cls_prob(meta, sample))
        cls = (self._classes(info, sample, meta, n, n if ordered else k, any_width=not needed)
               if needed or ordered else None)
        if ordered:
            order = np.argsort(-np.asarray(cls, np.float32).max(1), kind="stable")[:k]
            feats, boxes, cls = feats[order], boxes[order], cls[order] if needed else None
        feats, boxes = feats[:k], boxes[:k]
        self._finite(info, sample, "features", feats)
        self._finite(info, sample, "boxes", boxes)
        self._boxes_ok(info, sample, "boxes", boxes)
        image_feat = None
        stored = meta.get("has_image_feature") or (not meta and "image_feature" in sample)
        if stored and self.data.image_feature == "stored":
            image_feat = np.asarray(self._get(info, sample, "image_feature"))
            self._floats(info, sample, "image_feature", image_feat)
            if image_feat.shape != (d,):
                raise self._bad(info, sample, f"column 'image_feature' has shape {image_feat.shape}, "
                                              f"expected ({d},)")
            self._finite(info, sample, "image_feature", image_feat)
        return feats, boxes, cls, image_feat, k < n

    def _classes(self, info, sample, meta: dict, n: int, k: int, any_width: bool = False) -> np.ndarray:
        """The first ``k`` of the sample's ``n`` class distributions: the stored ``cls_prob``, or
        one-hot ``obj_labels`` with ``data.hard_class_targets``; else a bad sample. ``any_width``:
        the class count is not checked (read only to order the regions by confidence)."""
        # The loader checked a meta's count against the model's (MetaError); a meta-less
        # dataset's samples are checked here.
        num_classes = None if any_width else meta.get("num_classes") or self.num_classes
        if _has_cls_prob(meta, sample):
            cls = self._floats(info, sample, "cls_prob", np.asarray(self._get(info, sample, "cls_prob")))
            if cls.ndim != 2 or cls.shape[0] != n or (num_classes and cls.shape[1] != num_classes):
                want = f"({n}, {num_classes or 'C'})"
                raise self._bad(info, sample, f"column 'cls_prob' has shape {cls.shape}, expected {want}")
            cls = cls[:k]
            self._finite(info, sample, "cls_prob", cls)
            # probabilities: a negative one made the region-classification loss negative (torch:
            # numpy's float16 reductions took ~0.8 ms a sample here, torch's ~40 us)
            t = _t(np.ascontiguousarray(cls))
            low, total = (float(t.min()), float(t.float().sum(1).max())) if t.numel() else (0.0, 0.0)
            if low < -PROB_TOL or total > 1.0 + PROB_TOL:
                raise self._bad(info, sample, f"column 'cls_prob' is no class distribution per region (smallest "
                                              f"value {low:.3g}, largest row sum {total:.4g}): a detector's softmax "
                                              "output is expected")
            return cls
        if not (self.data.hard_class_targets and (meta.get("has_obj_labels") or "obj_labels" in sample)):
            raise self._bad(info, sample, "missing column 'cls_prob' (detector class distribution), needed for "
                                          "region classification targets / class embedding")
        labels = np.asarray(self._get(info, sample, "obj_labels")).astype(np.int64)
        if not num_classes:
            raise self._bad(info, sample, "data.hard_class_targets needs the class count "
                                          "(num_classes in vltrain_meta.json or model.num_region_classes)")
        if labels.shape != (n,) or labels.min() < 0 or labels.max() >= num_classes - 1:
            raise self._bad(info, sample, f"column 'obj_labels' has shape {labels.shape} or values "
                                          f"outside [0, {num_classes - 1}) (bottom-up objects_id: "
                                          f"{num_classes - 1} object classes, background excluded)")
        # objects_id counts the non-background classes; column 0 is background.
        return np.eye(num_classes, dtype=np.float32)[labels[:k] + 1]

    def _example(self, sample: dict, text_ids: list[int]) -> _Example:
        s, info = self._stream_of(sample)
        kind = self._kind(sample, info)
        sid = int(self._get(info, sample, "sample_id"))
        rng = masking.sample_rng(self.seed, self.epoch, sid, s)
        obj = self.obj
        if kind == "captions":
            rng.integers(len(self._get(info, sample, "captions")))     # _text_of's draw: keeps the order
            regions = self._regions(info, sample, by_confidence=bool(self.data.max_sequence))
            rest = regions[0][:0]                                    # regions the budget leaves out
            special = 2 if self.vlbert else 3
            words = text_ids[: self.data.max_text_len - special]
            if self.data.max_sequence:
                n_text, n_slots = share_budget(len(words) + special, len(regions[0]) + self.image_box,
                                               self.data.max_sequence, min_text=special)
                n_regions = max(n_slots - self.image_box, 1)
                words = words[: n_text - special]
                rest = regions[0][n_regions:]
                regions = (regions[0][:n_regions], regions[1][:n_regions],
                           None if regions[2] is None else regions[2][:n_regions], *regions[3:])
            if self.vlbert:
                ids = np.array([self.cls_id, *words, self.sep_id], np.int64)
            else:
                ids = np.array([self.cls_id, self.sep_id, *words, self.stop_id], np.int64)
            first = len(ids) - len(words) - 1                        # the caption's first token
            mode = MODE_SEQ2SEQ if rng.random() < obj.seq2seq_prob else MODE_BIDIRECTIONAL
            ttype = np.zeros(len(ids), np.int64)
            if mode == MODE_SEQ2SEQ:
                ttype[first:] = 1
            # VLP also masks [STOP] (the model learns where a caption ends); VL-BERT, like BERT,
            # masks word-pieces only.
            end = len(ids) - 1 if self.vlbert else len(ids)
            cand = np.arange(first, end, dtype=np.int64)
        elif kind == "text":
            words = text_ids[: self.data.max_text_len - 2]
            ids = np.array([self.cls_id, *words, self.sep_id], np.int64)
            rng.random()                                             # keep the draw order fixed
            mode = MODE_BIDIRECTIONAL
            ttype = np.zeros(len(ids), np.int64)
            cand = np.arange(1, len(ids) - 1, dtype=np.int64)
        else:
            raise self._bad(info, sample, f"dataset kind {kind!r} is not a pretraining kind")
        # text_ids come from a tokeniser call capped at max_text_len, more than the words' share
        ex = _Example(sid, ids, ttype, mode, np.zeros(0, np.int64), np.zeros(0, np.int64),
                      cut_text=len(words) < len(text_ids))
        if obj.mlm:
            ws = None
            if obj.whole_word_mask:
                ws = np.array(self.tok.word_starts([int(i) for i in ids[cand]]), bool)
                if kind == "captions" and not self.vlbert:
                    ws[-1] = True                                    # [STOP] is its own word
            if obj.mask_sampling == "bernoulli":
                pos, words_of = masking.bernoulli_mlm_positions(rng, cand, obj.mlm_prob, ws)
            else:
                n_mask = masking.num_to_mask(len(words), obj.mlm_prob, obj.max_pred)
                pos, words_of = masking.choose_mlm_positions(rng, cand, n_mask, ws), None
            ex.mlm_pos, ex.mlm_lab = pos, ids[pos].copy()
            masking.apply_mlm(rng, ids, pos, self.mask_id, self.random_pool,
                              obj.mask_token_prob, obj.random_token_prob, groups=words_of)
        if kind == "captions":
            ex.feats, ex.boxes, ex.cls, ex.image_feat, ex.cut_regions = regions
            if self.vlbert and ex.image_feat is None and len(rest):
                ex.rest_sum, ex.rest_n = rest.astype(np.float32).sum(0), len(rest)
            if obj.mrc:   # zeroing and targets happen in _assemble, on the batch tensors
                ex.mrc_pos = masking.choose_regions(rng, len(ex.feats), obj.mrc_prob, obj.mask_sampling)
                ex.mrc_zero = rng.random(len(ex.mrc_pos)) < obj.mrc_zero_prob
        return ex

    def _text_of(self, sample: dict) -> str:
        """The raw text this sample visits (caption drawn with the sample's rng) or an error."""
        s, info = self._stream_of(sample)
        kind = self._kind(sample, info)
        if kind == "captions":
            caps = self._get(info, sample, "captions")
            if not isinstance(caps, list) or not caps:
                raise self._bad(info, sample, "column 'captions' holds no captions")
            for i, c in enumerate(caps):
                self._text_ok(info, sample, c, f"caption {i}")
            sid = int(self._get(info, sample, "sample_id"))
            rng = masking.sample_rng(self.seed, self.epoch, sid, s)
            return caps[int(rng.integers(len(caps)))]
        if kind == "text":
            return self._text_ok(info, sample, self._get(info, sample, "text"), "text")
        raise self._bad(info, sample, f"dataset kind {kind!r} is not a pretraining kind")

    # ------------------------------------------------------------------ batch
    def __call__(self, samples: list[dict]) -> Batch:
        examples: list[_Example] = []
        skipped: list[str] = []
        texts, keep = [], []
        for smp in samples:
            try:
                texts.append(self._text_of(smp))
                keep.append(smp)
            except BadSampleError as e:
                if not self.data.skip_bad_samples:
                    raise
                skipped.append(str(e))
        # One batched tokeniser call (the Rust tokenizer parallelises nothing here, but the
        # per-call overhead dominates for short captions).
        enc = self.tok.text(texts, truncation=True, max_length=self.data.max_text_len)["input_ids"] if texts else []
        for smp, ids in zip(keep, enc):
            try:
                examples.append(self._example(smp, ids))
            except BadSampleError as e:
                if not self.data.skip_bad_samples:
                    raise
                skipped.append(str(e))
        batch = self._assemble(examples)
        if skipped:
            batch.task[SKIPPED_KEY] = skipped
        return batch

    def _text_len(self, longest: int) -> int:
        if self.data.pad_to == "bucket":
            for b in self.buckets:
                if b >= longest:
                    return b
        return longest

    def _assemble(self, exs: list[_Example]) -> Batch:
        B = len(exs)
        T = self._text_len(max((len(e.ids) for e in exs), default=0))
        input_ids = torch.full((B, T), self.pad_id, dtype=torch.long)
        ttype = torch.zeros((B, T), dtype=torch.long)
        attn = torch.zeros((B, T), dtype=torch.long)
        mlm_pos, mlm_lab = [], []
        for i, e in enumerate(exs):
            L = len(e.ids)
            input_ids[i, :L] = torch.from_numpy(e.ids)
            ttype[i, :L] = torch.from_numpy(e.ttype)
            attn[i, :L] = 1
            mlm_pos.append(e.mlm_pos + i * T)
            mlm_lab.append(e.mlm_lab)
        batch = Batch(
            sample_id=torch.tensor([e.sample_id for e in exs], dtype=torch.long),
            input_ids=input_ids, token_type_ids=ttype, attention_mask=attn,
            mode=torch.tensor([e.mode for e in exs], dtype=torch.long),
        )
        cut = ([e.sample_id for e in exs if e.cut_text], [e.sample_id for e in exs if e.cut_regions])
        if any(cut):
            batch.task[TRUNCATED_KEY] = cut
        if self.obj.mlm:
            batch.mlm_positions = torch.from_numpy(np.concatenate(mlm_pos or [np.zeros(0, np.int64)]))
            batch.mlm_labels = torch.from_numpy(np.concatenate(mlm_lab or [np.zeros(0, np.int64)]))
        img = [e for e in exs if e.feats is not None]
        if not img:
            return batch                      # text-only batch: a plain BERT input
        D = img[0].feats.shape[1]
        if any(e.feats.shape[1] != D for e in img):   # only without feat_dim (checked per sample)
            raise BadSampleError(f"batch mixes feature dims: {_ids_by(img, lambda e: e.feats.shape[1])}; "
                                 "pass feat_dim to reject the odd samples one by one")
        N = self.data.max_regions if self.data.pad_to == "bucket" else max(len(e.feats) for e in img)
        # The two large tensors (~0.7 MB per base-size sample) from the worker's pool.
        zeros = self.scratch.zeros if self.scratch is not None else torch.zeros
        feats = zeros((B, N, D), dtype=_torch_dtype(img[0].feats.dtype))
        boxes = torch.zeros((B, N, 4), dtype=torch.float32)
        rmask = torch.zeros((B, N), dtype=torch.bool)
        C = next((e.cls.shape[1] for e in img if e.cls is not None), None)
        # Class distributions keep the stored dtype (float16): at 100 x 1601 they outweigh the
        # features; the model and the loss cast them on the device.
        cls_dtype = next((_torch_dtype(e.cls.dtype) for e in img if e.cls is not None), None)
        cls = zeros((B, N, C), dtype=cls_dtype) if C is not None else None
        has_if = any(e.image_feat is not None for e in img)
        image_feat = torch.zeros((B, D), dtype=feats.dtype) if has_if else None
        mrc_pos, zero_pos = [], []
        for i, e in enumerate(exs):
            if e.feats is None:
                continue
            n = len(e.feats)
            feats[i, :n].copy_(_t(e.feats))
            boxes[i, :n].copy_(_t(e.boxes))
            rmask[i, :n] = True
            if e.cls is not None:
                if e.cls.shape[1] != C:   # only without num_classes (checked per sample)
                    has = [x for x in img if x.cls is not None]
                    raise BadSampleError(f"batch mixes class counts: {_ids_by(has, lambda x: x.cls.shape[1])}; "
                                         "pass num_classes to reject the odd samples one by one")
                cls[i, :n].copy_(_t(e.cls))
            if e.image_feat is not None:
                image_feat[i].copy_(_t(e.image_feat))
            if e.mrc_pos is not None:
                mrc_pos.append(e.mrc_pos + i * N)
                zero_pos.append(e.mrc_pos[e.mrc_zero] + i * N)
        batch.region_feats, batch.region_boxes, batch.region_mask = feats, boxes, rmask
        batch.region_cls_probs, batch.image_feat = cls, image_feat
        zero = torch.from_numpy(np.concatenate(zero_pos)) if zero_pos else torch.zeros(0, dtype=torch.long)
        # VL-BERT's whole-image mean where the model's own (of the regions in the batch) is not it
        left_out = [(i, e) for i, e in enumerate(exs) if e.rest_n]
        if self.vlbert and image_feat is None and (self.obj.mrc or left_out):
            rest_sum, rest_n = torch.zeros((B, D)), torch.zeros(B)
            for i, e in left_out:
                rest_sum[i], rest_n[i] = torch.from_numpy(e.rest_sum), e.rest_n
            batch.image_feat = _unmasked_mean(feats, rmask, zero, rest_sum, rest_n)
        if self.obj.mrc:
            pos = torch.from_numpy(np.concatenate(mrc_pos)) if mrc_pos else torch.zeros(0, dtype=torch.long)
            batch.mrc_positions = pos
            # Targets first, then zero the inputs of the regions chosen for it (features and,
            # since the class distribution is the target, the VLP class-embedding input too).
            batch.mrc_targets = cls.view(B * N, C)[pos].clone()
            feats.view(B * N, D)[zero] = 0
            cls.view(B * N, C)[zero] = 0
            if self.vlbert and self.obj.mrc_mask_word:
                batch.region_ids = torch.full((B, N), self.tok.img_id, dtype=torch.long)
                batch.region_ids.view(-1)[zero] = self.mask_id
        return batch


def _unmasked_mean(feats: torch.Tensor, rmask: torch.Tensor, pos: torch.Tensor,
                   rest_sum: torch.Tensor, rest_n: torch.Tensor) -> torch.Tensor:
    """(B, D) VL-BERT's whole-image feature from region features: the mean of the real regions
    whose inputs MRC does not zero (``pos``; VL-BERT's pretraining data subtracts them from the
    sum and divides by the rest; a mean over the zeroed inputs would shrink it by the masked
    share, ~15%, against fine-tuning's unmasked mean) and of those data.max_sequence left out
    (``rest_sum`` (B, D), ``rest_n`` (B,)). 0 where every region is masked."""
    keep = rmask.clone()
    keep.view(-1)[pos] = False
    k = keep[..., None].float()
    total = (feats.float() * k).sum(1) + rest_sum
    return (total / (k.sum(1) + rest_n[:, None]).clamp(min=1)).to(feats.dtype)


PROB_TOL = 0.01          # float16 storage of a softmax rounds each of 1601 classes


def _all_finite(arr: np.ndarray) -> bool:
    if arr.dtype == np.float16:   # numpy's float16 math is slow: test the bits. Finite iff the
        # magnitude bits are below the all-ones exponent (inf 0x7C00, NaN above it).
        return arr.size == 0 or int((arr.view(np.uint16) & 0x7FFF).max()) < 0x7C00
    if arr.dtype.kind == "f":
        return bool(np.isfinite(arr).all())
    return True


def _torch_dtype(np_dtype) -> torch.dtype:
    return torch.from_numpy(np.zeros(0, dtype=np_dtype)).dtype


# MDS-decoded arrays are read-only; the tensors viewing them are only ever read from. Filtered
# once here: a catch_warnings() around each call made Python show every other warning of the
# process again at each batch (leaving it resets the once-per-place memory).
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", category=UserWarning)


def _t(arr: np.ndarray) -> torch.Tensor:
    """Tensor view of a (possibly read-only, MDS-decoded) array, only ever read from."""
    if not arr.flags.writeable:
        return torch.from_numpy(arr)
    return torch.from_numpy(np.ascontiguousarray(arr))
