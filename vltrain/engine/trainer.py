"""The training loop around a DeepSpeed engine: data, steps, agreement between ranks,
validation, checkpoints, preemption.

Per micro-step the ranks all-reduce (sum) one small flag vector — [loss non-finite, stop
signal seen, time-based save due (rank 0's clock)] — so every rank takes the same branch
and no collective can hang. This is the one host-device sync per micro-step; everything
else (metrics) stays on the device until a logging boundary.
"""
from __future__ import annotations

import logging
import math
import os
import time
from typing import Optional

import torch
import torch.distributed as dist

from vltrain.ckpt.layout import locate
from vltrain.config import Config, config_to_dict, save_config
from vltrain.data.collate import TRUNCATED_KEY
from vltrain.data.errors import DataError
from vltrain.data.loader import STAND_IN_KEY
from vltrain.engine import checkpoint as ckpt
from vltrain.engine import schedule
from vltrain.engine.device_copy import DeviceCopier, InFlight
from vltrain.engine.resume import CheckpointError
from vltrain.engine.run_lock import release_run_lock
from vltrain.engine.signals import EXIT_PREEMPTED, STOP, ValidationInterrupted
from vltrain.engine.step_feed import EPOCH_END, StepFeed, stand_in_shares
from vltrain.monitor import MicroBatches, Ratio
from vltrain.profiling import StepProfiler
from vltrain.tasks.base import batch_work
from vltrain.tasks.evaluation import first_seen_counts, metric_sums

log = logging.getLogger(__name__)

FLAG_NONFINITE, FLAG_STOP, FLAG_SAVE = 0, 1, 2


class NonFiniteLossError(RuntimeError):
    pass


