"""What TensorBoard shows of real runs (1 rank, the debug model, one process for three runs):
one curve per run folder when a run starts over, throughput without start-up or save time,
the learning rate each update used, and an HParams record with the run's settings.

The three runs share a run folder: A trains 6 steps (validation and a ``best/`` save at
step 3, on a disk made slow for ``best/`` by sleeping in ``os.fsync`` there), B starts over
in the same folder (no resume), C resumes B to step 8.
"""
import math
import os
import textwrap

from tests.fixtures.corpus import run_one_rank

LR, SLOW_FSYNC_S = 1e-3, 0.5     # a disk slower than a loaded CI machine's debug step (<= 0.15 s)

RUNS = textwrap.dedent(r"""
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    real_fsync = os.fsync
    def slow_best_fsync(fd):     # a slow disk, for best/ only: its save must not count as training
        if "/best" in os.readlink(f"/proc/self/fd/{fd}"):
            time.sleep(float(sys.argv[3]))
        return real_fsync(fd)
    os.fsync = slow_best_fsync
    from vltrain.config import load_config
    from vltrain.engine.build import build_training
    corpus, out = sys.argv[1], sys.argv[2]
    base = [f"data.train={corpus}/captions/pretrain", f"data.val={corpus}/captions/val", "data.num_workers=1",
            f"train.lr={sys.argv[4]}", "train.warmup_steps=2", "train.log_every=1", "train.val_every=3",
            "train.save_every_steps=0", f"output_root={out}", "run_name=tb", f"data.cache_dir={out}/cache"]
    codes = []
    for extra in (["train.max_steps=6"], ["train.max_steps=6", "train.seed=5"],
                  ["train.max_steps=8", "train.seed=5", "train.resume=auto"]):
        codes.append(build_training(load_config("configs/debug.yaml", base + extra)).train())
    print("RESULTS " + json.dumps({"codes": codes}), flush=True)
""")


def _events(path, plugin=False):
    """The events as TensorBoard reads them (``plugin``: its server's reader, which also purges
    text; the classic one purges scalars only)."""
    from tensorboard.backend.event_processing import event_accumulator, plugin_event_accumulator
    kind = plugin_event_accumulator if plugin else event_accumulator
    acc = kind.EventAccumulator(path, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_tensorboard_of_a_run_started_over_and_resumed(synthetic_corpus, tmp_path):
    res = run_one_rank(RUNS, synthetic_corpus, str(tmp_path), str(SLOW_FSYNC_S), str(LR))
    assert res["codes"] == [0, 0, 0]
    acc = _events(str(tmp_path / "tb" / "tensorboard"))
    # B replaced A's curve (purged, as its checkpoints were), C continued B's: each step once
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 9)), [(e.step, e.value) for e in loss]
    assert [e.step for e in acc.Scalars("val/loss")] == [3, 6, 8]      # and at the end of C
    by_samples = _events(str(tmp_path / "tb" / "tensorboard" / "by_samples")).Scalars("by_samples/loss")
    assert [e.step for e in by_samples] == [8 * s for s in range(1, 9)]
    # the rate each update used: warm-up from 0 over 2 updates, then linear decay to step 8 (C)
    lr = [e.value for e in acc.Scalars("train/lr")]
    assert math.isclose(lr[0], 0.0, abs_tol=1e-12) and math.isclose(lr[1], LR / 2, rel_tol=1e-6) and math.isclose(lr[2], LR, rel_tol=1e-6)
    assert lr[-1] > 0, lr
    # best/ saves (slow) have their own tag; neither they nor the validation count as training:
    # the step after them is as fast as the others, as is the first one (the DataLoader
    # worker's start-up comes before the clock starts)
    best = acc.Scalars("perf/best_save_s")
    assert [e.step for e in best][0] == 3 and {e.step for e in best} <= {3, 6, 8}      # improved val/loss
    assert all(e.value >= SLOW_FSYNC_S for e in best)
    assert [e.step for e in acc.Scalars("perf/checkpoint_save_s")] == [6, 8]    # each run's last step
    step_time = {e.step: e.value for e in acc.Scalars("perf/step_time_s")}
    assert step_time[4] < SLOW_FSYNC_S and step_time[7] < SLOW_FSYNC_S, step_time
    wait = {e.step: e.value for e in acc.Scalars("perf/data_wait_frac")}
    assert wait[1] < 0.5 and wait[7] < 0.5, wait
    # HParams: one record with the run's settings (flags and ids whose names hold "token"
    # included) and the best-checkpoint metric as a column; the text table at each start
    text = _events(str(tmp_path / "tb" / "tensorboard"), plugin=True).Tensors("hparams/text_summary")
    assert [e.step for e in text] == [0, 6], [e.step for e in text]
    table = text[0].tensor_proto.string_val[0].decode()
    for key in ("model.pad_token_id", "model.vlbert_end_token", "objectives.mask_token_prob"):
        assert f"| {key} |" in table, key
    assert "val/loss" in str(acc.PluginTagToContent("hparams")["_hparams_/experiment"])
    assert os.path.isdir(tmp_path / "tb" / "checkpoints" / "best")
