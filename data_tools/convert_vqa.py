"""VQA v2 questions (+ annotations) + region features -> MDS dataset of kind ``vqa``.

Inputs: ``--questions`` (``questions[]``: question_id, image_id, question), optional
``--annotations`` (``annotations[]``: question_id, image_id, answers[{answer}],
multiple_choice_answer, answer_type; leave it out for test-dev/test questions, whose
samples then have no answers and no targets) and the region features (``--tsv`` or
``--npz-dir``, see data_tools/features.py). One sample per question.

Answer vocabulary (written beside the shards as ``answer_vocab.json``, a JSON list, index =
class id): either read with ``--answer-vocab`` (use the train split's for val/test so ids
match; a local path or s3:// URL) or built from these annotations: the ``--num-answers``
(default 3129) most frequent answers after the official VQA normalisation
(vltrain.metrics.vqa.normalize_answer: punctuation, number words -> digits, articles,
contractions), counting each question's ``multiple_choice_answer`` once
(``--vocab-count mc``, the common preprocessing of bottom-up-attention VQA / VLP) or every
annotator answer (``--vocab-count all``). Ties are broken alphabetically.

Targets: ``answer_scores`` (vltrain.metrics.vqa) gives every distinct normalised annotator
answer the VQA accuracy a prediction of it would get against the normalised annotator answers
(mean over the 10 leave-one-out subsets of min(1, matches/3); the official metric does not
normalise the annotators' answers); answers outside the vocabulary are dropped.
``target_ids``/``target_scores`` hold the in-vocabulary answers sorted by id. A question
with none (test split, or only rare answers) stores the single placeholder (0, 0.0)
because MDS cannot store empty arrays; a zero score adds nothing to a dense target.

Example:
  python data_tools/convert_vqa.py --questions v2_OpenEnded_mscoco_train2014_questions.json \\
      --annotations v2_mscoco_train2014_annotations.json --tsv train2014_36.tsv \\
      --out s3://bucket/vqa/train
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
import sys
from collections import Counter

import numpy as np

from data_tools.common import (BadInputError, SkipCounter, add_output_args, open_writer,
                               read_json_location, run_main, summarize)
from data_tools.features import RegionChecker, add_feature_args, feature_source, iter_image_regions, norm_id
from vltrain.data import schema
from vltrain.metrics.vqa import answer_scores, normalize_answer

DEFAULT_NUM_ANSWERS = 3129
EMPTY_TARGET = (np.zeros(1, np.int32), np.zeros(1, np.float32))


def _load_json(path: str, what: str, key: str) -> list:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read {what} JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        raise BadInputError(f"{path}: not a VQA {what} file (no '{key}' list)")
    return data[key]


def build_vocab(annotations: list[dict], num_answers: int, count: str) -> list[str]:
    """Top-``num_answers`` normalised answers by frequency (ties alphabetical)."""
    c: Counter[str] = Counter()
    for ann in annotations:
        if count == "mc":
            if ann.get("multiple_choice_answer") is not None:
                c[normalize_answer(str(ann["multiple_choice_answer"]))] += 1
        else:
            c.update(normalize_answer(str(a.get("answer", ""))) for a in ann.get("answers", []))
    c.pop("", None)
    ranked = sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:num_answers]]


def targets_for(answers: list[str], vocab_index: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """(target_ids, target_scores) of one question, in-vocabulary answers sorted by id."""
    if not answers:
        return EMPTY_TARGET
    scores = answer_scores(answers)
    pairs = sorted((vocab_index[a], s) for a, s in scores.items() if a in vocab_index and s > 0)
    if not pairs:
        return EMPTY_TARGET
    return (np.array([p[0] for p in pairs], np.int32), np.array([p[1] for p in pairs], np.float32))


def convert(args: argparse.Namespace) -> None:
    skips = SkipCounter(args.skip_bad)
    questions = _load_json(args.questions, "questions", "questions")
    anns: dict[int, dict] | None = None
    ann_list: list[dict] = []
    if args.annotations:
        ann_list = _load_json(args.annotations, "annotations", "annotations")
        anns = {}
        for k, a in enumerate(ann_list):
            if "question_id" not in a:
                raise BadInputError(f"{args.annotations} annotation {k}: no question_id")
            anns[int(a["question_id"])] = a
    if args.answer_vocab:
        vocab = read_json_location(args.answer_vocab)
        if not isinstance(vocab, list) or not all(isinstance(a, str) for a in vocab):
            raise BadInputError(f"{args.answer_vocab}: answer vocabulary must be a JSON list of strings")
        vocab_source = {"file": os.path.basename(args.answer_vocab)}
    else:
        if anns is None:
            raise BadInputError("without --annotations the answer vocabulary cannot be built: "
                                "pass --answer-vocab (the train split's answer_vocab.json)")
        vocab = build_vocab(ann_list, args.num_answers, args.vocab_count)
        vocab_source = {"built_from": os.path.basename(args.annotations), "count": args.vocab_count,
                        "num_answers": args.num_answers}
    vocab_index = {a: i for i, a in enumerate(vocab)}
    if len(vocab_index) != len(vocab):
        raise BadInputError("answer vocabulary has duplicate entries")

    # Group the questions by image, keeping file order.
    by_image: dict[str, list[dict]] = {}
    seen_q: set[int] = set()
    for k, q in enumerate(questions):
        where = f"{args.questions} question {k} (question_id {q.get('question_id')}, image {q.get('image_id')})"
        try:
            qid, iid = int(q["question_id"]), norm_id(q["image_id"])
        except (KeyError, TypeError, ValueError):
            skips.bad("malformed_question", f"{where}: needs integer question_id and an image_id")
            continue
        text = str(q.get("question") or "").strip()
        if not text:
            skips.bad("empty_question", f"{where}: empty question")
            continue
        if qid in seen_q:
            skips.bad("duplicate_question", f"{where}: question_id {qid} appears twice")
            continue
        answers: list[str] = []
        if anns is not None:
            a = anns.get(qid)
            if a is None:
                skips.bad("missing_annotation", f"{where}: no annotation in {args.annotations}")
                continue
            if "image_id" in a and norm_id(a["image_id"]) != iid:
                skips.bad("annotation_mismatch", f"{where}: its annotation names image {a['image_id']}")
                continue
            answers = [str(x.get("answer", "")) for x in a.get("answers", [])]
            if not answers:
                skips.bad("no_answers", f"{where}: annotation has no answers")
                continue
        seen_q.add(qid)
        by_image.setdefault(iid, []).append({"question_id": qid, "question": text, "answers": answers})
    if not by_image:
        raise BadInputError(f"{args.questions}: no usable questions")

    checker = RegionChecker(skips, args.feature_dim)
    writer = None
    no_target = 0
    with contextlib.ExitStack() as stack:
        for r in iter_image_regions(args, list(by_image), skips, "questions"):
            cols = checker.to_columns(r)
            if cols is None:
                continue
            if writer is None:
                meta = schema.make_meta(
                    "vqa", checker.feature_dim, checker.num_classes, checker.optional,
                    source={"tool": "convert_vqa", "questions": os.path.basename(args.questions),
                            "annotations": os.path.basename(args.annotations) if args.annotations else None,
                            "features": feature_source(args)},
                    answer_vocab_file=schema.ANSWER_VOCAB_FILE, answer_vocab_size=len(vocab),
                    answer_vocab_source=vocab_source, has_answers=anns is not None)
                writer = stack.enter_context(open_writer(args.out, "vqa", checker.optional, meta,
                                                         size_limit=args.size_limit,
                                                         overwrite=args.overwrite))
                writer.add_json(schema.ANSWER_VOCAB_FILE, vocab)
            for q in by_image[r.image_id]:
                ids, scores = targets_for(q["answers"], vocab_index)
                no_target += int(scores.max() == 0)
                writer.write({"sample_id": q["question_id"], **cols, "question_id": q["question_id"],
                              "question": q["question"], "answers": q["answers"],
                              "target_ids": ids, "target_scores": scores})
        if writer is None:
            raise BadInputError("no samples to write: no image with questions had valid features")
        writer.meta["questions_without_target"] = no_target
        writer.meta.update(skips.as_meta())
    summarize(writer, skips)
    print(f"answer vocabulary: {len(vocab)} answers; {no_target} question(s) without an in-vocabulary answer")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert_vqa.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="VQA v2 questions JSON")
    p.add_argument("--annotations", help="VQA v2 annotations JSON (leave out for test questions)")
    p.add_argument("--answer-vocab", help="existing answer_vocab.json (path or s3:// URL) to use "
                                          "instead of building one (val/test: pass train's)")
    p.add_argument("--num-answers", type=int, default=DEFAULT_NUM_ANSWERS,
                   help="vocabulary size when building it (default %(default)s)")
    p.add_argument("--vocab-count", choices=("mc", "all"), default="mc",
                   help="count each question's multiple_choice_answer (mc, default) or every "
                        "annotator answer (all) when ranking answers")
    add_feature_args(p)
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(convert, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
