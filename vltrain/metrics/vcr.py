"""VCR's three scores from two multiple-choice evaluations: Q->A, QA->R and Q->AR.

VCR (Zellers et al. 2019) reports Q->A (pick the answer), QA->R (pick the rationale given the
right answer) and Q->AR: a question counts only when both picks are right. vltrain trains and
evaluates the first two as two ``mc`` datasets (``data_tools/convert_vcr.py --task qa`` and
``--task qar``, which give a question the same sample id in both); this joins their
``predictions.json`` files:

  python -m vltrain.metrics.vcr runs/vcr-qa/eval/val_step00016600 runs/vcr-qar/eval/val_step00016600

(an evaluation folder or its predictions.json each). Both must hold the same questions, all
labelled: test-split predictions are scored by the VCR leaderboard, from the ``probs``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


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


def _load(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "predictions.json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read predictions ({e})") from e


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vltrain.metrics.vcr", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("qa", help="the Q->A evaluation (folder or predictions.json)")
    p.add_argument("qar", help="the QA->R evaluation of the same questions")
    args = p.parse_args(argv)
    try:
        scores = joint_accuracy(_load(args.qa), _load(args.qar))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(scores, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
