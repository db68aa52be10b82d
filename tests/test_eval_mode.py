"""``mode=eval`` (issue 7): ``vltrain/run.py --config configs/<task>.yaml mode=eval
train.init_from=<checkpoint>`` on several ranks keeps every sample exactly once, writes the
predictions keyed by sample id plus the submission format, logs to TensorBoard and prints,
and scores exactly what one rank scores.

Launches (gloo, CPU, debug model, the synthetic corpus's word vocabulary):
  1 rank   fine-tunes vqa (VL-BERT's [MASK] head, so both heads run end to end in the suite)
           / refs / mc briefly (checkpoints), then evaluates each checkpoint in mode=eval on
           an odd-sized split
  2 ranks  ``python vltrain/run.py ... mode=eval`` (the CLI) for VQA on the same split
  2 ranks  mode=eval for refs and mc (the worker calls what run.py calls), and for VQA from an
           ``vltrain-ckpt export-hf`` of its checkpoint (the head comes from the export)
The odd sizes (251 / 127 / 63 samples) make streaming pad one rank's share with a repeated
sample, which the evaluation must drop. The VQA evaluations keep 2 regions of every image (each
has at least 3), so metrics.json must count every sample as cut exactly once, the repeat too.
The last 3 multiple-choice samples are bad (NaN features) and skipped (data.skip_bad_samples):
metrics.json counts them once each, on one rank and on two, apart from num_samples. The refs
split's meta records inputs its converter skipped: metrics.json repeats them.
"""
import json
import os

import pytest

from tests.fixtures.procs import run_folder_holder
from tests.fixtures.tasks import run_ranks, run_tasks_worker, synthetic_vocab, write_subset

SIZES = {"vqa": ("test", 251), "refs": ("val", 127), "mc": ("val", 63)}
TRAIN_STEPS = 100
TASK_OVERRIDES = {"vqa": ["task.vqa_head=vlbert"], "refs": [], "mc": []}
EVAL_CUT = {"vqa": ["data.max_regions=2"]}
BAD = {"mc": 3}
CONVERTER_SKIPPED = {"refs": {"bad_box": 2, "missing_annotation": 1}}
# what convert_refs records beside them: the 3 bad refs held 7 of the input's expressions, which
# the official scorer would count
CONVERTER_LEFT_OUT = {"refs": {"samples_left_out": 7, "input_samples": SIZES["refs"][1] + 7,
                               "input_unit": "expressions"}}


