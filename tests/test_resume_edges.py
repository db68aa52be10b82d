"""Edges of saving and resuming (one rank, real trainers; tests/workers/resume_edges.py):
a restart from an earlier step replaces the later steps it reaches and trains at its own
learning rate, a failed save of `best` keeps the previous `best`, a resume at another
precision is refused by name and train.precision=auto keeps the checkpoint's, a stop signal with a non-finite loss at the end of an
accumulated step still resumes exactly, so does a step that an epoch's end cuts, and a stop at a
validation step checkpoints first."""
import math
import shutil

import pytest

from tests.fixtures.corpus import run_one_rank

SCRIPT = "from tests.workers.resume_edges import main; main()"


@pytest.fixture(scope="module")
def edges(synthetic_corpus, tmp_path_factory):
    return run_one_rank(SCRIPT, synthetic_corpus, str(tmp_path_factory.mktemp("edges")))


def test_a_restart_from_an_earlier_step_trains_at_its_lr_and_replaces_the_steps_it_reaches(edges):
    base, restart = edges["base"], edges["restart"]
    assert base["code"] == 0 and restart["code"] == 0
    # The first update after the resume uses the new train.lr on the schedule at step 2,
    # not the interrupted run's rate (both groups).
    assert restart["lr_expected"] != pytest.approx(restart["lr_base_run"])
    assert restart["lr_after_build"] == pytest.approx([restart["lr_expected"]] * 2, rel=1e-12)
    assert restart["clip_after_build"] == 0.5         # its train.grad_clip, not the checkpoint's 1.0
    # and its Adam settings (the checkpoint's: decay 0.01, eps 1e-6, betas 0.9/0.999); biases
    # and LayerNorms stay undecayed
    assert restart["groups_after_build"] == [[0.05, 1e-8, [0.8, 0.99]], [0.0, 1e-8, [0.8, 0.99]]]
    # Its step 4 replaced the base run's (which the old end-of-run check took as saved).
    assert restart["step4_lr"] == 5e-4 and restart["latest"] == "step_00000004"
    # Step 3's loss is taken on step 2's weights (restored exactly); step 4's, after the new rate's update.
    assert sorted(restart["losses"]) == ["3", "4"] and restart["losses"]["3"] == base["losses"]["3"]
    assert restart["losses"]["4"] != base["losses"]["4"]
    assert [n for n in restart["names"] if n.startswith("step_")] == ["step_00000002", "step_00000004"]
    # the base run profiled step 2: its checkpoint save is in the window, as a phase of its own
    assert "| save | 1 |" in base["profile"] and "| forward | 1 |" in base["profile"], base["profile"]


def test_a_failed_save_of_best_keeps_the_previous_best(edges):
    best = edges["best"]
    assert best["first"]["step"] == 4 and best["first"]["tag"] == "best"
    assert "No space left on device" in best["failed"]
    assert best["kept"]["record"] == best["first"] and best["kept"]["mtime_same"]
    assert "best.partial" in best["kept"]["names"]                  # the cut-short save, left aside
    assert best["after"]["step"] == 5                              # the next save replaced it
    assert not [n for n in best["names"] if n.startswith("best.")], best["names"]
    # best/ is no resume point: its saves leave a due train.save_every_minutes checkpoint due
    # (a validation improving more often than the interval kept every timed save away)
    assert best["timed_due_after_best"] is True


def test_a_resume_at_another_precision_is_refused_by_name(edges):
    msg = edges["precision"]
    assert msg.startswith("CheckpointError"), msg
    for part in ("train.precision=fp32", "train.precision=bf16", "step_00000004", "vltrain-ckpt reshard"):
        assert part in msg, msg


def test_a_backend_the_device_cannot_train_with_is_refused_before_the_first_step(edges):
    """flex on CPU has no backward: refused as the run builds (it failed at step 1, after the
    run folder, its config.yaml and TensorBoard files were written)."""
    from vltrain.model.attention import FLEX_CPU_MESSAGE
    assert edges["backend"]["error"] == f"ValueError: {FLEX_CPU_MESSAGE}", edges["backend"]


def test_steps_skipped_on_a_gradient_overflow_are_counted(edges):
    """Infinite gradients with a finite loss at step 2 (bf16 with DeepSpeed's overflow check, as
    fp16 meets them): DeepSpeed skips the update and its schedule step; train/overflow_skipped
    counts it, and the lr logged at step 3 is still step 2's (the schedule lags by one)."""
    ovf = edges["overflow"]
    assert ovf["code"] == 0 and ovf["step"] == 4 and ovf["skipped"] == 1, ovf
    assert ovf["tag"] == [[1, 0.0], [2, 1.0], [3, 1.0], [4, 1.0]], ovf
    lr = dict(ovf["lr"])
    assert lr[2] == lr[3] > lr[4] > 0, ovf


