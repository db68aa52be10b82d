"""Metrics: caption scores equal pycocoevalcap called directly; VQA accuracy equals
hand-computed cases of the official vqaEval.py algorithm; MC / grounding accuracy."""
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from vltrain.metrics import (
    CiderD,
    JavaNotFoundError,
    answer_scores,
    box_iou,
    caption_scores,
    cider_rewards,
    evaluate_captions,
    grounding_accuracy,
    multiple_choice_accuracy,
    normalize_answer,
    paired_box_iou,
    ptb_tokenize,
    simple_tokenize,
    spice_status,
    vqa_accuracy,
    vqa_eval,
)

# ----------------------------------------------------------------------------- captions
REFS = {
    11: ["A man riding a horse on a beach.", "A person rides a brown horse along the shore.",
         "Man on horseback near the ocean.", "Someone is riding a horse by the sea."],
    22: ["Two dogs playing in the snow.", "A couple of dogs run through snow, isn't it cold?",
         "Dogs frolic in a snowy field."],
    33: ["A woman's red T-shirt hangs on a line.", "Laundry drying outside, a red shirt."],
    44: ["A plate of food with broccoli and rice.", "Broccoli, rice and chicken on a white plate.",
         "A healthy meal on a dish.", "Dinner: chicken & rice.", "Food on a plate."],
    55: ["A cat sleeping on a laptop keyboard.", "The cat is asleep on the computer.",
         "A grey cat lies on a laptop."],
    66: ["A red bus drives down the street.", "A double-decker bus on a city road.",
         "The bus is red."],
}
CANDS = {
    11: "A man riding a horse on the beach.",
    22: "dogs playing in snow",
    33: "a red shirt on a clothes line",
    44: "a plate with rice and broccoli",
    55: "a cat on a laptop",
    66: "A red bus.",
}


@pytest.fixture(scope="module")
def coco_direct():
    """pycocoevalcap used directly, as its own eval.py does."""
    if shutil.which("java") is None:
        pytest.skip("java not installed")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    # One METEOR JVM (~8 s to load its paraphrase table) serves both sides: the direct side
    # calls its compute_score itself, ours reuses the same running process.
    meteor = Meteor()
    ours, ours_per_image = evaluate_captions(REFS, CANDS, meteor=meteor)
    assert meteor.meteor_p.poll() is None  # a caller's METEOR is left running

    tok = PTBTokenizer()
    gts = tok.tokenize({i: [{"caption": c} for c in REFS[i]] for i in REFS})
    res = tok.tokenize({i: [{"caption": CANDS[i]}] for i in REFS})
    direct, direct_per_image = {}, {}
    for scorer, names in [(Bleu(4), ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"]),
                          (meteor, ["METEOR"]), (Rouge(), ["ROUGE-L"]), (Cider(), ["CIDEr"])]:
        score, scores = scorer.compute_score(gts, res)
        if len(names) == 1:
            score, scores = [score], [scores]
        for name, s, per in zip(names, score, scores):
            direct[name] = s
            direct_per_image[name] = dict(zip(gts.keys(), per))
    return dict(ours=ours, ours_per_image=ours_per_image, direct=direct,
                direct_per_image=direct_per_image, gts=gts, res=res)


def test_ptb_tokenize_equals_pycocoevalcap(coco_direct):
    assert ptb_tokenize(REFS) == coco_direct["gts"]
    # line breaks inside a caption do not shift the following captions
    tok = ptb_tokenize({1: ["A dog\r\nrunning."], 2: ["", "A CAT, sitting."]})
    assert tok == {1: ["a dog running"], 2: ["", "a cat sitting"]}


def test_caption_scores_equal_pycocoevalcap(coco_direct):
    ours, direct = coco_direct["ours"], coco_direct["direct"]
    for name in ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]:
        assert isinstance(ours[name], float)
        assert ours[name] == pytest.approx(direct[name], abs=1e-6), name
        for i in REFS:  # per image, against all of its references
            assert coco_direct["ours_per_image"][i][name] == pytest.approx(
                direct_per_image_value(coco_direct, name, i), abs=1e-6), (name, i)
    # sanity: the scores mean something (candidate 11 is nearly a reference)
    per = coco_direct["ours_per_image"]
    assert per[11]["CIDEr"] == max(p["CIDEr"] for p in per.values())
    assert 0 < ours["BLEU-4"] < ours["BLEU-1"] <= 1


