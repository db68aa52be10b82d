"""The training engine end to end, 2 ranks over gloo on CPU with the debug model:

  U   uninterrupted run under the `deepspeed` launcher, reading its data from S3 (moto)
  P   the same run launched srun-style (one process per rank); SIGUSR1 to rank 1 only; both
      ranks under the profiler from step 4 (train.profile_steps), a window the signal cuts short
  R   `train.resume=auto` continues from P's checkpoint; rank 1 is SIGKILLed after step 20
  R2  `train.resume=auto` again: continues from the last complete checkpoint to the end

and checks exact resume against U, the preemption protocol, crash detection, TensorBoard
tags, checkpoint layout and that the S3 secret is written nowhere.
"""
import glob
import os
import signal
import subprocess
import sys
import time

import boto3
import pytest

from tests.fixtures.corpus import REPO, Ranks, rank_env
from vltrain.engine.distributed import free_port
from tests.fixtures.s3 import S3_SECRET_SENTINEL
from tests.fixtures.tasks import read_rows, write_subset
from vltrain.engine.checkpoint import COMPLETE_FILE, find_resume_point
from vltrain.engine.signals import EXIT_PREEMPTED

STEPS = 40
LOG_EVERY = 7       # resumes from the step-10/20/30 checkpoints fall between log steps
LOGGED = [*range(LOG_EVERY, STEPS, LOG_EVERY), STEPS]      # and at the last step
BAD_VAL = 3         # bad samples in U's validation split


def upload_dir(local, bucket, prefix):
    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    for path in glob.glob(os.path.join(local, "**", "*"), recursive=True):
        if os.path.isfile(path):
            s3.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local)}")
    return f"s3://{bucket}/{prefix}"


def overrides(out_root, run_name, train, val, cache, **extra):
    kv = {"output_root": out_root, "run_name": run_name, "data.train": train, "data.val": val,
          "data.cache_dir": cache, "train.max_steps": STEPS,
          # the resumes (at a step-10 checkpoint and where the signal lands) fall inside a
          # logging interval, which the checkpoint must carry over (rank-reduced) for the
          # resumed run to log the uninterrupted run's averages
          "train.log_every": LOG_EVERY,
          "train.save_every_steps": 10, "train.val_every": 20, "train.keep_last": 10,
          "train.dist_timeout_s": 30,
          # dropout on (debug.yaml has none): exact resume must restore the masks' RNG stream too
          "model.hidden_dropout": 0.1, "model.attention_dropout": 0.1, **extra}
    return [f"{k}={v}" for k, v in kv.items()]


def launcher_env():
    """Environment for a launcher (deepspeed / torchrun) that sets the rank variables itself."""
    env = rank_env(0, 1, 0)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    return env


def scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return acc, [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory, synthetic_corpus, s3_endpoint):
    root = tmp_path_factory.mktemp("engine")
    out, logs = str(root / "runs"), str(root / "logs")
    os.makedirs(logs)
    s3_bucket = "vlt-engine"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=s3_bucket)
    local_train = os.path.join(synthetic_corpus, "captions", "pretrain")
    local_val = os.path.join(synthetic_corpus, "captions", "val")
    s3_train = upload_dir(local_train, s3_bucket, "corpus/pretrain")
    # U validates on the split with its last BAD_VAL samples broken (NaN features), skipped
    bad_val = str(root / "val_bad")
    write_subset(local_val, bad_val, len(read_rows(local_val)), BAD_VAL)
    s3_val = upload_dir(bad_val, s3_bucket, "corpus/val")
    res = {"out": out, "logs": logs}

    # U: deepspeed launcher, data from S3.
    env = launcher_env()
    cmd = ["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), "vltrain/run.py",
           "--config", "configs/debug.yaml", "--deepspeed_config", "ds_configs/zero2.json",
           *overrides(out, "U", s3_train, s3_val, str(root / "cacheU"), **{"data.skip_bad_samples": "true"})]
    with open(os.path.join(logs, "U.log"), "w") as f:
        u = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    res["U_code"] = u.returncode

    # P: srun-style ranks, SIGUSR1 to rank 1 once training is under way, inside a profiled
    # window (R and R2 resume past it: no profile there).
    args = ["--config", "configs/debug.yaml", "--deepspeed_config", "ds_configs/zero2.json",
            *overrides(out, "P", local_train, local_val, str(root / "cacheP"),
                       **{"train.profile_steps": STEPS, "train.profile_start": 3, "train.profile_ranks": "[0,1]"})]
    p = Ranks(args, 2, os.path.join(logs, "P"), free_port())
    p.wait_for(0, f"step {LOG_EVERY}/", 300)
    p.procs[1].send_signal(signal.SIGUSR1)
    res["P_codes"] = p.wait(300)
    res["P_logs"] = [p.log(0), p.log(1)]
    res["P_found"] = find_resume_point(os.path.join(out, "P", "checkpoints"))

    # R: resume, then SIGKILL rank 1 after the step-20 checkpoint, as soon as step 21 is logged
    # (a fixed sleep could let a fast run finish first)
    r = Ranks(args + ["train.resume=auto"], 2, os.path.join(logs, "R"), free_port())
    r.wait_for(0, "step_00000020 (step 20)", 300)
    r.wait_for(0, f"step {3 * LOG_EVERY}/", 120)
    t0 = time.time()
    r.procs[1].kill()
    res["R_codes"] = r.wait(120)
    res["R_exit_s"] = time.time() - t0
    res["R_logs"] = [r.log(0), r.log(1)]
    res["R_found"] = find_resume_point(os.path.join(out, "P", "checkpoints"))

    # R2: resume again and finish, this time under torchrun.
    env = launcher_env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(free_port()), "vltrain/run.py", *args, "train.resume=auto"]
    with open(os.path.join(logs, "R2.log"), "w") as f:
        r2 = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    res["R2_code"] = r2.returncode
    res["R2_log"] = open(os.path.join(logs, "R2.log")).read()

    # R3: the finished run started again (a resubmitted job): nothing to train, a clean exit
    env = launcher_env()
    cmd[cmd.index("--master_port") + 1] = str(free_port())
    with open(os.path.join(logs, "R3.log"), "w") as f:
        r3 = subprocess.run(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=600)
    res["R3_code"] = r3.returncode
    res["R3_log"] = open(os.path.join(logs, "R3.log")).read()
    return res