def common(root, vocab, nvocab, task):
    return [f"data.cache_dir={root}/cache", f"data.vocab={vocab}", f"model.vocab_size={nvocab}",
            "data.val=", "train.dist_timeout_s=60", *TASK_OVERRIDES[task]]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, synthetic_corpus):
    root = str(tmp_path_factory.mktemp("evalmode"))
    vocab, nvocab = synthetic_vocab(synthetic_corpus, os.path.join(root, "vocab"))
    subsets, runs1, evals = {}, [], {}
    for task, (split, n) in SIZES.items():
        dst = os.path.join(root, "data", f"{task}_{split}{n}")
        skipped = CONVERTER_SKIPPED.get(task)
        converter = {"skipped": skipped, "skipped_total": sum(skipped.values()), **CONVERTER_LEFT_OUT[task]} \
            if skipped else None
        subsets[task] = (dst, write_subset(os.path.join(synthetic_corpus, task, split), dst, n, BAD.get(task, 0),
                                           converter))
        runs1.append({"name": f"train_{task}", "config": f"configs/{task}_debug.yaml", "overrides": [
            f"output_root={root}/train", f"data.train={synthetic_corpus}/{task}/train",
            f"train.max_steps={TRAIN_STEPS}", "train.warmup_steps=5", "train.val_every=0", "data.num_workers=0",
            *common(root, vocab, nvocab, task)]})
        ckpt = os.path.join(root, "train", f"{task}-debug", "checkpoints", f"step_{TRAIN_STEPS:08d}")
        evals[task] = ["mode=eval", f"train.init_from={ckpt}", "task.eval_split=test", f"data.test={dst}",
                       "data.train=/nonexistent/train/data/is/not/needed", *common(root, vocab, nvocab, task),
                       "data.val=/nonexistent/val/data/is/not/read/by/an/eval/of/test",
                       *EVAL_CUT.get(task, []), *(["data.skip_bad_samples=true"] if task in BAD else [])]
    for task in SIZES:
        runs1.append({"name": f"eval_{task}", "config": f"configs/{task}_debug.yaml",
                      "overrides": [f"output_root={root}/one", *evals[task]]})
    codes, logs = run_tasks_worker({"out": os.path.join(root, "w1"), "runs": runs1}, 1, os.path.join(root, "logs1"))
    assert codes == [0], logs[0][-5000:]

    cli = ["vltrain/run.py", "--config", "configs/vqa_debug.yaml", f"output_root={root}/two", *evals["vqa"]]
    # a training of the same run_name holds its folder meanwhile: an evaluation runs beside it
    holder = run_folder_holder(os.path.join(root, "two", "vqa-debug"))
    try:
        codes, cli_logs = run_ranks(cli, 2, os.path.join(root, "logs_cli"))
    finally:
        holder.kill()
        holder.wait()
    assert codes == [0, 0], cli_logs[0][-5000:] + cli_logs[1][-2000:]

    from vltrain.ckpt.__main__ import main as ckpt_main
    export = os.path.join(root, "vqa-export")
    ckpt = os.path.join(root, "train", "vqa-debug", "checkpoints", f"step_{TRAIN_STEPS:08d}")
    assert ckpt_main(["export-hf", ckpt, export]) == 0
    runs2 = [{"name": f"eval_{t}", "config": f"configs/{t}_debug.yaml", "overrides": [f"output_root={root}/two", *evals[t]]}
             for t in ("refs", "mc")]
    runs2.append({"name": "eval_vqa_export", "config": "configs/vqa_debug.yaml",
                  "overrides": [f"output_root={root}/export", *evals["vqa"], f"train.init_from={export}"]})
    codes, logs2 = run_tasks_worker({"out": os.path.join(root, "w2"), "runs": runs2}, 2, os.path.join(root, "logs2"))
    assert codes == [0, 0], logs2[0][-5000:] + logs2[1][-2000:]

    def files(world, task):
        d = os.path.join(root, "one" if world == 1 else "two", f"{task}-debug", "eval", f"test_step{TRAIN_STEPS:08d}")
        out = {}
        for name in os.listdir(d):
            with open(os.path.join(d, name)) as f:
                out[name] = json.load(f)
        return out

    d = os.path.join(root, "export", "vqa-debug", "eval", f"test_step{TRAIN_STEPS:08d}")      # the export's step
    exported = {name: json.load(open(os.path.join(d, name))) for name in os.listdir(d)}
    return {"root": root, "subsets": subsets, "cli_log": cli_logs[0], "exported": exported,
            "res": {(w, t): files(w, t) for w in (1, 2) for t in SIZES}}


def test_an_export_of_a_fine_tuned_checkpoint_evaluates_with_its_head(evaluated):
    """export-hf keeps the VQA head under vltrain's names: train.init_from=<the export> loads
    it, and the evaluation predicts what the checkpoint's own does."""
    ref, got = evaluated["res"][(2, "vqa")], evaluated["exported"]
    assert got["metrics.json"]["metrics"] == pytest.approx(ref["metrics.json"]["metrics"], abs=1e-6)
    assert {s: p["answer"] for s, p in got["predictions.json"].items()} == \
        {s: p["answer"] for s, p in ref["predictions.json"].items()}


