"""VCR annotations (train/val/test.jsonl) + region features -> MDS dataset of kind ``mc``.

Inputs: ``--annotations`` (one VCR JSON object per line, Zellers et al. 2019: annot_id,
objects, img_fn, metadata_fn, question, answer_choices, answer_label, rationale_choices,
rationale_label; other fields are ignored; the test split has no labels) and the region
features (``--tsv`` or ``--npz-dir``, see data_tools/features.py). One sample per line.

Tasks (``--task``):
  qa   Q -> A: question, choices = answer_choices, label = answer_label (-1 on the test split).
  qar  QA -> R: question text = question + " " + the correct answer, choices =
       rationale_choices, label = rationale_label. Needs answer_label, so not the test split.
       With ``--given-answer N``: answer_choices[N] in place of the correct answer, on any
       split, no labels (-1): the rationale scores "conditioned on a<N>" that VCR's
       leaderboard takes for the test split, one dataset per N = 0..3.
Q -> AR (both right) is not a dataset: convert and evaluate qa and qar separately and combine
the evaluations with ``python -m vltrain.metrics.vcr`` (val scores, or the leaderboard CSV
from qa + the four --given-answer evaluations of the test split).

Text: questions and choices are token lists whose tokens are words or lists of indices into
``objects``. As in VL-BERT's VCR loader, a "person" object becomes a gender-neutral name by its
place among the line's persons (the first Casey, the second Riley, ...; see ``object_name``),
any other object its class name ("tie"); several indices in one token are joined with " and ". Tokens
are joined with single spaces, except that no space goes before a token made only of
punctuation (other than opening brackets/quotes) or an English clitic ('s, n't, 're, ...) nor
after an opening bracket/quote (a straight quote counts as closing): ["What", "is", [0],
"thinking", "?"] -> "What is Casey thinking?". The tokenizer re-tokenises the text anyway.

Object references -> regions (VL-BERT adds the referenced object's RoI feature to the words of
the reference): unless ``--no-refs``, every sample gets two json columns,
  question_refs  [[char_start, char_end, region], ...]: question[char_start:char_end] is the
                 name written for one object, region its row in the sample's ``features``
                 (0-based) or -1 when no region matches it;
  choice_refs    one such list per choice, in the order of ``choices``.
A token naming several objects ("Casey and Riley") gives one triple per object, each covering
that object's name only (not " and "). With --task qar the answer's triples follow the
question's, shifted by len(question) + 1 (they index the combined question text). The region
of object i is
  with --metadata-dir  the region whose box has the highest IoU with box i of the image's
                       metadata (``boxes``, pixels, normalised by its ``width``/``height`` as
                       the region boxes are by the feature file's size); below 0.5 -> -1.
                       A metadata file whose box count differs from the line's objects is a
                       bad line (bad_metadata);
  without              i itself: the features must be extracted on VCR's own boxes, one row per
                       object in ``objects`` order, so an image's region count must equal a
                       line's object count (else a bad line, region_count: features from another
                       detector, capped, or with a whole-image box first, as VL-BERT's and R2C's
                       loaders add, would link words to the wrong regions; use --metadata-dir).
The meta records refs ("metadata_iou", "object_order", or null with --no-refs), refs_total
and refs_unmatched (triples with region -1).

Images: the image id is ``img_fn``'s file name without extension, e.g.
"lsmdc_3036_IN_TIME/3036_IN_TIME_00.37.33.594-00.37.54.485@0.jpg" ->
"3036_IN_TIME_00.37.33.594-00.37.54.485@0": a TSV's image_id column or the npz file name must
be exactly that. Feature files without image_w/image_h need ``--metadata-dir`` (the
vcr1images folder): the size is then read from ``width``/``height`` of ``<dir>/<metadata_fn>``
(when given, every image's metadata is read: its boxes map references to regions, see above).

sample_id: the integer after the last "-" of annot_id ("val-12" -> 12), else a stable hash of
annot_id. Bad lines (invalid JSON, missing fields, object index out of range, fewer than 2
choices, label out of range, duplicate annot_id, labelled and unlabelled lines mixed, and the
reference problems above) stop the tool naming file, line and annot_id, or are counted with
``--skip-bad``. The meta records task, num_choices (the most of any sample; VCR: 4),
has_labels, num_images, num_unlabeled, the refs facts above and the skips.

Example:
  python data_tools/convert_vcr.py --annotations vcr1annots/train.jsonl --task qa \\
      --tsv vcr_train_100.tsv --metadata-dir vcr1images --out s3://bucket/vcr/qa/train
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: import `data_tools` as a package, and keep
    import os as _os, sys as _sys  # data_tools/inspect.py from shadowing the stdlib `inspect`
    _here = _os.path.dirname(_os.path.realpath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or ".") != _here]   # symlinks resolved
    _sys.path.insert(0, _os.path.dirname(_here))

import argparse
import contextlib
import json
import os
import re
import sys
import unicodedata
from dataclasses import dataclass

import numpy as np

from data_tools.common import BadInputError, SkipCounter, add_output_args, open_writer, run_main, summarize
from data_tools.features import RegionChecker, add_feature_args, feature_source, iter_image_regions, norm_id
from vltrain.data import schema
from vltrain.metrics.accuracy import box_iou
from vltrain.metrics.vcr import sample_id_of
from vltrain.redact import RedactingArgumentParser

# VL-BERT's list (vcr/data/datasets/vcr.py): 13 names, none twice. R2C's has 15 with Peyton
# twice, which gave two people of one image the same name.
GENDER_NEUTRAL_NAMES = ['Casey', 'Riley', 'Jessie', 'Jackie', 'Avery', 'Jaime', 'Peyton', 'Kerry', 'Jody',
                        'Kendall', 'Frankie', 'Pat', 'Quinn']
CLITICS = {"'s", "'re", "'ve", "'ll", "'d", "'m", "n't"}
OPENING = {"Ps", "Pi"}          # Unicode categories of opening brackets and quotes
REQUIRED = ("annot_id", "objects", "img_fn", "question", "answer_choices")
REF_COLUMNS = ("question_refs", "choice_refs")     # optional mc columns, json (see the docstring)
MIN_IOU = 0.5                   # a metadata box matches its best region only at this IoU or more
ANNOT_ID_RE = re.compile(rb'"annot_id"\s*:\s*"([^"\\]*)"')


class _BadLine(Exception):
    """One line's problem; the caller adds file, line and annot_id."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


