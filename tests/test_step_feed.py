"""objectives.loss_reduction=token over the optimizer step (vltrain/engine/step_feed.py): the
micro-batches' token means divide by the step's count, so a global batch trains the same
however it is split; and the feed that counts each step's micro-batches before they train.
The 2-rank -> 1-rank resume with the default reduction is in test_ckpt_tools, a resume inside
a step an epoch's end cuts in test_resume_edges."""
import contextlib
import dataclasses

import pytest
import torch

from tests.fixtures.mds import make_caption_samples, make_text_samples
from vltrain.config import load_config
from vltrain.data.batch import Batch
from vltrain.data.collate import PretrainCollator, StreamInfo
from vltrain.data.loader import STAND_IN_KEY
from vltrain.data.schema import make_meta
from vltrain.engine.device_copy import DeviceCopier
from vltrain.engine.step_feed import COUNTS_KEY, EPOCH_END, STEP_KEY, StepFeed, stand_in_shares
from vltrain.model import VLModel
from vltrain.objectives.pretrain import pretrain_losses
from vltrain.objectives.reduce import step_divisors, token_counts
from vltrain.tokenization import Tokenizer

VLBERT = ["model.region_embedding=vlbert", "model.type_vocab_size=3", "model.image_token_type=2",
          "model.use_cls_probs=false", "model.geometry_conf=false", "model.vlbert_geometry_dim=64",
          "objectives.seq2seq_prob=0", "objectives.separate_text_mlm=true"]


@pytest.fixture(scope="module")
def mixed():
    """VL-BERT's pretraining batch of 8: image-text rows 0-4, text-only rows 5-7 (the real
    collator, masked tokens and regions), and a model."""
    cfg = load_config("configs/debug.yaml", VLBERT)
    meta = make_meta("captions", 64, 17, ("cls_prob",))
    streams = [StreamInfo("mem", meta), StreamInfo("text", make_meta("text", None, None))]
    collate = PretrainCollator(Tokenizer(cfg.data.vocab), cfg.data, cfg.objectives, 0, streams, vlbert=True)
    samples = make_caption_samples(5, feature_dim=64, num_classes=17, seed=3)
    texts = [dict(t, _stream=1) for t in make_text_samples(3, start_id=100)]
    batch = collate(samples + texts)
    torch.manual_seed(0)
    return cfg, VLModel(cfg.model), batch