def test_uninterrupted_run_under_deepspeed_launcher(runs):
    log = open(os.path.join(runs["logs"], "U.log")).read()
    assert runs["U_code"] == 0, log[-4000:]
    ck = os.path.join(runs["out"], "U", "checkpoints")
    assert open(os.path.join(ck, "latest")).read().strip() == "step_00000040"
    for tag in ("step_00000010", "step_00000040", "best"):
        files = os.listdir(os.path.join(ck, tag))
        assert COMPLETE_FILE in files and "config.yaml" in files
        assert {"vltrain_rank00000.pt", "vltrain_rank00001.pt"} <= set(files)
    assert os.path.isfile(os.path.join(runs["out"], "U", "config.yaml"))


def test_tensorboard_has_every_cpu_tag(runs):
    import math
    acc, losses = scalars(os.path.join(runs["out"], "U", "tensorboard"), "train/loss")
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/loss_mlm", "train/loss_mrc", "train/mlm_acc", "train/mrc_acc", "train/lr",
            "train/grad_norm", "perf/samples_per_s", "perf/tokens_per_s", "perf/data_wait_frac",
            "perf/step_time_s", "perf/peak_mem_gb", "val/loss", "val/mlm_acc", "val/mrc_acc",
            "data/skipped_samples", "val/skipped_samples", "data/truncated_text", "data/truncated_regions",
            "perf/checkpoint_save_s",
            "perf/best_save_s"}
    assert want <= tags, want - tags
    assert "perf/mfu" not in tags          # no known peak for a CPU
    saves = acc.Scalars("perf/checkpoint_save_s")   # save_every_steps=10
    assert [e.step for e in saves] == [10, 20, 30, 40] and all(e.value > 0 for e in saves), saves
    assert [e.step for e in acc.Scalars("perf/best_save_s")] == [20, 40]    # best/ at each validation
    for tag in want:
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    for tag in ("data/truncated_text", "data/truncated_regions"):   # the corpus fits debug.yaml's limits
        assert {e.value for e in acc.Scalars(tag)} == {0.0}, tag
    # the validation split's bad samples: counted once each at each validation, apart from
    # training's (none), though streaming's padding may give one to both ranks
    assert [(e.step, e.value) for e in acc.Scalars("val/skipped_samples")] == [(20, BAD_VAL), (40, BAD_VAL)]
    assert {e.value for e in acc.Scalars("data/skipped_samples")} == {0.0}
    log = open(os.path.join(runs["logs"], "U.log")).read()
    assert log.count(f"validation: {BAD_VAL} bad samples skipped (data.skip_bad_samples)") == 2, log[-3000:]
    assert [s for s, _ in losses] == LOGGED
    assert losses[-1][1] < losses[0][1]
    assert len(acc.Tensors("_hparams_/experiment") if "_hparams_/experiment" in acc.Tags()["tensors"] else []) \
        or "hparams" in " ".join(acc.Tags()["tensors"])