def direct_per_image_value(coco_direct, name, image_id):
    return float(coco_direct["direct_per_image"][name][image_id])


def test_spice_reported_never_dropped(coco_direct):
    ours = coco_direct["ours"]
    assert set(ours) == {"BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr",
                         "SPICE", "SPICE_status"}
    ok, status = spice_status()
    if ok:
        assert isinstance(ours["SPICE"], float) and ours["SPICE_status"] == "ok"
    else:
        assert ours["SPICE"] is None
        assert ours["SPICE_status"] == status and status.startswith("unavailable: ")
        assert "stanford-corenlp-3.6.0" in status  # offline here: the models are missing
        with pytest.raises(RuntimeError, match="SPICE requested but unavailable"):
            caption_scores(REFS, CANDS, spice=True)


def test_cider_d_corpus_idf_equals_pycocoevalcap(coco_direct):
    gts, res = coco_direct["gts"], coco_direct["res"]
    direct = coco_direct["direct_per_image"]["CIDEr"]
    ids = list(gts)
    # one candidate per image of the corpus: exactly pycocoevalcap's per-image CIDEr-D
    cider = CiderD(gts, tokenize=None)
    got = cider([(i, res[i][0]) for i in ids])
    np.testing.assert_allclose(got, [direct[i] for i in ids], rtol=0, atol=1e-9)
    # several candidates per image, any order: each scored independently, idf unchanged
    pairs = [(22, res[22][0]), (11, "a horse"), (11, res[11][0]), (22, gts[22][0])]
    batch = cider(pairs)
    alone = [cider([p])[0] for p in pairs]
    np.testing.assert_allclose(batch, alone, rtol=0, atol=1e-12)
    assert batch[2] == pytest.approx(direct[11], abs=1e-9)
    assert batch[2] > batch[1]  # the fuller caption beats "a horse"
    # the idf comes from the whole reference corpus, not from the images in the batch
    assert cider.ref_len == pytest.approx(math.log(len(REFS)))
    small = CiderD({11: gts[11], 22: gts[22]}, tokenize=None)([(11, res[11][0])])[0]
    assert small != pytest.approx(batch[2])
    # the raw-text path (PTB tokenization inside) gives the same numbers
    raw = cider_rewards(REFS, [(i, CANDS[i]) for i in ids], tokenize="ptb")
    np.testing.assert_allclose(raw, [direct[i] for i in ids], rtol=0, atol=1e-9)


def test_simple_tokenizer_matches_ptb_on_captions(coco_direct):
    for i, refs in REFS.items():
        for raw, ptb in zip(refs, coco_direct["gts"][i]):
            assert simple_tokenize(raw) == ptb, raw
        assert simple_tokenize(CANDS[i]) == coco_direct["res"][i][0]


def test_java_missing_gives_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH with no java on it
    with pytest.raises(JavaNotFoundError, match="java not found: install default-jre-headless"):
        caption_scores(REFS, CANDS)
    with pytest.raises(JavaNotFoundError, match="java not found"):
        cider_rewards(REFS, [(11, "a man")], tokenize="ptb")
    ok, status = spice_status()
    assert not ok and "java not found" in status
    # the pure-Python reward path needs no Java
    r = cider_rewards(REFS, [(11, "a man riding a horse"), (11, "a bus")], tokenize="simple")
    assert r.shape == (2,) and r[0] > r[1] >= 0