def rows(batch: Batch, lo: int, hi: int) -> Batch:
    """Rows lo..hi-1 of ``batch`` as a micro-batch of their own (positions renumbered)."""
    T, N = batch.input_ids.shape[1], batch.region_feats.shape[1]
    text = (batch.mlm_positions // T >= lo) & (batch.mlm_positions // T < hi)
    regions = (batch.mrc_positions // N >= lo) & (batch.mrc_positions // N < hi)
    cut = {f.name: getattr(batch, f.name)[lo:hi] for f in dataclasses.fields(batch)
           if isinstance(getattr(batch, f.name), torch.Tensor)}
    cut.update(mlm_positions=batch.mlm_positions[text] - lo * T, mlm_labels=batch.mlm_labels[text],
               mrc_positions=batch.mrc_positions[regions] - lo * N, mrc_targets=batch.mrc_targets[regions])
    return dataclasses.replace(batch, **cut)


def step_gradient(model, micro_batches, objectives, divide_by_step: bool):
    """What DeepSpeed accumulates over one rank's micro-batches: the mean of their gradients."""
    model.zero_grad()
    k = len(micro_batches)
    step = step_divisors(torch.tensor([token_counts(b) for b in micro_batches]).sum(0), k)
    for b in micro_batches:
        b = dataclasses.replace(b, token_divisors=step if divide_by_step else None)
        (pretrain_losses(model, b, objectives)[0] / k).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("separate", [True, False])
def test_a_step_split_into_micro_batches_trains_as_one_batch(mixed, separate):
    """Four micro-batches of 2 (one all text-only, two without a text-only row) give the
    gradient of the batch of 8 when they divide by the step's counts; each by its own count
    (the per micro-batch mean) they do not: a sparse micro-batch's tokens weighed more."""
    cfg, model, batch = mixed
    objectives = dataclasses.replace(cfg.objectives, mrc=True, separate_text_mlm=separate)
    whole = step_gradient(model, [batch], objectives, divide_by_step=True)
    split = [rows(batch, i, i + 2) for i in range(0, 8, 2)]
    assert [bool(b.region_mask.any(1).all()) for b in split] == [True, True, False, False]
    assert not split[3].region_mask.any()                   # a micro-batch of text-only rows
    exact = step_gradient(model, split, objectives, divide_by_step=True)
    own = step_gradient(model, split, objectives, divide_by_step=False)
    scale = max(g.abs().max() for g in whole.values())
    assert max((exact[n] - whole[n]).abs().max() for n in whole) <= 1e-5 * scale
    assert max((own[n] - whole[n]).abs().max() for n in whole) > 1e-2 * scale


def test_without_text_only_rows_the_mean_is_over_the_masked_tokens():
    """Every run without data.text_train: no text-only rows. The step's MLM loss is the mean over
    its masked tokens, as the batch's own mean and per-example means at one token per row say
    (the two kinds clamped to 1 apart and added divided by the count + 1: half the loss, and
    its gradient, at one masked token)."""
    cfg = load_config("configs/debug.yaml", [])
    collate = PretrainCollator(Tokenizer(cfg.data.vocab), cfg.data, cfg.objectives, 0,
                               [StreamInfo("mem", make_meta("captions", 64, 17, ("cls_prob",)))])
    batch = collate(make_caption_samples(4, feature_dim=64, num_classes=17, seed=5))
    torch.manual_seed(0)
    model = VLModel(cfg.model)
    counts = token_counts(batch)
    assert counts[0] == 0 and counts[1] == batch.mlm_positions.numel() > 0
    with torch.no_grad():
        own = pretrain_losses(model, batch, cfg.objectives)[1]["loss_mlm"]
        step = pretrain_losses(model, dataclasses.replace(batch, token_divisors=step_divisors(
            torch.tensor(counts), 1)), cfg.objectives)[1]["loss_mlm"]
        one = rows(batch, 0, 1)
        one = dataclasses.replace(one, mlm_positions=one.mlm_positions[:1], mlm_labels=one.mlm_labels[:1])
        single = pretrain_losses(model, dataclasses.replace(one, token_divisors=step_divisors(
            torch.tensor(token_counts(one)), 1)), cfg.objectives)[1]["loss_mlm"]
        per_token = pretrain_losses(model, one, cfg.objectives)[1]["loss_mlm"]
    torch.testing.assert_close(step, own)
    torch.testing.assert_close(single, per_token)
    # caption fine-tuning's cross-entropy (the same divisor): its step mean is its token mean
    from vltrain.tasks.caption import build_caption, make_caption_collator
    cap_cfg = load_config("configs/caption_debug.yaml", [])
    caps = make_caption_collator(cap_cfg, Tokenizer(cap_cfg.data.vocab), [StreamInfo(
        "mem", make_meta("captions", 64, 17, ("cls_prob",)))], train=True)(
        make_caption_samples(4, feature_dim=64, num_classes=17, seed=6))
    task = build_caption(cap_cfg, VLModel(cap_cfg.model))
    with torch.no_grad():
        own = task(caps)[1]["loss_mlm"]
        step = task(dataclasses.replace(caps, token_divisors=step_divisors(torch.tensor(token_counts(caps)), 1)))[1]
    torch.testing.assert_close(step["loss_mlm"], own)


def test_the_step_mean_of_the_micro_batches_metrics_is_the_batchs_loss(mixed):
    """What the monitor logs for a step, the mean over its micro-batches (and ranks), is the
    loss of the batch they split: a micro-batch without regions reports a region loss of 0
    (its share), where leaving it out would scale the mean by 4/3."""
    cfg, model, batch = mixed
    objectives = dataclasses.replace(cfg.objectives, mrc=True)
    split = [rows(batch, i, i + 2) for i in range(0, 8, 2)]
    step = step_divisors(torch.tensor([token_counts(b) for b in split]).sum(0), 4)
    with torch.no_grad():
        whole = pretrain_losses(model, batch, objectives)[1]
        parts = [pretrain_losses(model, dataclasses.replace(b, token_divisors=step), objectives)[1] for b in split]
        own = pretrain_losses(model, split[3], objectives)[1]
    assert parts[3]["loss_mrc"] == 0 and "loss_mrc" not in own         # evaluation: nothing to report
    for k in ("loss", "loss_mlm", "loss_mrc"):
        torch.testing.assert_close(sum(p[k] for p in parts) / 4, whole[k])


def test_a_stand_in_micro_batch_logs_its_share_of_the_step_mean(mixed):
    """A stand-in (weight 0, counted 0 tokens) beside a real micro-batch: the step's logged
    losses, the monitor's mean over the step's micro-batches, are the real one's own means."""
    from vltrain.monitor import MicroBatches
    cfg, model, batch = mixed
    objectives = dataclasses.replace(cfg.objectives, mrc=True)
    step = step_divisors(torch.tensor(token_counts(batch)), 2)
    with torch.no_grad():
        own = pretrain_losses(model, batch, objectives)[1]
        real = pretrain_losses(model, dataclasses.replace(batch, token_divisors=step), objectives)[1]
    micro = MicroBatches()
    micro.add(real, batch.batch_size)
    micro.add(stand_in_shares(real), 0)
    assert "mlm_acc" not in stand_in_shares(real)      # accuracies count the tokens seen only
    means = micro.means()
    for k in ("loss", "loss_mlm", "loss_mrc"):
        torch.testing.assert_close(means[k], own[k])


def test_one_batch_divides_by_its_own_counts(mixed):
    """A step of one micro-batch: the step's divisors are the batch's own (evaluation's loss)."""
    cfg, model, batch = mixed
    objectives = dataclasses.replace(cfg.objectives, mrc=True)
    T = batch.input_ids.shape[1]
    counts = token_counts(batch)
    text_rows = (batch.mlm_positions // T >= 5).sum().item()
    assert counts == [text_rows, batch.mlm_positions.numel() - text_rows, batch.mrc_positions.numel()]
    assert 0 < text_rows < batch.mlm_positions.numel()
    with torch.no_grad():
        own = pretrain_losses(model, batch, objectives)[1]
        divisors = step_divisors(torch.tensor(counts), 1)
        step = pretrain_losses(model, dataclasses.replace(batch, token_divisors=divisors), objectives)[1]
    for k in ("loss", "loss_mlm", "loss_mrc"):
        torch.testing.assert_close(step[k], own[k])


def host_batch(i: int, masked: int, text_only: bool = False) -> Batch:
    """A micro-batch of 2 rows with ``masked`` masked tokens and 3 masked regions."""
    ids = torch.full((2, 6), 5)
    return Batch(sample_id=torch.tensor([2 * i, 2 * i + 1]), input_ids=ids, token_type_ids=torch.zeros_like(ids),
                 attention_mask=torch.ones_like(ids), mode=torch.zeros(2, dtype=torch.long),
                 region_feats=torch.zeros(2, 4, 3), region_mask=torch.full((2, 4), not text_only),
                 mlm_positions=torch.arange(masked), mlm_labels=torch.zeros(masked, dtype=torch.long),
                 mrc_positions=torch.arange(0 if text_only else 3), task={"i": i})


def run_feed(stream, accum, script, counting=True):
    """Drive a StepFeed as the trainer does; ``script``: per micro-batch taken, whether it is
    skipped (non-finite). Returns [(batch i, count, divisors)] in training order."""
    feed = StepFeed(iter(stream), DeviceCopier(torch.device("cpu")), accum, 1, token_counts if counting else None,
                    contextlib.nullcontext)
    out, ahead = [], feed.fetch()
    feed.carried = []                         # the batches that carried their count's counts
    for skipped in script:
        batch = feed.take(ahead)
        if COUNTS_KEY in batch.task:
            feed.carried.append(batch.task["i"])
        ahead = feed.fetch()                  # fetched while the forward runs
        if skipped:
            feed.extend(prefetched=True)
        d = batch.token_divisors
        out.append((batch.task["i"], batch.task.get(STEP_KEY, (None,))[0], None if d is None else d.tolist()))
    return out, feed


def test_the_feed_counts_each_step_before_it_trains():
    stream = [host_batch(i, masked=i + 1) for i in range(6)] + [EPOCH_END] + [host_batch(i, 2) for i in range(6, 12)]
    out, feed = run_feed(stream, 3, [False] * 6)
    assert [(i, c) for i, c, _ in out] == [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (5, 2)]
    # the step's masked tokens / its micro-batches; a kind it lacks (text-only rows) divides by
    # 1, all masked tokens by their count (not count + 1)
    assert out[0][2] == pytest.approx([1 / 3, (1 + 2 + 3) / 3, 3, (1 + 2 + 3) / 3])
    assert out[3][2] == pytest.approx([1 / 3, (4 + 5 + 6) / 3, 3, (4 + 5 + 6) / 3])
    # at the save after step 2, batch 6 fetched ahead: the rest of its step, pulled and counted
    assert feed.held == 2 and feed._tags[STEP_KEY] == (3, 3)
    assert sorted(b.task["i"] for b in feed._pending) == [7, 8]
    assert feed.carried == [0, 3]             # the counts travel with each count's first batch only


def test_a_count_stops_at_the_epochs_end():
    """An epoch ending inside a step (after a skipped micro-batch moved the steps by one):
    its batches are counted apart from the next epoch's, so those held back at a save are of
    one epoch; the next step is counted whole again."""
    stream = [host_batch(i, masked=i + 1) for i in range(5)] + [EPOCH_END] + [host_batch(i, 2) for i in range(5, 12)]
    out, feed = run_feed(stream, 3, [False] * 8)
    assert [(i, c) for i, c, _ in out] == [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 4), (7, 4)]
    # each part divides by its count per micro-batch: weighs 2/3 and 1/3 of the step
    assert out[3][2] == pytest.approx([1 / 2, (4 + 5) / 2, 3, (4 + 5) / 2]) and out[5][2] == pytest.approx([1, 2, 3, 2])


def test_text_only_rows_and_stand_ins_are_counted_as_the_losses_see_them():
    stand_in = dataclasses.replace(host_batch(1, 4), task={"i": 1, STAND_IN_KEY: True})
    stream = [host_batch(0, 2, text_only=True), stand_in, host_batch(2, 3)]
    out, _ = run_feed(stream, 3, [False] * 2)
    assert out[0][2] == pytest.approx([2 / 3, 3 / 3, 3 / 3, 5 / 3])   # text-only tokens apart; the stand-in counts 0


def test_a_skipped_micro_batch_is_replaced_under_the_same_count():
    stream = [host_batch(i, 1 + i % 2) for i in range(12)]
    # batch 1 skipped (mid-step): batch 3 completes step 1 under its count, step 2 starts at 4
    out, _ = run_feed(stream, 3, [False, True, False, False, False, False, False])
    assert [(i, c) for i, c, _ in out] == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]
    # batch 2 skipped (a step's last): batch 3, fetched ahead under step 2's count, completes
    # step 1; step 2 is counted again from batch 4
    out, _ = run_feed(stream, 3, [False, False, True, False, False, False, False])
    assert [(i, c) for i, c, _ in out] == [(0, 1), (1, 1), (2, 1), (3, 2), (4, 3), (5, 3), (6, 3)]
    assert out[4][2] == pytest.approx([1 / 3, (1 + 2 + 1) / 3, 3, (1 + 2 + 1) / 3])


def test_without_a_token_mean_batches_pass_one_at_a_time():
    stream = [host_batch(i, 2) for i in range(4)]
    out, feed = run_feed(stream, 3, [False, False], counting=False)
    assert out == [(0, None, None), (1, None, None)] and feed.held == 0