@pytest.mark.parametrize("task", list(SIZES))
def test_two_ranks_keep_each_sample_once_and_match_one_rank(evaluated, task):
    _, rows = evaluated["subsets"][task]
    assert len(rows) == SIZES[task][1]
    bad = BAD.get(task, 0)
    rows = rows[:len(rows) - bad]                                          # the scored ones
    ids = sorted(str(r["sample_id"]) for r in rows)
    one, two = evaluated["res"][(1, task)], evaluated["res"][(2, task)]
    for res in (one, two):
        assert sorted(res["predictions.json"]) == ids                      # each sample, once
        assert res["metrics.json"]["num_samples"] == len(rows)
        assert res["metrics.json"]["metrics"]["num_samples"] == len(rows)
        assert res["metrics.json"]["step"] == TRAIN_STEPS and res["metrics.json"]["split"] == "test"
        assert res["metrics.json"]["truncated"] == {"text": 0, "regions": len(rows) if task in EVAL_CUT else 0}
        assert res["metrics.json"]["skipped"] == bad
        assert res["metrics.json"]["repeated_ids"] == 0          # streaming's padding repeats are no such thing
        assert res["metrics.json"]["converter_skipped"] == CONVERTER_SKIPPED.get(task, {})
        assert res["metrics.json"]["converter_left_out"] == CONVERTER_LEFT_OUT.get(
            task, {"samples_left_out": 0, "input_samples": 0, "input_unit": ""})
    assert one["metrics.json"]["metrics"] == pytest.approx(two["metrics.json"]["metrics"], abs=1e-9)
    for sid in ids:
        a, b = one["predictions.json"][sid], two["predictions.json"][sid]
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5), (task, sid, k, a[k], b[k])
    # The checkpoint learned something, so equal predictions are not a constant answer.
    key = {"vqa": "answer", "refs": "region", "mc": "pred"}[task]
    assert len({p[key] for p in one["predictions.json"].values()}) > 1


def test_vqa_submission_file_holds_every_question_once(evaluated):
    _, rows = evaluated["subsets"]["vqa"]
    for world in (1, 2):
        res = evaluated["res"][(world, "vqa")]
        sub = res["vqa_results.json"]
        assert isinstance(sub, list) and all(set(r) == {"question_id", "answer"} for r in sub)
        assert [r["question_id"] for r in sub] == sorted(r["question_id"] for r in rows)
        by_sid = {str(r["sample_id"]): r["question_id"] for r in rows}
        answers = {p["question_id"]: p["answer"] for sid, p in res["predictions.json"].items()
                   if p["question_id"] == by_sid[sid]}
        assert len(answers) == len(rows) and all(answers[r["question_id"]] == r["answer"] for r in sub)


def test_eval_results_are_in_tensorboard_and_printed(evaluated):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    m = evaluated["res"][(2, "vqa")]["metrics.json"]["metrics"]
    # a TensorBoard run of its own (tensorboard/eval): mode=eval of the val split in the training
    # run's folder put a second val/ point beside the training's at the same step
    acc = EventAccumulator(os.path.join(evaluated["root"], "two", "vqa-debug", "tensorboard", "eval"),
                           size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("test/accuracy")] == [(TRAIN_STEPS, pytest.approx(m["accuracy"]))]
    assert f"eval test step {TRAIN_STEPS} | num_samples 251 | accuracy {m['accuracy']:.4g}" in evaluated["cli_log"]
    assert ("test evaluation: 251 of 251 samples have more regions than data.max_regions allows"
            in evaluated["cli_log"]), evaluated["cli_log"][-3000:]


def test_eval_needs_the_tasks_own_weights(evaluated, synthetic_corpus):
    """init_from loads a checkpoint's task head; in mode=eval a checkpoint of another task (no
    VQA head in it) is refused, naming what is missing, instead of predicting at random."""
    import torch
    from vltrain.config import load_config
    from vltrain.engine.build import init_weights, load_task_weights
    from vltrain.model import VLModel
    from vltrain.tasks import get_task
    root = evaluated["root"]
    vocab, nvocab = synthetic_vocab(synthetic_corpus, os.path.join(root, "vocab"))
    ckpt = {t: os.path.join(root, "train", f"{t}-debug", "checkpoints", f"step_{TRAIN_STEPS:08d}") for t in SIZES}
    cfg = load_config("configs/vqa_debug.yaml", [f"data.train={synthetic_corpus}/vqa/train", f"data.vocab={vocab}",
                                                 f"model.vocab_size={nvocab}", "data.val=", *TASK_OVERRIDES["vqa"]])
    task = get_task("vqa").build_module(cfg, VLModel(cfg.model))
    state = init_weights(task.model, ckpt["vqa"])
    assert sorted(state) == sorted(n for n, _ in task.named_parameters() if n.startswith("head."))
    load_task_weights(task, state, ckpt["vqa"], require_heads=True)
    assert all(torch.equal(p, state[n]) for n, p in task.named_parameters() if n in state)

    other = get_task("vqa").build_module(cfg, VLModel(cfg.model))
    refs_state = init_weights(other.model, ckpt["refs"])
    with pytest.raises(ValueError, match=r"has no weights for \['head.decoder.bias'.*fine-tuned for this task"):
        load_task_weights(other, refs_state, ckpt["refs"], require_heads=True)