def test_sigusr1_to_one_rank_checkpoints_every_rank(runs):
    assert runs["P_codes"] == [EXIT_PREEMPTED, EXIT_PREEMPTED], runs["P_logs"][0][-3000:]
    found = runs["P_found"]
    assert found is not None
    k = found.info["step"]
    assert 5 <= k < STEPS
    files = os.listdir(found.path)
    assert {"vltrain_rank00000.pt", "vltrain_rank00001.pt", COMPLETE_FILE} <= set(files)
    # rank 1 got the signal (its own line at INFO, not shown on a rank other than 0: Slurm signals
    # every rank at once); rank 0 says how many had it
    assert "received SIGUSR1" not in runs["P_logs"][0] + runs["P_logs"][1]
    assert "; 1 of 2 rank(s) had received it by then" in runs["P_logs"][0], runs["P_logs"][0][-3000:]


def test_profiled_window_cut_short_by_the_signal(runs):
    """Both ranks profiled from step 4 until the stop signal ended the run: each wrote its trace
    (the trainer's phases once per micro-step) and its summary, which says it was cut short.
    That the profiled run's losses equal U's is test_resume_reproduces_the_uninterrupted_losses."""
    import gzip
    import json
    stopped = runs["P_found"].info["step"]
    out = os.path.join(runs["out"], "P", "profile", f"steps_4-{3 + STEPS}")
    for r in (0, 1):
        md = open(os.path.join(out, f"rank{r}.md")).read()
        assert md.startswith(f"# Profile: steps 4-{stopped}, rank {r}; cut short at step {stopped} (stop signal)\n")
        for phase in ("forward", "fetch", "flags", "backward", "step", "log"):
            assert f"| {phase} | " in md, (phase, md)
        assert "| communication |" in md, md          # ZeRO-2's gloo collectives
        events = json.load(gzip.open(os.path.join(out, f"rank{r}.pt.trace.json.gz")))["traceEvents"]
        forwards = [e for e in events if e.get("name") == "vltrain.forward"]
        assert len(forwards) == stopped - 3, (len(forwards), stopped)
        assert f"profile of steps 4-{stopped} (rank {r}; cut short at step {stopped} (stop signal))" in runs["P_logs"][r]
    # rank 0's summary in TensorBoard's text tab too, at the step the window ended
    acc, _ = scalars(os.path.join(runs["out"], "P", "tensorboard"), "train/loss")
    texts = acc.Tensors("profile/text_summary")
    assert [t.step for t in texts] == [stopped]
    assert texts[0].tensor_proto.string_val[0].decode() == open(os.path.join(out, "rank0.md")).read()
    for log in runs["R_logs"]:
        assert "starts at step" in log and "past the profiled window (steps 4-43)" in log


def test_killed_rank_fails_the_job_in_bounded_time(runs):
    assert runs["R_codes"][1] == -signal.SIGKILL
    assert runs["R_codes"][0] != 0, runs["R_logs"][0][-3000:]
    assert runs["R_exit_s"] < 60
    assert runs["R_found"].info["step"] >= 20


def test_resume_reproduces_the_uninterrupted_losses(runs):
    assert runs["R2_code"] == 0, runs["R2_log"][-3000:]
    _, u = scalars(os.path.join(runs["out"], "U", "tensorboard"), "train/loss")
    _, p = scalars(os.path.join(runs["out"], "P", "tensorboard"), "train/loss")
    steps = [s for s, _ in p]
    assert steps == LOGGED, steps      # every interval exactly once, none twice
    for (su, lu), (sp, lp) in zip(u, p):
        assert su == sp and abs(lu - lp) <= 1e-6 * abs(lu), (su, lu, lp)
    # the samples axis: the same sample counts at the same intervals, none counted twice or lost
    _, ub = scalars(os.path.join(runs["out"], "U", "tensorboard", "by_samples"), "by_samples/loss")
    _, pb = scalars(os.path.join(runs["out"], "P", "tensorboard", "by_samples"), "by_samples/loss")
    assert [s for s, _ in pb] == [s for s, _ in ub] and len(ub) == len(LOGGED), (ub, pb)
    resumed = runs["R_found"].info["step"]
    assert f"at step {resumed}" in runs["R2_log"].split("resumed from", 1)[1]


def test_a_finished_run_resumed_again_exits_cleanly(runs):
    """Streaming's per-node loader-state segment is unlinked when the local rank that created it
    exits; with nothing left to train, that rank used to exit before the other attached
    (FileNotFoundError '/<prefix>_resume', 2 of 5 tries): the ranks now wait for each other."""
    assert runs["R3_code"] == 0, runs["R3_log"][-3000:]
    assert f"step {STEPS} is train.max_steps={STEPS}: nothing left to train" in runs["R3_log"], runs["R3_log"][-3000:]


def test_secret_is_written_nowhere(runs):
    hits = []
    for root in (runs["out"], runs["logs"]):
        for path in glob.glob(os.path.join(root, "**", "*"), recursive=True):
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    if S3_SECRET_SENTINEL.encode() in f.read():
                        hits.append(path)
    assert not hits
