"""What the engine does with bad runs: non-finite losses on one rank, and bad inputs that
must stop every rank before training, without hanging (2 ranks, gloo)."""
import os
import socket
import subprocess
import sys

import pytest

from tests.fixtures.corpus import REPO, Ranks, rank_env
from tests.fixtures.procs import run_folder_holder
from vltrain.engine.distributed import free_port


def launch(script_args, tmp, name):
    port = free_port()
    logs = []
    procs = []
    for r in range(2):
        f = open(os.path.join(tmp, f"{name}{r}.log"), "w")
        logs.append(f.name)
        procs.append(subprocess.Popen([sys.executable, *script_args], cwd=REPO, env=rank_env(r, 2, port),
                                      stdout=f, stderr=subprocess.STDOUT))
    return procs, logs


def finish(procs, logs, timeout=600):
    try:
        codes = [p.wait(timeout) for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:            # not left running under the next tests
            p.kill()
            p.wait()
        raise AssertionError("ranks hung:\n" + "\n".join(open(l).read()[-3000:] for l in logs)) from None
    return codes, [open(l).read() for l in logs]


def test_nonfinite_losses_skip_on_every_rank_and_abort_when_persistent(tmp_path, synthetic_corpus):
    train = os.path.join(synthetic_corpus, "captions", "pretrain")
    out = str(tmp_path / "runs")
    # One job at a time: a starting streaming job clears stale shared memory on the host,
    # which would include a concurrently running job's.
    results = {}
    for m in ("transient", "persistent"):
        results[m] = finish(*launch(["tests/workers/nonfinite.py", m, out, train, str(tmp_path / f"cache-{m}")],
                                    str(tmp_path), m))
    (codes_t, logs_t), (codes_p, logs_p) = results["transient"], results["persistent"]

    assert codes_t == [0, 0], logs_t[0][-3000:]
    # Both ranks skipped the same two micro-batches (rank 1's loss was NaN), and training still
    # ran its 10 steps; rank 0 says so, with how many ranks had it (every rank's line was the same)
    assert logs_t[0].count("non-finite loss at step") == 2, logs_t[0][-3000:]
    assert logs_t[0].count("on 1 of 2 rank(s): micro-batch skipped on every rank") == 2, logs_t[0][-3000:]
    assert "non-finite loss" not in logs_t[1], logs_t[1][-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "transient", "tensorboard"))
    acc.Reload()
    # at the steps the skipped micro-batches belonged to: the 3rd and 7th, in steps 3 and 6
    assert [(e.step, e.value) for e in acc.Scalars("train/nonfinite_skipped")] == [(3, 1.0), (6, 2.0)]
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 11))

    assert codes_p[0] != 0 and codes_p[1] != 0, logs_p[0][-3000:]
    for log in logs_p:
        assert "3 non-finite losses in a row" in log, log[-3000:]


def test_an_all_bad_micro_batch_on_one_rank_keeps_ranks_in_step(tmp_path, synthetic_corpus):
    """Rank 1's first two micro-batches of an epoch hold only bad samples (skip_bad_samples): the rank runs
    a good batch at zero weight in their place instead of running micro-batches fewer than rank 0,
    which would leave the ranks in different epochs at the end of the first (16 micro-batches
    each) and hang them; both ranks finish, every step logged."""
    train = os.path.join(synthetic_corpus, "captions", "pretrain")
    out = str(tmp_path / "runs")
    codes, logs = finish(*launch(["tests/workers/bad_batch.py", out, train, str(tmp_path / "cache")],
                                 str(tmp_path), "bad"), timeout=400)
    assert codes == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "stands in at zero weight" in logs[1] and "stands in" not in logs[0], logs[1][-3000:]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "bad_batch", "tensorboard"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 21))
    # each epoch's DataLoader worker is new, so its first two micro-batches are bad in both
    # epochs: the next good batch stands in at the start, the previous epoch's last in the second
    assert [e.value for e in acc.Scalars("data/skipped_samples")][-1] == 32
    assert logs[1].count("the next good batch stands in") == 2, logs[1][-3000:]
    assert logs[1].count("the previous good batch stands in") == 2, logs[1][-3000:]
    for tag in ("data/truncated_text", "data/truncated_regions"):
        assert [e.value for e in acc.Scalars(tag)] == [1.0] * 20, tag
    assert "have more text than data.max_text_len (or data.max_sequence) allows" in logs[0]
    assert logs[1].count("stands in at zero weight") == 4


@pytest.mark.parametrize("case", ["unknown_key", "ds_contradiction", "missing_data", "bad_checkpoint",
                                  "run_folder_in_use"])
def test_bad_input_stops_every_rank_with_a_message(tmp_path, synthetic_corpus, case):
    train = os.path.join(synthetic_corpus, "captions", "pretrain")
    base = ["--config", "configs/debug.yaml", f"output_root={tmp_path}", f"data.train={train}", "data.val=",
            f"data.cache_dir={tmp_path / 'cache'}", "train.max_steps=5", "train.dist_timeout_s=30"]
    expect = {
        "unknown_key": (["train.lr_rate=1"], "unknown config key 'train.lr_rate'; did you mean 'train.lr'"),
        "ds_contradiction": (["--deepspeed_config", str(tmp_path / "ds.json")],
                             "'train_micro_batch_size_per_gpu' = 4 contradicts train.micro_batch_size = 8"),
        "missing_data": ([f"data.train={tmp_path / 'nowhere'}"], f"{tmp_path / 'nowhere'}"),
        "bad_checkpoint": ([f"train.resume={tmp_path / 'ckpt'}"], f"{tmp_path / 'ckpt'} holds no complete checkpoint"),
    }
    (tmp_path / "ds.json").write_text('{"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}')
    (tmp_path / "ckpt" / "step_00000005").mkdir(parents=True)
    (tmp_path / "ckpt" / "step_00000005" / "mp_rank_00_model_states.pt").write_text("garbage")
    holder = None
    if case == "run_folder_in_use":    # another live job in run_name=debug's folder (a second sbatch of one job)
        holder = run_folder_holder(tmp_path / "debug")
        expect[case] = ([], f"run_name=debug: its folder {tmp_path / 'debug'} is in use by another job (host "
                            f"{socket.gethostname()}, pid {holder.pid}, since ")
    extra, message = expect[case]
    try:
        ranks = Ranks(base + extra, 2, str(tmp_path / "logs"), free_port())
        codes = ranks.wait(240)
    finally:
        if holder is not None:
            holder.kill()
            holder.wait()
    assert codes == [2, 2], ranks.log(0)[-3000:]
    for r in range(2):
        assert message in ranks.log(r), ranks.log(r)[-3000:]
    assert "step 1/" not in ranks.log(0)
    if holder is not None:     # the other job's folder: nothing written there, nothing removed
        assert os.listdir(tmp_path / "debug") == [".vltrain.lock"]
        return
    # the run folder, made before the data and the ds_config were read, is not left behind empty
    assert not (tmp_path / "debug").exists(), os.listdir(tmp_path / "debug")