def test_fine_tuning_takes_no_head_of_another_task_or_answer_vocabulary(evaluated, synthetic_corpus, caplog):
    """A grounding head and VL-BERT's VQA head share names and shapes (head.transform.*): name
    matching loaded one into the other when fine-tuning from the other task's checkpoint. Heads
    come only from a source of the same task, and for VQA of the same answer vocabulary."""
    import torch
    from vltrain.config import load_config
    from vltrain.engine.build import head_source_problem, init_weights, load_task_weights
    from vltrain.model import VLModel
    from vltrain.tasks import get_task
    root = evaluated["root"]
    vocab, nvocab = synthetic_vocab(synthetic_corpus, os.path.join(root, "vocab"))
    ckpt = os.path.join(root, "train", "refs-debug", "checkpoints", f"step_{TRAIN_STEPS:08d}")
    cfg = load_config("configs/vqa_debug.yaml", [f"data.train={synthetic_corpus}/vqa/train", f"data.vocab={vocab}",
                                                 f"model.vocab_size={nvocab}", "data.val=", *TASK_OVERRIDES["vqa"]])
    task = get_task("vqa").build_module(cfg, VLModel(cfg.model))
    refs_state = init_weights(task.model, ckpt)
    assert any(n.startswith("head.transform.") and n in dict(task.named_parameters()) for n in refs_state)
    built = {n: p.detach().clone() for n, p in task.named_parameters() if n.startswith("head.")}
    skip = head_source_problem(cfg, "refs", "")
    assert skip == "it was trained for task refs, not vqa: its heads mean other things"
    with caplog.at_level("WARNING", logger="vltrain.engine.build"):
        load_task_weights(task, refs_state, ckpt, require_heads=False, same_task=False, skip=skip)
    assert all(torch.equal(p, built[n]) for n, p in task.named_parameters() if n in built)    # as the task built it
    assert f"train.init_from={ckpt}: its head weights not loaded: it was trained for task refs" in caplog.text
    vocab_sha = cfg.task.answer_vocab_sha256
    assert vocab_sha and head_source_problem(cfg, "vqa", vocab_sha) == "" and head_source_problem(cfg, "vqa", "") == ""
    assert "another answer vocabulary" in head_source_problem(cfg, "vqa", "0" * 64)


@pytest.mark.parametrize("task", ["vqa", "mc"])
def test_eval_of_a_split_that_cannot_be_opened_names_it_and_leaves_no_run_folder(evaluated, synthetic_corpus,
                                                                                tmp_path, task):
    """The evaluated split is opened after the start (VQA reads its answer vocabulary while
    building the head, the others in the evaluation itself): its error names the key, and the
    run folder made for the evaluation is not left behind empty."""
    from tests.fixtures.corpus import Ranks
    from vltrain.engine.distributed import free_port
    root = evaluated["root"]
    vocab, nvocab = synthetic_vocab(synthetic_corpus, os.path.join(root, "vocab"))
    split = SIZES[task][0]
    ckpt = os.path.join(root, "train", f"{task}-debug", "checkpoints", f"step_{TRAIN_STEPS:08d}")
    args = ["--config", f"configs/{task}_debug.yaml", "mode=eval", f"task.eval_split={split}",
            f"train.init_from={ckpt}", f"output_root={tmp_path}", "run_name=ev",
            *common(root, vocab, nvocab, task), f"data.{split}={tmp_path / 'nowhere'}"]
    ranks = Ranks(args, 1, str(tmp_path / "logs"), free_port())
    assert ranks.wait(300) == [2], ranks.log(0)[-3000:]
    assert f"data.{split}: dataset {tmp_path / 'nowhere'}: folder does not exist" in ranks.log(0), ranks.log(0)
    assert not (tmp_path / "ev").exists(), os.listdir(tmp_path / "ev")


