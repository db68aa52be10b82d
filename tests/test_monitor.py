"""FLOP count, peak table and the TensorBoard monitor (read back with tensorboard's EventAccumulator)."""
import glob
import math
import os
import time

import pytest
import torch
from torch import nn

from vltrain.config import Config, config_to_dict, debug_model_config
from vltrain.monitor import (FlopCounter, MicroBatches, Monitor, device_peak_tflops, flops_per_sample, non_embedding_params,
                             peak_memory_gb, peak_tflops_for, scrub_hparams)


class TinyBert(nn.Module):
    """Embedding tables + one layer + an MLM decoder tied to the word embeddings."""

    def __init__(self, vocab=50, hidden=8, ffn=16, pos=12):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(pos, hidden)
        self.type = nn.Embedding(2, hidden)
        self.region = nn.Linear(6, hidden)           # region projection: a matmul, counts
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.out = nn.Linear(hidden, hidden)
        self.ffn1 = nn.Linear(hidden, ffn)
        self.ffn2 = nn.Linear(ffn, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.decoder = nn.Linear(hidden, vocab)
        self.decoder.weight = self.word.weight       # tied: counted once, as an embedding table


def test_non_embedding_params_by_hand():
    m = TinyBert()
    h, f, v = 8, 16, 50
    hand = (6 * h + h) + (h * 3 * h + 3 * h) + (h * h + h) + (h * f + f) + (f * h + h) + 2 * h + v   # + decoder bias
    assert non_embedding_params(m) == hand == 690
    # a custom predicate: also treat the region projection as an embedding
    assert non_embedding_params(m, lambda name, mod: isinstance(mod, nn.Embedding) or name == "region") == hand - 56


@pytest.mark.parametrize("task_name,over,heads", [
    ("refs", [], ()), ("mc", [], ("cls_head",)), ("caption", [], ("mlm_head",)), ("pretrain", [], ("mlm_head",)),
    ("pretrain", ["objectives.mrc=true"], ("mlm_head", "mrc_head")),
    ("pretrain", ["objectives.mrc=true", "objectives.mlm=false"], ("mrc_head",))])
def test_a_tasks_n_holds_its_own_heads_not_the_models_unused_ones(task_name, over, heads):
    """A fine-tune's MFU counted N over the model, pretraining heads included, task head not,
    and pretraining's the [CLS] scorer and (without MRC) the region head, which it never runs:
    N is now the task module's, less the model's heads the task never runs."""
    from vltrain.model import VLModel
    from vltrain.monitor import flop_params
    from vltrain.tasks import get_task
    from vltrain.config import load_config
    cfg = load_config(None, [f"task.name={task_name}", *over], to_run=False)
    cfg.model = debug_model_config()
    model = VLModel(cfg.model)
    spec = get_task(task_name)
    task = spec.build_module(cfg, model)
    own = sum(p.numel() for n, p in task.named_parameters() if not n.startswith("model."))
    run_heads = sum(p.numel() for h in heads for p in getattr(model, h).parameters())
    all_heads = sum(p.numel() for h in ("mlm_head", "mrc_head", "cls_head") for p in getattr(model, h).parameters())
    want = non_embedding_params(model) - all_heads + run_heads + own
    assert spec.model_heads(cfg) == heads
    assert flop_params(task, model, spec.model_heads(cfg)) == want
    assert want != non_embedding_params(model)     # the old count was another


def test_flops_per_sample_formula():
    cfg = debug_model_config(vocab_size=50, hidden_size=8, num_layers=1)
    m = TinyBert()
    n, L, H, V, T, P = 690, 1, 8, 50, 10, 3
    want = T * (6 * n + 12 * L * H * T) + P * 6 * H * V
    assert flops_per_sample(m, cfg, seq_len=T, n_mlm_pred=P) == want == 58200
    assert flops_per_sample(n, cfg, seq_len=T, n_mlm_pred=P) == want
    fc = FlopCounter(m, cfg)
    assert fc.batch(batch_size=4, seq_len=T, n_pred_total=12) == 4 * want
    # a padded batch: rows of 10 and 4 real tokens (padded to 10) count as those two samples,
    # device scalars in, a device scalar out
    from vltrain.tasks.base import work_of
    work = work_of(torch.tensor([10, 4]), mlm_rows=3)
    got = fc.count(work.tokens, work.tokens_sq, work.mlm_rows)
    assert torch.is_tensor(got) and float(got) == want + flops_per_sample(n, cfg, seq_len=4) < fc.batch(2, T, 3)


@pytest.mark.parametrize("mlm, mrc", [(True, True), (True, False), (False, True)])
def test_pretraining_work_counts_the_rows_the_model_is_asked_for(mlm, mrc):
    """The MFU counter's MLM rows are the text positions the loss passes to the model, whatever
    the objectives flags: one decision, read by both."""
    import dataclasses
    from benchmarks.common import Size, make_batch
    from vltrain.config import ObjectivesConfig
    from vltrain.model import VLModel
    from vltrain.tasks import get_task
    from vltrain.tasks.base import batch_work
    size = Size("t", debug_model_config(), batch=3, regions=5, text=9)
    batch = make_batch(size)
    batch = dataclasses.replace(batch, mrc_positions=torch.tensor([0, 7, 11]),
                                mrc_targets=torch.softmax(torch.randn(3, 17), -1))
    cfg = Config(model=size.model, objectives=ObjectivesConfig(mlm=mlm, mrc=mrc))
    spec = get_task("pretrain")
    model = VLModel(cfg.model)
    seen = {}
    model.register_forward_pre_hook(lambda m, args, kw: seen.update(kw), with_kwargs=True)
    spec.build_module(cfg, model)(batch)
    text, regions = seen["text_positions"], seen["region_positions"]
    work = batch_work(spec, batch, cfg)
    assert work.mlm_rows == text.numel() == (batch.mlm_positions.numel() if mlm else 0)
    assert (regions is not None) == mrc
    # the benchmark's batch has no padding: the count is its uniform one, with or without a mask
    for b in (batch, dataclasses.replace(batch, region_mask=None)):
        work = batch_work(spec, b, cfg)
        assert (int(work.tokens), int(work.tokens_sq)) == (3 * size.seq_len, 3 * size.seq_len ** 2)


def test_self_critical_work_is_not_counted(tmp_path):
    """SCST decodes captions of data-dependent length: its work is None (the trainer then adds
    no tokens and no FLOPs), and with no FLOPs the monitor reports no MFU, even with a peak."""
    from benchmarks.common import Size, make_batch
    from vltrain.tasks import get_task
    from vltrain.tasks.base import batch_work
    batch = make_batch(Size("t", debug_model_config(), batch=3, regions=5, text=9))
    cfg = Config(model=debug_model_config())
    cfg.task.name = "caption"
    assert batch_work(get_task("caption"), batch, cfg).mlm_rows == batch.mlm_positions.numel()
    cfg.task.scst = True
    assert batch_work(get_task("caption"), batch, cfg) is None
    mon = Monitor(str(tmp_path), rank=0, log_every=1, peak_tflops=989.0, log_fn=lambda s: None)
    out = mon.step_end(1, {"loss": 1.0}, samples=4, tokens=0, flops=0.0)
    mon.close()
    assert out["perf/samples_per_s"] > 0 and "perf/mfu" not in out and "perf/tokens_per_s" not in out


def test_bert_base_flops_match_the_design_figure():
    """DESIGN.md: BERT-base with 100 regions + ~40 text tokens is about 1e11 FLOPs/sample."""
    cfg = Config().model
    n = 85_000_000 + 2048 * 768     # 12 layers ~85M, + the region projection
    f = flops_per_sample(n, cfg, seq_len=142, n_mlm_pred=6)
    assert 0.7e11 < f < 1.3e11


def test_peak_table():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756
    assert peak_tflops_for("NVIDIA H200") == 989
    assert peak_tflops_for("NVIDIA H200 NVL") == 835          # not the SXM part's 989
    assert peak_tflops_for("NVIDIA H800 PCIe") == 756
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops_for("NVIDIA A100 80GB PCIe", "fp16") == 312
    assert peak_tflops_for("NVIDIA H100 80GB HBM3", "fp32") is None
    assert [peak_tflops_for(f"Tesla {n}", "fp16") for n in ("V100-SXM2-32GB", "V100-PCIE-16GB", "V100S-PCIE-32GB")] \
        == [125, 112, 130]
    assert peak_tflops_for("Some CPU") is None
    assert device_peak_tflops("bf16", override=123.0) == 123.0
    if not torch.cuda.is_available():
        assert device_peak_tflops("bf16") is None


def test_peak_memory_is_positive():
    assert 0.001 < peak_memory_gb() < 1000


def _read(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    files = glob.glob(os.path.join(tb_dir, "events.out.tfevents.*"))
    assert len(files) == 1, files
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _train(mon, steps, data_sleep=0.0, step_sleep=0.0, flops=0.0):
    for step in range(1, steps + 1):
        with mon.data_wait():
            time.sleep(data_sleep)
        time.sleep(step_sleep)
        loss = torch.tensor(2.0 / step)
        mon.step_end(step, {"loss": loss, "loss_mlm": loss * 0.5, "mlm_acc": torch.tensor(0.25)},
                     samples=8, tokens=torch.tensor(100), flops=flops, lr=1e-4 * step,
                     grad_norm=torch.tensor(1.5), loss_scale=None)


def test_monitor_writes_expected_tags_and_only_rank0(tmp_path, monkeypatch):
    logs = []
    monkeypatch.setenv("VLTRAIN_TEST_SENTINEL_SECRET", "S3NT1NEL-ENV")
    mon = Monitor(str(tmp_path / "run"), rank=0, world_size=1, log_every=2, peak_tflops=1e-6,
                  log_fn=logs.append, max_steps=6)
    cfg = config_to_dict(Config())
    cfg["data"]["train"] = "s3://user:S3NT1NEL-URL@bucket/prefix"
    cfg["secret_key"] = "S3NT1NEL-KEY"
    mon.log_hparams(cfg, {"zero_optimization": {"stage": 2}})
    _train(mon, 6, data_sleep=0.02, step_sleep=0.02, flops=1e6)
    mon.log_val(6, {"loss": 1.0, "mlm_acc": torch.tensor(0.5)})
    mon.close()
    other = Monitor(str(tmp_path / "run1"), rank=1, world_size=2, log_every=2, log_fn=logs.append)
    _train(other, 4)
    other.close()
    assert not (tmp_path / "run1").exists()                  # rank 1 writes nothing

    acc = _read(str(tmp_path / "run" / "tensorboard"))
    tags = set(acc.Tags()["scalars"])
    want = {"train/loss", "train/loss_mlm", "train/mlm_acc", "train/lr", "train/grad_norm",
            "perf/samples_per_s", "perf/tokens_per_s", "perf/mfu", "perf/data_wait_frac", "perf/step_time_s",
            "perf/peak_mem_gb", "val/loss", "val/mlm_acc"}
    assert want <= tags, want - tags
    assert "train/loss_scale" not in tags                    # not fp16
    for tag in tags:
        assert all(math.isfinite(e.value) for e in acc.Scalars(tag)), tag
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [2, 4, 6]
    assert loss[0].value == pytest.approx((2.0 + 1.0) / 2)   # mean over the interval
    assert [e.value for e in acc.Scalars("train/lr")] == pytest.approx([2e-4, 4e-4, 6e-4])
    by_samples = _read(str(tmp_path / "run" / "tensorboard" / "by_samples"))
    assert set(by_samples.Tags()["scalars"]) == {"by_samples/loss", "by_samples/samples_per_s"}
    assert [e.step for e in by_samples.Scalars("by_samples/loss")] == [16, 32, 48]
    sps = acc.Scalars("perf/samples_per_s")[-1].value
    step_time = acc.Scalars("perf/step_time_s")[-1].value
    assert 0.04 <= step_time < 1.0 and sps == pytest.approx(8 / step_time, rel=0.05)
    assert acc.Scalars("perf/tokens_per_s")[-1].value == pytest.approx(100 / step_time, rel=0.05)
    assert 0.3 < acc.Scalars("perf/data_wait_frac")[-1].value < 0.7   # half of each step was data wait
    mfu = acc.Scalars("perf/mfu")[-1].value
    assert mfu == pytest.approx((1e6 / step_time) / 1e6, rel=0.05)    # peak 1e-6 TFLOP/s = 1e6 FLOP/s
    # hparams: the HParams plugin and a text table
    assert "hparams/text_summary" in acc.Tags()["tensors"]
    assert "_hparams_/experiment" in acc.PluginTagToContent("hparams")
    # the human line
    assert len([ln for ln in logs if ln.startswith("step ")]) == 3
    assert logs[-2].startswith("step 6/6 | loss ") and "samples/s" in logs[-2] and "MFU" in logs[-2]
    assert logs[-1].startswith("val step 6")
    # secrets: no env value, no secret-looking key, no URL password
    blob = open(glob.glob(str(tmp_path / "run" / "tensorboard" / "events.*"))[0], "rb").read()
    assert b"S3NT1NEL" not in blob
    assert b"zero_optimization.stage" in blob and b"train.lr" in blob


def test_a_full_disk_stops_tensorboard_not_the_training(tmp_path, caplog):
    """TensorBoard's writer failing (its filesystem full: the first thing to fail when
    output_root fills, before any checkpoint) ended the run with its OSError; now logging
    there stops with one warning and the log lines go on."""
    import errno
    logs = []
    mon = Monitor(str(tmp_path), rank=0, log_every=1, log_fn=logs.append)
    mon.step_end(1, {"loss": 1.0}, samples=4)

    def full():
        raise OSError(errno.ENOSPC, "No space left on device")
    mon.writer.flush = full
    mon.step_end(2, {"loss": 0.5}, samples=4)
    mon.log_scalar("perf/checkpoint_save_s", 1.0, 2)
    mon.step_end(3, {"loss": 0.25}, samples=4)
    mon.close()
    assert [ln.split(" |")[0] for ln in logs] == ["step 1", "step 2", "step 3"]
    warned = [r.getMessage() for r in caplog.records if "TensorBoard logging" in r.getMessage()]
    assert warned == [f"TensorBoard logging to {tmp_path}/tensorboard stopped (OSError: [Errno 28] No space left "
                      "on device); training goes on, the figures stay in the log"], warned
    assert mon.writer is None


def test_no_mfu_without_a_peak_and_loss_scale_when_given(tmp_path):
    mon = Monitor(str(tmp_path), rank=0, log_every=1, peak_tflops=None, log_fn=lambda s: None)
    for step in (1, 2):
        mon.step_end(step, {"loss": 1.0}, samples=4, flops=1e9, lr=1e-3, loss_scale=65536.0)
    mon.close()
    acc = _read(str(tmp_path / "tensorboard"))
    tags = set(acc.Tags()["scalars"])
    assert "perf/mfu" not in tags and "perf/tokens_per_s" not in tags
    assert [e.value for e in acc.Scalars("train/loss_scale")] == [65536.0, 65536.0]


def test_scrub_hparams():
    out = scrub_hparams({"a": {"b": 1, "password": "x", "aws_secret_access_key": "y"},
                         "url": "https://u:p@host/x", "l": [1, 2], "n": None})
    assert out == {"a.b": 1, "url": "https://***@host/x", "l": "[1, 2]", "n": "None"}


def test_reset_timer_keeps_the_interval_losses_and_sample_count(tmp_path):
    mon = Monitor(str(tmp_path), rank=0, log_every=2, log_fn=lambda s: None)
    mon.step_end(1, {"loss": 1.0}, samples=4)
    time.sleep(0.3)                      # e.g. a validation pass: not training time
    mon.reset_timer()
    mon.step_end(2, {"loss": 3.0}, samples=4)
    mon.close()
    acc = _read(str(tmp_path / "tensorboard"))
    assert acc.Scalars("train/loss")[0].value == 2.0
    assert _read(str(tmp_path / "tensorboard" / "by_samples")).Scalars("by_samples/loss")[0].step == 8
    assert acc.Scalars("perf/step_time_s")[0].value < 0.25


def test_a_resume_inside_a_logging_interval_logs_the_uninterrupted_average():
    """The checkpoint at step 2 (log_every=3) keeps the interval's sums: the resumed run's
    line at step 3 averages steps 1-3 and counts their samples, as the uninterrupted run's.
    The sums are the world's: after a resume on more ranks only rank 0 holds them."""
    def run(steps, mon):
        out = None
        for step in steps:
            out = mon.step_end(step, {"loss": torch.tensor(float(step))}, samples=8) or out
        return out

    ref = Monitor(None, rank=0, log_every=3, log_fn=lambda s: None)
    want = run(range(1, 4), ref)
    first = Monitor(None, rank=0, log_every=3, log_fn=lambda s: None)
    run(range(1, 3), first)
    pending = first.pending_state()
    assert pending["global"] and pending["counts"] == {"train/loss": 2} and pending["new_samples"] == 16
    resumed = Monitor(None, rank=0, log_every=3, log_fn=lambda s: None)
    resumed.resume_at(2, first.samples_seen, pending)
    got = run([3], resumed)
    assert got["train/loss"] == want["train/loss"] == 2.0 and resumed.samples_seen == ref.samples_seen == 24
    lost = Monitor(None, rank=0, log_every=3, log_fn=lambda s: None)       # without the interval
    lost.resume_at(2, first.samples_seen)
    assert run([3], lost)["train/loss"] == 3.0 and lost.samples_seen == 8
    other = Monitor(None, rank=1, world_size=2, log_every=3, log_fn=lambda s: None)
    other.resume_at(2, 0, pending)
    assert other._sums == {} and other._new_samples == 0


def test_resume_hides_what_the_crashed_run_logged_after_the_checkpoint(tmp_path):
    first = Monitor(str(tmp_path), rank=0, log_every=1, log_fn=lambda s: None)
    for step in range(1, 5):
        first.step_end(step, {"loss": float(step)}, samples=8)
    first.close()                        # "crash" after step 4; the checkpoint was at step 2
    # The resumed run starts later, as a new job would. TensorBoard orders event files by
    # name (epoch second, host, pid, then a per-process counter compared as text): two
    # writers of one process within one second can sort "…9" after "…10".
    time.sleep(1.1)
    second = Monitor(str(tmp_path), rank=0, log_every=1, log_fn=lambda s: None)
    second.resume_at(step=2, samples_seen=16)
    for step in range(3, 6):
        second.step_end(step, {"loss": 10.0 * step}, samples=8)
    second.close()
    acc = _read_all(str(tmp_path / "tensorboard"))
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0),
                                                                      (5, 50.0)]
    acc = _read_all(str(tmp_path / "tensorboard" / "by_samples"))
    assert [(e.step, e.value) for e in acc.Scalars("by_samples/loss")] == [(8, 1.0), (16, 2.0), (24, 30.0),
                                                                           (32, 40.0), (40, 50.0)]


