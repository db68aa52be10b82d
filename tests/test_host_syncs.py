"""No host-device sync in a training step's forward and backward, for every task.

A sync (reading a value back, or an op whose output shape depends on values) makes the host
wait for the GPU, so it cannot queue the next kernels ahead: GPU idle time in every step.
The trainer keeps exactly one per micro-step on purpose (the all-reduced flag vector,
vltrain/engine/trainer.py); the model, the losses and the task heads must add none.

On CPU a recorder stands in for CUDA's sync detector (tests/fixtures/host_sync.py); on a GPU
the same step runs under ``torch.cuda.set_sync_debug_mode("error")``. Last, the whole
``Trainer.train()`` loop: vltrain reads back once per micro-step (the flags), once per log
interval and once per checkpoint. On a GPU, also every task's step as the recipes run it
there: bf16 weights through the compiled blocks, its loss equal to the uncompiled one's.
"""
import collections
import textwrap

import pytest
import torch

from tests.fixtures.corpus import run_one_rank
from tests.fixtures.host_sync import HostSyncRecorder
from tests.fixtures.tasks import CORPUS_DIR, collator, read_rows, task_cfg

# Syncs that only run on CPU tensors, each skipped for device tensors precisely because it
# would sync there: validating a mode tensor given on the host, varlen's "any target rows?"
# shortcut, and varlen's CPU emulation of the GPU kernels (it loops over segments).
# Exempt by function *and* operation, so that any other read-back added there still fails.
CPU_ONLY = {"model/vl_model.py:mode_tensor": {"__bool__"}, "model/attention.py:plan_varlen": {"__bool__"},
            "model/attention.py:emulated_varlen": {"tolist"}}


def cpu_only(op: str, where: str) -> bool:
    return op in CPU_ONLY.get(where.rsplit(":", 1)[0].removeprefix("vltrain/"), ())

CASES = {                                     # name -> (task, config overrides)
    "pretrain": ("pretrain", []),
    "pretrain-vlbert": ("pretrain", ["model.region_embedding=vlbert", "objectives.mrc=true",
                                    "data.image_feature=regions_mean", "model.vlbert_image_box=true",
                                    "model.vlbert_end_token=true"]),          # the VL-BERT recipe
    "pretrain-example-reduction": ("pretrain", ["objectives.loss_reduction=example"]),
    "caption": ("caption", []),
    "caption-example-reduction": ("caption", ["objectives.loss_reduction=example"]),
    "vqa-vlp": ("vqa", []),
    "vqa-vlbert": ("vqa", ["task.vqa_head=vlbert"]),
    "mc": ("mc", []),
    "mc-sigmoid": ("mc", ["task.mc_loss=sigmoid"]),
    "refs": ("refs", []),
}


def training_step(corpus: str, case: str, backend: str, device: str = "cpu", *overrides: str,
                  dtype: torch.dtype = None):
    """(module, batch) of one case's training step on ``device``: the debug model (built as
    build.py does: blocks compiled where ``model.compile=true``) and a batch of 8 training
    samples, collated as the trainer's loader does; with ``dtype``, weights and batch in it
    (DeepSpeed's bf16 mode)."""
    from vltrain.model import VLModel
    from vltrain.model.compile import maybe_compile
    from vltrain.tasks import get_task
    task, extra = CASES[case]
    cfg = task_cfg(corpus, task, f"model.attention_backend={backend}", *extra, *overrides)
    rows = read_rows(cfg.data.train)[:8]
    batch = collator(cfg, "train", train=True)(rows)
    torch.manual_seed(0)
    module = get_task(cfg.task.name).build_module(cfg, maybe_compile(VLModel(cfg.model))).to(device, dtype).train()
    return module, batch.to(device, float_dtype=dtype)


@pytest.mark.parametrize("case", ["pretrain", "pretrain-vlbert", "caption"])
def test_vocabulary_logits_are_computed_only_at_the_masked_positions(synthetic_corpus, case):
    """The tied decoder (hidden x vocabulary, the largest matmul of a BERT-base head) runs on
    the masked rows alone: every call's rows add up to the batch's MLM labels."""
    module, batch = training_step(synthetic_corpus, case, "sdpa")
    word = module.model.embeddings.word
    rows = []

    def record(mod, args, kwargs, out):
        if kwargs.get("logits"):
            rows.append(args[0].shape[0])
    handle = word.register_forward_hook(record, with_kwargs=True)
    try:
        loss, _ = module(batch)
    finally:
        handle.remove()
    n = int(batch.mlm_labels.numel())
    assert n and rows and sum(rows) == n < batch.input_ids.numel(), (rows, n, batch.input_ids.shape)