def _is_punct(word: str, opening: bool) -> bool:
    cats = [unicodedata.category(c) for c in word]
    return all(c.startswith("P") and (c in OPENING) == opening for c in cats)


def object_name(objects: list[str], i: int) -> str:
    """The words for object ``i``: a person's name by its place among the line's persons (the
    14th is Casey again), else the class name. VL-BERT names persons in that order too, but its
    counter runs on from the sample it read before, so the same line could read differently from
    one epoch to the next; here a line always reads the same, and its first 13 people differ."""
    if objects[i] != "person":
        return objects[i]
    return GENDER_NEUTRAL_NAMES[objects[:i].count("person") % len(GENDER_NEUTRAL_NAMES)]


def object_words(ref: list, objects: list[str], what: str) -> tuple[str, list[list[int]]]:
    """The text of one object reference token and its [start, end, object index] spans."""
    if not ref or not all(type(i) is int for i in ref):   # bool is an int subclass: refused
        raise _BadLine("bad_object_ref", f"{what}: object reference {ref!r} is not a non-empty list of integers")
    text, spans = "", []
    for i in ref:
        if not 0 <= i < len(objects):
            raise _BadLine("bad_object_ref", f"{what}: object index {i} outside the line's "
                                             f"{len(objects)} objects {objects}")
        name = object_name(objects, i)
        if text:
            text += " and "
        spans.append([len(text), len(text) + len(name), i])
        text += name
    return text, spans


def render(tokens, objects: list[str], what: str) -> tuple[str, list[list[int]]]:
    """Text of one VCR token list (see the module docstring for the spacing rule) and its
    object references as [char_start, char_end, object index] triples."""
    if not isinstance(tokens, list):
        raise _BadLine("bad_token", f"{what} is not a list of tokens: {tokens!r}")
    text, refs, glue = "", [], True
    for k, tok in enumerate(tokens):
        spans = []
        if isinstance(tok, str):
            word = tok.strip()
        elif isinstance(tok, list):
            word, spans = object_words(tok, objects, f"{what} token {k}")
        else:
            raise _BadLine("bad_token", f"{what} token {k} {tok!r} is neither a word nor a list of object indices")
        if not word:
            continue
        if not (glue or word.lower() in CLITICS or _is_punct(word, opening=False)):
            text += " "
        refs += [[len(text) + a, len(text) + b, i] for a, b, i in spans]
        text += word
        glue = _is_punct(word, opening=True)
    if not text:
        raise _BadLine("empty_text", f"{what} is empty")
    return text, refs


