"""VCR annotations (train/val/test.jsonl) + region features -> MDS dataset of kind ``mc``.

Inputs: ``--annotations`` (one VCR JSON object per line, Zellers et al. 2019: annot_id,
objects, img_fn, metadata_fn, question, answer_choices, answer_label, rationale_choices,
rationale_label; other fields are ignored; the test split has no labels) and the region
features (``--tsv`` or ``--npz-dir``, see data_tools/features.py). One sample per line.

Tasks (``--task``):
  qa   Q -> A: question, choices = answer_choices, label = answer_label (-1 on the test split).
  qar  QA -> R: question text = question + " " + the correct answer, choices =
       rationale_choices, label = rationale_label. Needs answer_label, so not the test split
       (VCR scores test QA -> R with each candidate answer in turn, which this tool does not do).
Q -> AR (both right) is not a dataset: convert and evaluate qa and qar separately and combine
the two predictions files yourself.

Text: questions and choices are token lists whose tokens are words or lists of indices into
``objects``. As in R2C's and VL-BERT's VCR loaders, an index of a "person" object becomes the
gender-neutral name GENDER_NEUTRAL_NAMES[index % 15] (Casey, Riley, Jessie, ...), any other
object its class name ("tie"); several indices in one token are joined with " and ". Tokens
are joined with single spaces, except that no space goes before a token made only of
punctuation (other than opening brackets/quotes) or an English clitic ('s, n't, 're, ...) nor
after an opening bracket/quote (a straight quote counts as closing): ["What", "is", [0],
"thinking", "?"] -> "What is Casey thinking?". The tokenizer re-tokenises the text anyway.
Left out: which region an object reference points to (VL-BERT adds that RoI's feature to the
reference's words; the mc schema carries text only).

Images: the image id is ``img_fn``'s file name without extension, e.g.
"lsmdc_3036_IN_TIME/3036_IN_TIME_00.37.33.594-00.37.54.485@0.jpg" ->
"3036_IN_TIME_00.37.33.594-00.37.54.485@0": a TSV's image_id column or the npz file name must
be exactly that. Feature files without image_w/image_h need ``--metadata-dir`` (the
vcr1images folder): the size is then read from ``width``/``height`` of ``<dir>/<metadata_fn>``.

sample_id: the integer after the last "-" of annot_id ("val-12" -> 12), else a stable hash of
annot_id. Bad lines (invalid JSON, missing fields, object index out of range, fewer than 2
choices, label out of range, duplicate annot_id, labelled and unlabelled lines mixed) stop the
tool naming file, line and annot_id, or are counted with ``--skip-bad``. The meta records task,
num_choices (the most of any sample; VCR: 4), has_labels, num_images, num_unlabeled and the skips.

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

from data_tools.common import BadInputError, SkipCounter, add_output_args, open_writer, run_main, summarize
from data_tools.features import RegionChecker, add_feature_args, iter_image_regions, norm_id, stable_sample_id
from vltrain.data import schema

# R2C's list (dataloaders/vcr.py), Peyton twice included: the same index gives the same name.
GENDER_NEUTRAL_NAMES = ['Casey', 'Riley', 'Jessie', 'Jackie', 'Avery', 'Jaime', 'Peyton', 'Kerry', 'Jody',
                        'Kendall', 'Peyton', 'Skyler', 'Frankie', 'Pat', 'Quinn']
CLITICS = {"'s", "'re", "'ve", "'ll", "'d", "'m", "n't"}
OPENING = {"Ps", "Pi"}          # Unicode categories of opening brackets and quotes
REQUIRED = ("annot_id", "objects", "img_fn", "question", "answer_choices")
ANNOT_ID_RE = re.compile(rb'"annot_id"\s*:\s*"([^"\\]*)"')


class _BadLine(Exception):
    """One line's problem; the caller adds file, line and annot_id."""

    def __init__(self, category: str, message: str):
        super().__init__(message)
        self.category = category


def _is_punct(word: str, opening: bool) -> bool:
    cats = [unicodedata.category(c) for c in word]
    return all(c.startswith("P") and (c in OPENING) == opening for c in cats)


def object_words(ref: list, objects: list[str], what: str) -> str:
    if not ref or not all(type(i) is int for i in ref):   # bool is an int subclass: refused
        raise _BadLine("bad_object_ref", f"{what}: object reference {ref!r} is not a non-empty list of integers")
    words = []
    for i in ref:
        if not 0 <= i < len(objects):
            raise _BadLine("bad_object_ref", f"{what}: object index {i} outside the line's "
                                             f"{len(objects)} objects {objects}")
        words.append(GENDER_NEUTRAL_NAMES[i % len(GENDER_NEUTRAL_NAMES)] if objects[i] == "person"
                     else objects[i])
    return " and ".join(words)


def render(tokens, objects: list[str], what: str) -> str:
    """Text of one VCR token list (see the module docstring for the spacing rule)."""
    if not isinstance(tokens, list):
        raise _BadLine("bad_token", f"{what} is not a list of tokens: {tokens!r}")
    text, glue = "", True
    for k, tok in enumerate(tokens):
        if isinstance(tok, str):
            word = tok.strip()
        elif isinstance(tok, list):
            word = object_words(tok, objects, f"{what} token {k}")
        else:
            raise _BadLine("bad_token", f"{what} token {k} {tok!r} is neither a word nor a list of object indices")
        if not word:
            continue
        if not (glue or word.lower() in CLITICS or _is_punct(word, opening=False)):
            text += " "
        text += word
        glue = _is_punct(word, opening=True)
    if not text:
        raise _BadLine("empty_text", f"{what} is empty")
    return text