def test_caption_input_errors():
    with pytest.raises(ValueError, match="no candidate caption"):
        caption_scores(REFS, {11: "a man"})
    with pytest.raises(ValueError, match="no references"):
        caption_scores({11: ["a man"]}, {11: "a man", 99: "x"})
    with pytest.raises(TypeError, match="one string"):
        caption_scores({11: ["a man"]}, {11: ["a man"]})
    with pytest.raises(KeyError, match="without references"):
        cider_rewards({11: ["a man"]}, [(12, "a man")], tokenize=None)


# ---------------------------------------------------------------------------------- VQA
def test_normalize_answer_official_processing():
    assert normalize_answer("Two") == "2"
    assert normalize_answer("  a Dog. ") == "dog"
    assert normalize_answer("The TWO dogs!") == "2 dogs"
    assert normalize_answer("dont") == "don't"          # contraction restored
    assert normalize_answer("1,000") == "1000"          # digit comma: punctuation deleted
    assert normalize_answer("3.5") == "3.5"             # period before a digit kept
    assert normalize_answer("yes/no") == "yes no"       # punctuation w/o spaces -> space
    assert normalize_answer("yes / no") == "yes no"     # with spaces -> deleted
    assert normalize_answer("none") == "0"
    assert normalize_answer("red\tand\nblue") == "red and blue"
    for a in ["Two", "a Dog.", "dont", "1,000", "t-shirt", "Yes!", "the one", "somebody'd"]:
        n = normalize_answer(a)
        assert normalize_answer(n) == n  # idempotent: vocabulary keys are fixed points


@pytest.mark.parametrize("matches,expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9),
                                              (4, 1.0), (10, 1.0)])
def test_leave_one_out_mean(matches, expected):
    answers = ["dog"] * matches + ["cat"] * (10 - matches)
    # by hand: m subsets keep m-1 matches, 10-m keep m: mean of min(1, k/3)
    by_hand = (matches * min(1, (matches - 1) / 3) + (10 - matches) * min(1, matches / 3)) / 10
    explicit = np.mean([min(1, sum(a == "dog" for a in sub) / 3)
                        for sub in itertools.combinations(answers, 9)])
    assert by_hand == pytest.approx(expected) and explicit == pytest.approx(expected)
    assert vqa_accuracy("dog", answers) == pytest.approx(expected, abs=1e-12)


def test_vqa_unanimous_annotators():
    gt = ["2"] * 10
    assert vqa_accuracy("2", gt) == 1.0
    assert vqa_accuracy("Two", gt) == 1.0     # the prediction is always normalised
    assert vqa_accuracy(" two. ", gt) == 1.0
    assert vqa_accuracy("3", gt) == 0.0
    # unanimous ground truth is compared verbatim by the official code: a raw, never
    # normalised "Two" or "dog." in the annotations matches nothing ...
    assert vqa_accuracy("two", ["Two"] * 10) == 0.0
    assert vqa_accuracy("dog", ["dog."] * 10) == 0.0
    # ... unless asked to normalise raw ground truth first
    assert vqa_accuracy("two", ["Two"] * 10, normalize_gt=True) == 1.0
    assert vqa_accuracy("dog", ["dog."] * 10, normalize_gt=True) == 1.0


def test_vqa_disagreeing_annotators():
    # 3 say "2", 2 say "two", 5 say "3": the official code only strips punctuation from
    # disagreeing answers, so "two" stays "two" and the prediction "Two" -> "2" has 3 matches
    gt = ["2", "2", "2", "two", "two", "3", "3", "3", "3", "3"]
    assert vqa_accuracy("Two", gt) == pytest.approx(0.9)
    assert vqa_accuracy("2", gt) == pytest.approx(0.9)
    assert vqa_accuracy("3", gt) == pytest.approx(1.0)
    assert vqa_accuracy("two", gt, normalize_gt=True) == pytest.approx(1.0)  # 5 matches
    # articles, punctuation, case in the prediction
    gt = ["dog", "dog", "cat", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]
    for pred in ["dog", "a dog", "the Dog.", "DOG", "an dog!", "dog?"]:
        assert vqa_accuracy(pred, gt) == pytest.approx(0.6), pred
    # disagreeing ground truth goes through processPunctuation: "dog." -> "dog"
    gt = ["dog.", "dog", "dog,", "cat", "cat", "cat", "cat", "cat", "cat", "cat"]
    # "dog," -> "dog " (the comma becomes a space and the official code does not strip)
    assert vqa_accuracy("dog", gt) == pytest.approx(0.6)
    # "yes/no" -> "yes no" matches; "yes / no" -> "yes  no" (slash deleted, the two spaces
    # are not collapsed on the ground-truth side) does not
    gt = ["yes/no", "yes / no", "yes", "no", "no", "no", "no", "no", "no", "no"]
    assert vqa_accuracy("yes no", gt) == pytest.approx(0.3)
    assert vqa_accuracy("Yes/No", gt) == pytest.approx(0.3)


