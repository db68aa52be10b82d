"""The sbatch templates on a real (local, two-node, CPU) Slurm cluster, debug model:

  plain     `sbatch --nodes=2 --ntasks-per-node=1 --gpus-per-node=0 slurm/pretrain.sbatch`, data
            read from s3:// (moto): COMPLETED, one rank per node, checkpoints, finite TensorBoard
            losses, one cache folder per node, the S3 secret in no log
  preempt   the same job (GPU request dropped with SBATCH_GPUS_PER_NODE=0 instead), signalled
            with `scancel --signal=USR1` mid-run: it checkpoints, exits 75, requeues itself,
            resumes from that checkpoint and completes every step exactly once
  sigterm   Slurm's SIGTERM: preempted by a job of a higher-tier partition (GraceTime) it
            checkpoints, is requeued and resumes; `scancel` then ends it with a checkpoint
  early     USR1 to the batch shell and to the ranks while they start: ignored, not fatal
  failures  a bad config key (caught before the ranks start) and a missing dataset (inside the
            ranks, through srun --kill-on-bad-exit): FAILED with the message in the log, never
            requeued
  storage   the object store down at the start (connection refused): the ranks exit 69 and the
            job is requeued; back up, the requeued run completes; down for good, the job fails
            after STORAGE_REQUEUES requeues in a row

The ranks choose DeepSpeed's CPU accelerator by themselves (no DS_ACCELERATOR in the job's
environment, no nvidia-smi on the nodes).
"""
import functools
import glob
import math
import os
import re
import sys
import time

import pytest

from tests.fixtures.corpus import REPO
from tests.fixtures.s3 import S3_SECRET_SENTINEL, moto_server
from tests.fixtures.slurm import wait_for
from vltrain.engine.distributed import free_port

pytestmark = pytest.mark.slow

PRETRAIN = os.path.join(REPO, "slurm", "pretrain.sbatch")
DEBUG_CONFIG = os.path.join(REPO, "configs", "debug.yaml")
S3_VARS = ("S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
JOB_TIMEOUT = 300      # a job start costs ~30 s of imports per rank on a loaded 2-core machine


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


_wait_for = functools.partial(wait_for, poll=0.5)


class Job:
    """One submission of slurm/pretrain.sbatch; its batch log and run folder under `root`."""

    def __init__(self, cluster, root, name, sbatch_args, overrides, env_extra=None):
        self.cluster, self.root, self.name = cluster, str(root), name
        self.run_dir = os.path.join(self.root, "runs", name)
        env = {k: v for k, v in cluster.env.items() if k != "DS_ACCELERATOR"}  # the template decides
        env.update({k: os.environ[k] for k in S3_VARS if k in os.environ})
        env.update(CONFIG=DEBUG_CONFIG, PYTHON=sys.executable, OUTPUT_ROOT=os.path.join(self.root, "runs"),
                   RUN_NAME=name, CACHE_DIR=os.path.join(self.root, "cache", name), OMP_NUM_THREADS="1",
                   VLTRAIN_MASTER_PORT=str(free_port()))
        env.update(env_extra or {})
        self.env = env
        res = cluster.run(["sbatch", "--parsable", f"--output={self.root}/slurm-%j.out", "--time=15",
                           *sbatch_args, PRETRAIN, *overrides], cwd=REPO, env=env)
        self.id = res.stdout.strip().split(";")[0]

    @property
    def batch_log(self):
        return _read(os.path.join(self.root, f"slurm-{self.id}.out"))

    def rank_log(self, rank):
        return _read(os.path.join(self.run_dir, "logs", f"{self.id}-{rank}.log"))

    def logs(self):
        return (f"--- batch log\n{self.batch_log[-3000:]}\n--- rank 0\n{self.rank_log(0)[-3000:]}"
                f"\n--- rank 1\n{self.rank_log(1)[-2000:]}")

    def start_requeued(self):
        """Slurm holds a requeued job back (BeginTime = now + cred_expire, 2 min) because the
        nodes refuse a relaunch whose credential is not newer than the revoked one. Start it
        sooner: once the job is back in the queue, a moment past the revocation's second."""
        def requeued():
            info = self.cluster.job(self.id)
            return info.get("JobState") == "PENDING" and info.get("Restarts") == "1"
        _wait_for(requeued, 90, "the job to be pending again after its requeue")
        time.sleep(2)
        self.cluster.run(["scontrol", "update", f"JobId={self.id}", "StartTime=now"])

    def wait(self, states, timeout=JOB_TIMEOUT):
        try:
            return self.cluster.wait_job(self.id, states, timeout=timeout)
        except (AssertionError, TimeoutError) as e:
            raise AssertionError(f"{e}\n{self.logs()}") from None


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)] if tag in acc.Tags()["scalars"] else []