def test_eval_refuses_a_split_converted_with_another_answer_vocabulary(evaluated, synthetic_corpus, tmp_path):
    """The same answers in another order (a split converted without the training split's
    --answer-vocab): the head's class ids would name other answers. The checkpoint's config
    records the vocabulary it was trained on (task.answer_vocab_sha256); mode=eval used to build
    the head from the evaluated split itself and score it silently (accuracy 30 vs 47.5)."""
    import shutil
    from tests.fixtures.corpus import Ranks
    from vltrain.engine.distributed import free_port
    from vltrain.tasks.vqa import read_answer_vocab
    root = evaluated["root"]
    vocab, nvocab = synthetic_vocab(synthetic_corpus, os.path.join(root, "vocab"))
    ckpt = os.path.join(root, "train", "vqa-debug", "checkpoints", f"step_{TRAIN_STEPS:08d}")
    other = tmp_path / "val_other_vocab"
    shutil.copytree(f"{synthetic_corpus}/vqa/val", other)
    # another order, one answer fewer: the vocabulary is named, not its size (task.num_answers)
    (other / "answer_vocab.json").write_text(json.dumps(read_answer_vocab(str(other))[::-1][:-1]))
    args = ["--config", "configs/vqa_debug.yaml", "mode=eval", "task.eval_split=val", f"train.init_from={ckpt}",
            f"output_root={tmp_path}", "run_name=ev", *common(root, vocab, nvocab, "vqa"), f"data.val={other}"]
    ranks = Ranks(args, 1, str(tmp_path / "logs"), free_port())
    assert ranks.wait(300) == [2], ranks.log(0)[-3000:]
    assert ("data.val: its answer_vocab.json differs from the one the head was trained on" in ranks.log(0)
            ), ranks.log(0)[-3000:]
    assert "task.num_answers" not in ranks.log(0), ranks.log(0)[-3000:]


def test_samples_sharing_a_sample_id_are_counted_not_silently_dropped(evaluated, synthetic_corpus, tmp_path):
    """Predictions are kept one per sample id: two samples of a split with one id were scored
    once between them without a word (a malformed-data audit: VQA 64 -> 62 samples,
    metrics.json skipped 0). Now metrics.json says how many went unscored, and the log warns."""
    from tests.fixtures.corpus import Ranks
    from vltrain.engine.distributed import free_port
    root = evaluated["root"]
    vocab, nvocab = synthetic_vocab(synthetic_corpus, os.path.join(root, "vocab"))
    ckpt = os.path.join(root, "train", "vqa-debug", "checkpoints", f"step_{TRAIN_STEPS:08d}")
    dst = str(tmp_path / "vqa_same_ids")
    write_subset(os.path.join(synthetic_corpus, "vqa", "val"), dst, 12, repeat_ids=2)
    args = ["--config", "configs/vqa_debug.yaml", "mode=eval", "task.eval_split=val", f"train.init_from={ckpt}",
            f"output_root={tmp_path}", "run_name=ev", *common(root, vocab, nvocab, "vqa"), f"data.val={dst}"]
    ranks = Ranks(args, 1, str(tmp_path / "logs"), free_port())
    assert ranks.wait(300) == [0], ranks.log(0)[-3000:]
    with open(tmp_path / "ev" / "eval" / f"val_step{TRAIN_STEPS:08d}" / "metrics.json") as f:
        metrics = json.load(f)
    assert (metrics["num_samples"], metrics["repeated_ids"], metrics["skipped"]) == (10, 2, 0), metrics
    assert "2 of the split's samples share a sample_id with another and were not scored" in ranks.log(0)