def test_answer_scores_soft_targets():
    gt = ["2", "2", "two", "Two", "3", "3", "a dog", "dog.", "Dog", "cat"]
    # normalised: 2 x4, 3 x2, dog x3, cat x1 -> 1.0, 0.6, 0.9, 0.3
    scores = answer_scores(gt)
    assert scores.keys() == {"2", "3", "dog", "cat"}
    for k, v in {"2": 1.0, "3": 0.6, "dog": 0.9, "cat": 0.3}.items():
        assert scores[k] == pytest.approx(v, abs=1e-12), k
    # each equals the accuracy of predicting it against the normalised answers (not the official one)
    for k, v in scores.items():
        assert v == pytest.approx(vqa_accuracy(k, gt, normalize_gt=True))
    assert answer_scores(["yes"] * 10) == {"yes": 1.0}
    with pytest.raises(ValueError):
        answer_scores([])


def test_vqa_eval_aggregates():
    gt = {1: ["yes"] * 10, 2: ["2"] * 3 + ["3"] * 7, 3: ["red"] * 10}
    pred = {1: "Yes", 2: "two", 3: "blue"}
    out = vqa_eval(pred, gt, answer_types={1: "yes/no", 2: "number", 3: "other"})
    assert out["n"] == 3
    assert out["accuracy"] == pytest.approx(100 * (1.0 + 0.9 + 0.0) / 3)
    assert out["per_question"] == {1: 1.0, 2: pytest.approx(0.9), 3: 0.0}
    assert out["per_answer_type"] == {"yes/no": 100.0, "number": pytest.approx(90.0),
                                      "other": 0.0}
    with pytest.raises(ValueError, match="no prediction"):
        vqa_eval({1: "yes"}, gt)
    with pytest.raises(ValueError, match="unknown question"):
        vqa_eval({**pred, 9: "x"}, gt)


def test_majority_answer_baseline_is_scored_officially():
    """The baseline a model's official ``accuracy`` is compared with uses the same metric."""
    from vltrain.metrics.vqa import majority_answer_baseline
    vocab = ["2", "3"]
    train = [{"target_ids": [0], "target_scores": [1.0]}, {"target_ids": [1], "target_scores": [0.6]}]
    val = [{"answers": ["two"] * 7 + ["2"] * 3}, {"answers": ["2"] * 10}]
    # official: 3 verbatim matches -> 0.9, then 1.0 (normalising "two" would give 1.0 twice)
    assert majority_answer_baseline(train, val, vocab) == ("2", pytest.approx(95.0))


# --------------------------------------------------------------- multiple choice / boxes
def test_multiple_choice_accuracy():
    scores = torch.tensor([[0.1, 2.0, 0.3, 0.0], [5.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0],
                           [1.0, 1.0, 0.0, 0.0]])
    labels = torch.tensor([1, 0, 2, 1])  # last row: a tie goes to the first choice
    assert multiple_choice_accuracy(scores, labels) == 0.5
    assert multiple_choice_accuracy(scores.tolist(), [1, 0, 3, 0]) == 1.0
    with pytest.raises(ValueError):
        multiple_choice_accuracy(scores, [1, 0, 4, 0])