def _rank_headers(text, jobid):
    """(rank, node, restart) of every task start line the template writes."""
    return re.findall(rf"job={jobid} rank=(\d+) local_rank=\d+ node=(\S+) host=\S+ restart=(\d+) "
                      r"accelerator=(\S+): starting", text)


def _assert_no_secret(*roots):
    hits = []
    for root in roots:
        files = [root] if os.path.isfile(root) else glob.glob(os.path.join(root, "**", "*"), recursive=True)
        for path in files:
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    if S3_SECRET_SENTINEL.encode() in f.read():
                        hits.append(path)
    assert not hits, f"the S3 secret was written to {hits}"


def _upload(local, bucket, prefix, endpoint=None):
    import boto3
    s3 = boto3.client("s3", endpoint_url=endpoint or os.environ["S3_ENDPOINT_URL"])
    for path in glob.glob(os.path.join(local, "**", "*"), recursive=True):
        if os.path.isfile(path):
            s3.upload_file(path, bucket, f"{prefix}/{os.path.relpath(path, local)}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture(scope="module")
def s3_corpus(synthetic_corpus, s3_endpoint):
    import boto3
    bucket = "vlt-slurm-jobs"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return {"train": _upload(os.path.join(synthetic_corpus, "captions", "pretrain"), bucket, "captions/pretrain"),
            "val": _upload(os.path.join(synthetic_corpus, "captions", "val"), bucket, "captions/val"),
            "bucket": bucket}


def test_two_node_pretraining_from_s3(slurm_cluster, s3_corpus, tmp_path):
    steps = 20
    job = Job(slurm_cluster, tmp_path, "plain",
              ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0"],
              [f"train.max_steps={steps}", "train.log_every=1", "train.save_every_steps=10",
               "train.val_every=10", "train.dist_timeout_s=60"],
              # the rendezvous port as on a real cluster: from the job id, probed on the first node
              {"DATA_REMOTE": s3_corpus["train"], "DATA_VAL_REMOTE": s3_corpus["val"], "VLTRAIN_MASTER_PORT": ""})
    info = job.wait({"COMPLETED"})
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, job.logs())

    # Two ranks, one on each node, both on the CPU accelerator the template picked.
    logs = job.rank_log(0) + job.rank_log(1)
    assert sorted(_rank_headers(logs, job.id)) == [("0", "node1", "0", "cpu"), ("1", "node2", "0", "cpu")], logs
    assert f"job={job.id} rank=0 INFO vltrain.train: step {steps}/{steps}" in job.rank_log(0), job.logs()
    batch = job.batch_log
    port = 10000 + int(job.id) % 20000
    # MASTER_ADDR is node1's NodeAddr (the local cluster's 127.0.0.1), not its NodeName
    assert f"master=127.0.0.1:{port}\n" in batch or f"port {port} is taken on this node: rendezvous on" in batch, batch
    assert "ranks: rank0=0 rank1=0" in batch and "finished" in batch, batch
    assert "requeu" not in batch.split("srun exited", 1)[1], batch
    assert os.path.realpath(os.path.join(job.run_dir, "logs", f"{job.id}-batch.out")) == \
        os.path.realpath(os.path.join(tmp_path, f"slurm-{job.id}.out"))

    # Checkpoints (complete, both ranks' state), resolved config, TensorBoard with finite losses.
    ck = os.path.join(job.run_dir, "checkpoints")
    assert _read(os.path.join(ck, "latest")).strip() == f"step_{steps:08d}"
    for tag in ("step_00000010", f"step_{steps:08d}"):
        files = set(os.listdir(os.path.join(ck, tag)))
        assert {"vltrain_ckpt.json", "vltrain_rank00000.pt", "vltrain_rank00001.pt"} <= files, (tag, files)
    assert f"train: {s3_corpus['train']}" in _read(os.path.join(job.run_dir, "config.yaml"))
    losses = _scalars(os.path.join(job.run_dir, "tensorboard"), "train/loss")
    assert [s for s, _ in losses] == list(range(1, steps + 1)), losses
    assert all(math.isfinite(v) for _, v in losses), losses
    val = _scalars(os.path.join(job.run_dir, "tensorboard"), "val/loss")
    assert [s for s, _ in val] == [10, 20] and all(math.isfinite(v) for _, v in val), val

    # Each node streamed into its own cache folder.
    assert sorted(os.listdir(os.path.join(tmp_path, "cache", "plain"))) == ["node0", "node1"]

    # The secret was in every rank's environment (they read S3 with it) and is in no log:
    # not the batch log, not the ranks' logs, not the run folder, not the Slurm daemons' logs.
    assert job.env["AWS_SECRET_ACCESS_KEY"] == S3_SECRET_SENTINEL
    _assert_no_secret(str(tmp_path), str(slurm_cluster.state_dir / "log"))


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, synthetic_corpus, tmp_path):
    steps = 60
    # The GPU request is dropped by an SBATCH_* variable this time; the command line is the
    # plain one from the README.
    # a run folder named with a space and %j (a field to srun --output, which put the ranks' logs
    # in a folder named after the job id instead)
    job = Job(slurm_cluster, tmp_path, "preempt %j 50%", ["--nodes=2", "--ntasks-per-node=1"],
              [f"train.max_steps={steps}", "train.log_every=1", "data.val=", "train.dist_timeout_s=60"],
              {"SBATCH_GPUS_PER_NODE": "0",
               "DATA_REMOTE": os.path.join(synthetic_corpus, "captions", "pretrain")})
    try:
        _wait_for(lambda: any(int(n) >= 5 for n in re.findall(rf"step (\d+)/{steps} ", job.rank_log(0))),
                  JOB_TIMEOUT, "training to be under way")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{slurm_cluster.job(job.id)}\n{job.logs()}") from None
    slurm_cluster.run(["scancel", "--signal=USR1", job.id])     # to the tasks, as --signal=USR1@T does
    try:
        _wait_for(lambda: "requeueing" in job.batch_log, 120, "the batch script to requeue the job")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{job.logs()}") from None

    job.start_requeued()
    info = job.wait({"COMPLETED"})
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, job.logs())

    log0, batch = job.rank_log(0), job.batch_log
    # First run: USR1 seen, checkpoint at step k, exit 75 -> requeue. Second run: resumed at k.
    k = int(re.search(r"stopped on signal at step (\d+); checkpoint saved; exiting with 75", log0).group(1))
    assert 5 <= k < steps, log0
    assert "received SIGUSR1" in log0
    # the signal reached every process of the step; only the ranks took it (vltrain/engine/signals.py):
    # no helper died of it, and no task shell reported its sleep killed
    logs = log0 + job.rank_log(1)
    assert "resource_tracker" not in logs and "User defined signal" not in logs, logs[-3000:]
    assert re.search(r"restart=0: srun exited with \d+; ranks:.*=75", batch), batch
    assert "restart=0: checkpointed on signal: requeueing" in batch, batch
    assert "restart=1: srun exited with 0; ranks: rank0=0 rank1=0" in batch and "restart=1: finished" in batch, batch
    resumed = re.findall(r"resumed from (.+) at step (\d+)", log0)
    assert resumed == [(os.path.join(job.run_dir, "checkpoints", f"step_{k:08d}"), str(k))], log0
    headers = sorted(_rank_headers(job.rank_log(0) + job.rank_log(1), job.id))
    assert headers == [("0", "node1", "0", "cpu"), ("0", "node1", "1", "cpu"),
                       ("1", "node2", "0", "cpu"), ("1", "node2", "1", "cpu")], headers

    # Every step trained exactly once across the two runs: in the log and in TensorBoard.
    logged = [int(s) for s in re.findall(rf"INFO vltrain\.train: step (\d+)/{steps} ", log0)]
    assert logged == list(range(1, steps + 1)), logged
    first, second = log0.split("resumed from", 1)
    assert f"step {k}/{steps} " in first and f"step {k + 1}/{steps} " not in first
    losses = _scalars(os.path.join(job.run_dir, "tensorboard"), "train/loss")
    assert [s for s, _ in losses] == list(range(1, steps + 1)), [s for s, _ in losses]
    assert all(math.isfinite(v) for _, v in losses)
    assert _read(os.path.join(job.run_dir, "checkpoints", "latest")).strip() == f"step_{steps:08d}"
    _assert_no_secret(str(tmp_path))