def _read_all(tb_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(tb_dir, size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def _monitor_rank(rank: int, port: int, out: str):
    """One gloo rank: rank 1's micro-steps had no region loss (text-only batches), and its
    loader is slower (0.3 s a step, rank 0's 0.1 s, then 0.1 s of "compute" each); each step
    counts 4 samples and 1 MFLOP against a 1 MFLOP/s peak; then a step 3 the checkpoint's
    pending interval holds."""
    import json
    import time
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    mon = Monitor(None, rank=rank, world_size=2, log_every=2, log_fn=lambda s: None, peak_tflops=1e-6)
    start = time.perf_counter()
    for step in (1, 2):
        with mon.data_wait():
            time.sleep(0.1 + 0.2 * rank)
        time.sleep(0.1)
        metrics = {"loss": torch.tensor(1.0 + rank)}
        if rank == 0:
            metrics["loss_mrc"] = torch.tensor(3.0 * step)
        if step == 2:
            wall = time.perf_counter() - start      # this rank's own clock over the interval
        logged = mon.step_end(step, metrics, samples=4, flops=1e6)
    mon.step_end(3, {"loss": torch.tensor(1.0 + rank)}, samples=4)
    pending = mon.pending_state()
    with open(f"{out}/rank{rank}.json", "w") as f:
        json.dump({"logged": logged, "pending": pending, "wall": wall}, f)
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """What two gloo ranks of _monitor_rank logged and saved (one launch for the tests below)."""
    import torch.multiprocessing as mp
    from vltrain.engine.distributed import free_port
    out = tmp_path_factory.mktemp("monitor2")
    mp.spawn(_monitor_rank, args=(free_port(), str(out)), nprocs=2)
    return out


def test_ranks_with_different_metrics_reduce_their_union(two_ranks):
    """A rank whose interval lacks a metric (no region loss on text-only batches) joins the
    reduction all the same: the metric is averaged over the micro-steps that had it."""
    import json
    for rank in (0, 1):
        logged = json.load(open(two_ranks / f"rank{rank}.json"))["logged"]
        assert logged["train/loss"] == pytest.approx(1.5)              # (1 + 1 + 2 + 2) / 4
        assert logged["train/loss_mrc"] == pytest.approx(4.5)          # (3 + 6) / 2, rank 0's only
        # rank 1 waited for data 3/4 of the interval, rank 0 half of it: the slowest rank's
        # share, which holds the job (their mean read less, their sum more than all of it)
        assert 0.7 < logged["perf/data_wait_frac"] < 0.85, logged


def test_throughput_and_mfu_over_ranks_are_the_jobs(two_ranks):
    """Two ranks each train 4 samples and 1 MFLOP a step against a 1 MFLOP/s peak: the step
    time is the job's (the ranks meet at the log step's reduction, so each clock reads the slower
    rank's interval; averaged over ranks, not summed), samples/s counts both ranks' samples, and
    MFU divides both ranks' FLOPs by both ranks' peak."""
    import json
    runs = [json.load(open(two_ranks / f"rank{rank}.json")) for rank in (0, 1)]
    logged = runs[0]["logged"]
    step = logged["perf/step_time_s"]
    assert step == pytest.approx(max(r["wall"] for r in runs) / 2, rel=0.2), (logged, runs)
    assert logged["perf/samples_per_s"] * step == pytest.approx(8.0)      # 2 ranks x 4 samples a step
    assert logged["perf/mfu"] * step == pytest.approx(1.0)                # 1 s of peak work a step, per rank


def test_a_resume_on_fewer_ranks_weighs_the_saved_steps_as_its_own(two_ranks):
    """A checkpoint's interval held each rank's step mean at weight 1, so after a resume from 2
    ranks to 1 the saved step weighed twice the new one: (1 + 2 + 4) / 3 instead of the steps'
    mean (1.5 + 4) / 2."""
    import json
    pending = json.load(open(two_ranks / "rank0.json"))["pending"]
    mon = Monitor(None, rank=0, world_size=1, log_every=2, log_fn=lambda s: None)
    mon.resume_at(3, 12, pending)
    logged = mon.step_end(4, {"loss": torch.tensor(4.0)}, samples=8)
    assert logged["train/loss"] == pytest.approx((1.5 + 4.0) / 2)


def test_a_steps_micro_batches_average_each_metric_over_those_that_gave_it():
    """grad_accum=2 with one text-only micro-batch (no region loss): loss_mrc is that of the
    other micro-batch, not half of it; samples are the micro-batches' own sizes (a batch
    thinned by skip_bad_samples is smaller); uncounted work adds no tokens."""
    mb = MicroBatches()
    mb.add({"loss": torch.tensor(2.0), "loss_mrc": torch.tensor(3.0)}, 30, torch.tensor(400), 1e9)
    mb.add({"loss": torch.tensor(4.0)}, 32, torch.tensor(300), 2e9)
    means = mb.means()
    assert float(means["loss"]) == 3.0 and float(means["loss_mrc"]) == 3.0
    assert mb.samples == 62 and int(mb.tokens) == 700 and mb.flops == 3e9
    scst = MicroBatches()
    scst.add({"loss": 1.0}, 4)
    assert scst.tokens is None and scst.flops == 0.0


def test_accuracy_over_masked_tokens_weighs_every_token_once():
    """BERT's masked_lm_accuracy: correct / masked over the interval, whatever micro-batch,
    step or checkpoint they fell in. Micro-batches of 10/10 and 45/90 correct read 55%, not
    the 75% of a mean over micro-batches; a resume inside the interval keeps the counts."""
    from vltrain.monitor import Ratio, accuracy
    first = accuracy(torch.ones(10), torch.ones(10))
    second = accuracy(torch.tensor([1.0] * 45 + [0.0] * 45), torch.ones(90))
    assert (float(first.num), float(first.den), float(second.num), float(second.den)) == (10, 10, 45, 90)
    mb = MicroBatches()
    mb.add({"mlm_acc": first, "loss": torch.tensor(1.0)}, 8)
    mb.add({"mlm_acc": second, "loss": torch.tensor(3.0)}, 8)
    step1 = mb.means()
    assert isinstance(step1["mlm_acc"], Ratio) and float(step1["loss"]) == 2.0

    def run(mon, steps):
        out = None
        for step, metrics in steps:
            out = mon.step_end(step, metrics, samples=16) or out
        return out
    steps = [(1, step1), (2, {"mlm_acc": accuracy(torch.zeros(100), torch.ones(100))})]
    whole = run(Monitor(None, rank=0, log_every=2, log_fn=lambda s: None), steps)
    assert whole["train/mlm_acc"] == pytest.approx(55 / 200) and whole["train/loss"] == 2.0
    half = Monitor(None, rank=0, log_every=2, log_fn=lambda s: None)
    run(half, steps[:1])
    resumed = Monitor(None, rank=0, log_every=2, log_fn=lambda s: None)
    resumed.resume_at(1, half.samples_seen, half.pending_state())
    assert run(resumed, steps[1:])["train/mlm_acc"] == pytest.approx(55 / 200)


def test_an_fp16_step_skipped_on_overflow_leaves_the_grad_norm_mean_finite(tmp_path):
    """DeepSpeed reports the norm of a step skipped on overflow as inf: left out of the
    interval's mean, not turning it into inf."""
    mon = Monitor(str(tmp_path), rank=0, log_every=3, log_fn=lambda s: None)
    mon.step_end(1, {"loss": 1.0}, samples=4, grad_norm=float("inf"))
    mon.step_end(2, {"loss": 1.0}, samples=4, grad_norm=2.0)
    out = mon.step_end(3, {"loss": 1.0}, samples=4, grad_norm=torch.tensor(4.0))
    mon.close()
    assert out["train/grad_norm"] == pytest.approx(3.0)
