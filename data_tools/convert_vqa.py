"""VQA v2 questions (+ annotations) + region features -> MDS dataset of kind ``vqa``.

Inputs: ``--questions`` (``questions[]``: question_id, image_id, question), optional
``--annotations`` (``annotations[]``: question_id, image_id, answers[{answer}],
multiple_choice_answer, answer_type; leave it out for test-dev/test questions, whose
samples then have no answers and no targets) and the region features (``--tsv`` or
``--npz-dir``, see data_tools/features.py). One sample per question; its ``answer_type`` column
holds the annotation's official answer type ("yes/no", "number", "other"; "" without one or
without annotations), which evaluation reports per-type accuracies by.

Answer vocabulary (written beside the shards as ``answer_vocab.json``, a JSON list, index =
class id): either read with ``--answer-vocab`` (use the train split's for val/test so ids
match; a JSON list of strings or one answer per line, e.g. VL-BERT's answers_vqa.txt; a
local path or s3:// URL) or built from annotations (``--vocab-annotations``, repeatable,
default the ``--annotations`` file), counting after the official VQA normalisation
(vltrain.metrics.vqa.normalize_answer: punctuation, number words -> digits, articles,
contractions) each question's ``multiple_choice_answer`` once (``--vocab-count mc``, the
common preprocessing of bottom-up-attention VQA / VLP) or every annotator answer
(``--vocab-count all``). Kept: the answers counted at least ``--min-answer-count`` times,
at most ``--num-answers`` of them (default 3129 without a minimum count, no limit with
one), most frequent first, ties broken alphabetically. The recipe of bottom-up attention /
VLP / VL-BERT (answers given as multiple_choice_answer at least 9 times in train+val, about
3129; their normalisation differs from the official one in details, so the count may too):
``--vocab-annotations v2_mscoco_train2014_annotations.json --vocab-annotations
v2_mscoco_val2014_annotations.json --min-answer-count 9``.

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
                               read_text_location, run_main, summarize)
from data_tools.features import RegionChecker, add_feature_args, feature_source, iter_image_regions, norm_id
from vltrain.data import schema
from vltrain.metrics.vqa import answer_scores, normalize_answer
from vltrain.redact import RedactingArgumentParser

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


def _int_id(value) -> int | None:
    """A question_id as an int: JSON integers and digit strings; None for anything else
    (``int()`` would truncate 12.7 and accept True)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    return None