def _slurm_time(value):
    return time.mktime(time.strptime(value, "%Y-%m-%dT%H:%M:%S"))


def _log_time(line):
    return time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))


def test_preemption_and_scancel_checkpoint_on_sigterm(slurm_cluster, synthetic_corpus, tmp_path):
    """Slurm's own SIGTERM, sent to every process of the job, DataLoader workers included:
    1. a job of the higher-tier partition `urgent` preempts the run (PreemptMode=REQUEUE,
       GraceTime): the ranks checkpoint within the grace time, the run is requeued, the urgent
       job gets the nodes only once the checkpoint is written;
    2. the requeued run resumes from that checkpoint;
    3. `scancel` ends it for good: checkpoint, CANCELLED, not requeued."""
    steps = 100000     # never reached: the job is cancelled
    job = Job(slurm_cluster, tmp_path, "sigterm", ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0"],
              ["train.log_every=1", f"train.max_steps={steps}", "data.val=", "train.dist_timeout_s=60"],
              {"DATA_REMOTE": os.path.join(synthetic_corpus, "captions", "pretrain")})
    assert "num_workers: 1" in _read(DEBUG_CONFIG)   # the workers are what SIGTERM used to kill

    def trained(run_log):
        return [int(n) for n in re.findall(rf"INFO vltrain\.train: step (\d+)/{steps} ", run_log)]

    try:
        _wait_for(lambda: any(n >= 5 for n in trained(job.rank_log(0))), JOB_TIMEOUT, "training to be under way")
    except TimeoutError as e:
        raise AssertionError(f"{e}\n{slurm_cluster.job(job.id)}\n{job.logs()}") from None
    urgent = slurm_cluster.sbatch(["--partition=urgent", "--nodes=1", f"--output={tmp_path}/urgent-%j.out",
                                   "--wrap", "echo urgent ran"])
    info = slurm_cluster.wait_job(urgent, {"COMPLETED"}, timeout=120)
    stopped = re.search(r"^(.*) WARNING vltrain\.engine\.trainer: stopped on signal at step (\d+); checkpoint saved",
                        job.rank_log(0), flags=re.M)
    assert stopped, job.logs()
    k1 = int(stopped.group(2))
    # The urgent job started only once the run had checkpointed (Slurm waited for it to end).
    assert _slurm_time(info["StartTime"]) >= math.floor(_log_time(stopped.group(1))), (info, job.logs())
    # every rank stopped on it (rank 0 says so, with how many had it by then: rank 1 says it at INFO)
    assert "received SIGTERM" in job.rank_log(0) and re.search(r"; [12] of 2 rank\(s\) had received it by then$",
                                                               job.rank_log(0), flags=re.M), job.logs()
    assert re.search(r"restart=0: srun exited with \d+; ranks: rank0=75 rank1=75$", job.batch_log, flags=re.M), \
        job.batch_log   # not 143: a rank past its checkpoint ignores srun's SIGTERM to the step

    # 2. Requeued (by the template on exit 75; Slurm's PreemptMode=REQUEUE would too): resume.
    job.start_requeued()
    _wait_for(lambda: trained(job.rank_log(0).split("resumed from", 1)[-1]) if "resumed from" in job.rank_log(0)
              else None, JOB_TIMEOUT, "the resumed run to train")
    resumed = re.findall(r"resumed from (\S+) at step (\d+)", job.rank_log(0))
    assert resumed == [(os.path.join(job.run_dir, "checkpoints", f"step_{k1:08d}"), str(k1))], job.logs()

    # 3. scancel: SIGTERM to the batch shell and every process of the step.
    slurm_cluster.run(["scancel", job.id])
    info = job.wait({"CANCELLED"})
    assert info["Restarts"] == "1", info
    log0, batch = job.rank_log(0), job.batch_log
    k2 = int(re.findall(r"stopped on signal at step (\d+); checkpoint saved", log0)[-1])
    assert k2 > k1, log0
    assert "restart=1: checkpointed after SIGTERM from Slurm (cancel / time limit): not requeueing" in batch, batch
    assert _read(os.path.join(job.run_dir, "checkpoints", "latest")).strip() == f"step_{k2:08d}"
    # Every step up to the last checkpoint trained exactly once across the two runs.
    assert trained(log0) == list(range(1, k2 + 1)), trained(log0)
    assert "Traceback" not in log0 + job.rank_log(1), job.logs()