def test_box_iou_edge_cases():
    a = [0.0, 0.0, 2.0, 2.0]
    assert box_iou(a, a) == 1.0
    assert box_iou(a, [1.0, 1.0, 3.0, 3.0]) == pytest.approx(1 / 7)
    assert box_iou(a, [2.0, 0.0, 4.0, 2.0]) == 0.0     # touching edges
    assert box_iou(a, [5.0, 5.0, 6.0, 6.0]) == 0.0     # disjoint
    assert box_iou(a, [0.5, 0.5, 1.5, 1.5]) == 0.25    # contained
    assert box_iou(a, [1.0, 1.0, 1.0, 1.0]) == 0.0     # zero-area box
    assert box_iou([1, 1, 1, 1], [1, 1, 1, 1]) == 0.0  # 0/0 is 0, not NaN
    assert box_iou(a, [2.0, 2.0, 0.0, 0.0]) == 0.0     # inverted box has no area
    m = box_iou(torch.tensor([a, [1.0, 1.0, 3.0, 3.0]]), torch.tensor([a, a, [9.0, 9, 10, 10]]))
    assert isinstance(m, torch.Tensor) and m.shape == (2, 3)
    torch.testing.assert_close(m, torch.tensor([[1.0, 1.0, 0.0], [1 / 7, 1 / 7, 0.0]]))
    p = paired_box_iou(np.array([a, a]), np.array([a, [0.0, 0.0, 1.0, 2.0]]))
    np.testing.assert_allclose(p, [1.0, 0.5])
    with pytest.raises(ValueError):
        box_iou([0, 0, 1], a)


def test_grounding_accuracy_threshold():
    gt = torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4)
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0],    # IoU 1
                         [0.0, 0.0, 1.0, 0.5],    # IoU exactly 0.5 -> counts
                         [0.0, 0.0, 1.0, 0.49],   # IoU 0.49 -> misses
                         [2.0, 2.0, 3.0, 3.0]])   # disjoint
    assert grounding_accuracy(pred.double(), gt.double()) == 0.5
    assert grounding_accuracy(pred, gt, thresh=0.4) == 0.75
    with pytest.raises(ValueError):
        grounding_accuracy(pred[:3], gt)


def test_pixel_inclusive_iou_is_vlbert_cacluate_iou():
    """VL-BERT's test code adds one pixel to every side (boxes in pixels): the README's case,
    a 40 x 40 prediction inside a 40 x 81 target, is a miss continuously and a hit there."""
    gt = np.array([[10.0, 10.0, 50.0, 91.0]])
    pred = np.array([[10.0, 10.0, 50.0, 50.0]])
    assert paired_box_iou(pred, gt)[0] == pytest.approx(1600 / 3240)
    assert paired_box_iou(pred, gt, pixel_inclusive=True)[0] == pytest.approx(41 * 41 / (41 * 82))
    assert grounding_accuracy(pred, gt) == 0.0 and grounding_accuracy(pred, gt, pixel_inclusive=True) == 1.0
    # their formula, written out, on random pixel boxes (disjoint ones included)
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (200, 2, 2))
    a, b = np.concatenate([xy[:, 0], xy[:, 0] + rng.uniform(0, 60, (200, 2))], 1), \
        np.concatenate([xy[:, 1], xy[:, 1] + rng.uniform(0, 60, (200, 2))], 1)
    inter = (np.minimum(a[:, 2], b[:, 2]) - np.maximum(a[:, 0], b[:, 0]) + 1).clip(0) * \
        (np.minimum(a[:, 3], b[:, 3]) - np.maximum(a[:, 1], b[:, 1]) + 1).clip(0)
    area = lambda x: (x[:, 2] - x[:, 0] + 1) * (x[:, 3] - x[:, 1] + 1)  # noqa: E731
    np.testing.assert_allclose(paired_box_iou(a, b, pixel_inclusive=True), inter / (area(a) + area(b) - inter))