def _positive_int(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {n}")
    return n


def load_answer_vocab(location: str) -> list[str]:
    """An existing answer vocabulary (index = class id): a JSON list of strings (our
    answer_vocab.json, LXMERT's trainval_label2ans.json) or plain text with one answer per line
    (VL-BERT's answers_vqa.txt; blank lines ignored)."""
    text = read_text_location(location)
    if text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise BadInputError(f"{location}: not valid JSON ({e}); an answer vocabulary is a JSON list "
                                f"of strings or a text file with one answer per line") from e
        if not isinstance(data, list) or not all(isinstance(a, str) for a in data):
            raise BadInputError(f"{location}: an answer vocabulary must be a JSON list of strings (index = "
                                f"class id), got {type(data).__name__}" +
                                (" with non-string entries" if isinstance(data, list) else ""))
        entries = [(f"entry {i}", a) for i, a in enumerate(data)]
    else:
        entries = [(f"line {n}", line.strip()) for n, line in enumerate(text.splitlines(), start=1)
                   if line.strip()]
    if not entries:
        raise BadInputError(f"{location}: the answer vocabulary holds no answers")
    first: dict[str, str] = {}
    for where, answer in entries:
        if answer in first:
            # Two class ids for one answer: targets would use one and the other never be learned.
            raise BadInputError(f"{location} {where}: answer {answer!r} is already at {first[answer]}; "
                                f"an answer vocabulary lists each answer once")
        first[answer] = where
    return [a for _, a in entries]


def count_answers(path: str, annotations: list, count: str, counts: Counter[str]) -> None:
    """Add one annotation file's normalised answers to ``counts``: each question's
    multiple_choice_answer (``count="mc"``) or every annotator answer (``"all"``)."""
    for k, ann in enumerate(annotations):
        if not isinstance(ann, dict):
            raise BadInputError(f"{path} annotation {k}: {ann!r:.80} is not an object")
        if count == "mc":
            if ann.get("multiple_choice_answer") is not None:
                counts[normalize_answer(str(ann["multiple_choice_answer"]))] += 1
        else:
            counts.update(normalize_answer(str(a.get("answer", ""))) for a in ann.get("answers", []))


def build_vocab(counts: Counter[str], num_answers: int | None, min_count: int) -> list[str]:
    """The answers counted at least ``min_count`` times, most frequent first (ties
    alphabetical, so the class ids are the same on every run), at most ``num_answers``."""
    ranked = sorted(((a, c) for a, c in counts.items() if a and c >= min_count),
                    key=lambda kv: (-kv[1], kv[0]))
    return [a for a, _ in ranked[:num_answers]]


def vocab_from_args(args: argparse.Namespace, ann_list: list[dict]) -> tuple[list[str], dict]:
    """(answer vocabulary, how the meta describes its source) from the command line."""
    if args.answer_vocab:
        if args.num_answers or args.min_answer_count:
            raise BadInputError("--num-answers / --min-answer-count build a vocabulary; --answer-vocab "
                                f"{args.answer_vocab} is used as it is: pass one or the other")
        vocab = load_answer_vocab(args.answer_vocab)
        # targets come from normalised annotator answers: an entry in another form ('t-shirt',
        # Pythia's '<unk>') is a class no question can have as its target
        odd = [a for a in vocab if normalize_answer(a) != a]
        if odd:
            print(f"warning: {len(odd)} of the {len(vocab)} answers in --answer-vocab {args.answer_vocab} are "
                  f"not in the normalised form the targets are matched in, so no question can have them as "
                  f"a target: " + ", ".join(f"{a!r} (reads {normalize_answer(a)!r})" for a in odd[:5])
                  + (", ..." if len(odd) > 5 else ""), file=sys.stderr)
        return vocab, {"file": os.path.basename(args.answer_vocab)}
    files = args.vocab_annotations or ([args.annotations] if args.annotations else [])
    if not files:
        raise BadInputError("without --annotations the answer vocabulary cannot be built: pass "
                            "--answer-vocab (the train split's answer_vocab.json) or --vocab-annotations")
    repeated = sorted({f for f in files if files.count(f) > 1})
    if repeated:
        raise BadInputError(f"--vocab-annotations {repeated[0]} given twice: its answers would count double")
    counts: Counter[str] = Counter()
    for path in files:
        anns = ann_list if path == args.annotations else _load_json(path, "annotations", "annotations")
        count_answers(path, anns, args.vocab_count, counts)
    min_count = args.min_answer_count or 1
    # A minimum count alone is the standard recipe (it sets the size); a cap only when asked.
    cap = args.num_answers or (None if args.min_answer_count else DEFAULT_NUM_ANSWERS)
    vocab = build_vocab(counts, cap, min_count)
    if not vocab:
        raise BadInputError(f"no answer is counted at least {min_count} time(s) in {', '.join(files)}: "
                            f"the answer vocabulary would be empty")
    return vocab, {"built_from": [os.path.basename(f) for f in files], "count": args.vocab_count,
                   "num_answers": cap, "min_answer_count": min_count}


def index_annotations(path: str, annotations: list) -> dict[int, dict]:
    """{question_id: annotation}. An annotation without an integer question_id is an error, not
    a skip: which question it belongs to cannot be told, so skipping it would lose it unnamed."""
    out = {}
    for k, a in enumerate(annotations):
        qid = _int_id(a.get("question_id")) if isinstance(a, dict) else None
        if qid is None:
            got = f"question_id {a['question_id']!r}" if isinstance(a, dict) and "question_id" in a \
                else "no question_id"
            raise BadInputError(f"{path} annotation {k}: {got}; every annotation needs the integer "
                                f"question_id of its question")
        out[qid] = a
    return out


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
    skips = SkipCounter.from_args(args)
    questions = _load_json(args.questions, "questions", "questions")
    skips.read = len(questions)              # VQA's scorer counts every question
    anns: dict[int, dict] | None = None
    ann_list: list[dict] = []
    if args.annotations:
        ann_list = _load_json(args.annotations, "annotations", "annotations")
        anns = index_annotations(args.annotations, ann_list)
    vocab, vocab_source = vocab_from_args(args, ann_list)
    vocab_index = {a: i for i, a in enumerate(vocab)}

    # Group the questions by image, keeping file order.
    by_image: dict[str, list[dict]] = {}
    seen_q: set[int] = set()
    for k, q in enumerate(questions):
        where = f"{args.questions} question {k} (question_id {q.get('question_id')}, image {q.get('image_id')})"
        qid = _int_id(q.get("question_id"))
        if qid is None or q.get("image_id") is None:
            skips.bad("malformed_question", f"{where}: needs integer question_id and an image_id")
            continue
        iid = norm_id(q["image_id"])
        text = str(q.get("question") or "").strip()
        if not text:
            skips.bad("empty_question", f"{where}: empty question")
            continue
        if qid in seen_q:
            skips.bad("duplicate_question", f"{where}: question_id {qid} appears twice")
            continue
        answers: list[str] = []
        answer_type = ""
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
            answer_type = str(a.get("answer_type") or "").strip()
        seen_q.add(qid)
        by_image.setdefault(iid, []).append({"question_id": qid, "question": text, "answers": answers,
                                             "answer_type": answer_type})
    if not by_image:
        raise BadInputError(f"{args.questions}: no usable questions")

    odd = [(q["question_id"], len(q["answers"])) for qs in by_image.values() for q in qs
           if anns is not None and len(q["answers"]) != 10]
    if odd:   # the targets' formula (VQA accuracy) assumes VQA's 10 annotators
        print(f"warning: {len(odd)} question(s) have other than 10 annotator answers (e.g. question_id {odd[0][0]} "
              f"has {odd[0][1]}): their targets are VQA accuracy's mean over leaving one answer out, made for 10; "
              "a question with a single answer gets none", file=sys.stderr)
    checker = RegionChecker(skips, args.feature_dim)
    writer = None
    no_target = 0
    with contextlib.ExitStack() as stack:
        for r in iter_image_regions(args, list(by_image), skips, "questions"):
            cols = checker.to_columns(r)
            if cols is None:
                continue
            if writer is None:
                optional = tuple(checker.optional) + ("answer_type",)   # always written, "" if unknown
                meta = schema.make_meta(
                    "vqa", checker.feature_dim, checker.num_classes, optional,
                    source={"tool": "convert_vqa", "questions": os.path.basename(args.questions),
                            "annotations": os.path.basename(args.annotations) if args.annotations else None,
                            "features": feature_source(args)},
                    answer_vocab_file=schema.ANSWER_VOCAB_FILE, answer_vocab_size=len(vocab),
                    answer_vocab_source=vocab_source, has_answers=anns is not None)
                writer = stack.enter_context(open_writer(args.out, "vqa", optional, meta,
                                                         size_limit=args.size_limit,
                                                         overwrite=args.overwrite))
                writer.add_json(schema.ANSWER_VOCAB_FILE, vocab)
            for q in by_image[r.image_id]:
                ids, scores = targets_for(q["answers"], vocab_index)
                no_target += int(scores.max() == 0)
                writer.write({"sample_id": q["question_id"], **cols, "question_id": q["question_id"],
                              "question": q["question"], "answers": q["answers"], "answer_type": q["answer_type"],
                              "target_ids": ids, "target_scores": scores})
        if writer is None:
            raise BadInputError("no samples to write: no image with questions had valid features")
        writer.meta["questions_without_target"] = no_target
        skips.finish(writer, "questions")
    summarize(writer, skips)
    if anns is None:      # a test split: nothing to score against
        print(f"answer vocabulary: {len(vocab)} answers; no annotations given: questions without answers")
    else:
        print(f"answer vocabulary: {len(vocab)} answers; {no_target} question(s) without an in-vocabulary answer")


def build_parser() -> argparse.ArgumentParser:
    p = RedactingArgumentParser(prog="convert_vqa.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--questions", required=True, help="VQA v2 questions JSON")
    p.add_argument("--annotations", help="VQA v2 annotations JSON (leave out for test questions)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--answer-vocab", help="existing answer vocabulary to use instead of building one "
                                            "(val/test: pass train's answer_vocab.json): a JSON list of "
                                            "strings or a text file with one answer per line (VL-BERT's "
                                            "answers_vqa.txt); a path or s3:// URL")
    src.add_argument("--vocab-annotations", action="append", metavar="FILE",
                     help="annotations JSON to count answers in when building the vocabulary; repeat "
                          "for several files (default: --annotations)")
    p.add_argument("--num-answers", type=_positive_int, default=None,
                   help=f"keep at most this many answers, the most frequent (default {DEFAULT_NUM_ANSWERS}; "
                        f"no limit with --min-answer-count)")
    p.add_argument("--min-answer-count", type=_positive_int, default=None, metavar="N",
                   help="keep the answers counted at least N times. The recipe of bottom-up attention / "
                        "VLP / VL-BERT's ~3129-answer VQA v2 vocabulary: --vocab-annotations "
                        "train.json --vocab-annotations val.json --min-answer-count 9")
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