SLOW_PYTHON = """#!/bin/bash
# The venv's python, started 4 s late: holds the batch shell in its config check and each rank
# before run.py runs, so a signal can be sent there. A marker file says which one is waiting.
if [[ "$1" == - ]]; then what=check; else what="rank$SLURM_PROCID"; fi
touch "$MARKS/$what"
sleep 4
exec {python} "$@"
"""


def test_usr1_while_the_job_starts_is_not_fatal(slurm_cluster, synthetic_corpus, tmp_path):
    """USR1 before anything can checkpoint: to the batch shell during its config check
    (`scancel --batch`, as --signal=B:USR1@T sends it), then to the ranks before run.py has
    its handler (a job whose time limit is under the USR1 lead gets it at once). Bash's and
    Python's default action would end the job; it must instead run to the end."""
    marks = tmp_path / "marks"
    marks.mkdir()
    slow = tmp_path / "slow_python"
    slow.write_text(SLOW_PYTHON.format(python=sys.executable))
    slow.chmod(0o755)
    steps = 6     # > debug.yaml's warm-up
    job = Job(slurm_cluster, tmp_path, "early", ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0"],
              [f"train.max_steps={steps}", "train.log_every=1", "data.val=", "train.dist_timeout_s=60"],
              {"DATA_REMOTE": os.path.join(synthetic_corpus, "captions", "pretrain"), "PYTHON": str(slow),
               "MARKS": str(marks)})
    _wait_for(lambda: (marks / "check").exists(), JOB_TIMEOUT, "the batch shell's config check")
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", job.id])
    _wait_for(lambda: (marks / "rank0").exists() and (marks / "rank1").exists(), JOB_TIMEOUT, "the ranks to start")
    slurm_cluster.run(["scancel", "--signal=USR1", job.id])
    info = job.wait({"COMPLETED"})
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0", (info, job.logs())
    assert "USR1 before the ranks started: nothing to checkpoint yet, ignored" in job.batch_log, job.batch_log
    assert "ranks: rank0=0 rank1=0" in job.batch_log, job.batch_log
    assert f"step {steps}/{steps}" in job.rank_log(0), job.logs()
    assert "received SIGUSR1" not in job.rank_log(0) + job.rank_log(1), job.logs()   # lost, as documented