def test_caption_task_scoring_without_java(monkeypatch, tmp_path):
    """mode=eval needs the COCO protocol: no Java is an error. Validation during training goes
    on with CIDEr-D on the pure-Python tokenizer, under its own name (the best checkpoint is
    kept by CIDEr, so it is not updated from it); an empty split or an image without
    references is an error naming it."""
    from vltrain.tasks.caption import _check_references, score_captions
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(JavaNotFoundError, match="java not found"):
        score_captions(REFS, CANDS, final=True)
    numeric, full = score_captions(REFS, CANDS, final=False)
    assert set(numeric) == {"CIDEr_simple"} and full["CIDEr"] is None and "Java missing" in full["status"]
    expect = CiderD(REFS, tokenize="simple")([(i, CANDS[i]) for i in REFS]).mean()
    assert numeric["CIDEr_simple"] == pytest.approx(float(expect))
    with pytest.raises(ValueError, match="data.val: no image"):
        _check_references("val", {})
    with pytest.raises(ValueError, match="data.test: 1 image.* image_id 42"):
        _check_references("test", {7: ["a cat"], 42: []})


@pytest.mark.parametrize("stop_requested", [True, False], ids=["after_stop_signal", "no_stop_signal"])
def test_a_scorer_ended_by_the_stop_signal_is_an_interruption_in_training(monkeypatch, stop_requested):
    """Slurm's USR1 reaches every process of the step, the PTB tokenizer's / METEOR's JVM too,
    and ends it. During training validation, with the stop flag set, that is no error: the
    validation has no scores and the run goes on to checkpoint. Without the flag it is one."""
    import signal
    import threading
    from tests.fixtures.java import signal_first_java_child
    from vltrain.engine.signals import STOP
    from vltrain.tasks.caption import _score_on_main
    monkeypatch.setattr(STOP, "signum", signal.SIGUSR1 if stop_requested else None)
    found: list = []
    killer = threading.Thread(target=signal_first_java_child, args=(signal.SIGUSR1, found))
    killer.start()
    numeric, full, err = _score_on_main("val", REFS, CANDS, final=False)
    killer.join()
    assert found, "no java child was seen"
    if stop_requested:
        assert err is None and numeric == {} and "stop signal ended the scorer" in full["status"]
    else:
        assert numeric == {} and "(Java) failed" in err            # PTB tokenizer's or METEOR's


def test_eval_ignores_usr1_and_so_do_the_processes_it_starts():
    """mode=eval is not preemptible: it ignores SIGUSR1, and a child started afterwards (the
    scorers' Java) inherits that across exec; a child of a process that handles USR1 does not.
    SIGTERM ends an evaluation at once; in training it only asks for a checkpoint and a stop."""
    script = textwrap.dedent("""
        import os, signal, subprocess, sys, time
        from vltrain.engine.signals import STOP
        STOP.install()
        if sys.argv[1] == "eval":
            STOP.not_preemptible()
        child = subprocess.Popen(["sleep", "30"])
        os.kill(child.pid, signal.SIGUSR1)
        time.sleep(0.5)
        print("alive" if child.poll() is None else f"ended {child.returncode}", flush=True)
        child.kill()
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.5)
        print("stop requested" if STOP.requested else "running", flush=True)
    """)
    for mode, want, code in (("eval", ["alive"], -15), ("train", ["ended -10", "stop requested"], 0)):
        p = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, timeout=120,
                           cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert (p.stdout.split("\n")[:-1], p.returncode) == (want, code), (mode, p.stdout, p.stderr)