def _label(line: dict, key: str, n: int) -> int | None:
    if key not in line:
        return None
    v = line[key]
    if type(v) is not int or not 0 <= v < n:
        raise _BadLine("bad_label", f"{key} {v!r} is not an index into its {n} choices")
    return v


def _choices(line: dict, key: str, objects: list[str]) -> tuple[list[str], list[list[list[int]]]]:
    raw = line.get(key)
    if not isinstance(raw, list) or len(raw) < 2:
        raise _BadLine("bad_choices", f"{key} must list at least 2 choices, got {raw!r}")
    texts, refs = zip(*(render(c, objects, f"{key}[{k}]") for k, c in enumerate(raw)))
    return list(texts), list(refs)


def parse_line(line, task: str, need_metadata: bool, where: str, given_answer: int | None = None) -> dict:
    """One annotation line -> {annot_id, image_id, metadata_fn, num_objects, question, choices,
    label, question_objs, choice_objs}; the *_objs hold [char_start, char_end, object index].
    ``given_answer`` (qar): that candidate answer follows the question, and there is no label."""
    if not isinstance(line, dict):
        raise _BadLine("malformed_line", "not a JSON object")
    missing = [k for k in REQUIRED + (("metadata_fn",) if need_metadata else ()) if k not in line]
    if missing:
        raise _BadLine("malformed_line", f"missing field(s) {missing}")
    objects = line["objects"]
    if not isinstance(objects, list) or not all(isinstance(o, str) for o in objects):
        raise _BadLine("malformed_line", f"'objects' is not a list of class names: {objects!r}")
    if not isinstance(line["img_fn"], str) or not line["img_fn"].strip():
        raise _BadLine("malformed_line", f"'img_fn' is not a file name: {line['img_fn']!r}")
    question, question_objs = render(line["question"], objects, "question")
    answers, answer_objs = _choices(line, "answer_choices", objects)
    answer = _label(line, "answer_label", len(answers))
    if task == "qa":
        choices, choice_objs, label = answers, answer_objs, answer
    else:
        if given_answer is not None:
            if given_answer >= len(answers):
                raise _BadLine("bad_label", f"--given-answer {given_answer} but only {len(answers)} answer choices")
            answer = given_answer
        elif answer is None:
            # Not skippable: every line of a test file lacks it, skipping would hide the misuse.
            raise BadInputError(f"{where}: no answer_label (a test-split line?): --task qar puts the correct "
                                f"answer after the question; VCR's test QA->R takes each candidate answer in "
                                f"turn: convert with --given-answer N for N = 0..3")
        shift = len(question) + 1
        question_objs = question_objs + [[a + shift, b + shift, i] for a, b, i in answer_objs[answer]]
        question = f"{question} {answers[answer]}"
        choices, choice_objs = _choices(line, "rationale_choices", objects)
        label = None
        if given_answer is None:
            label = _label(line, "rationale_label", len(choices))
            if label is None:
                raise _BadLine("bad_label", "answer_label without rationale_label")
    base = os.path.splitext(os.path.basename(line["img_fn"].strip()))[0]
    return {"annot_id": str(line["annot_id"]), "image_id": norm_id(base), "metadata_fn": line.get("metadata_fn"),
            "num_objects": len(objects), "question": question, "choices": choices, "label": label,
            "question_objs": question_objs, "choice_objs": choice_objs}


