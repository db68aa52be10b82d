"""VQA accuracy exactly as the official VQA API computes it.

Reproduces ``PythonEvaluationTools/vqaEvaluation/vqaEval.py`` of GT-Vision-Lab/VQA
(master; the EvalAI server copy in Cloud-CV/VQA-Challenge has the same accuracy loop):

* the **prediction** is always cleaned: newlines/tabs -> spaces, ``strip()``, then
  ``processPunctuation`` and ``processDigitArticle`` (lower-case, number words -> digits,
  articles dropped, contractions restored, whitespace collapsed);
* the **ground-truth answers** are only passed through ``processPunctuation`` and only
  when the annotators disagree (``len(set(answers)) > 1``); they are never lower-cased or
  digit-mapped by the evaluator, because the released annotations already went through
  that processing (so a raw ``"Two"`` in the ground truth never matches: that is the
  official behaviour, see ``normalize_gt`` for raw answers);
* the accuracy of a question is the mean, over the leave-one-out subsets of the answers
  (ten for VQA), of ``min(1, #matches / 3)``: 1 match -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.

``normalize_answer`` is the prediction-side processing; the data converter uses it to build
the answer vocabulary, and ``answer_scores`` gives the soft training targets. ``normalize_gt=True``
is NOT the official metric: it normalises the ground truth like those targets, so the score of a
prediction is its soft target (the val score the LXMERT / VL-BERT code report), more lenient
than the official one (``"2"`` vs 7 x ``"two"`` + 3 x ``"2"``: 1.0, officially 0.9).
"""
from __future__ import annotations

import re
from collections import Counter, defaultdict
from typing import Hashable, Mapping, Sequence

__all__ = [
    "normalize_answer",
    "process_punctuation",
    "process_digit_article",
    "vqa_accuracy",
    "answer_scores",
    "per_type_accuracy",
    "vqa_eval",
]

# --- the official tables (vqaEval.py, GT-Vision-Lab/VQA master) --------------------------
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've",
    "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
MANUAL_MAP = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = ("a", "an", "the")
# "(?!<=\d)" is the official pattern verbatim: a (mistyped) negative *lookahead*, so the
# rule is "drop a period not followed by a digit".
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(\,)(\d)")
PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
         ">", "<", "@", "`", ",", "?", "!"]
# The official call is periodStrip.sub("", text, re.UNICODE): the third positional argument
# of Pattern.sub is `count`, so at most int(re.UNICODE) == 32 periods are removed.
_PERIOD_COUNT = int(re.UNICODE)


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation`` (no lower-casing)."""
    out = text
    has_digit_comma = COMMA_STRIP.search(text) is not None
    for p in PUNCT:
        # The official test looks at the *input* text, not the partly processed one.
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, _PERIOD_COUNT)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``: lower-case, number words -> digits, drop
    articles, restore contractions, collapse whitespace."""
    words = []
    for word in text.lower().split():
        word = MANUAL_MAP.get(word, word)
        if word not in ARTICLES:
            words.append(word)
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(ans: str) -> str:
    """The official processing of a predicted answer (also our vocabulary key)."""
    ans = ans.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(ans))


def _loo_accuracy(pred: str, answers: Sequence[str]) -> float:
    """Mean over leave-one-out subsets of min(1, matches/3); `pred` and `answers` are
    compared verbatim (already processed)."""
    n = len(answers)
    matches = sum(1 for a in answers if a == pred)
    # Leaving out a matching answer leaves matches-1, leaving out another leaves matches.
    total = matches * min(1.0, (matches - 1) / 3.0) + (n - matches) * min(1.0, matches / 3.0)
    return total / n


def _check_answers(gt_answers: Sequence[str]) -> None:
    if isinstance(gt_answers, str):
        raise TypeError("gt_answers must be a list of answer strings, not one string")
    if len(gt_answers) == 0:
        raise ValueError("gt_answers is empty: a question needs at least one annotator answer")


