"""One-rank worker: the edges of saving and resuming, several runs in one process.

Usage: python -c "from tests.workers.resume_edges import main; main()" CORPUS OUT
(prints ``RESULTS <json>``; tests/test_resume_edges.py runs it)

Real trainers (``build_training``, DeepSpeed ZeRO-2 as run.py); what is injected is a fault,
never our code's behaviour: a NaN loss at a chosen micro-batch, SIGUSR1 sent to this process
from inside a chosen forward (as Slurm's would arrive), and a ``torch.save`` that fails (a
full disk) during one save. Runs, in order:

  base      max_steps=4, saves at 2 and 4
  restart   the base run restarted from its step 2 with another train.lr: the lr right after
            the resume, and whether step 4 (the base run's) is replaced by this run's
  best      on the restart's trainer: save `best`, then a save of `best` that fails midway,
            then one that succeeds
  precision resume of the base run with train.precision=bf16: the error
  auto_precision  train.precision=auto: the base run's; a bf16 run resumed with it
  accum     grad_accum=2, NaN at micro-batch 4 (a step's last): uninterrupted, then with
            SIGUSR1 at that micro-batch (exit 75) and a resume
  valstop   SIGUSR1 during step 2, at which a validation is due (val_every=2)
"""
import json
import os
import signal
import sys

import torch


def cfg_of(corpus, out, name, *extra):
    from vltrain.config import load_config
    return load_config("configs/debug.yaml", [
        f"data.train={corpus}/captions/pretrain", "data.val=", f"output_root={out}", f"run_name={name}",
        f"data.cache_dir={out}/cache", "train.warmup_steps=1", "train.log_every=1", "train.keep_last=3", *extra])


class Faults:
    """Per run: NaN loss at micro-batch ``nan_at`` (1-based, training forwards), SIGUSR1 at ``usr1_at``."""

    def __init__(self):
        from vltrain.tasks.pretrain import PretrainTask
        self.real = PretrainTask.forward
        self.set()
        faults = self

        def forward(task, batch):
            loss, metrics = faults.real(task, batch)
            if task.training:
                faults.calls += 1
                if faults.calls == faults.usr1_at:
                    os.kill(os.getpid(), signal.SIGUSR1)
                if faults.calls == faults.nan_at:
                    loss = loss * float("nan")
            return loss, metrics
        PretrainTask.forward = forward

    def set(self, nan_at=0, usr1_at=0):
        self.calls, self.nan_at, self.usr1_at = 0, nan_at, usr1_at


def train(cfg, faults, **fault):
    """Build (resuming as run.py does), train; returns (code, {step: loss}, trainer)."""
    from tests.workers import record_losses
    from vltrain.engine.build import build_training
    from vltrain.engine.signals import STOP
    STOP.signum = None                    # a previous run in this process stopped on a signal
    faults.set(**fault)
    trainer = build_training(cfg)
    losses = record_losses(trainer)
    trainer.lr_after_build = trainer.engine.get_lr()
    trainer.validated_at = []                       # the steps validate() ran at (observed only)
    real_validate = trainer.validate

    def validate(*a, **kw):
        trainer.validated_at.append(trainer.step)
        return real_validate(*a, **kw)
    trainer.validate = validate
    return trainer.train(), losses, trainer


def record(path):
    from vltrain.engine.checkpoint import read_ckpt_info
    return read_ckpt_info(path)


def main():
    from vltrain.run import setup_logging
    setup_logging()
    corpus, out = sys.argv[1:3]
    from vltrain.config import load_config
    res = {}
    faults = Faults()

    code, base_losses, t = train(cfg_of(corpus, out, "base", "train.max_steps=4", "train.save_every_steps=2"), faults)
    t.close()
    ckpts, base_precision = t.save_dir, t.cfg.train.precision
    res["base"] = {"code": code, "losses": base_losses}

    cfg = cfg_of(corpus, out, "base", "train.max_steps=4", "train.save_every_steps=0", "train.lr=5e-4",
                 f"train.resume={ckpts}/step_00000002")
    code, losses, t = train(cfg, faults)
    from vltrain.engine.schedule import lr_at
    res["restart"] = {"code": code, "losses": losses, "lr_after_build": t.lr_after_build,
                      "lr_expected": lr_at(cfg, 2), "lr_base_run": lr_at(cfg_of(corpus, out, "x", "train.max_steps=4"), 2),
                      "step4_lr": load_config(f"{ckpts}/step_00000004/config.yaml").train.lr,
                      "latest": open(f"{ckpts}/latest").read(), "names": sorted(os.listdir(ckpts))}

    best = os.path.join(ckpts, "best")
    t.save("best")
    first = record(best)
    mtime = os.stat(os.path.join(best, "vltrain_ckpt.json")).st_mtime_ns
    real_save = torch.save

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    torch.save = full_disk
    try:
        t.save("best")
        failed = "no error"
    except OSError as e:
        failed = str(e)
    finally:
        torch.save = real_save
    kept = {"record": record(best), "mtime_same": os.stat(os.path.join(best, "vltrain_ckpt.json")).st_mtime_ns == mtime,
            "names": sorted(os.listdir(ckpts))}
    t.step = 5          # the number the next save records, to tell it from the first
    t.save("best")
    res["best"] = {"first": first, "failed": failed, "kept": kept, "after": record(best),
                   "names": sorted(os.listdir(ckpts))}
    t.close()

    try:
        train(cfg_of(corpus, out, "base", "train.max_steps=6", "train.resume=auto", "train.precision=bf16"), faults)
        res["precision"] = "no error"
    except Exception as e:  # noqa: BLE001 - the message is the result
        res["precision"] = f"{type(e).__name__}: {e}"

    # train.precision=auto (the default): fp32 for a new run on CPU; a bf16 run resumes in bf16
    code, _, t = train(cfg_of(corpus, out, "bf16run", "train.max_steps=2", "train.precision=bf16"), faults)
    t.close()
    code2, losses, t2 = train(cfg_of(corpus, out, "bf16run", "train.max_steps=3", "train.resume=auto"), faults)
    t2.close()
    res["auto_precision"] = {"new_run": base_precision, "codes": [code, code2], "resumed": t2.cfg.train.precision,
                             "losses": losses,
                             "saved": load_config(f"{t2.save_dir}/step_00000003/config.yaml").train.precision}

    accum = ["train.max_steps=3", "train.grad_accum=2", "train.save_every_steps=0"]
    code, losses, t = train(cfg_of(corpus, out, "accum_ref", *accum), faults, nan_at=4)
    t.close()
    res["accum_ref"] = {"code": code, "losses": losses}
    code, losses, t = train(cfg_of(corpus, out, "accum", *accum), faults, nan_at=4, usr1_at=4)
    t.close()
    res["accum_stopped"] = {"code": code, "losses": losses, "latest": open(f"{t.save_dir}/latest").read()}
    code, losses, t = train(cfg_of(corpus, out, "accum", *accum, "train.resume=auto"), faults)
    t.close()
    res["accum_resumed"] = {"code": code, "losses": losses}

    code, losses, t = train(cfg_of(corpus, out, "valstop", "train.max_steps=4", "train.save_every_steps=0",
                                   f"data.val={corpus}/captions/val", "train.val_every=2"), faults, usr1_at=2)
    t.close()
    res["valstop"] = {"code": code, "validated_at": t.validated_at, "latest": open(f"{t.save_dir}/latest").read()}
    print("RESULTS " + json.dumps(res), flush=True)

