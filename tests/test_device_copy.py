"""Host-to-device batch copies (vltrain/engine/device_copy.py): the same batch as ``Batch.to``,
region features cast, task tensors moved; on a GPU from pinned memory on a side stream, with
no host sync and correct values while the compute stream is still busy, also when the copy is
started before more compute is queued and taken into use after it (as the trainer does)."""
import dataclasses

import pytest
import torch

from benchmarks.common import Size, make_batch
from vltrain.config import debug_model_config
from vltrain.engine.device_copy import DeviceCopier


def host_batch():
    b = make_batch(Size("t", debug_model_config(), batch=3, regions=4, text=7))
    b.region_feats = b.region_feats.half()                      # as stored in the shards
    b.task["vqa_targets"] = torch.rand(3, 5)
    return b


def same(a, b) -> bool:
    ta, tb = list(a.tensors()), list(b.tensors())
    return len(ta) == len(tb) and all(x.dtype == y.dtype and torch.equal(x.cpu(), y.cpu()) for x, y in zip(ta, tb))


def test_batch_tensors_lists_every_tensor_once():
    b = host_batch()
    names = [f for f in vars(b) if isinstance(getattr(b, f), torch.Tensor)]
    assert len(list(b.tensors())) == len(names) + len(b.task)


@pytest.mark.parametrize("float_dtype", [None, torch.bfloat16])
def test_copier_on_cpu_equals_batch_to(float_dtype):
    b = host_batch()
    out = DeviceCopier(torch.device("cpu"), float_dtype)(b)
    assert same(out, b.to("cpu", float_dtype=float_dtype))
    assert out.region_feats.dtype == (float_dtype or torch.float16)
    assert out.region_boxes.dtype == torch.float32 and out.task["vqa_targets"].dtype == torch.float32
    pending = DeviceCopier(torch.device("cpu"), float_dtype).start(b)
    assert pending.get() is pending.get() and same(pending.get(), out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CPU reference: the test above)")
def test_copier_on_cuda_overlaps_a_busy_stream_and_gets_the_values_right():
    dev = torch.device("cuda")
    b = host_batch().pin_memory()
    want = b.to(dev, float_dtype=torch.bfloat16)
    torch.cuda.synchronize()
    copier = DeviceCopier(dev, torch.bfloat16)
    x = torch.randn(4096, 4096, device=dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):                                     # keep the compute stream busy
            x = torch.tanh(x @ x)
        out = copier(b)
        used = out.region_feats.float().sum() + out.task["vqa_targets"].sum()
        pending = copier.start(b)                               # the trainer's order: copy started,
        for _ in range(20):                                     # more compute queued (the rest of
            x = torch.tanh(x @ x)                               # the micro-step), then the batch used
        ahead = pending.get()
        used_ahead = ahead.region_feats.float().sum() + ahead.task["vqa_targets"].sum()
        text_only = copier.start(dataclasses.replace(b, region_feats=None, region_boxes=None,
                                                     region_cls_probs=None, region_mask=None)).get()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.device.type == "cuda" for t in out.tensors())
    assert same(out, want) and same(ahead, want)
    assert torch.equal(text_only.input_ids.cpu(), b.input_ids) and text_only.region_feats is None
    total = float(want.region_feats.float().sum() + want.task["vqa_targets"].sum())
    assert float(used) == pytest.approx(total) and float(used_ahead) == pytest.approx(total)