def test_the_recorder_sees_what_syncs_on_a_gpu():
    x = torch.arange(6.0)
    with HostSyncRecorder(packages=("tests",)) as rec:
        y = x * 2 + 1                                  # none of these
        torch.where(x > 2, x, y).index_add_(0, torch.tensor([0, 1]), x[:2])
        x.reshape(2, 3)[:, 1:].sum(0)
    assert rec.calls == []
    with HostSyncRecorder(packages=("tests",)) as rec:
        x.sum().item()
        bool(x.sum() > 0)
        x[x > 2]
        torch.nonzero(x)
        x.tolist()
        torch.where(x > 2)
        x.cpu()
        x.new_tensor([0.0, 1.0])
    assert [op for op, _ in rec.calls] == ["item", "__bool__", "__getitem__", "nonzero", "tolist", "where", "cpu",
                                           "new_tensor"]
    assert all(where.startswith("test_host_syncs.py:test_the_recorder_sees_what_syncs_on_a_gpu:")
               for _, where in rec.calls)
    from deepspeed.accelerator import get_accelerator    # device-wide waits, also in nested recorders
    with HostSyncRecorder(packages=("tests",)) as outer:
        with HostSyncRecorder(packages=("tests",)) as inner:
            get_accelerator().synchronize()
        get_accelerator().synchronize()
    assert [op for op, _ in inner.calls] == ["synchronize"] and [op for op, _ in outer.calls] == ["synchronize"] * 2
    assert "synchronize" not in vars(get_accelerator())   # the accelerator's own method again


@pytest.mark.parametrize("backend", ["eager", "sdpa", "varlen"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_step_has_no_host_sync(synthetic_corpus, case, backend):
    module, batch = training_step(synthetic_corpus, case, backend)
    with HostSyncRecorder() as rec:
        loss, _ = module(batch)
        loss.backward()
    assert torch.isfinite(loss)
    syncs = sorted({(op, where) for op, where in rec.calls if not cpu_only(op, where)})
    assert not syncs, f"{case} ({backend}): host syncs in the step: {syncs}"


# Every case with sdpa (the backend `auto` picks on GPUs); flex, varlen and triton (their
# per-forward BlockMask / unpadding plans / keep-mask draws) on pretraining only: each case
# would compile flex anew.
CUDA_CASES = [(case, "sdpa") for case in sorted(CASES)] + [("pretrain", b) for b in ("flex", "varlen", "triton")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU reference: the test above)")
@pytest.mark.parametrize("case, backend", CUDA_CASES)
def test_a_training_step_has_no_host_sync_on_cuda(synthetic_corpus, case, backend):
    from vltrain.model.attention import varlen_kernel_name
    if backend == "varlen" and varlen_kernel_name("cuda") is None:
        pytest.skip("no varlen kernel (flash_attn or torch.nn.attention.varlen) here")
    module, batch = training_step(synthetic_corpus, case, backend, device="cuda")
    # varlen's GPU kernels take bf16/fp16 only: that case runs as GPU training does, in bf16
    amp = torch.autocast("cuda", torch.bfloat16, enabled=backend == "varlen")
    with amp:
        loss, _ = module(batch)      # first call outside the check: compiling (flex) may sync
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with amp:
            loss, _ = module(batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="needs CUDA (CPU references: the eager step above, the compiled blocks in test_attention_backends)")
@pytest.mark.parametrize("case, backend", [(case, "sdpa") for case in sorted(CASES)] + [("pretrain", "triton")])
def test_every_task_steps_compiled_in_bf16_on_cuda(synthetic_corpus, case, backend):
    """What every cluster recipe runs on a GPU (train.precision=auto -> bf16 weights,
    model.compile=true): each task's training step through the compiled blocks, then its
    validation forward, whose loss matches the uncompiled module's (same weights). triton:
    its custom ops inside the compiled blocks, the keep mask drawn by Inductor's RNG."""
    torch._dynamo.reset()      # graphs of earlier tests could fill the recompile limit (then: eager)
    module, batch = training_step(synthetic_corpus, case, backend, "cuda", "model.compile=true",
                                  dtype=torch.bfloat16)
    eager, _ = training_step(synthetic_corpus, case, backend, "cuda", dtype=torch.bfloat16)
    loss, _ = module(batch)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in module.parameters() if p.grad is not None)
    eager.load_state_dict(module.state_dict())
    with torch.no_grad():
        got, want = module.eval()(batch)[0], eager.eval()(batch)[0]
    assert torch.allclose(got.float(), want.float(), rtol=3e-2, atol=3e-2), (case, float(got), float(want))


ENGINE_CUDA_SCRIPT = textwrap.dedent(r"""
    import json
    import torch, deepspeed
    from vltrain.config import Config, debug_model_config
    from vltrain.engine.distributed import init_distributed
    from vltrain.engine.ds_config import check_buildable, no_decay_param_groups, resolve_ds_config
    from vltrain.engine.ds_readbacks import drop_step_readbacks
    info = init_distributed(timeout_s=60)
    cfg = Config(model=debug_model_config())
    cfg.train.micro_batch_size, cfg.train.precision = 4, "bf16"
    ds = resolve_ds_config("ds_configs/zero2.json", cfg, 1, info.accelerator)
    check_buildable(ds)                # as vltrain/engine/build.py (FusedAdam's JIT build on this node)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 1))
    eng = deepspeed.initialize(model=m, model_parameters=no_decay_param_groups(m, 0.01), config=ds)[0]
    applied = drop_step_readbacks(eng.optimizer)
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)

    def step():
        loss = eng(x).float().pow(2).mean()
        eng.backward(loss)
        eng.step()
    for _ in range(3):                 # past DeepSpeed's throughput timer's start step (2)
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    error = None
    try:
        for _ in range(3):
            step()
    except RuntimeError as e:
        import traceback
        error = traceback.format_exc()[-3000:]
    finally:
        torch.cuda.set_sync_debug_mode("default")
    print("RESULTS " + json.dumps({"applied": applied, "error": error}), flush=True)
""")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU reference: the trainer tests below)")
def test_the_engine_step_has_no_host_sync_on_cuda():
    """vltrain's DeepSpeed engine (ZeRO-2, bf16, FusedAdam) steps without waiting for the GPU:
    no throughput-timer synchronize, no norm read back (vltrain/engine/ds_readbacks.py)."""
    res = run_one_rank(ENGINE_CUDA_SCRIPT, DS_ACCELERATOR="cuda")
    assert res["applied"] is True
    assert res["error"] is None, res["error"]