class Trainer:
    """Owns the loop; built by ``vltrain.engine.build.build_training``."""

    def __init__(self, cfg: Config, engine, info, loader, val_loader, monitor, flops, run_dir: str,
                 device: torch.device, float_dtype: Optional[torch.dtype], ds_config: dict,
                 spec=None, tokenizer=None):
        self.cfg, self.engine, self.info = cfg, engine, info
        self.loader, self.val_loader, self.monitor, self.flops = loader, val_loader, monitor, flops
        self.run_dir, self.device, self.float_dtype = run_dir, device, float_dtype
        self.ds_config = ds_config
        self.spec, self.tokenizer = spec, tokenizer
        self.save_dir = os.path.join(run_dir, "checkpoints")
        self.created_run_dir = False      # by this job (build.py): mode=eval removes it if left empty
        self.step = 0                     # optimizer steps done
        self.nonfinite_total = 0
        self.nonfinite_in_row = 0
        self._stop_ranks = 0              # ranks that had received a stop signal, at the step it was seen
        self._val_pending = False         # the validation due at self.step was skipped or cut short by a stop
        self._validated_step: Optional[int] = None
        self._cuts = [0, 0, 0]           # samples trained on since the last log, of them cut texts, regions
        self.best_metric: Optional[float] = None
        self.stop = STOP.install()
        self._last_save_time = time.time()
        self._saved_step: Optional[int] = None   # the step whose state this run's save_dir holds
        self._eval_loaders: dict = {}      # split -> loader, built on first use (eval_loader)
        self.to_device = DeviceCopier(device, float_dtype)   # host -> device on a side CUDA stream
        # The next micro-batch, fetched and its copy started while the GPU runs this one's
        # forward (see train()); a checkpoint's loader state leaves it out, so a resumed run
        # starts with it.
        self._next: Optional[InFlight] = None
        self._feed: Optional[StepFeed] = None     # the step's micro-batches, counted ahead (made by train())
        self.profiler = StepProfiler(cfg.train, run_dir, info.rank, info.world, device)   # train.profile_*
        self.profiler.on_report = lambda md, step: self.monitor.log_text("profile", md, step)
        # DeepSpeed keeps the gradient norm its optimizers compute (ZeRO, fp16/bf16), but the
        # one it clips fp32 ZeRO-0 gradients with is dropped: there it is computed here
        self._own_grad_norm = (engine is not None and not engine.zero_optimization()
                               and float_dtype in (None, torch.float32))
        # Steps DeepSpeed skips on a gradient overflow (fp16's loss scaling, or bf16 with
        # check_grad_overflow): counted in train/overflow_skipped. They advance self.step but not
        # the LR schedule, which then lags by as many steps.
        self._overflow_checked = float_dtype == torch.float16 or (
            float_dtype == torch.bfloat16 and bool((ds_config.get("bf16") or {}).get("check_grad_overflow")))

    # ------------------------------------------------------------------ state

    def checkpoint_info(self, loader_state: dict) -> dict:
        zero = (self.ds_config.get("zero_optimization") or {}).get("stage", 0)
        t = self.cfg.train
        return {"world_size": self.info.world, "zero_stage": zero,
                "micro_batch_size": t.micro_batch_size, "grad_accum": t.grad_accum,
                "global_batch": t.samples_per_step(self.info.world),
                "num_canonical_nodes": loader_state.get("num_canonical_nodes"),
                "best_metric": self.best_metric, "nonfinite_total": self.nonfinite_total}

    def save(self, tag: Optional[str] = None) -> str:
        tag = tag or ckpt.step_tag(self.step)
        # pulled from the loader and not trained yet: the batch fetched ahead, the step's others
        held = int(self._next is not None) + (self._feed.held if self._feed is not None else 0)
        loader_state = self.loader.state_dict(held_back=held)
        # Everything a resumed run needs to go on as this one would have: counters, the
        # validation still due, and the monitor's open logging interval (summed over ranks).
        rank_state = {"loader": loader_state,
                      "best_metric": self.best_metric, "val_pending": self._val_pending,
                      "validated_step": self._validated_step,
                      "nonfinite_total": self.nonfinite_total, "nonfinite_in_row": self.nonfinite_in_row,
                      "samples_seen": self.monitor.samples_seen, "monitor": self.monitor.pending_state(),
                      "cuts": list(self._cuts)}
        start = time.time()
        path = ckpt.save(self.engine, self.save_dir, tag, step=self.step, cfg=self.cfg,
                         rank_state=rank_state, info=self.checkpoint_info(loader_state), rank=self.info.rank,
                         keep_last=self.cfg.train.keep_last)
        now = time.time()
        if tag != ckpt.BEST_TAG:
            # best/ is no resume point: it must not put off the next save_every_minutes checkpoint
            # (a validation improving more often than that interval kept every timed save away)
            self._saved_step, self._last_save_time = self.step, now
        # What a stop signal's save must fit in: Slurm's GraceTime / KillWait (README).
        took = now - start
        self.monitor.log_scalar("perf/best_save_s" if tag == ckpt.BEST_TAG else "perf/checkpoint_save_s", took,
                                self.step)
        if self.info.is_main:
            log.info("saved checkpoint %s (step %d) in %.1f s", path, self.step, took)
        return path

    def resume_from(self, found: ckpt.Found) -> None:
        """Full resume: engine (weights, optimizer, schedule), loader position, RNG, counters."""
        from vltrain.engine.resume import (checkpoint_precision, optimizer_group_settings, optimizer_run_settings,
                                           repair_universal_zero3_load, restore_group_settings,
                                           restore_run_settings, zero0_layout_mismatch)
        settings = optimizer_group_settings(self.engine)
        base_lrs = list(self.engine.lr_scheduler.base_lrs)      # this run's config, before the load
        run_settings = optimizer_run_settings(self.engine.optimizer)
        try:
            load_path, _ = self.engine.load_checkpoint(found.save_dir, tag=found.tag)
        except Exception as e:
            # DeepSpeed's errors name no file (unreadable files were refused by the build:
            # check_files_open); an out-of-memory or a collective's timeout is raised as it is
            why = zero0_layout_mismatch(found.path, self.engine.optimizer)
            if why:
                raise CheckpointError(f"cannot load checkpoint {found.path}: {why}") from e
            raise
        if load_path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {found.path}")
        if found.info.get("universal"):
            repair_universal_zero3_load(self.engine)   # DeepSpeed 0.19.8 ZeRO-3 loader quirk
        restore_group_settings(self.engine, settings)
        schedule.reapply(self.engine.lr_scheduler, base_lrs)
        saved_precision = checkpoint_precision(found.path)
        changed = restore_run_settings(self.engine.optimizer, run_settings,
                                       same_precision=saved_precision in (None, self.cfg.train.precision))
        if changed and self.info.is_main:
            log.warning("resume: %s", changed)
        state = ckpt.load_rank_state(found.path, self.info.rank, found.info["world_size"], self.info.world)
        inexact = self.loader.load_state_dict(state["loader"])
        if inexact and self.info.is_main:
            log.warning("resume: %s", inexact)
        if dist.is_initialized():
            # streaming keeps the loader state in a segment per node that the first local rank
            # to load it creates and unlinks when it exits: a resumed run with nothing left to
            # train ended before a slower rank attached ("No such file or directory:
            # '/<prefix>_resume'", in 2 of 5 tries on 2 ranks)
            dist.barrier()
        if found.info["world_size"] == self.info.world:
            ckpt.set_rng_state(state["rng"])   # per-rank streams only mean something at the same size
            self._cuts = list(state.get("cuts", self._cuts))
        self.step = int(state["step"])
        if os.path.abspath(found.path) == os.path.abspath(os.path.join(self.save_dir, ckpt.step_tag(self.step))):
            self._saved_step = self.step
        self.best_metric = state.get("best_metric")
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self._val_pending = bool(state.get("val_pending", False))
        # a finished run's last checkpoint comes after its end-of-run validation: started again,
        # it does not validate (and save) that step once more
        self._validated_step = state.get("validated_step")
        self.monitor.resume_at(self.step, int(state.get("samples_seen", 0)), state.get("monitor"))
        if self.info.is_main:
            log.info("resumed from %s at step %d", found.path, self.step)
            if self.step >= self.cfg.train.max_steps:      # a finished run started again
                log.info("step %d is train.max_steps=%d: nothing left to train (raise train.max_steps to go on)",
                         self.step, self.cfg.train.max_steps)

    # ------------------------------------------------------------------ loop

    def _flags(self, loss: torch.Tensor) -> list[int]:
        """[ranks whose loss is non-finite, ranks asked to stop, ranks whose save is due], summed
        over the ranks: one collective and the step's one host-device sync."""
        flags = torch.zeros(3, device=self.device)
        flags[FLAG_NONFINITE] = (~torch.isfinite(loss.detach())).float()
        flags[FLAG_STOP] = float(self.stop.requested)
        every = self.cfg.train.save_every_minutes
        if self.info.is_main and every > 0 and time.time() - self._last_save_time >= every * 60:
            flags[FLAG_SAVE] = 1.0
        if dist.is_initialized():
            dist.all_reduce(flags)
        return [round(v) for v in flags.tolist()]

    def _batches(self):
        """Endless batches across epochs (the loader keeps the epoch), ``EPOCH_END`` after each.
        A resumed, finished epoch yields nothing once; two empty epochs in a row mean the data
        is too small."""
        empty = 0
        while True:
            n = 0
            for batch in self.loader:
                n += 1
                yield batch
            yield EPOCH_END
            empty = 0 if n else empty + 1
            if empty >= 2:
                raise DataError(f"data.train={self.cfg.data.train} yields no batch for this rank: an epoch "
                                f"of it is smaller than one global batch ({self.loader.global_batch} samples: "
                                "world size x train.micro_batch_size x train.grad_accum)")

    def train(self) -> int:
        """Run to ``train.max_steps`` or a stop signal; returns the process exit code."""
        try:
            return self._train()
        except BaseException as e:
            self.profiler.close(self.step, f"{type(e).__name__}")     # what the window saw, then raise
            raise
        finally:
            release_run_lock(self.run_dir)    # the main rank's (build.claim_run_dir): this process trains no more

    def _train(self) -> int:
        cfg = self.cfg.train
        phase = self.profiler.phase
        if self.info.is_main:         # the run folder: made by build_training (make_run_dir)
            save_config(self.cfg, os.path.join(self.run_dir, "config.yaml"))
        best = self.spec.best_metric if self.spec is not None else "loss"
        self.monitor.log_hparams(config_to_dict(self.cfg), self.ds_config,
                                 metric_tags=dict.fromkeys(("train/loss", "val/loss", f"val/{best}")), step=self.step)
        counted = self.spec is not None and self.spec.token_mean(self.cfg)
        self._feed = StepFeed(self._batches(), self.to_device, self.engine.gradient_accumulation_steps(),
                              self.info.world, self.spec.step_counts if counted else None,
                              self.monitor.data_wait)
        save_due = False
        micro = MicroBatches()
        if self._val_pending and cfg.val_every and self.val_loader is not None:
            code = self._validate_due()   # resumed where a stop signal skipped or cut short a validation
            if code is not None:
                return code
        self._val_pending = False         # (or validation is off in this run)
        if self.step < cfg.max_steps and self._next is None:
            # The first batch (the workers' start-up, seconds) before the clock starts: else the
            # first interval of every start and requeue reads as a data-bound one.
            self._next = self._feed.fetch()
        self.monitor.reset_timer()
        self._last_save_time = time.time()    # save_every_minutes counts training, not the start-up
        self.profiler.at_step(self.step)      # a window starting here: after the start-up, as the clock
        while self.step < cfg.max_steps:
            with phase("forward"):
                batch = self._feed.take(self._next if self._next is not None else self._feed.fetch())
                self._next = None
                boundary = self.engine.is_gradient_accumulation_boundary()
                loss, metrics = self.engine(batch)
                stand_in = bool(batch.task.get(STAND_IN_KEY))
                if stand_in:
                    # this rank's samples were all bad: the same forward/backward/collectives
                    # as every other rank, with no gradient and nothing counted
                    loss = loss * 0.0
            if not (boundary and self.step + 1 >= cfg.max_steps):
                # While the GPU runs the forward just queued: the loader's next batch and its
                # copy to the device (side stream). Here, before the first read-back of this
                # micro-step (the flags below), the host's fetch and the copy overlap GPU work
                # whatever follows: DeepSpeed's backward ends in a device-wide sync with
                # overlap_comm (ZeRO-2, several ranks) and its fp16 step reads the gradient
                # norm back, each leaving the GPU idle behind a fetch issued after them.
                with phase("fetch"):
                    self._next = self._feed.fetch()
            with phase("flags"):
                nonfinite, stop, save_now = self._flags(loss)
            save_due = save_due or save_now
            self._stop_ranks = max(stop, self._stop_ranks)
            if nonfinite:
                # Every rank skips this micro-batch before backward: no gradient, no update.
                self.nonfinite_total += 1
                self.nonfinite_in_row += 1
                # at the step it belongs to: logged at the steps done, a resume (which purges
                # from its step + 1) kept the old point beside the new one
                self.monitor.log_scalar("train/nonfinite_skipped", self.nonfinite_total, self.step + 1)
                if self.info.is_main:       # the same on every rank: said once, with how many had it
                    log.warning("non-finite loss at step %d on %d of %d rank(s): micro-batch skipped on every "
                                "rank (%d in a row, %d in total)", self.step, nonfinite, self.info.world,
                                self.nonfinite_in_row, self.nonfinite_total)
                if self.nonfinite_in_row >= cfg.max_nonfinite_in_row:
                    raise NonFiniteLossError(
                        f"{self.nonfinite_in_row} non-finite losses in a row at step {self.step} "
                        f"(train.max_nonfinite_in_row={cfg.max_nonfinite_in_row}); lower train.lr, "
                        "check the data, or resume from an earlier checkpoint")
                if stop and boundary and cfg.grad_accum == 1:
                    return self._preempt()
                # With gradient accumulation the step's earlier micro-batches are in the
                # gradients, which a checkpoint does not hold: stop after the step completes.
                self._feed.extend(prefetched=self._next is not None)
                continue
            self.nonfinite_in_row = 0
            with phase("backward"):
                self.engine.backward(loss)
            if boundary:
                lr = self.engine.get_lr()[0]     # this update's (engine.step advances the schedule)
                # before the step clips them; on the device, read back at the next log
                grad_norm = (torch.nn.utils.get_total_norm([p.grad for p in self.engine.module.parameters()
                                                            if p.grad is not None])
                             if self._own_grad_norm else None)
            with phase("step"):
                self.engine.step()
            if not stand_in:
                cut = batch.task.get(TRUNCATED_KEY, ((), ()))
                self._cuts = [a + b for a, b in zip(self._cuts, (batch.batch_size, *map(len, cut)))]
                work = batch_work(self.spec, batch, self.cfg)
                if work is None:               # not countable (self-critical training)
                    micro.add(metrics, batch.batch_size)
                else:
                    micro.add(metrics, batch.batch_size, work.tokens,
                              self.flops.count(work.tokens, work.tokens_sq, work.mlm_rows))
            elif batch.token_divisors is not None:
                micro.add(stand_in_shares(metrics), 0)
            if not boundary:
                continue
            self.step += 1
            instant = None
            with phase("log"):
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    instant = self._data_counters()
                    if self._overflow_checked:        # the same on every rank (DeepSpeed agrees it)
                        instant["train/overflow_skipped"] = float(self.engine.skipped_steps)
                self.monitor.step_end(
                    self.step, micro.means(), samples=micro.samples, tokens=micro.tokens, flops=micro.flops,
                    lr=lr, grad_norm=grad_norm if self._own_grad_norm else self.engine.get_global_grad_norm(),
                    # every fp16 optimizer of DeepSpeed's has loss_scale (ZeRO-0's no cur_scale)
                    loss_scale=getattr(self.engine.optimizer, "loss_scale", None)
                    if self.float_dtype == torch.float16 else None,
                    instant=instant)
            micro = MicroBatches()
            val_due = bool(cfg.val_every and self.val_loader is not None and self.step % cfg.val_every == 0)
            if stop:    # before a validation due now: the checkpoint must fit in Slurm's grace time
                return self._preempt(val_pending=val_due)
            if val_due:
                code = self._validate_due()
                if code is not None:
                    return code
            if (cfg.save_every_steps and self.step % cfg.save_every_steps == 0) or save_due:
                with phase("save"):
                    self.save()
                save_due = False
                self.monitor.reset_timer()
            if self.profiler.at_step(self.step):    # a window ended: its export is not a step's time
                self.monitor.reset_timer()
        self.profiler.close(self.step, "the run's last step")
        if (self.val_loader is not None and cfg.val_every and self.step % cfg.val_every
                and self._validated_step != self.step):     # not the resumed run's pending one
            code = self._validate_due()
            if code is not None:
                return code
        if self._saved_step != self.step:
            self.save()
        self.monitor.close()
        return 0

    def _data_counters(self) -> dict:
        """Skipped samples so far, and the shares of the samples trained on since the last log
        whose text or regions were cut (data.max_text_len / max_regions), over all ranks: one
        all-reduce."""
        t = torch.tensor([float(self.loader.num_skipped), *map(float, self._cuts)], device=self.device)
        self._cuts = [0, 0, 0]
        if dist.is_initialized():
            dist.all_reduce(t)
        skipped, rows, text, regions = t.tolist()
        out = {"data/skipped_samples": skipped}
        if rows:
            out.update({"data/truncated_text": text / rows, "data/truncated_regions": regions / rows})
        return out

    def _validate_due(self) -> Optional[int]:
        """The validation due at this step; None, or the exit code when a stop signal cut it
        short: then the checkpoint keeps it due, and the resumed run runs it first (a skipped
        validation would otherwise never run, and ``best/`` could differ from an uninterrupted
        run's)."""
        self._val_pending = False
        try:
            with self.profiler.phase("validate"):
                self.validate()
        except ValidationInterrupted as e:
            if self.info.is_main:
                log.warning("validation at step %d cut short by the stop signal (%s): it runs first "
                            "when the run resumes", self.step, e)
            return self._preempt(val_pending=True)
        self._validated_step = self.step
        if self._saved_step == self.step:
            self._saved_step = None       # the checkpoint of this step still has it due: save again at the end
        return None

    def _preempt(self, val_pending: bool = False) -> int:
        """Checkpoint and return the requeue exit code; ``val_pending``: the validation due at
        this step did not run (it is skipped so that the checkpoint fits in Slurm's grace time)."""
        self.profiler.close(self.step, "stop signal")
        self._val_pending = val_pending
        self.save()
        self.stop.exiting()
        if self.info.is_main:     # the other ranks that got the signal said so at INFO (Slurm signals all)
            got = (f"; {self._stop_ranks} of {self.info.world} rank(s) had received it by then"
                   if self._stop_ranks else "")
            log.warning("stopped on signal at step %d; checkpoint saved; exiting with %d (to continue: the same "
                        "command with train.resume=auto; the Slurm templates requeue the job themselves unless it "
                        "is being cancelled)%s", self.step, EXIT_PREEMPTED, got)
        self.monitor.close()
        if dist.is_initialized():
            # srun --kill-on-bad-exit ends every task once the first exits 75: wait until every
            # rank has flushed its logs (the checkpoint itself is committed before this)
            dist.barrier()
        return EXIT_PREEMPTED

    def close(self) -> None:
        """Release the engine and the datasets, so that another run can be built in this
        process: streaming refuses a second live dataset on the same local cache folder,
        and a finished run's validation set is usually the next run's too."""
        import gc
        self.engine.destroy()
        self.monitor.close()
        self.loader = self.val_loader = None
        self._eval_loaders.clear()
        gc.collect()

    # ------------------------------------------------------------------ validation

    def validate(self) -> dict:
        """Validation on ``data.val``: the task's evaluation, or the mean of its loss metrics.
        Keeps the ``best`` checkpoint by the task's metric."""
        if self.spec is not None and self.spec.evaluate is not None:
            result = self.spec.evaluate(self, "val")
        else:
            result = self.mean_metrics(self.val_loader)
        self.monitor.log_val(self.step, result)
        name = self.spec.best_metric if self.spec is not None else "loss"
        higher = self.spec.higher_is_better if self.spec is not None else False
        metric = result.get(name)
        if metric is not None and math.isfinite(metric):
            better = self.best_metric is None or (metric > self.best_metric if higher else metric < self.best_metric)
            if better:
                self.best_metric = metric
                self.save(ckpt.BEST_TAG)
        self.monitor.reset_timer()      # neither the pass nor a best/ save is training time
        return result

    def eval_loader(self, split: str):
        """Loader over ``data.<split>`` for evaluation: the validation loader for ``val``, else
        built once (every rank must call this together the first time: it is collective)."""
        if split == "val" and self.val_loader is not None:
            return self.val_loader
        if split not in self._eval_loaders:
            from vltrain.data.loader import build_eval_loader
            make = self.spec.make_collator if self.spec is not None else None
            self._eval_loaders[split] = build_eval_loader(self.cfg, self.tokenizer, self.cfg.train.micro_batch_size,
                                                          split, make_collator=make)[0]
        return self._eval_loaders[split]

    def run_eval(self, split: str) -> int:
        """``mode=eval``: the task's evaluation of ``data.<split>`` with the loaded weights (each
        sample once across ranks; result files under ``<run_dir>/eval/``), logged to TensorBoard
        as ``<split>/<metric>`` and printed. Returns the exit code. Not preemptible: SIGUSR1
        is ignored from here on (the scorers' Java children inherit that), SIGTERM ends it."""
        STOP.not_preemptible()
        if self.step == 0 and self.cfg.train.init_from:
            # name the results by the evaluated weights' step: a checkpoint's, an export's or a
            # consolidated file's (0 for other weights, a BERT folder)
            try:
                self.step = int(locate(self.cfg.train.init_from, check_files=False).info.get("step", 0))
            except (CheckpointError, OSError):
                from vltrain.ckpt.export import written_step
                self.step = written_step(self.cfg.train.init_from) or 0
        if self.spec is not None and self.spec.evaluate is not None:
            result = self.spec.evaluate(self, split)
        else:
            result = self.mean_metrics(self.eval_loader(split))
        for k, v in result.items():    # a run of its own: a val/ point beside training's would be a second one
            self.monitor.log_scalar(f"{split}/{k}", v, self.step, run="eval")
        if self.info.is_main:
            log.info("eval %s step %d | %s", split, self.step, " | ".join(f"{k} {v:.4g}" for k, v in result.items()))
        self.monitor.close()
        return 0

    @torch.no_grad()
    def mean_metrics(self, loader) -> dict:
        """Mean of the module's metrics over a loader, each sample once across all ranks (a
        batch's metrics weigh as many samples as it holds that no earlier batch, on this rank
        or a lower one, held). A metric is averaged over the batches that report it; a
        ``Ratio`` (accuracy over masked tokens) is its numerators' sum over its denominators'.
        ``skipped_samples``: the bad samples ``data.skip_bad_samples`` left out of the means
        (each once: streaming's padding may give one to two ranks)."""
        self.engine.eval()
        batches: list[tuple[list[int], dict]] = []
        for batch in loader:
            ids = batch.sample_id.tolist()
            # Every batch runs forward, repeats included: under ZeRO-3 the forward gathers
            # parameters collectively, so every rank must run the same batches.
            _, metrics = self.engine(self.to_device(batch))
            batches.append((ids, {k: Ratio(*(x.detach().float() for x in v)) if isinstance(v, Ratio)
                                  else v.detach().float() for k, v in metrics.items()}))
        self.engine.train()
        mine = ([ids for ids, _ in batches], sorted({k for _, m in batches for k in m}), set(loader.skipped_in_pass))
        everyone = [mine]
        if dist.is_initialized():
            everyone = [None] * self.info.world
            dist.all_gather_object(everyone, mine)
        weights = first_seen_counts([ids for ids, _, _ in everyone])[self.info.rank]
        keys = sorted({k for _, ks, _ in everyone for k in ks})
        skipped = len(set().union(*(s for _, _, s in everyone)))
        if skipped and self.info.is_main:
            log.warning("validation: %d bad samples skipped (data.skip_bad_samples), not in its means", skipped)
        sums = metric_sums(batches, weights, keys, self.device)
        if dist.is_initialized():
            dist.all_reduce(sums)
        sums = sums.tolist()
        means = {k: sums[i] / sums[len(keys) + i] if sums[len(keys) + i] > 0 else 0.0 for i, k in enumerate(keys)}
        return {**means, "skipped_samples": skipped}
