"""VCR's three scores from two multiple-choice evaluations: Q->A, QA->R and Q->AR; and the
leaderboard's submission file for the test split.

VCR (Zellers et al. 2019) reports Q->A (pick the answer), QA->R (pick the rationale given the
right answer) and Q->AR: a question counts only when both picks are right. vltrain trains and
evaluates the first two as two ``mc`` datasets (``data_tools/convert_vcr.py --task qa`` and
``--task qar``, which give a question the same sample id in both); this joins their
``predictions.json`` files:

  python -m vltrain.metrics.vcr runs/vcr-qa/eval/val_step00016600 runs/vcr-qar/eval/val_step00016600

(an evaluation folder or its predictions.json each). Both must hold the same questions, all
labelled. The test split has no labels: the leaderboard scores a CSV of probabilities, the
answers' and the rationales' conditioned on each candidate answer in turn (R2C's
eval_for_leaderboard.py format). Evaluate the qa dataset and the four ``--task qar
--given-answer N`` datasets of the test split, then

  python -m vltrain.metrics.vcr --leaderboard submission.csv --annotations vcr1annots/test.jsonl \
      QA_EVAL QAR_A0_EVAL QAR_A1_EVAL QAR_A2_EVAL QAR_A3_EVAL

writes one row per line of the annotations, in their order (annot_id, answer_0..3,
rationale_conditioned_on_a0_0 .. a3_3); a question missing from an evaluation is an error.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

from vltrain.data.schema import stable_sample_id
from vltrain.redact import RedactingArgumentParser

NUM_CHOICES = 4   # VCR: four answers, four rationales


def sample_id_of(annot_id: str) -> int:
    """A VCR question's sample id (convert_vcr): the integer after the last "-" of annot_id
    ("test-12" -> 12), else a stable hash of annot_id."""
    _, sep, tail = annot_id.rpartition("-")
    if sep and tail.isascii() and tail.isdigit() and int(tail) < 2 ** 63:
        return int(tail)
    return stable_sample_id(annot_id)


def joint_accuracy(qa: dict, qar: dict) -> dict[str, float]:
    """``qa``/``qar``: sample id -> {"pred", "label", ...} (an mc evaluation's predictions.json).
    Returns percentages of Q->A, QA->R and Q->AR, and the question count."""
    only_qa, only_qar = sorted(set(qa) - set(qar)), sorted(set(qar) - set(qa))
    if only_qa or only_qar:
        raise ValueError(f"the evaluations hold different questions: {len(only_qa)} only in Q->A "
                         f"(e.g. {only_qa[:3]}), {len(only_qar)} only in QA->R (e.g. {only_qar[:3]}); "
                         "evaluate the same split of datasets converted from the same annotations")
    if not qa:
        raise ValueError("no predictions")
    unlabeled = sorted(k for k in qa if "label" not in qa[k] or "label" not in qar[k])
    if unlabeled:
        raise ValueError(f"{len(unlabeled)} questions have no label (e.g. {unlabeled[:3]}): a test split "
                         "is scored by the VCR leaderboard")
    right_a = {k for k, r in qa.items() if r["pred"] == r["label"]}
    right_r = {k for k, r in qar.items() if r["pred"] == r["label"]}
    n = len(qa)
    return {"Q->A": 100.0 * len(right_a) / n, "QA->R": 100.0 * len(right_r) / n,
            "Q->AR": 100.0 * len(right_a & right_r) / n, "num_samples": float(n)}


def leaderboard_rows(annot_ids: list[str], qa: dict, conditioned: list[dict]) -> list[list]:
    """The leaderboard CSV's rows (header first): per annot_id the Q->A probabilities and the
    QA->R ones given each candidate answer (``conditioned[n]``: the --given-answer n evaluation,
    one per answer: main() checks the count before reading any file)."""
    header = ["annot_id", *(f"answer_{i}" for i in range(NUM_CHOICES)),
              *(f"rationale_conditioned_on_a{a}_{i}" for a in range(NUM_CHOICES) for i in range(NUM_CHOICES))]
    rows = [header]
    for annot_id in annot_ids:
        sid = str(sample_id_of(annot_id))
        row = [annot_id]
        for what, preds in (("Q->A", qa), *((f"QA->R given answer {n}", p) for n, p in enumerate(conditioned))):
            if sid not in preds:
                raise ValueError(f"annot_id {annot_id} (sample id {sid}) is not in the {what} evaluation: "
                                 "evaluate the datasets converted from these annotations")
            probs = preds[sid]["probs"]
            if len(probs) != NUM_CHOICES:
                raise ValueError(f"annot_id {annot_id}: {len(probs)} choices in the {what} evaluation, "
                                 f"VCR has {NUM_CHOICES}")
            row += [f"{p:.6g}" for p in probs]
        rows.append(row)
    return rows


def _annot_ids(path: str) -> list[str]:
    out = []
    try:
        with open(path) as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    try:
                        out.append(str(json.loads(line)["annot_id"]))
                    except (json.JSONDecodeError, KeyError, TypeError) as e:
                        raise ValueError(f"{path} line {lineno}: no annot_id ({e!r})") from e
    except OSError as e:
        raise ValueError(f"{path}: cannot read the annotations ({e})") from e
    return out


def _load(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "predictions.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read predictions ({e})") from e


def main(argv: list[str] | None = None) -> int:
    p = RedactingArgumentParser(prog="python -m vltrain.metrics.vcr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("evals", nargs="+", metavar="EVAL",
                   help="evaluation folders (or predictions.json): Q->A then QA->R; with --leaderboard, "
                        "Q->A then the four QA->R evaluations given answer 0, 1, 2, 3")
    p.add_argument("--leaderboard", metavar="CSV", help="write the leaderboard submission file here")
    p.add_argument("--annotations", metavar="JSONL", help="with --leaderboard: the split's VCR annotations")
    args = p.parse_args(argv)
    try:
        if args.leaderboard:
            if not args.annotations:
                raise ValueError("--leaderboard needs --annotations (the test.jsonl the datasets came from)")
            if len(args.evals) != 1 + NUM_CHOICES:
                raise ValueError(f"--leaderboard takes {1 + NUM_CHOICES} evaluations (Q->A, then QA->R given "
                                 f"answer 0..{NUM_CHOICES - 1}), got {len(args.evals)}")
            preds = [_load(e) for e in args.evals]
            rows = leaderboard_rows(_annot_ids(args.annotations), preds[0], preds[1:])
            tmp = args.leaderboard + ".tmp"
            with open(tmp, "w", newline="") as f:
                csv.writer(f).writerows(rows)
            os.replace(tmp, args.leaderboard)
            print(f"wrote {len(rows) - 1} questions to {args.leaderboard}")
            return 0
        if len(args.evals) != 2:
            raise ValueError(f"give the Q->A and the QA->R evaluation (2), got {len(args.evals)}")
        scores = joint_accuracy(_load(args.evals[0]), _load(args.evals[1]))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