def test_vcr_joint_accuracy_from_two_evaluations(tmp_path, capsys):
    """Q->AR counts a question when both its answer and its rationale are right (VCR)."""
    from vltrain.metrics.vcr import main as vcr_main

    def write(name, preds_labels):
        d = tmp_path / name
        d.mkdir()
        recs = {str(k): {"image_id": "x", "probs": [0.25] * 4, "pred": p, **({"label": y} if y is not None else {})}
                for k, (p, y) in preds_labels.items()}
        (d / "predictions.json").write_text(json.dumps(recs))
        return str(d)

    qa = write("qa", {1: (0, 0), 2: (1, 1), 3: (2, 2), 4: (3, 0)})       # right on 1, 2, 3
    qar = write("qar", {1: (1, 0), 2: (1, 1), 3: (0, 0), 4: (2, 2)})     # right on 2, 3, 4
    assert vcr_main([qa, os.path.join(qar, "predictions.json")]) == 0
    assert json.loads(capsys.readouterr().out) == {"Q->A": 75.0, "QA->R": 75.0, "Q->AR": 50.0, "num_samples": 4.0}
    other = write("other", {1: (0, 0), 2: (1, 1), 3: (2, 2), 5: (0, 0)})
    assert vcr_main([qa, other]) == 2
    assert "1 only in Q->A (e.g. ['4']), 1 only in QA->R (e.g. ['5'])" in capsys.readouterr().err
    test = write("test", {1: (0, None), 2: (1, None), 3: (2, None), 4: (0, None)})
    assert vcr_main([qa, test]) == 2
    assert "4 questions have no label" in capsys.readouterr().err


def test_vcr_leaderboard_csv_from_five_evaluations(tmp_path, capsys):
    """The test split's submission: per annot_id (annotation order) the answers' probabilities
    and the rationales' given each candidate answer, in R2C's eval_for_leaderboard.py columns."""
    import csv
    from vltrain.metrics.vcr import main as vcr_main, sample_id_of

    annot_ids = ["test-5", "test-2", "test-odd-name"]      # the last one's sample id is a hash
    (tmp_path / "test.jsonl").write_text("".join(json.dumps({"annot_id": a, "question": []}) + "\n"
                                                  for a in annot_ids))

    def probs(which, a):              # distinct per evaluation and question
        return [round(0.1 * which + 0.01 * i + 0.001 * len(a), 6) for i in range(4)]

    evals = []
    for which in range(5):
        d = tmp_path / f"eval{which}"
        d.mkdir()
        recs = {str(sample_id_of(a)): {"image_id": "x", "probs": probs(which, a), "pred": 0} for a in annot_ids}
        (d / "predictions.json").write_text(json.dumps(recs))
        evals.append(str(d))
    out = tmp_path / "submission.csv"
    args = ["--leaderboard", str(out), "--annotations", str(tmp_path / "test.jsonl")]
    assert vcr_main([*args, *evals]) == 0
    rows = list(csv.reader(out.open()))
    assert rows[0] == (["annot_id"] + [f"answer_{i}" for i in range(4)] +
                       [f"rationale_conditioned_on_a{a}_{i}" for a in range(4) for i in range(4)])
    assert [r[0] for r in rows[1:]] == annot_ids
    for r, a in zip(rows[1:], annot_ids):
        assert [float(x) for x in r[1:]] == [p for which in range(5) for p in probs(which, a)]

    assert vcr_main([*args, *evals[:4]]) == 2                      # one conditioned evaluation short
    assert "takes 5 evaluations" in capsys.readouterr().err
    (tmp_path / "test.jsonl").write_text(json.dumps({"annot_id": "test-9"}) + "\n")
    assert vcr_main([*args, *evals]) == 2
    assert "annot_id test-9 (sample id 9) is not in the Q->A evaluation" in capsys.readouterr().err


