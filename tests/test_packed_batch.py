"""A batch crosses from a DataLoader worker to the trainer as one shared buffer
(vltrain/data/packed.py): the same values for every task's batch, one storage per batch."""
from __future__ import annotations

import pytest
import torch

from tests.fixtures.tasks import CORPUS_DIR, collator, read_rows, task_cfg
from vltrain.data.batch import Batch
from vltrain.data.packed import ALIGN, ScratchPool, pack, release_shared_pages, shared_buffer


def assert_same_batch(a: Batch, b: Batch) -> None:
    for name, x in vars(a).items():
        y = getattr(b, name)
        if name == "task":
            assert x.keys() == y.keys()
            for k in x:
                _assert_same(x[k], y[k], f"task.{k}")
        else:
            _assert_same(x, y, name)


def _assert_same(x, y, name):
    if isinstance(x, torch.Tensor):
        assert isinstance(y, torch.Tensor), name
        assert (x.dtype, x.shape) == (y.dtype, y.shape), name
        assert torch.equal(x, y), name
    else:
        assert x == y, name


def storages(batch: Batch) -> set:
    return {t.untyped_storage().data_ptr() for t in batch.tensors()}


@pytest.mark.parametrize("task", sorted(CORPUS_DIR))
def test_pack_then_unpack_gives_the_same_batch(synthetic_corpus, task):
    cfg = task_cfg(synthetic_corpus, task)
    coll = collator(cfg)
    batch = coll(read_rows(cfg.data.val)[:5])
    packed = pack(batch)
    assert packed.buffer.is_shared()
    out = packed.unpack()
    assert_same_batch(batch, out)
    assert len(storages(out)) == 1 and len(storages(batch)) > 5
    assert all(t.data_ptr() % ALIGN == 0 for t in out.tensors())
    # The views are independent: writing one field leaves the others as they were.
    out.input_ids.fill_(7)
    assert torch.equal(out.attention_mask, batch.attention_mask)
    if out.region_feats is not None:
        assert torch.equal(out.region_feats, batch.region_feats)


def test_moving_a_packed_batch_keeps_the_values_and_gives_the_shared_pages_back(synthetic_corpus):
    """What ``pin_memory`` does, with a CPU copy in place of the pin (pinning needs CUDA)."""
    cfg = task_cfg(synthetic_corpus, "pretrain")
    batch = collator(cfg)(read_rows(cfg.data.val)[:5])
    packed = pack(batch)
    old = packed.buffer
    moved = packed.moved(lambda buf: buf.clone())
    assert_same_batch(batch, moved.unpack())
    assert not moved.buffer.is_shared()
    assert int(old.count_nonzero()) == 0                   # the shared pages are gone (they read as zeros)
    with pytest.raises(RuntimeError, match="was moved"):
        packed.unpack()


def test_release_shared_pages_frees_exactly_that_storage():
    a, b = shared_buffer(3 * 4096 + 100).fill_(1), shared_buffer(4096).fill_(1)
    assert release_shared_pages(a)
    assert int(a.count_nonzero()) == 0 and int(b.count_nonzero()) == b.numel()
    assert not release_shared_pages(torch.empty(0, dtype=torch.uint8))


def test_pack_refuses_what_it_cannot_place():
    cfg_batch = Batch(sample_id=torch.arange(2), input_ids=torch.zeros(2, 3, dtype=torch.long),
                      token_type_ids=torch.zeros(2, 3, dtype=torch.long),
                      attention_mask=torch.ones(2, 3, dtype=torch.long), mode=torch.zeros(2, dtype=torch.long),
                      task={"weird": torch.eye(2).to_sparse()})
    with pytest.raises(ValueError, match="task.weird"):
        pack(cfg_batch)


@pytest.mark.parametrize("task", ["pretrain", "vqa"])
def test_a_worker_sends_one_buffer_with_the_same_values(synthetic_corpus, task, tmp_path):
    """The eval loader (fixed order and masks) with one worker yields exactly what it yields
    in-process, and every worker batch's tensors are views of one storage."""
    from vltrain.data.loader import build_eval_loader
    from vltrain.tasks import get_task
    from vltrain.tokenization import Tokenizer

    def batches(workers: int):
        cfg = task_cfg(synthetic_corpus, task, f"data.num_workers={workers}",
                       f"data.cache_dir={tmp_path}/cache{workers}")
        loader, _ = build_eval_loader(cfg, Tokenizer(cfg.data.vocab), 4,
                                      make_collator=get_task(cfg.task.name).make_collator)
        return list(loader)

    in_process, from_worker = batches(0), batches(1)
    assert len(in_process) == len(from_worker) > 1
    for a, b in zip(in_process, from_worker):
        assert_same_batch(a, b)
        assert len(storages(b)) == 1
        assert len(storages(a)) > 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA; the CPU tests above "
                                                          "check the packing and unpacking it relies on")
def test_pinned_packed_batch_reaches_the_gpu_intact(synthetic_corpus):
    from vltrain.engine.device_copy import DeviceCopier
    cfg = task_cfg(synthetic_corpus, "pretrain")
    batch = collator(cfg)(read_rows(cfg.data.val)[:5])
    packed = pack(batch)
    shared = packed.buffer
    pinned = packed.pin_memory().unpack()
    assert all(t.is_pinned() for t in pinned.tensors())
    assert int(shared.count_nonzero()) == 0                # the pinning thread gave the shared pages back
    on_gpu = DeviceCopier(torch.device("cuda"))(pinned)
    torch.cuda.synchronize()
    assert_same_batch(batch, on_gpu.to("cpu"))


def test_scratch_pool_recycles_zeroed_tensors_only_after_recycle():
    pool = ScratchPool(keep=2)
    a = pool.zeros((3, 5), torch.float16).fill_(7)
    b = pool.zeros((3, 5), torch.float16)                  # a is still in use: a new one
    assert b.data_ptr() != a.data_ptr() and pool.reused == 0
    pool.recycle()
    c = pool.zeros((3, 5), torch.float16)
    assert c.data_ptr() in (a.data_ptr(), b.data_ptr()) and pool.reused == 1
    assert int(c.count_nonzero()) == 0                      # zeroed although a held 7s
    assert pool.zeros((3, 5), torch.float32).dtype == torch.float32 and pool.reused == 1
    pool.recycle()
    for shape in ((1,), (2,), (4,)):                        # more free shapes than keep: oldest go
        pool.zeros(shape, torch.uint8)
    pool.recycle()
    pool.zeros((4,), torch.uint8)
    pool.zeros((2,), torch.uint8)
    assert pool.reused == 3
    pool.zeros((1,), torch.uint8)                          # dropped: a new one
    assert pool.reused == 3