def _read_lines(path: str):
    """(line number, raw bytes, decoded JSON or the decode error) for every non-blank line."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise BadInputError(f"{path}: cannot read the annotations ({e})") from e
    with f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield lineno, raw, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield lineno, raw, e


def _annot_id(line, raw: bytes) -> str:
    if isinstance(line, dict):
        return str(line.get("annot_id", "?"))
    m = ANNOT_ID_RE.search(raw)         # a truncated line may still name it
    return m.group(1).decode("utf-8", "replace") if m else "?"


def read_annotations(args: argparse.Namespace, skips: SkipCounter) -> dict[str, list[dict]]:
    """The usable lines grouped by image id, in file order."""
    by_image: dict[str, list[dict]] = {}
    seen: dict[int, tuple[str, int]] = {}          # sample_id -> (annot_id, line)
    labelled: tuple[bool, int] | None = None       # (lines have labels, first such line)
    for lineno, raw, line in _read_lines(args.annotations):
        where = f"{args.annotations} line {lineno} (annot_id {_annot_id(line, raw)})"
        skips.read += 1                                  # one question per line
        try:
            if isinstance(line, Exception):
                raise _BadLine("malformed_line", f"invalid JSON ({line})")
            a = parse_line(line, args.task, bool(args.metadata_dir), where, args.given_answer)
            sid = sample_id_of(a["annot_id"])
            if sid in seen:
                first_aid, first_line = seen[sid]
                raise _BadLine("duplicate_annotation", f"annot_id already on line {first_line}"
                               if first_aid == a["annot_id"] else
                               f"sample id {sid} already taken by line {first_line} (annot_id {first_aid}): "
                               f"one split per file")
            has = a["label"] is not None
            if labelled is not None and labelled[0] != has:
                raise _BadLine("mixed_labels", f"{'has' if has else 'lacks'} labels, line {labelled[1]} "
                                               f"{'lacks' if has else 'has'} them (mixed splits?)")
        except _BadLine as e:
            skips.bad(e.category, f"{where}: {e}")
            continue
        labelled = labelled or (has, lineno)
        seen[sid] = (a["annot_id"], lineno)
        a["sample_id"] = sid
        a["where"] = where
        by_image.setdefault(a["image_id"], []).append(a)
    if not by_image:
        raise BadInputError(f"{args.annotations}: no usable annotation lines")
    return by_image


@dataclass
class Metadata:
    """What one ``<metadata-dir>/<metadata_fn>`` gives: the image size and the object boxes
    normalised by it, each None with the reason in ``size_error`` / ``boxes_error``."""
    path: str
    size: tuple[int, int] | None = None
    boxes: np.ndarray | None = None             # (num_objects, 4) x1,y1,x2,y2 in [0, 1]
    size_error: str = ""
    boxes_error: str = ""


def load_metadata(meta_dir: str, metadata_fn) -> Metadata:
    m = Metadata(os.path.join(meta_dir, str(metadata_fn)))
    try:
        with open(m.path, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        why = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"   # str(OSError) repeats the path
        m.size_error = m.boxes_error = why
        return m
    if not isinstance(meta, dict):
        m.size_error = m.boxes_error = "not a JSON object"
        return m
    try:
        w, h = int(meta["width"]), int(meta["height"])
        if w <= 0 or h <= 0:
            raise ValueError(f"size {w}x{h} is not positive")
        m.size = (w, h)
    except (ValueError, KeyError, TypeError, OverflowError) as e:
        m.size_error = f"{type(e).__name__}: {e}"
        m.boxes_error = f"no width/height to normalise its boxes with ({m.size_error})"
        return m
    raw = meta.get("boxes")
    if not isinstance(raw, list) or not all(isinstance(b, list) and len(b) >= 4 for b in raw):
        m.boxes_error = f"'boxes' is not a list of [x1, y1, x2, y2(, score)] boxes: {str(raw)[:80]}"
        return m
    try:
        boxes = np.array([b[:4] for b in raw], dtype=np.float64).reshape(-1, 4)
    except (ValueError, TypeError) as e:
        m.boxes_error = f"'boxes' holds non-numbers ({e})"
        return m
    if not np.isfinite(boxes).all():
        m.boxes_error = "'boxes' holds NaN or inf"
        return m
    m.boxes = np.clip(boxes / np.array([w, h, w, h], dtype=np.float64), 0.0, 1.0)
    return m


def object_regions(a: dict, region_boxes: np.ndarray, meta: Metadata | None) -> list[int]:
    """Region (row of ``features``, or -1) of each of the line's objects. ``meta`` None: the
    features are on VCR's own boxes, region i = object i (so as many regions as objects); else
    the best IoU with the metadata box."""
    n, m = len(region_boxes), a["num_objects"]
    if meta is None:
        if m != n:
            raise _BadLine("region_count", f"image {a['image_id']} has {n} regions but the line has {m} objects: "
                                           f"without --metadata-dir region i is object i's box, so the features "
                                           f"must be extracted on VCR's boxes, one per object (pass --metadata-dir "
                                           f"to link each object to the region of best box IoU)")
        return list(range(m))
    if meta.boxes is None:
        raise _BadLine("bad_metadata", f"{meta.path} gives no object boxes ({meta.boxes_error})")
    if len(meta.boxes) != m:
        raise _BadLine("bad_metadata", f"{meta.path} has {len(meta.boxes)} boxes but the line has {m} objects "
                                       f"(wrong metadata_fn or --metadata-dir?)")
    if m == 0:
        return []
    iou = np.asarray(box_iou(meta.boxes, region_boxes.astype(np.float64)))       # (m, n)
    best = iou.argmax(axis=1)
    return [int(r) if iou[i, r] >= MIN_IOU else -1 for i, r in enumerate(best)]


def convert(args: argparse.Namespace) -> None:
    if args.given_answer is not None and args.task != "qar":
        raise BadInputError("--given-answer goes with --task qar (the answer given before the rationales)")
    skips = SkipCounter.from_args(args)
    by_image = read_annotations(args, skips)
    checker = RegionChecker(skips, args.feature_dim)
    refs = None if args.no_refs else "metadata_iou" if args.metadata_dir else "object_order"
    ref_columns = () if refs is None else REF_COLUMNS
    writer = None
    images = unlabeled = num_choices = refs_total = refs_unmatched = 0
    with contextlib.ExitStack() as stack:
        for r in iter_image_regions(args, list(by_image), skips, "annotations"):
            anns = by_image[r.image_id]
            metas: dict[str, Metadata] = {}

            def metadata(fn) -> Metadata:
                if str(fn) not in metas:
                    metas[str(fn)] = load_metadata(args.metadata_dir, fn)
                return metas[str(fn)]

            fallback = None
            if args.metadata_dir and (r.image_w is None or r.image_h is None):
                m = metadata(anns[0]["metadata_fn"])
                if m.size is None:
                    skips.bad("missing_image_size", f"image {r.image_id}: the features have no image size and "
                                                    f"{m.path} gives none ({m.size_error})")
                    continue
                fallback = m.size
            cols = checker.to_columns(r, fallback)
            if cols is None:
                continue
            rows = []
            for a in anns:
                row = {"sample_id": a["sample_id"], **cols, "question": a["question"], "choices": a["choices"],
                       "label": -1 if a["label"] is None else a["label"]}
                if refs is not None:
                    try:
                        region = object_regions(a, cols["boxes"],
                                                metadata(a["metadata_fn"]) if refs == "metadata_iou" else None)
                    except _BadLine as e:
                        skips.bad(e.category, f"{a['where']}: {e}")
                        continue
                    row["question_refs"] = [[b, e, region[i]] for b, e, i in a["question_objs"]]
                    row["choice_refs"] = [[[b, e, region[i]] for b, e, i in c] for c in a["choice_objs"]]
                rows.append(row)
            if not rows:
                continue
            if writer is None:
                optional = tuple(checker.optional) + ref_columns
                meta = schema.make_meta(
                    "mc", checker.feature_dim, checker.num_classes, optional,
                    source={"tool": "convert_vcr", "annotations": os.path.basename(args.annotations),
                            "features": feature_source(args)},
                    task=args.task, given_answer=args.given_answer, refs=refs)
                writer = stack.enter_context(open_writer(args.out, "mc", optional, meta,
                                                         size_limit=args.size_limit, overwrite=args.overwrite))
            images += 1
            for row in rows:
                unlabeled += row["label"] < 0
                num_choices = max(num_choices, len(row["choices"]))
                if refs is not None:
                    for t in [row["question_refs"], *row["choice_refs"]]:
                        refs_total += len(t)
                        refs_unmatched += sum(reg < 0 for _, _, reg in t)
                writer.write(row)
        if writer is None:
            raise BadInputError("no samples to write: no image with annotations had valid features")
        writer.meta.update(num_choices=num_choices, has_labels=unlabeled == 0, num_images=images,
                           num_unlabeled=unlabeled, refs_total=refs_total, refs_unmatched=refs_unmatched)
        skips.finish(writer, "questions")
    summarize(writer, skips)
    print(f"task {args.task}: {images} image(s), {unlabeled} unlabeled sample(s), up to {num_choices} choices")
    if refs is not None:
        print(f"object references ({refs}): {refs_total}, {refs_unmatched} without a matching region")


def build_parser() -> argparse.ArgumentParser:
    p = RedactingArgumentParser(prog="convert_vcr.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="VCR annotations: train.jsonl, val.jsonl or test.jsonl")
    p.add_argument("--task", choices=("qa", "qar"), default="qa",
                   help="qa: Q->A (default); qar: QA->R (question + correct answer, rationale choices)")
    p.add_argument("--given-answer", type=int, choices=range(4), metavar="N",
                   help="with --task qar: candidate answer N (0-3) after the question instead of the correct "
                        "one, no labels, any split (VCR's test QA->R, one dataset per N)")
    p.add_argument("--metadata-dir", metavar="DIR",
                   help="vcr1images folder: <DIR>/<metadata_fn> gives the object boxes (each reference -> the "
                        "region of best IoU >= 0.5) and the image size where the features lack it; without it "
                        "region i is taken to be object i's box (features on VCR's boxes, one per object)")
    p.add_argument("--no-refs", action="store_true",
                   help="write no question_refs/choice_refs columns (text only)")
    add_feature_args(p)
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(convert, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