def _label(line: dict, key: str, n: int) -> int | None:
    if key not in line:
        return None
    v = line[key]
    if type(v) is not int or not 0 <= v < n:
        raise _BadLine("bad_label", f"{key} {v!r} is not an index into its {n} choices")
    return v


def _choices(line: dict, key: str, objects: list[str]) -> list[str]:
    raw = line.get(key)
    if not isinstance(raw, list) or len(raw) < 2:
        raise _BadLine("bad_choices", f"{key} must list at least 2 choices, got {raw!r}")
    return [render(c, objects, f"{key}[{k}]") for k, c in enumerate(raw)]


def sample_id_of(annot_id: str) -> int:
    _, sep, tail = annot_id.rpartition("-")
    if sep and tail.isascii() and tail.isdigit() and int(tail) < 2 ** 63:
        return int(tail)
    return stable_sample_id(annot_id)


def parse_line(line, task: str, need_metadata: bool, where: str) -> dict:
    """One annotation line -> {image_id, metadata_fn, question, choices, label, annot_id}."""
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
    question = render(line["question"], objects, "question")
    answers = _choices(line, "answer_choices", objects)
    answer = _label(line, "answer_label", len(answers))
    if task == "qa":
        choices, label = answers, answer
    else:
        if answer is None:
            # Not skippable: every line of a test file lacks it, skipping would hide the misuse.
            raise BadInputError(f"{where}: no answer_label (a test-split line?): --task qar puts the correct "
                                f"answer after the question; VCR's test QA->R needs each candidate answer in "
                                f"turn, which this tool does not do (convert the test split with --task qa)")
        question = f"{question} {answers[answer]}"
        choices = _choices(line, "rationale_choices", objects)
        label = _label(line, "rationale_label", len(choices))
        if label is None:
            raise _BadLine("bad_label", "answer_label without rationale_label")
    base = os.path.splitext(os.path.basename(line["img_fn"].strip()))[0]
    return {"annot_id": str(line["annot_id"]), "image_id": norm_id(base), "metadata_fn": line.get("metadata_fn"),
            "question": question, "choices": choices, "label": label}


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
        try:
            if isinstance(line, Exception):
                raise _BadLine("malformed_line", f"invalid JSON ({line})")
            a = parse_line(line, args.task, bool(args.metadata_dir), where)
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
        by_image.setdefault(a["image_id"], []).append(a)
    if not by_image:
        raise BadInputError(f"{args.annotations}: no usable annotation lines")
    return by_image


def metadata_size(meta_dir: str, metadata_fn, image_id: str, skips: SkipCounter) -> tuple[int, int] | None:
    path = os.path.join(meta_dir, str(metadata_fn))
    try:
        with open(path, encoding="utf-8") as f:
            meta = json.load(f)
        w, h = int(meta["width"]), int(meta["height"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        why = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"   # str(OSError) repeats the path
        skips.bad("missing_image_size", f"image {image_id}: the features have no image size and {path} "
                                        f"gives none ({why})")
        return None
    return w, h


def convert(args: argparse.Namespace) -> None:
    skips = SkipCounter(args.skip_bad)
    by_image = read_annotations(args, skips)
    checker = RegionChecker(skips, args.feature_dim)
    writer = None
    images = unlabeled = num_choices = 0
    with contextlib.ExitStack() as stack:
        for r in iter_image_regions(args, list(by_image), skips, "annotations"):
            anns = by_image[r.image_id]
            fallback = None
            if args.metadata_dir and (r.image_w is None or r.image_h is None):
                fallback = metadata_size(args.metadata_dir, anns[0]["metadata_fn"], r.image_id, skips)
                if fallback is None:
                    continue
            cols = checker.to_columns(r, fallback)
            if cols is None:
                continue
            if writer is None:
                meta = schema.make_meta(
                    "mc", checker.feature_dim, checker.num_classes, checker.optional,
                    source={"tool": "convert_vcr", "annotations": os.path.basename(args.annotations),
                            "features": ([os.path.basename(t) for t in args.tsv] if args.tsv
                                         else os.path.basename(os.path.normpath(args.npz_dir)))},
                    task=args.task)
                writer = stack.enter_context(open_writer(args.out, "mc", checker.optional, meta,
                                                         size_limit=args.size_limit, overwrite=args.overwrite))
            images += 1
            for a in anns:
                label = -1 if a["label"] is None else a["label"]
                unlabeled += label < 0
                num_choices = max(num_choices, len(a["choices"]))
                writer.write({"sample_id": a["sample_id"], **cols, "question": a["question"],
                              "choices": a["choices"], "label": label})
        if writer is None:
            raise BadInputError("no samples to write: no image with annotations had valid features")
        writer.meta.update(num_choices=num_choices, has_labels=unlabeled == 0, num_images=images,
                           num_unlabeled=unlabeled, skipped=skips.as_dict(), skipped_total=skips.total)
    summarize(writer, skips)
    print(f"task {args.task}: {images} image(s), {unlabeled} unlabeled sample(s), up to {num_choices} choices")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_vcr.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--annotations", required=True, help="VCR annotations: train.jsonl, val.jsonl or test.jsonl")
    p.add_argument("--task", choices=("qa", "qar"), default="qa",
                   help="qa: Q->A (default); qar: QA->R (question + correct answer, rationale choices)")
    p.add_argument("--metadata-dir", metavar="DIR",
                   help="vcr1images folder: image sizes from <DIR>/<metadata_fn> when the features lack them")
    add_feature_args(p)
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(convert, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