def vqa_accuracy(pred: str, gt_answers: Sequence[str], *, normalize_gt: bool = False) -> float:
    """Per-question accuracy in [0, 1]; by default as the official ``VQAEval.evaluate``
    computes it.

    ``normalize_gt=True`` (not official) first applies :func:`normalize_answer` to every
    ground-truth answer (``"Two"`` -> ``"2"``, ``"a dog."`` -> ``"dog"``): the score is then the
    soft training target of ``pred`` (:func:`answer_scores`), the convention of the LXMERT /
    VL-BERT code.
    """
    _check_answers(gt_answers)
    answers = [normalize_answer(a) for a in gt_answers] if normalize_gt else list(gt_answers)
    if len(set(answers)) > 1:
        answers = [process_punctuation(a) for a in answers]
    return _loo_accuracy(normalize_answer(pred), answers)


def answer_scores(gt_answers: Sequence[str]) -> dict[str, float]:
    """Soft target for every distinct normalised answer of one question.

    The score of answer ``a`` is ``vqa_accuracy(a, gt_answers, normalize_gt=True)``: the
    annotators' answers are normalised first (the common preprocessing of VQA training
    targets), so with ten answers the scores are 0.3 / 0.6 / 0.9 / 1.0 for 1 / 2 / 3 / 4+
    agreeing annotators.
    """
    _check_answers(gt_answers)
    normed = [normalize_answer(a) for a in gt_answers]
    return {a: vqa_accuracy(a, normed) for a in Counter(normed)}


def per_type_accuracy(per_question: Mapping[Hashable, float], types: Mapping[Hashable, str],
                      what: str = "per_answer_type") -> dict[str, float]:
    """vqaEval.py's ``perAnswerType`` / ``perQuestionType`` (percent): for each type, the mean
    of the per-question accuracies (0..1) of its questions. Every question needs a type
    (``what`` names the grouping in the error)."""
    groups: dict[str, list[float]] = defaultdict(list)
    for q, acc in per_question.items():
        if q not in types:
            raise ValueError(f"{what}: question {q!r} has no type")
        groups[types[q]].append(acc)
    return {t: 100.0 * sum(v) / len(v) for t, v in groups.items()}


def vqa_eval(
    predictions: Mapping[Hashable, str],
    gt: Mapping[Hashable, Sequence[str]],
    answer_types: Mapping[Hashable, str] | None = None,
    question_types: Mapping[Hashable, str] | None = None,
    *,
    normalize_gt: bool = False,
) -> dict:
    """VQA accuracy over a set of questions (official unless ``normalize_gt``).

    ``predictions``: question id -> predicted answer; ``gt``: question id -> annotator
    answers. Every question in ``gt`` needs a prediction and every prediction a question
    (either mismatch is an error, never a silently smaller denominator).

    Returns ``{"accuracy": percent, "n": #questions, "per_question": {qid: 0..1}}`` plus
    ``"per_answer_type"`` / ``"per_question_type"`` (percent) when the types are given.
    Percentages are unrounded (the official code rounds to 2 decimals for display).
    """
    missing = [q for q in gt if q not in predictions]
    extra = [q for q in predictions if q not in gt]
    if missing:
        raise ValueError(f"{len(missing)} question(s) have no prediction, e.g. {missing[:5]}")
    if extra:
        raise ValueError(f"{len(extra)} prediction(s) for unknown question ids, e.g. {extra[:5]}")
    if not gt:
        raise ValueError("vqa_eval: no questions to score")

    per_q = {q: vqa_accuracy(predictions[q], gt[q], normalize_gt=normalize_gt) for q in gt}
    out: dict = {
        "accuracy": 100.0 * sum(per_q.values()) / len(per_q),
        "n": len(per_q),
        "per_question": per_q,
    }
    for key, types in (("per_answer_type", answer_types), ("per_question_type", question_types)):
        if types is not None:
            out[key] = per_type_accuracy(per_q, types, key)
    return out


def majority_answer_baseline(train_rows: Sequence[Mapping], eval_rows: Sequence[Mapping],
                             vocab: Sequence[str]) -> tuple[str, float]:
    """(answer, official accuracy in percent on ``eval_rows``) of always giving the answer with
    the highest total soft score in ``train_rows`` — the prior a VQA model must beat. Rows are
    samples of our VQA datasets (``target_ids``, ``target_scores``, ``answers``)."""
    mass: Counter = Counter()
    for r in train_rows:
        for i, s in zip(list(r["target_ids"]), list(r["target_scores"])):
            mass[int(i)] += float(s)
    answer = vocab[mass.most_common(1)[0][0]]
    scores = [vqa_accuracy(answer, list(r["answers"])) for r in eval_rows]
    return answer, 100.0 * sum(scores) / max(1, len(scores))