def test_real_failures_end_failed_and_are_not_requeued(slurm_cluster, s3_corpus, tmp_path):
    base = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0"]
    # 1. A bad config key: the template checks the config before starting any rank.
    bad_key = Job(slurm_cluster, tmp_path, "badkey", base, ["train.no_such_key=1"],
                  {"DATA_REMOTE": s3_corpus["train"]})
    # 2. A dataset that is not there: every rank fails while building (exit 2); srun
    #    --kill-on-bad-exit ends the step; the batch script reports the ranks' error.
    missing = f"s3://{s3_corpus['bucket']}/no/such/dataset"
    no_data = Job(slurm_cluster, tmp_path, "nodata", base, ["data.val=", "train.dist_timeout_s=60"],
                  {"DATA_REMOTE": missing})

    info = bad_key.wait({"FAILED"})
    assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", info
    assert "unknown config key 'train.no_such_key'" in bad_key.batch_log, bad_key.batch_log
    assert "not starting the ranks" in bad_key.batch_log
    assert not os.path.exists(os.path.join(bad_key.run_dir)), "no rank should have started"

    info = no_data.wait({"FAILED"})
    assert info["ExitCode"] == "2:0" and info["Restarts"] == "0", (info, no_data.logs())
    for rank in (0, 1):
        assert f"job={no_data.id} rank={rank} local_rank=0" in no_data.rank_log(rank)
    assert re.search(rf"job={no_data.id} rank=\d ERROR vltrain\.run: MetaError: data\.train: dataset {re.escape(missing)}",
                     no_data.rank_log(0) + no_data.rank_log(1)), no_data.logs()
    batch = no_data.batch_log
    assert "training failed (exit 2); not requeued" in batch, batch
    assert f"MetaError: data.train: dataset {missing}" in batch, batch    # the ranks' error, copied up
    time.sleep(3)                                                  # and it stays that way
    for job in (bad_key, no_data):
        info = slurm_cluster.job(job.id)
        assert info["JobState"] == "FAILED" and info["Restarts"] == "0", info
    _assert_no_secret(str(tmp_path))