def test_scst_reads_a_captions_datasets_references_file_not_its_shards(synthetic_corpus, tmp_path, caplog):
    """Self-critical training's references from a captions dataset: its references.jsonl (every
    rank read every shard, region features included: tens of GB for COCO before the first
    collective), equal to the shards' captions; a dataset converted before the file, or copied
    without it, is read from its shards, saying so; another kind of dataset is named."""
    import shutil
    from vltrain.data.errors import MetaError
    from vltrain.data.schema import references_key
    from vltrain.tasks.scst import iter_mds_samples, read_caption_references
    split = os.path.join(synthetic_corpus, "captions", "train")
    from_shards = {references_key(s): list(s["captions"]) for s in iter_mds_samples(split)}
    assert len(from_shards) > 100
    light = tmp_path / "light"                     # the file alone: no shard is read
    shutil.copytree(split, light, ignore=shutil.ignore_patterns("*.mds*"))
    assert not list(light.glob("*.mds*"))
    assert read_caption_references(str(light)) == from_shards
    lost = tmp_path / "lost"                       # copied without it
    shutil.copytree(split, lost)
    os.remove(lost / "references.jsonl")
    with caplog.at_level("WARNING", logger="vltrain.tasks.scst"):
        assert read_caption_references(str(lost)) == from_shards
    assert "no references.jsonl; is this a dataset written by data_tools?; reading the references from the " \
           "shards instead" in caplog.text
    caplog.clear()
    old = tmp_path / "old"                         # converted before references.jsonl
    shutil.copytree(lost, old)
    meta = json.loads((old / "vltrain_meta.json").read_text())
    del meta["references_file"]
    (old / "vltrain_meta.json").write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="vltrain.tasks.scst"):
        assert read_caption_references(str(old)) == from_shards
    assert "reading its references from every shard, region features included (a dataset without " \
           "references.jsonl" in caplog.text
    with pytest.raises(MetaError, match=r"dataset .*/vqa/train is a 'vqa' dataset, not a captions one"):
        read_caption_references(os.path.join(synthetic_corpus, "vqa", "train"))


def test_each_sampled_caption_is_scored_against_its_own_images_greedy_caption():
    """Two images, two samples each (image-major, as sample_captions returns them): sample j's
    baseline is image j // 2's greedy reward. Pairing them image-minor (repeat, not
    repeat_interleave) leaves the mean advantage alone and changes the loss."""
    from vltrain.tasks.scst import self_critical_loss
    r_sample, r_greedy = torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0])
    logps = torch.tensor([[0.0, 0.5], [1.0, 0.0], [0.0, 0.0], [0.0, 2.0]])
    mask = torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])   # 6 sampled tokens
    loss, adv = self_critical_loss(r_sample, r_greedy, logps, mask)
    assert adv.tolist() == [-9.0, -8.0, -17.0, -16.0]
    assert float(loss) == pytest.approx(-(-8.0 * 1.0 + -16.0 * 2.0) / 6)


def test_scst_references_json_needs_a_list_per_image(tmp_path):
    """task.scst_references as JSON: each image maps to a list of captions. A bare string
    would have been read as one-character captions (silently wrong CIDEr-D rewards)."""
    from vltrain.data.errors import MetaError
    from vltrain.tasks.scst import read_caption_references
    good = tmp_path / "refs.json"
    good.write_text(json.dumps({"1": ["a dog runs", "a dog"], "2": ["a cat"]}))
    assert read_caption_references(str(good)) == {"1": ["a dog runs", "a dog"], "2": ["a cat"]}
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"1": ["a dog"], "2": "a cat sits"}))
    with pytest.raises(MetaError, match="bad.json: image 2: expected a list of captions, got str"):
        read_caption_references(str(bad))
    # references of other images than data.train's (COCO's integer ids against file names, or
    # another split): the first batch names the key, not a bare KeyError repeated per sample
    from vltrain.decoding import DecodeOptions
    from vltrain.tasks.scst import SelfCritical
    from vltrain.tokenization import Tokenizer
    tok = Tokenizer("bert-base-uncased")
    scst = SelfCritical(read_caption_references(str(good)), tok, DecodeOptions(), source=f"task.scst_references={good}")
    caps = [tok.encode("a dog")] * 3
    assert scst.rewards(["1", "2", "1"], caps).shape == (3,)
    with pytest.raises(ValueError, match=r"task.scst_references=.*refs.json has no reference captions for 1 "
                                         r"image\(s\) of this batch, e.g. \['COCO_7'\]: its image ids must be "
                                         r"data.train"):
        scst.rewards(["1", "COCO_7", "COCO_7"], caps)
