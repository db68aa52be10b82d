"""The on-disk contract between `data_tools/` (writers) and `vltrain.data` (readers).

Every dataset is an MDS folder (local or ``s3://``/``gs://`` prefix) holding ``index.json``,
the shards, and ``vltrain_meta.json`` (written by us beside the index): the dataset kind,
feature dimension, class count and which optional columns exist. Region features are
float16 ndarrays; ``pkl`` columns are never used (unsafe, and refused at read time).

Boxes are ``x1, y1, x2, y2`` normalised to [0, 1] by the image size.
"""
from __future__ import annotations

import functools

META_FILE = "vltrain_meta.json"
META_VERSION = 1


def stable_sample_id(image_id: str) -> int:
    """A stable int64 sample id for an image: the id itself if numeric, else a 63-bit hash."""
    if image_id.isdigit() and int(image_id) < 2 ** 63:
        return int(image_id)
    import xxhash
    return xxhash.xxh64(image_id.encode("utf-8")).intdigest() & (2 ** 63 - 1)


# Columns every image-bearing sample has.
IMAGE_COLUMNS = {
    "sample_id": "int64",                # stable id: keys masking RNG, eval dedupe
    "image_id": "str",
    "image_w": "int32",
    "image_h": "int32",
    "features": "ndarray:float16",       # (N, D) detector RoI features
    "boxes": "ndarray:float32",          # (N, 4) normalised x1,y1,x2,y2
}
# Optional image columns: present in every sample of a dataset or in none (meta says which).
OPTIONAL_IMAGE_COLUMNS = {
    "cls_prob": "ndarray:float16",       # (N, C) detector class distribution (C incl. background)
    "obj_labels": "ndarray:int32",       # (N,) bottom-up objects_id: argmax over the non-
                                         # background classes (= cls_prob column - 1)
    "obj_conf": "ndarray:float32",       # (N,) detector confidence (objects_conf)
    "image_feature": "ndarray:float16",  # (D,) whole-image RoI feature (VL-BERT text tokens)
}

# Task-specific columns, by dataset kind.
KIND_COLUMNS = {
    "captions": {"captions": "json"},                          # list[str], all references
    "vqa": {
        "question_id": "int64",
        "question": "str",
        "answers": "json",               # list[str], the raw annotator answers (10 in VQA v2)
        "target_ids": "ndarray:int32",   # answer-vocab ids with a non-zero soft score
        "target_scores": "ndarray:float32",
        # MDS cannot store empty arrays: a question with no in-vocabulary answer (test split,
        # or only rare answers) stores the placeholder ids [0], scores [0.0], which adds
        # nothing to a dense target vector.
    },
    "refs": {"expression": "str", "target_region": "int32", "target_box": "ndarray:float32"},
    "mc": {"question": "str", "choices": "json", "label": "int32"},
    "text": {"text": "str"},             # text-only <Text, None> samples: no image columns
}
KINDS = tuple(KIND_COLUMNS)
# Optional task columns, by kind (present in every sample of a dataset or in none).
OPTIONAL_KIND_COLUMNS = {
    # VL-BERT's VCR link from an object reference to its region: [char_start, char_end, region]
    # triples; text[char_start:char_end] names the object, region indexes the sample's
    # features rows (-1: no region matched). One list for the question, one per choice.
    "mc": {"question_refs": "json", "choice_refs": "json"},
    # The official VQA answer type ("yes/no", "number", "other"; "" when not annotated), for
    # vqaEval.py's per-type accuracies. Optional so that datasets converted before it existed
    # still read: they simply have no per-type scores.
    "vqa": {"answer_type": "str"},
}

# Answer vocabulary of a VQA dataset: a JSON list of answers, index = class id.
ANSWER_VOCAB_FILE = "answer_vocab.json"
# A captions dataset's reference captions, one JSON line [references_key, [captions]] a sample,
# written beside its shards: what self-critical training scores against, without reading the
# shards (their region features: tens of GB for COCO).
REFERENCES_FILE = "references.jsonl"
# Boxes are (x1, y1, x2, y2) normalised by the image size; they may poke out by 1% (rounding):
# the converters refuse more, and the collators refuse such a sample (a dataset written otherwise)
BOX_TOLERANCE = 0.01


def box_faults(boxes):
    """Per box of ``boxes`` (an array (..., 4), normalised): (outside [0, 1] by more than
    BOX_TOLERANCE, corners swapped: x2 < x1 or y2 < y1). The converters and the collators
    refuse either."""
    outside = ((boxes < -BOX_TOLERANCE) | (boxes > 1 + BOX_TOLERANCE)).any(-1)
    swapped = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    return outside, swapped


def yields_tokens(text: str, strip_accents: bool = True) -> bool:
    """Whether BERT's tokenizer makes at least one token of ``text`` (a word piece or [UNK]):
    its normalizer drops control, format and private-use characters, U+FFFD (a decoder's
    replacement character) and, with accent stripping, combining marks, so a caption of only
    such characters (mojibake: "\ufffd\ufffd\u200b") passes ``str.strip()`` and tokenizes to
    nothing. Asked of the tokenizers library's own normalizer and pre-tokenizer (no
    vocabulary needed: the converters have none); printable ASCII always makes a token."""
    if text.isascii():
        return any("!" <= c <= "~" for c in text)
    normalizer, pre = _bert_text_steps(bool(strip_accents))
    return bool(pre.pre_tokenize_str(normalizer.normalize_str(text)))


@functools.lru_cache(maxsize=None)
def _bert_text_steps(strip_accents: bool):
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer
    return BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents,
                          lowercase=False), BertPreTokenizer()


# every input a converter's --skip-bad left out, beside the shards: [{"reason", "input"}]
SKIPPED_FILE = "vltrain_skipped.json"


def columns_for(kind: str, optional: tuple[str, ...] = ()) -> dict[str, str]:
    """MDS ``columns`` mapping for a dataset of ``kind`` with the given optional image columns."""
    if kind not in KIND_COLUMNS:
        raise ValueError(f"unknown dataset kind {kind!r}; expected one of {KINDS}")
    if kind == "text":
        return {"sample_id": "int64", **KIND_COLUMNS["text"]}
    known = {**OPTIONAL_IMAGE_COLUMNS, **OPTIONAL_KIND_COLUMNS.get(kind, {})}
    unknown = set(optional) - set(known)
    if unknown:
        raise ValueError(f"unknown optional columns {sorted(unknown)} for kind {kind!r}")
    cols = dict(IMAGE_COLUMNS)
    cols.update({k: known[k] for k in optional})
    cols.update(KIND_COLUMNS[kind])
    return cols


def make_meta(kind: str, feature_dim: int | None, num_classes: int | None,
              optional: tuple[str, ...] = (), **extra) -> dict:
    """Contents of ``vltrain_meta.json``. ``extra`` holds tool-specific facts (source, counts)."""
    return {
        "version": META_VERSION,
        "kind": kind,
        "feature_dim": feature_dim,
        "num_classes": num_classes,        # detector classes incl. background; None if unknown
        "has_cls_prob": "cls_prob" in optional,
        "has_obj_labels": "obj_labels" in optional,
        "has_image_feature": "image_feature" in optional,
        "optional_columns": sorted(optional),
        **extra,
    }


def references_key(sample: dict) -> str:
    """The key of a captions sample's references: its ``image_id`` (the sample id without one)."""
    image_id = sample.get("image_id")
    return str(image_id) if image_id not in (None, "") else str(sample["sample_id"])