def test_a_universal_checkpoint_resumed_at_another_precision_takes_this_runs_scaler_and_clipping(edges):
    """An fp16 run's checkpoint (dynamic loss scaler at 2^16) resharded and resumed in bf16:
    DeepSpeed's load would install the fp16 scaler, which would keep doubling in bf16 (no
    overflow checks); the run keeps its own static scale 1 and its own train.grad_clip."""
    uni = edges["uni16"]
    assert uni["code"] == 0 and uni["precision"] == "bf16", uni
    assert uni["scaler"] == "LossScaler" and uni["scale"] == 1.0 and uni["dynamic"] is False, uni
    assert uni["clip"] == uni["clip_after_build"] == 0.25, uni
    # the restart's checkpoint had decay 0.05, eps 1e-8, betas 0.8/0.99: this run's defaults
    assert uni["groups_after_build"] == [[0.01, 1e-6, [0.9, 0.999]], [0.0, 1e-6, [0.9, 0.999]]], uni


def test_auto_precision_resumes_at_the_checkpoints_precision(edges):
    """train.precision=auto (the default) is fp32 for a new run on CPU, and a run saved in bf16
    resumes in bf16 (an fp32 resume of it would be refused: the test above)."""
    auto = edges["auto_precision"]
    assert auto["new_run"] == "fp32" and auto["codes"] == [0, 0], auto
    assert auto["resumed"] == "bf16" and auto["saved"] == "bf16", auto
    assert sorted(auto["losses"]) == ["3"], auto


def test_a_stop_on_a_nonfinite_last_micro_batch_waits_for_the_step(edges):
    """grad_accum=2 and a NaN at micro-batch 4 (step 2's last): the step completes with
    micro-batch 5 in the uninterrupted run. SIGUSR1 at micro-batch 4 must not checkpoint step 1
    with micro-batch 3's gradient dropped: it checkpoints after step 2 and the resumed step 3
    equals the uninterrupted one."""
    ref, stopped, resumed = edges["accum_ref"], edges["accum_stopped"], edges["accum_resumed"]
    assert ref["code"] == 0 and stopped["code"] == 75 and resumed["code"] == 0
    assert stopped["latest"] == "step_00000002"
    assert stopped["losses"] == {k: ref["losses"][k] for k in ("1", "2")}
    assert sorted(resumed["losses"]) == ["3"] and math.isclose(resumed["losses"]["3"], ref["losses"]["3"],
                                                              rel_tol=1e-6), (resumed, ref)


def test_a_step_across_an_epochs_end_resumes_exactly(edges):
    """After a skipped micro-batch an epoch can end inside a step: the step's micro-batches are
    counted per epoch (a token mean's divisor), and the checkpoint before it holds the epoch's
    last micro-batch back (pulled, not trained). Resumed there, the next steps equal the
    uninterrupted run's."""
    ref, resumed = edges["epochcut_ref"], edges["epochcut_resumed"]
    assert ref["code"] == resumed["code"] == 0
    assert sorted(resumed["losses"], key=int) == ["16", "17", "18"]
    for s in ("16", "17", "18"):
        assert math.isclose(resumed["losses"][s], ref["losses"][s], rel_tol=1e-6), (s, resumed, ref)


def test_a_stop_signal_checkpoints_before_a_validation_due_at_that_step_which_runs_on_resume(edges):
    """Slurm's grace time (KillWait 30 s, GraceTime) must hold the checkpoint: a full
    validation pass ran first, and a long one got the rank SIGKILLed without a checkpoint. The
    skipped validation runs first in the resumed run, so it validates, keeps `best` and logs
    as the uninterrupted run: the interval logged at step 3 (log_every=3) averages steps 1-3
    though the stop came at step 2, and the samples axis counts every sample once."""
    ref, stop, resumed = edges["valref"], edges["valstop"], edges["valresumed"]
    assert stop["code"] == 75 and stop["latest"] == "step_00000002"
    assert stop["validated_at"] == [] and stop["losses"] == {}, stop
    assert ref["code"] == resumed["code"] == 0
    assert ref["validated_at"] == resumed["validated_at"] == [2, 4], (ref, resumed)
    assert resumed["val"] == ref["val"]
    assert resumed["best_metric"] == ref["best_metric"] and resumed["best_step"] == ref["best_step"]
    assert sorted(ref["losses"]) == sorted(resumed["losses"]) == ["3", "4"]
    for k in ("3", "4"):
        assert math.isclose(resumed["losses"][k], ref["losses"][k], rel_tol=1e-6), (k, ref, resumed)
    assert resumed["samples_seen"] == ref["samples_seen"] > 0
    # the resumed run profiled step 3, which starts where the job does: the window begins after
    # the start-up (the pending validation, the first batch), so it holds step 3's work only
    md = resumed["profile"]
    assert md.startswith("# Profile: steps 3-3, rank 0\n") and "| forward | 1 |" in md, md
    assert "| validate |" not in md, md


