"""Train/eval loaders: ``StreamingDataset`` + ``PretrainCollator`` in a resumable DataLoader.

Epochs and resume (what the trainer relies on):
  * The loader keeps the epoch itself. Each ``iter(loader)`` starts the next epoch of the
    underlying ``StreamingDataset`` (or the epoch of a loaded state) and, before any worker
    starts, sets that epoch on the collator: masks are keyed on (seed, epoch, sample id).
  * ``state_dict()`` (any rank; all ranks hold the same value) = epoch + samples consumed in it
    by all ranks (``batches yielded x batch x world``, skipped bad samples included).
    ``load_state_dict()`` before ``iter()`` makes the next iteration continue exactly there:
    same epoch, same remaining samples in the same order, same masks.
  * ``state_dict(held_back=k)`` is the state from before the last ``k`` batches were yielded
    (the trainer fetches one batch ahead, and a checkpoint must not count it as trained).
  * A finished epoch saves ``sample_in_epoch == epoch size``: a resumed ``iter()`` then yields
    nothing for that epoch and the following ``iter()`` starts the next one (streaming's rule).
  * Resuming with a different world size is supported by streaming as long as
    ``num_canonical_nodes`` is unchanged (it is saved in the state).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
from typing import Any, Optional

import torch
from streaming import StreamingDataLoader
from torch.utils.data import DataLoader

from vltrain.data.collate import SKIPPED_KEY, TRUNCATED_KEY, PretrainCollator, StreamInfo
from vltrain.data.datasets import build_dataset, clean_stale_shared_memory, is_remote
from vltrain.data.batch import Batch
from vltrain.data.errors import BadSampleError, DataError, MetaError
from vltrain.data import host_limits
from vltrain.data.fetch_watchdog import FetchWatchdog
from vltrain.data.packed import PackedBatch, ScratchPool, pack
from vltrain.data.storage_faults import store_of
from vltrain.data.worker_signals import WorkerStart, worker_context
from vltrain.engine.distributed import first_rank

STAND_IN_KEY = "stand_in"   # Batch.task flag: a repeated batch standing in for an all-bad one

log = logging.getLogger(__name__)

_SHM_CLEANED = False


def prepare_streaming_once(num_workers: int = 0) -> None:
    """Clean stale streaming shared memory, once per process, before the first dataset exists.

    Segments a live process maps (this process's datasets, another job's on the same host)
    are kept. With torch.distributed initialised, every rank must reach it (it ends in a
    barrier).
    """
    global _SHM_CLEANED
    if not _SHM_CLEANED:
        clean_stale_shared_memory()
        _SHM_CLEANED = True
        small = host_limits.check_shm(num_workers)
        if small and int(os.environ.get("LOCAL_RANK", "0")) == 0:     # the node's: said once a node
            log.warning("%s", small)


class PackInWorkers:
    """``collate_fn``: the collator's batch, packed into one shared buffer when collated in a
    DataLoader worker (see vltrain/data/packed.py), the collator's large tensors recycled
    there from batch to batch; unchanged in the main process."""

    def __init__(self, collator):
        self.collator = collator
        self.scratch: Optional[ScratchPool] = None

    def __call__(self, samples):
        if torch.utils.data.get_worker_info() is None:
            return self.collator(samples)
        if self.scratch is None:          # first batch in this worker (its own copy of both)
            self.scratch = self.collator.scratch = ScratchPool()
        try:
            return pack(self.collator(samples))
        finally:
            # pack copied the batch (or the collator raised): nothing holds its tensors now.
            self.scratch.recycle()


class VLDataLoader(StreamingDataLoader):
    """``StreamingDataLoader`` yielding ``Batch``; counts skipped samples (data wait is timed
    by the trainer's monitor around ``next()``).

    Attributes the trainer reads:
      ``epoch``           epoch of the current/last iteration;
      ``num_skipped``     bad samples skipped so far (``data.skip_bad_samples``), with up to
                          20 of their messages in ``skipped_examples``;
      ``num_stand_ins``   micro-batches whose samples were all skipped: the previous batch
                          was yielded again in their place with ``task[STAND_IN_KEY] = True``
                          (the trainer gives it zero weight), so every rank runs as many
                          micro-batches as the others;

    A batch's ``task[TRUNCATED_KEY]`` (samples whose text / regions the collator cut) stays in
    it for the trainer to count as it trains on the batch; the loader warns the first time.

    ``held_back``: the most batches the trainer holds un-trained (``state_dict(held_back)``): a
    step's micro-batches (vltrain/engine/step_feed.py).

    ``global_batch`` (training: micro batch x world size x grad_accum): an epoch ends after its
    last whole global batch, ``epoch_size // global_batch`` optimizer steps. The samples a rank
    would still yield (each rank's share is padded, and ``drop_last`` keeps what fills its micro
    batches) depend on the world size; ending at the global batch keeps every epoch's samples
    and steps the same after a checkpoint moves to another world size, and no optimizer step
    spans two epochs (unless a micro-batch skipped for a non-finite loss moved the steps by
    one: vltrain/engine/step_feed.py). 0: the whole pass (evaluation).
    """

    def __init__(self, dataset, *, collator: PretrainCollator, batch_size: int,
                 fixed_epoch: Optional[int] = None, wait_timeout_s: float = 0.0, what: str = "data", store: str = "",
                 global_batch: int = 0, held_back: int = 1, **kwargs):
        if kwargs.get("num_workers", 0) > 0 and "multiprocessing_context" not in kwargs:
            kwargs["multiprocessing_context"] = worker_context()    # why: vltrain/data/worker_signals.py
        super().__init__(dataset, batch_size=batch_size, collate_fn=PackInWorkers(collator), **kwargs)
        self.collator = collator
        self.watchdog = FetchWatchdog(wait_timeout_s, what, store)   # 0: unbounded
        self.fixed_epoch = fixed_epoch
        self.global_batch = int(global_batch)
        self.epoch = 0
        self.num_skipped = 0
        self.num_stand_ins = 0
        self.skipped_examples: list[str] = []
        self._warned_cuts = [False, False]
        self._last: Optional[Batch] = None   # the last good batch: stands in for an all-bad one
        self._resume: Optional[dict] = None
        self._offset = 0
        self._started = False
        self._epoch_done = False
        # (samples consumed, skipped) of the last batches yielded this epoch, for state_dict(held_back)
        self._yielded: collections.deque = collections.deque(maxlen=held_back + 1)

    def _upcoming_epoch(self) -> tuple[int, int]:
        nxt = int(self.dataset.next_epoch)
        if self._resume is not None and self._resume["epoch"] >= nxt:
            return int(self._resume["epoch"]), int(self._resume["sample_in_epoch"])
        return nxt, 0

    def __iter__(self):
        self.epoch, self._offset = self._upcoming_epoch()
        self._started, self._epoch_done = True, False
        if hasattr(self.collator, "set_epoch"):   # task collators without randomness may lack it
            self.collator.set_epoch(self.epoch if self.fixed_epoch is None else self.fixed_epoch)
        self.num_samples_yielded = 0
        self.skipped_in_pass: list[str] = []     # this pass's skip messages (an evaluation counts them)
        self._yielded.clear()
        self.worker_init_fn = WorkerStart() if self.num_workers > 0 else None
        try:
            it = DataLoader.__iter__(self)   # workers are created (dataset and collator pickled) here
        except OSError as e:
            raise host_limits.explain(e) or e
        # All-bad micro-batches met before any good batch (a start, a resume): the next good
        # batch stands in for each, yielded first in their place.
        waiting: list[list[str]] = []
        while True:
            if self.global_batch and self.num_samples_yielded and self._in_epoch(self.num_samples_yielded) >= \
                    self._epoch_end():
                self._epoch_done = True    # the epoch's last whole global batch is out
                return
            try:
                with self.watchdog.waiting():
                    batch = next(it)
            except StopIteration:
                if waiting:
                    raise BadSampleError(
                        f"every sample of this rank's micro-batches to the end of epoch {self.epoch} is bad and "
                        f"skipped, so nothing can stand in for them: {'; '.join(waiting[0][:3])}. Fix the data, "
                        "or raise train.micro_batch_size")
                # Exhausted: the epoch is complete even if drop_last left samples unyielded,
                # so a checkpoint taken now resumes at the next epoch, as an unbroken run would.
                self._epoch_done = True
                return
            except Exception as e:   # noqa: BLE001 - a worker killed for memory, a full /dev/shm: said so
                explained = host_limits.explain(e, getattr(it, "_workers", ()))
                if explained is None:
                    raise
                raise explained from e
            if isinstance(batch, PackedBatch):
                batch = batch.unpack()
            skipped = list(batch.task.pop(SKIPPED_KEY, None) or ())
            if batch.batch_size == 0:
                # Every sample of the micro-batch was bad. Ranks must still run as many
                # micro-batches as each other (collectives in every step, streaming's barrier at
                # the next epoch), so a good batch stands in, marked for zero weight.
                if self._last is None:
                    waiting.append(skipped)
                    continue
                yield self._stand_in(skipped, "previous")
                continue
            self._last = batch
            for early in waiting:
                yield self._stand_in(early, "next")
            waiting.clear()
            self._count(batch.batch_size, skipped)
            self._warn_cuts(batch)
            yield batch

    def _count(self, rows: int, skipped: list[str]) -> None:
        """Just before a batch is yielded: the samples it consumed from the dataset (skipped ones
        count: resume) and its skips."""
        self.num_samples_yielded += rows + len(skipped)
        self._yielded.append((rows + len(skipped), len(skipped)))
        self.num_skipped += len(skipped)
        self.skipped_in_pass += skipped
        for msg in skipped:
            if len(self.skipped_examples) < 20:
                self.skipped_examples.append(msg)
                log.warning("skipped bad sample: %s", msg)

    def _stand_in(self, skipped: list[str], which: str) -> Batch:
        self._count(0, skipped)
        self.num_stand_ins += 1
        log.warning("all %d samples of a micro-batch were bad: the %s good batch stands in at zero weight "
                    "(%d such micro-batches so far)", len(skipped), which, self.num_stand_ins)
        return dataclasses.replace(self._last, task={**self._last.task, STAND_IN_KEY: True})

    def _warn_cuts(self, batch: Batch) -> None:
        """Said by rank 0 (a property of the config against the data, alike on every rank; the
        share of all ranks' samples is logged, data/truncated_*)."""
        if not first_rank():
            return
        text, regions = map(len, batch.task.get(TRUNCATED_KEY, ((), ())))
        if text and not self._warned_cuts[0]:
            self._warned_cuts[0] = True
            log.warning("%d of %d samples of a micro-batch have more text than data.max_text_len (or "
                        "data.max_sequence) allows: cut (the share per log interval is data/truncated_text)",
                        text, batch.batch_size)
        if regions and not self._warned_cuts[1]:
            self._warned_cuts[1] = True
            log.warning("%d of %d samples of a micro-batch have more regions than data.max_regions: the "
                        "first ones are kept (the share per log interval is data/truncated_regions)",
                        regions, batch.batch_size)

    def state_dict(self, held_back: int = 0) -> dict[str, Any]:
        """Resumption state; identical on every rank (save it from rank 0).

        ``held_back``: how many of the batches yielded last were not trained on yet (the
        trainer holds a step's micro-batches: vltrain/engine/step_feed.py): the state is the one
        from before they were yielded, so a resumed run starts with them. They must all come
        from the current (or just finished) epoch."""
        if held_back:
            if not self._started or held_back > len(self._yielded):
                raise ValueError(f"state_dict(held_back={held_back}): only {len(self._yielded)} batches of "
                                 f"this epoch were yielded")
            back = list(self._yielded)[-held_back:]
            st = self._state(sum(n for n, _ in back), sum(k for _, k in back))
        else:
            st = self._state(0, 0)
        st["datasets"] = self.dataset.identity       # what the position counts in (load_state_dict checks it)
        return st

    @functools.cached_property
    def _num_ranks(self) -> int:
        """Read once: ``_in_epoch`` runs for every batch."""
        from streaming.base.world import World
        return World.detect().num_ranks

    def _in_epoch(self, yielded: int) -> int:
        """Samples of the current epoch consumed by all ranks once this rank has yielded ``yielded``."""
        n = yielded * self._num_ranks
        return self._offset + (n // self.dataset.replication if self.dataset.replication else n)

    def _epoch_end(self) -> int:
        """Where the epoch ends, in samples: after its last whole global batch (``global_batch``)."""
        size = int(self.dataset.epoch_size)
        return size // self.global_batch * self.global_batch if self.global_batch else size

    def _state(self, unyielded: int, unskipped: int) -> dict[str, Any]:
        if not self._started:
            if self._resume is not None:
                return dict(self._resume, num_skipped=self.num_skipped)
            epoch, offset = self._upcoming_epoch()
            st = self.dataset.state_dict(0, False)
            st.update(epoch=epoch, sample_in_epoch=offset, num_skipped=self.num_skipped)
            return st
        at = self._in_epoch(self.num_samples_yielded - unyielded)
        st = self.dataset.state_dict(at - self._offset, False)  # fills num_canonical_nodes, shuffle_seed, ...
        # a finished epoch (its last global batch out: the next iter() yields nothing of it)
        # resumes at the next one; one whose last batches are held back, at them
        done = at >= self._epoch_end() or (self._epoch_done and not unyielded)
        st.update(epoch=self.epoch, sample_in_epoch=max(at, int(self.dataset.epoch_size)) if done else at)
        st["num_skipped"] = self.num_skipped - unskipped
        return st

    def load_state_dict(self, obj: dict[str, Any]) -> Optional[str]:
        """Continue from ``obj`` at the next ``iter()`` (call on every rank, before iterating).
        Returns what makes the continuation inexact, if anything (for the main rank to log)."""
        obj = dict(obj)
        self.num_skipped = int(obj.pop("num_skipped", 0))
        problem = self._changed_data(obj.pop("datasets", None), int(obj.get("epoch", 0)),
                                     int(obj.get("sample_in_epoch", 0)))
        if obj.get("sample_in_epoch", 0) >= self._epoch_end():    # saved by an older version at the end
            obj["sample_in_epoch"] = max(int(obj["sample_in_epoch"]), int(self.dataset.epoch_size))
        self._resume = obj
        self.dataset.load_state_dict(obj)
        # Streaming applies the saved data order only in the workers that read the resumed
        # epoch; a later epoch's workers are copies of this process's dataset, which would take
        # the new node count (a 2-node run moved to 1 node reshuffled its next epochs) and the
        # new train.seed (with workers; without, streaming kept the saved one)
        for key in ("num_canonical_nodes", "initial_physical_nodes", "shuffle_seed"):
            if obj.get(key) is not None:
                setattr(self.dataset, key, int(obj[key]))
        return problem

    def _changed_data(self, saved: Optional[list], epoch: int, at: int) -> Optional[str]:
        """The streams that differ from those the saved position counts in, when it is inside an
        epoch (at an epoch's start any data continues exactly). A checkpoint older than this
        record (``saved`` None) is not checked."""
        now = self.dataset.identity
        if saved is None or at <= 0 or at >= sum(d["choose"] or d["samples"] for d in saved):   # its epoch's end
            return None
        if [(d["index"], d["choose"]) for d in saved] == [(d["index"], d["choose"]) for d in now]:
            return None
        def listed(streams):
            return ", ".join(f"{d['dataset']} ({d['samples']} samples, index {d['index']})" for d in streams)
        return (f"the training data differs from the data the checkpoint was reading (then {listed(saved)}; now "
                f"{listed(now)}): its "
                f"position, sample {at} of epoch {epoch}, does not carry over to it, so the rest of epoch {epoch} "
                "repeats some samples and leaves out others; later epochs are whole. Resume with the same data for "
                "an exact continuation")


def _check_meta_vs_model(cfg, infos: list[StreamInfo]) -> None:
    m = cfg.model
    for info in infos:
        meta = info.meta
        if meta.get("kind") == "text":
            continue
        if meta.get("feature_dim") and meta["feature_dim"] != m.region_feat_dim:
            raise MetaError(f"dataset {info.name} has feature_dim={meta['feature_dim']} but "
                            f"model.region_feat_dim={m.region_feat_dim}")
        needs_classes = cfg.objectives.mrc or (m.region_embedding == "vlp" and m.use_cls_probs)
        if needs_classes and meta.get("num_classes") and meta["num_classes"] != m.num_region_classes:
            raise MetaError(f"dataset {info.name} has num_classes={meta['num_classes']} but "
                            f"model.num_region_classes={m.num_region_classes}")


def pretrain_collator(cfg, tokenizer, infos: list[StreamInfo], train: bool) -> PretrainCollator:
    """The pretraining task's collator (the default ``make_collator``)."""
    need_cls = cfg.model.region_embedding == "vlp" and cfg.model.use_cls_probs
    return PretrainCollator(tokenizer, cfg.data, cfg.objectives, cfg.train.seed, infos,
                            require_cls_probs=need_cls, vlbert=cfg.model.region_embedding == "vlbert",
                            num_classes=cfg.model.num_region_classes, feat_dim=cfg.model.region_feat_dim,
                            image_box=cfg.model.vlbert_image_box)


def _loader(cfg, tokenizer, batch_size: int, split: str, train: bool,
            make_collator=None) -> tuple[VLDataLoader, PretrainCollator]:
    from streaming.base.world import World
    prepare_streaming_once(int(cfg.data.num_workers))
    try:
        ds, infos = build_dataset(cfg, batch_size, split=split, shuffle=cfg.data.shuffle if train else False)
        _check_meta_vs_model(cfg, infos)
        collator = (make_collator or pretrain_collator)(cfg, tokenizer, infos, train)
    except DataError as e:          # the message names the dataset folder; this, the key that chose it
        raise type(e)(f"data.{split}: {e}") from None
    except ValueError as e:
        if type(e) is not ValueError:
            raise
        raise ValueError(f"data.{split}: {e}") from None
    global_batch = cfg.train.samples_per_step(World.detect().num_ranks) if train else 0
    if int(ds.epoch_size) < global_batch:
        # an epoch ends after its last whole global batch: with none, each rank still took a
        # micro-batch of every epoch, so each step mixed epochs and what trained depended on
        # the world size
        raise DataError(f"data.train={cfg.data.train}: an epoch holds {int(ds.epoch_size)} samples"
                        f"{' (with data.text_train)' if cfg.data.text_train else ''}, fewer than one global batch of "
                        f"{global_batch} (world size x train.micro_batch_size x train.grad_accum): use more data, "
                        "or a smaller train.micro_batch_size / train.global_batch")
    workers = int(cfg.data.num_workers)
    # Training holds a step's micro-batches before it trains them (step_feed.py): the workers'
    # queue must hold a step's too, or the GPU waits at each step start for its remaining ones.
    ahead = cfg.train.grad_accum if train else 1
    loader = VLDataLoader(ds, collator=collator, batch_size=batch_size, num_workers=workers,
                          pin_memory=torch.cuda.is_available(), drop_last=train,
                          persistent_workers=False, fixed_epoch=None if train else 0,
                          prefetch_factor=max(2, -(-ahead // workers)) if workers > 0 else None, held_back=ahead,
                          # Each iter() draws the workers' base seed from this generator, not from
                          # torch's global RNG, which a resumed run restores from its checkpoint:
                          # drawn there, it shifted every dropout mask after a resume.
                          generator=torch.Generator().manual_seed(cfg.train.seed),
                          # the bound a rank waits for its peers, also for a batch
                          wait_timeout_s=cfg.train.dist_timeout_s,
                          global_batch=global_batch,
                          what=f"data.{split}={getattr(cfg.data, split)}",
                          store=", ".join(sorted({store_of(i.name) for i in infos if is_remote(i.name)})))
    return loader, collator


def build_train_loader(cfg, tokenizer, make_collator=None) -> tuple[VLDataLoader, PretrainCollator]:
    """Training loader over ``data.train`` (+ ``data.text_train``), shuffled, batches of
    ``train.micro_batch_size`` per rank, epochs of whole global batches
    (``TrainConfig.samples_per_step``). Every rank must call it (collective when torch.distributed
    is initialised).
    """
    return _loader(cfg, tokenizer, cfg.train.micro_batch_size, "train", train=True, make_collator=make_collator)


def build_eval_loader(cfg, tokenizer, batch_size: int, split: str = "val",
                      make_collator=None) -> tuple[VLDataLoader, PretrainCollator]:
    """Eval loader over ``data.<split>``: no shuffle, keeps the last partial batch, masks fixed
    (epoch 0) so every evaluation scores the same masked tokens. Streaming pads each rank's
    share to equal length by repeating samples: dedupe by ``Batch.sample_id`` when scoring."""
    return _loader(cfg, tokenizer, batch_size, split, train=False, make_collator=make_collator)