def test_a_storage_outage_is_requeued_a_bounded_number_of_times(slurm_cluster, s3_endpoint, synthetic_corpus,
                                                                 tmp_path):
    base = ["--nodes=1", "--ntasks-per-node=1", "--gpus-per-node=0"]
    steps = 6
    overrides = [f"train.max_steps={steps}", "data.val=", "train.dist_timeout_s=60", "data.download_retry=1"]
    data = "s3://vlt-outage/captions/pretrain"
    later, never = free_port(), free_port()      # nothing listens on either yet
    back = Job(slurm_cluster, tmp_path, "back", base, overrides,
               {"S3_ENDPOINT_URL": f"http://127.0.0.1:{later}", "DATA_REMOTE": data})
    down = Job(slurm_cluster, tmp_path, "down", base, overrides,
               {"S3_ENDPOINT_URL": f"http://127.0.0.1:{never}", "DATA_REMOTE": data, "STORAGE_REQUEUES": "1"})
    for job in (back, down):
        try:
            _wait_for(lambda: "requeueing" in job.batch_log, JOB_TIMEOUT, "the batch script to requeue the job")
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{job.logs()}") from None
        assert re.search(r"restart=0: srun exited with \d+; ranks: rank0=69", job.batch_log), job.logs()
        assert "the object store did not answer (exit 69): requeueing (storage try 1 of at most " \
               f"{1 if job is down else 3} in a row)" in job.batch_log, job.logs()
        port = later if job is back else never
        assert re.search(rf"rank=0 ERROR vltrain\.run: StorageUnavailable: data\.train: dataset {data}: cannot read "
                         rf"vltrain_meta\.json: S3 endpoint http://127\.0\.0\.1:{port} did not answer",
                         job.rank_log(0)), job.logs()
    with moto_server(later) as endpoint:          # the store is back, with the dataset
        import boto3
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="vlt-outage")
        _upload(os.path.join(synthetic_corpus, "captions", "pretrain"), "vlt-outage", "captions/pretrain", endpoint)
        for job in (back, down):
            job.start_requeued()
        info = back.wait({"COMPLETED"})
        assert info["ExitCode"] == "0:0" and info["Restarts"] == "1", (info, back.logs())
    assert f"step {steps}/{steps}" in back.rank_log(0) and "restart=1: finished" in back.batch_log, back.logs()
    assert not glob.glob(os.path.join(back.run_dir, "logs", ".storage_requeues.*"))

    info = down.wait({"FAILED"})                 # its store never came back: once requeued, then failed
    assert info["ExitCode"] == "69:0" and info["Restarts"] == "1", (info, down.logs())
    assert "the object store did not answer in 2 runs in a row without a new checkpoint (STORAGE_REQUEUES=1" \
           in down.batch_log, down.logs()
    assert f"StorageUnavailable: data.train: dataset {data}" in down.batch_log     # the ranks' error, copied up
    _assert_no_secret(str(tmp_path))