def test_a_validation_due_at_the_last_step_runs_on_resume_and_the_last_checkpoint_says_so(edges):
    """A stop during the last step: the resumed run validates at it, then saves that step again,
    so the final checkpoint no longer has the validation due and holds the best metric it found.
    Resumed with validation off (data.val=), the due validation is dropped and the run ends."""
    stopped, resumed, off, ref = edges["valend_stopped"], edges["valend"], edges["valoff"], edges["valref"]
    assert stopped["code"] == 75 and stopped["validated_at"] == [2] and stopped["latest"] == "step_00000004"
    assert resumed["code"] == 0 and resumed["validated_at"] == [4], resumed
    assert resumed["saved_val_pending"] is False and resumed["saved_best_metric"] == ref["best_metric"]
    assert resumed["best_step"] == ref["best_step"] == 4
    assert off["code"] == 0 and off["validated_at"] == [], off


def test_a_finished_run_started_again_neither_validates_nor_saves_again(edges):
    """A run whose last step is no validation step validates at its end; started again (a
    requeue after it finished, the same command) it validated and saved that step once more,
    a second val/ point at the step: the checkpoint now says the step was validated."""
    first, again = edges["valodd"], edges["valodd_again"]
    assert first["code"] == 0 and first["validated_at"] == [2, 3] and first["latest"] == "step_00000003", first
    assert again["code"] == 0 and again["validated_at"] == [] and not again["resaved"], again
    assert again["best_step"] == first["best_step"] and again["best_metric"] == first["best_metric"]


@pytest.mark.skipif(not shutil.which("java"), reason="java not installed (pycocoevalcap's scorers)")
def test_a_validation_cut_short_by_the_stop_signal_runs_again_on_resume(edges):
    """USR1 reaches the rank and the caption scorer's JVM (which it ends) while step 2's
    validation is scored: the run checkpoints with that validation due and exits 75; the
    resumed run scores it in full, equal to the uninterrupted run's, and keeps `best` by it."""
    ref, stop, resumed = edges["capref"], edges["capstop"], edges["capresumed"]
    assert stop["java_signalled"] and stop["code"] == 75 and stop["latest"] == "step_00000002", stop
    assert stop["val"] == {} and stop["best_step"] is None, stop         # no scores, no best
    assert ref["code"] == resumed["code"] == 0
    assert ref["validated_at"] == resumed["validated_at"] == [2]
    assert "CIDEr" in ref["val"]["2"] and resumed["val"] == ref["val"]
    assert resumed["best_step"] == ref["best_step"] == 2


@pytest.mark.parametrize("part", ["optim_states", "vltrain_rank"])
def test_a_damaged_checkpoint_file_is_named(edges, part):
    """DeepSpeed's optimizer states or vltrain's rank state cut in half: the resume fails naming
    the file (torch's own error names none) and what to do."""
    res = edges[f"damaged_{part}"]
    assert res["error"].startswith("CheckpointError"), res
    assert res["victim"] in res["error"] and "train.resume=" in res["error"], res


def test_a_zero0_checkpoint_of_the_fused_gpu_optimizer_resumed_on_cpu_says_why(edges):
    """ZeRO-0 bf16 on a GPU saves DeepSpeed's fused optimizer state (flat per group), which the
    unfused optimizer of a CPU run cannot read; DeepSpeed's own error names neither."""
    msg = edges["zero0_layout"]
    assert msg.startswith("CheckpointError: cannot load checkpoint ") and "z0gpu/checkpoints/step_00000001" in msg
    assert "saved by DeepSpeed's fused bf16/fp16 optimizer (FusedAdam, a GPU run)" in msg, msg
    assert "this run has the unfused one" in msg and "train.init_from=" in msg, msg