def test_every_task_has_a_case():
    from vltrain.tasks import TASKS
    assert {task for task, _ in CASES.values()} == set(TASKS) <= set(CORPUS_DIR)


TRAINER_SCRIPT = textwrap.dedent(r"""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from tests.fixtures.host_sync import HostSyncRecorder
    from vltrain.config import load_config
    from vltrain.engine.build import build_training
    corpus, out = sys.argv[1], sys.argv[2]
    cfg = load_config("configs/debug.yaml", [f"data.train={corpus}/captions/pretrain", "data.val=",
                                             "train.max_steps=3", "train.grad_accum=2", "train.warmup_steps=1",
                                             "train.log_every=3", "train.precision=bf16",
                                             "train.save_every_steps=0", f"output_root={out}", "run_name=syncs",
                                             f"data.cache_dir={out}/cache"])
    trainer = build_training(cfg)
    rec = HostSyncRecorder(packages=("vltrain", "deepspeed"))
    from vltrain.engine.step_feed import StepFeed
    forward, fetch = trainer.engine.forward, StepFeed.fetch        # markers in the same timeline
    def marked(name, fn):
        def call(*a, **k):
            rec.calls.append((name, "marker"))
            return fn(*a, **k)
        return call
    trainer.engine.forward, StepFeed.fetch = marked("forward", forward), marked("fetch", fetch)
    with rec:
        code = trainer.train()
    print("RESULTS " + json.dumps({"code": code, "calls": rec.calls}), flush=True)
""")

# Where vltrain itself may read back from the device during Trainer.train(), and how often.
PER_MICRO_STEP = {"vltrain/engine/trainer.py:_flags",          # THE one sync: the agreed flag vector
                  "vltrain/model/vl_model.py:mode_tensor"}     # CPU only (see CPU_ONLY)
