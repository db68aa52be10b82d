"""No host-device sync in a training step's forward and backward, for every task.

A sync (reading a value back, or an op whose output shape depends on values) makes the host
wait for the GPU, so it cannot queue the next kernels ahead: GPU idle time in every step.
The trainer keeps exactly one per micro-step on purpose (the all-reduced flag vector,
vltrain/engine/trainer.py); the model, the losses and the task heads must add none.

On CPU a recorder stands in for CUDA's sync detector (tests/fixtures/host_sync.py); on a GPU
the same step runs under ``torch.cuda.set_sync_debug_mode("error")``.
"""
import pytest
import torch

from tests.fixtures.host_sync import HostSyncRecorder
from tests.fixtures.tasks import CORPUS_DIR, collator, read_rows, task_cfg

# Syncs that only run on CPU tensors, each skipped for device tensors precisely because it
# would sync there: validating a mode tensor given on the host, varlen's "any target rows?"
# shortcut, and varlen's CPU emulation of the GPU kernels (it loops over segments).
CPU_ONLY = {"model/vl_model.py:mode_tensor", "model/attention.py:plan_varlen", "model/attention.py:emulated_varlen"}

CASES = {                                     # name -> (task, config overrides)
    "pretrain": ("pretrain", []),
    "pretrain-example-reduction": ("pretrain", ["objectives.loss_reduction=example"]),
    "caption": ("caption", []),
    "caption-example-reduction": ("caption", ["objectives.loss_reduction=example"]),
    "vqa-vlp": ("vqa", []),
    "vqa-vlbert": ("vqa", ["task.vqa_head=vlbert"]),
    "mc": ("mc", []),
    "refs": ("refs", []),
}


def training_step(corpus: str, case: str, backend: str, device: str = "cpu"):
    """(module, batch) of one case's training step on ``device``: the debug model and a batch
    of 8 training samples, collated as the trainer's loader does."""
    from vltrain.model import VLModel
    from vltrain.tasks import get_task
    task, extra = CASES[case]
    cfg = task_cfg(corpus, task, f"model.attention_backend={backend}", *extra)
    rows = read_rows(cfg.data.train)[:8]
    batch = collator(cfg, "train", train=True)(rows)
    torch.manual_seed(0)
    module = get_task(cfg.task.name).build_module(cfg, VLModel(cfg.model)).to(device).train()
    return module, batch.to(device)


def test_the_recorder_sees_what_syncs_on_a_gpu():
    x = torch.arange(6.0)
    with HostSyncRecorder(package="tests") as rec:
        y = x * 2 + 1                                  # none of these
        torch.where(x > 2, x, y).index_add_(0, torch.tensor([0, 1]), x[:2])
        x.reshape(2, 3)[:, 1:].sum(0)
    assert rec.calls == []
    with HostSyncRecorder(package="tests") as rec:
        x.sum().item()
        bool(x.sum() > 0)
        x[x > 2]
        torch.nonzero(x)
        x.tolist()
        torch.where(x > 2)
        x.cpu()
    assert [op for op, _ in rec.calls] == ["item", "__bool__", "__getitem__", "nonzero", "tolist", "where", "cpu"]
    assert all(where.startswith("test_host_syncs.py:test_the_recorder_sees_what_syncs_on_a_gpu:")
               for _, where in rec.calls)


@pytest.mark.parametrize("backend", ["eager", "sdpa", "varlen"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_step_has_no_host_sync(synthetic_corpus, case, backend):
    module, batch = training_step(synthetic_corpus, case, backend)
    with HostSyncRecorder() as rec:
        loss, _ = module(batch)
        loss.backward()
    assert torch.isfinite(loss)
    syncs = sorted({(op, where) for op, where in rec.calls if where.rsplit(":", 1)[0] not in CPU_ONLY})
    assert not syncs, f"{case} ({backend}): host syncs in the step: {syncs}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU reference: the test above)")
@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_a_training_step_has_no_host_sync_on_cuda(synthetic_corpus, case, backend):
    from vltrain.model.attention import varlen_kernel_name
    if backend == "varlen" and varlen_kernel_name("cuda") is None:
        pytest.skip("no varlen kernel (flash_attn or torch.nn.attention.varlen) here")
    module, batch = training_step(synthetic_corpus, case, backend, device="cuda")
    loss, _ = module(batch)          # first call outside the check: compiling (flex) may sync
    loss.backward()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = module(batch)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


def test_every_task_has_a_case():
    from vltrain.tasks import TASKS
    assert {task for task, _ in CASES.values()} == set(TASKS) <= set(CORPUS_DIR)