# Reads of the host batch before its copy (a step's token counts, step_feed.py): no device there.
PER_STEP_ON_THE_HOST = {"vltrain/objectives/reduce.py:token_counts"}
PER_LOG_INTERVAL_OR_RUN = {"vltrain/monitor.py:_reduced", "vltrain/monitor.py:<listcomp>",  # (_reduced's, Python 3.11)
                           "vltrain/engine/trainer.py:_data_counters",
                           "vltrain/engine/checkpoint.py:save", "vltrain/data/loader.py:__iter__"}


@pytest.fixture(scope="module")
def trainer_calls(synthetic_corpus, tmp_path_factory):
    """Trainer.train() as run.py runs it (DeepSpeed ZeRO-2, bf16 as on a GPU, 3 steps x 2
    micro-steps, one rank):
    its read-backs, with markers where the engine's forward and the trainer's fetch begin."""
    res = run_one_rank(TRAINER_SCRIPT, synthetic_corpus, str(tmp_path_factory.mktemp("syncs")))
    assert res["code"] == 0
    return [tuple(c) for c in res["calls"]]


def test_the_trainer_syncs_once_per_micro_step(trainer_calls):
    """vltrain's only per-micro-step read-back is the flag vector; logging reads once per
    interval, saving once per checkpoint."""
    sites = collections.Counter(where.rsplit(":", 1)[0] for _, where in trainer_calls if where != "marker")
    ours = {k: n for k, n in sites.items() if k.startswith("vltrain/")}
    deepspeeds = {k: n for k, n in sites.items() if not k.startswith("vltrain/")}
    assert set(ours) <= PER_MICRO_STEP | PER_LOG_INTERVAL_OR_RUN | PER_STEP_ON_THE_HOST, (ours, deepspeeds)
    # each step's micro-batches counted once, before the step: 2 host batches per step
    assert ours["vltrain/objectives/reduce.py:token_counts"] == 6, (ours, deepspeeds)
    assert ours["vltrain/engine/trainer.py:_flags"] == 6, (ours, deepspeeds)
    assert ours.get("vltrain/model/vl_model.py:mode_tensor", 0) == 6, (ours, deepspeeds)
    # one log step and the checkpoint's copy of the logging interval: .cpu().tolist() each
    assert ours.get("vltrain/monitor.py:_reduced", 0) <= 4, (ours, deepspeeds)


def test_deepspeeds_step_reads_nothing_back(trainer_calls):
    """DeepSpeed's ZeRO-1/2 step builds a constant on the host and reads the gradient norm back
    before clipping (four waits per bf16 step, before anything of the step is queued);
    vltrain/engine/ds_readbacks.py keeps both on the device. What is left of DeepSpeed's: its
    checkpoint tag check, at the save after the last step."""
    last_forward = max(i for i, call in enumerate(trainer_calls) if call == ("forward", "marker"))
    theirs = [(i, where) for i, (_, where) in enumerate(trainer_calls) if where.startswith("deepspeed/")]
    assert theirs and all(where.startswith("deepspeed/runtime/engine.py:_checkpoint_tag_validation:")
                          and i > last_forward for i, where in theirs), theirs


def test_no_device_wide_wait_in_training_steps(trainer_calls):
    """DeepSpeed's throughput timer is on by default and synchronizes the whole device at the
    start of every forward and the end of every step from the third step on: the host could
    never queue a forward while the GPU still ran the previous step. vltrain's resolved
    ds_config turns it off (vltrain/engine/ds_config.py); the 3-step run reaches the third."""
    waits = [where for op, where in trainer_calls if op == "synchronize"]
    assert waits == [], waits


def test_the_next_batch_is_fetched_before_the_first_read_back_after_each_forward(trainer_calls):
    """The trainer takes (and starts copying) the next micro-batch right after queuing a
    forward, before anything makes the host wait for the GPU: so the fetch overlaps GPU work
    even where DeepSpeed's backward or step syncs (this recorder sees read-backs; DeepSpeed's
    device-wide syncs with overlap_comm come inside the backward, later still). Every
    micro-step but the last fetches one; the first batch is fetched up front."""
    order = [op if where == "marker" else "sync" for op, where in trainer_calls if not cpu_only(op, where)]
    forwards = [i for i, op in enumerate(order) if op == "forward"]
    assert len(forwards) == 6 and order[0] == "fetch", order
    for i in forwards[:-1]:
        assert order[i + 1] == "fetch", (i, order)
    assert "fetch" not in order[forwards[-1]:], order
