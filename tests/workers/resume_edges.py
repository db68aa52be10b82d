"""One-rank worker: the edges of saving and resuming, several runs in one process.

Usage: python -c "from tests.workers.resume_edges import main; main()" CORPUS OUT
(prints ``RESULTS <json>``; tests/test_resume_edges.py runs it)

Real trainers (``build_training``, DeepSpeed ZeRO-2 as run.py); what is injected is a fault,
never our code's behaviour: a NaN loss at a chosen micro-batch, SIGUSR1 sent to this process
from inside a chosen forward (as Slurm's would arrive), and a ``torch.save`` that fails (a
full disk) during one save. Runs, in order:

  base      max_steps=4, saves at 2 and 4; step 2 profiled (its save in the window)
  restart   the base run restarted from its step 2 with another train.lr, grad_clip and Adam
            settings: those right after the resume, and whether step 4 (the base run's) is
            replaced by this run's
  best      on the restart's trainer: save `best` while a timed checkpoint is due (still due
            after it), then a save of `best` that fails midway, then one that succeeds
  precision resume of the base run with train.precision=bf16: the error
  uni16     the restart's step 4 resharded to a universal checkpoint made to look fp16-trained (a
            dynamic loss scaler of 2^16 and train.precision: fp16, as a GPU run writes them; the
            CPU has no fp16), resumed in bf16 with another train.grad_clip: this run's scaler
            and clipping, not the checkpoint's (and Adam settings: the restart's were others)
  auto_precision  train.precision=auto: the base run's; a bf16 run resumed with it
  overflow  bf16 with DeepSpeed's check_grad_overflow, infinite gradients (a finite loss) at
            step 2: the step skipped, train/overflow_skipped and the logged lr
  accum     grad_accum=2, NaN at micro-batch 4 (a step's last): uninterrupted, then with
            SIGUSR1 at that micro-batch (exit 75) and a resume
  epochcut  grad_accum=2, NaN at micro-batch 3: an epoch ends inside step 16; step 15's
            checkpoint (the epoch's last micro-batch held back) resumed
  valstop   SIGUSR1 during step 2, at which a validation is due (val_every=2; log_every=3):
            uninterrupted (valref), stopped, resumed: the skipped validation runs first (before
            the resumed run's profiled window, step 3), and the interval logged at step 3
            averages steps 1-3 as the uninterrupted run's
  valend    the same with SIGUSR1 during the last step (4): the resumed run validates and saves
            step 4 again (the checkpoint no longer has it due, and keeps the new best); a copy
            of the stopped run resumed with validation off (data.val=) just finishes
  capstop   caption fine-tuning validated at step 2 (Java scorers), uninterrupted (capref) and
            with SIGUSR1 sent, as Slurm does, to this process and to the scorer's JVM while it
            runs (the validation is cut short: exit 75), then resumed (needs java)
  damaged   resume from a copy of a checkpoint with one file cut in half: the error names it
"""
import json
import os
import shutil
import signal
import sys
import threading

import torch

from tests.fixtures.java import signal_first_java_child


def cfg_of(corpus, out, name, *extra, config="configs/debug.yaml"):
    from vltrain.config import load_config
    return load_config(config, [
        f"data.train={corpus}/captions/pretrain", "data.val=", f"output_root={out}", f"run_name={name}",
        f"data.cache_dir={out}/cache", "train.warmup_steps=1", "train.log_every=1", "train.keep_last=3", *extra])


class InfGrad(torch.autograd.Function):
    """The loss as it is, its gradient infinite: a gradient overflow with a finite loss (what
    fp16 meets past its range), which DeepSpeed's overflow check skips."""
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class Faults:
    """Per run: NaN loss at micro-batch ``nan_at`` (1-based, training forwards), SIGUSR1 at
    ``usr1_at``, infinite gradients (a finite loss) at ``inf_grad_at``."""

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
                if faults.calls == faults.inf_grad_at:
                    loss = InfGrad.apply(loss)
            return loss, metrics
        PretrainTask.forward = forward

    def set(self, nan_at=0, usr1_at=0, inf_grad_at=0):
        self.calls, self.nan_at, self.usr1_at, self.inf_grad_at = 0, nan_at, usr1_at, inf_grad_at


def train(cfg, faults, ds_config=None, **fault):
    """Build (resuming as run.py does), train; returns (code, {step: loss}, trainer)."""
    from tests.workers import record_losses
    from vltrain.engine.build import build_training
    from vltrain.engine.signals import STOP
    STOP.signum = None                    # a previous run in this process stopped on a signal
    faults.set(**fault)
    trainer = build_training(cfg, ds_config)
    losses = record_losses(trainer)
    trainer.lr_after_build = trainer.engine.get_lr()
    trainer.clip_after_build = getattr(trainer.engine.optimizer, "clip_grad", None)
    inner = getattr(trainer.engine.optimizer, "optimizer", trainer.engine.optimizer)
    trainer.groups_after_build = [[g["weight_decay"], g["eps"], list(g["betas"])] for g in inner.param_groups]
    trainer.validated_at = []                       # the steps validate() ran at (observed only)
    trainer.val_results = {}
    real_validate = trainer.validate

    def validate(*a, **kw):
        trainer.validated_at.append(trainer.step)
        trainer.val_results[trainer.step] = real_validate(*a, **kw)
        return trainer.val_results[trainer.step]
    trainer.validate = validate
    return trainer.train(), losses, trainer


def outcome(code, losses, t) -> dict:
    best = record(os.path.join(t.save_dir, "best"))
    return {"code": code, "losses": losses, "validated_at": t.validated_at, "best_metric": t.best_metric,
            "best_step": best and best["step"], "samples_seen": t.monitor.samples_seen,
            "val": {str(k): v for k, v in t.val_results.items()},
            "latest": open(os.path.join(t.save_dir, "latest")).read()}


def profile_of(t, step):
    """The summary of a train.profile_steps=1 window over ``step``, or None."""
    path = os.path.join(t.run_dir, "profile", f"steps_{step}-{step}", "rank0.md")
    return open(path).read() if os.path.exists(path) else None


def record(path):
    from vltrain.engine.checkpoint import read_ckpt_info
    return read_ckpt_info(path)


def main():
    from vltrain.engine.signals import STOP
    from vltrain.redact import setup_logging
    STOP.install()
    STOP.shield_children()        # as run.py: capstop's Java must still end on USR1
    setup_logging()
    corpus, out = sys.argv[1:3]
    from vltrain.config import load_config
    res = {}
    faults = Faults()

    code, base_losses, t = train(cfg_of(corpus, out, "base", "train.max_steps=4", "train.save_every_steps=2",
                                        "train.profile_start=1", "train.profile_steps=1"), faults)
    t.close()
    ckpts, base_precision = t.save_dir, t.cfg.train.precision
    res["base"] = {"code": code, "losses": base_losses, "profile": profile_of(t, 2)}

    cfg = cfg_of(corpus, out, "base", "train.max_steps=4", "train.save_every_steps=0", "train.lr=5e-4",
                 "train.grad_clip=0.5", "train.weight_decay=0.05", "train.adam_eps=1e-8", "train.adam_betas=[0.8,0.99]",
                 f"train.resume={ckpts}/step_00000002")
    code, losses, t = train(cfg, faults)
    from vltrain.engine.schedule import lr_at
    res["restart"] = {"code": code, "losses": losses, "lr_after_build": t.lr_after_build,
                      "lr_expected": lr_at(cfg, 2), "clip_after_build": t.clip_after_build,
                      "groups_after_build": t.groups_after_build, "lr_base_run": lr_at(cfg_of(corpus, out, "x", "train.max_steps=4"), 2),
                      "step4_lr": load_config(f"{ckpts}/step_00000004/config.yaml").train.lr,
                      "latest": open(f"{ckpts}/latest").read(), "names": sorted(os.listdir(ckpts))}

    best = os.path.join(ckpts, "best")
    import time
    from vltrain.engine.trainer import FLAG_SAVE
    t.cfg.train.save_every_minutes = 1.0
    t._last_save_time = time.time() - 61              # a timed checkpoint is due
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
    timed_due_after_best = bool(t._flags(torch.tensor(1.0))[FLAG_SAVE])     # best/ is no resume point
    kept = {"record": record(best), "mtime_same": os.stat(os.path.join(best, "vltrain_ckpt.json")).st_mtime_ns == mtime,
            "names": sorted(os.listdir(ckpts))}
    t.step = 5          # the number the next save records, to tell it from the first
    t.save("best")
    res["best"] = {"first": first, "failed": failed, "kept": kept, "after": record(best),
                   "timed_due_after_best": timed_due_after_best,
                   "names": sorted(os.listdir(ckpts))}
    t.close()

    try:
        train(cfg_of(corpus, out, "base", "train.max_steps=6", "train.resume=auto", "train.precision=bf16"), faults)
        res["precision"] = "no error"
    except Exception as e:  # noqa: BLE001 - the message is the result
        res["precision"] = f"{type(e).__name__}: {e}"

    try:       # a backend the device cannot train with: refused at build, not at the first step
        train(cfg_of(corpus, out, "flexcpu", "train.max_steps=2", "model.attention_backend=flex"), faults)
        res["backend"] = {"error": "no error"}
    except Exception as e:  # noqa: BLE001 - the message is the result
        res["backend"] = {"error": f"{type(e).__name__}: {e}", "names": sorted(os.listdir(out))}

    import yaml
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from vltrain.ckpt.__main__ import main as ckpt_main
    uni = os.path.join(out, "uni16", "checkpoints", "step_00000004")
    assert ckpt_main(["reshard", ckpts, uni, "--tag", "step_00000004", "--world-size", "1"]) == 0
    opt_file = os.path.join(uni, "zero", "optimizer_state.pt")
    sd = torch.load(opt_file, weights_only=False)
    sd["loss_scaler"] = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=1000, min_scale=1.0, delayed_shift=2,
                                          consecutive_hysteresis=False)
    sd["dynamic_loss_scale"] = True
    torch.save(sd, opt_file)
    with open(os.path.join(uni, "config.yaml")) as f:
        saved = yaml.safe_load(f)
    saved["train"]["precision"] = "fp16"
    with open(os.path.join(uni, "config.yaml"), "w") as f:
        yaml.safe_dump(saved, f)
    code, _, t = train(cfg_of(corpus, out, "uni16", "train.max_steps=5", "train.resume=auto", "train.precision=bf16",
                              "train.grad_clip=0.25"), faults)
    t.close()
    scaler = t.engine.optimizer.loss_scaler
    res["uni16"] = {"code": code, "scaler": type(scaler).__name__, "scale": scaler.cur_scale,
                    "dynamic": t.engine.optimizer.dynamic_loss_scale, "clip": t.engine.optimizer.clip_grad,
                    "clip_after_build": t.clip_after_build, "precision": t.cfg.train.precision,
                    "groups_after_build": t.groups_after_build}

    # train.precision=auto (the default): fp32 for a new run on CPU; a bf16 run resumes in bf16
    code, _, t = train(cfg_of(corpus, out, "bf16run", "train.max_steps=2", "train.precision=bf16"), faults)
    t.close()
    code2, losses, t2 = train(cfg_of(corpus, out, "bf16run", "train.max_steps=3", "train.resume=auto"), faults)
    t2.close()
    res["auto_precision"] = {"new_run": base_precision, "codes": [code, code2], "resumed": t2.cfg.train.precision,
                             "losses": losses,
                             "saved": load_config(f"{t2.save_dir}/step_00000003/config.yaml").train.precision}

    # bf16 with DeepSpeed's overflow check, infinite gradients at step 2: skipped and counted
    ds = json.load(open("ds_configs/zero2.json"))
    ds.setdefault("bf16", {})["check_grad_overflow"] = True
    code, losses, t = train(cfg_of(corpus, out, "overflow", "train.max_steps=4", "train.precision=bf16",
                                   "train.save_every_steps=0"), faults, ds_config=ds, inf_grad_at=2)
    t.close()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(os.path.join(out, "overflow", "tensorboard"))
    acc.Reload()
    res["overflow"] = {"code": code, "skipped": t.engine.skipped_steps, "step": t.step,
                       "tag": [[e.step, e.value] for e in acc.Scalars("train/overflow_skipped")],
                       "lr": [[e.step, e.value] for e in acc.Scalars("train/lr")]}

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

    # 256 samples, 16 a step: a NaN at micro-batch 3 moves the steps by one, so step 16 takes the
    # epoch's last micro-batch and the next epoch's first; step 15's save holds the first back
    cut = ["train.max_steps=18", "train.grad_accum=2", "train.save_every_steps=15"]
    code, losses, t = train(cfg_of(corpus, out, "epochcut", *cut), faults, nan_at=3)
    t.close()
    res["epochcut_ref"] = {"code": code, "losses": losses}
    code, losses, t = train(cfg_of(corpus, out, "epochcut_resumed", *cut,
                                   f"train.resume={out}/epochcut/checkpoints/step_00000015"), faults)
    t.close()
    res["epochcut_resumed"] = {"code": code, "losses": losses}

    vs = ["train.max_steps=4", "train.save_every_steps=0", f"data.val={corpus}/captions/val", "train.val_every=2",
          "train.log_every=3"]
    for name, extra, fault in [("valref", [], {}), ("valstop", [], {"usr1_at": 2}),
                               ("valresumed", ["train.resume=auto", "train.profile_start=2",
                                               "train.profile_steps=1"], {})]:
        code, losses, t = train(cfg_of(corpus, out, "valstop" if name == "valresumed" else name, *vs, *extra),
                                faults, **fault)
        t.close()
        res[name] = {**outcome(code, losses, t), "profile": profile_of(t, 3)}

    code, _, t = train(cfg_of(corpus, out, "valend", *vs), faults, usr1_at=4)
    t.close()
    shutil.copytree(os.path.join(out, "valend"), os.path.join(out, "valoff"))
    res["valend_stopped"] = outcome(code, {}, t)
    code, _, t = train(cfg_of(corpus, out, "valend", *vs, "train.resume=auto"), faults)
    t.close()
    state = torch.load(os.path.join(t.save_dir, "step_00000004", "vltrain_rank00000.pt"), weights_only=False)
    res["valend"] = {**outcome(code, {}, t), "saved_val_pending": state["val_pending"],
                     "saved_best_metric": state["best_metric"]}
    code, _, t = train(cfg_of(corpus, out, "valoff", *vs, "train.resume=auto", "data.val="), faults)
    t.close()
    res["valoff"] = outcome(code, {}, t)
    # a finished run whose last step is no validation step (validated at the end), started again
    odd = ["train.max_steps=3", "train.save_every_steps=0", f"data.val={corpus}/captions/val", "train.val_every=2"]
    code, _, t = train(cfg_of(corpus, out, "valodd", *odd), faults)
    t.close()
    res["valodd"] = outcome(code, {}, t)
    last = os.path.join(t.save_dir, "step_00000003")
    files = lambda: sorted((f, os.stat(os.path.join(last, f)).st_mtime_ns) for f in os.listdir(last))  # noqa: E731
    before = files()
    code, _, t = train(cfg_of(corpus, out, "valodd", *odd, "train.resume=auto"), faults)
    t.close()
    res["valodd_again"] = {**outcome(code, {}, t), "resaved": files() != before}

    if shutil.which("java"):
        cap = ["train.max_steps=2", "train.val_every=2", "train.save_every_steps=0", "data.num_workers=0",
               f"data.train={corpus}/captions/train", f"data.val={corpus}/captions/val"]
        for name, extra in [("capref", []), ("capstop", []), ("capresumed", ["train.resume=auto"])]:
            found: list = []
            done = threading.Event()
            # Slurm's USR1 reaches every process of the step: this rank and the scorer's JVM
            killer = threading.Thread(target=signal_first_java_child, args=(signal.SIGUSR1, found),
                                      kwargs={"timeout": 600, "also_self": True, "done": done}, daemon=True)
            if name == "capstop":
                killer.start()
            code, losses, t = train(cfg_of(corpus, out, "capstop" if name == "capresumed" else name, *cap, *extra,
                                           config="configs/caption_debug.yaml"), faults)
            done.set()
            if killer.is_alive():
                killer.join()
            t.close()
            res[name] = {**outcome(code, losses, t), "java_signalled": bool(found)}

    # a damaged file: the base run's step 4 copied, its optimizer states cut in half
    damaged = os.path.join(out, "damaged", "checkpoints")
    shutil.copytree(os.path.join(ckpts, "step_00000004"), os.path.join(damaged, "step_00000004"))
    for name in ("optim_states", "vltrain_rank"):
        victim = next(f for f in sorted(os.listdir(os.path.join(damaged, "step_00000004"))) if name in f)
        path = os.path.join(damaged, "step_00000004", victim)
        keep = os.path.getsize(path) // 2
        with open(path, "r+b") as f:
            f.truncate(keep)
        try:
            train(cfg_of(corpus, out, "damaged", "train.max_steps=6", f"train.resume={damaged}/step_00000004"), faults)
            res[f"damaged_{name}"] = {"victim": victim, "error": "no error"}
        except Exception as e:  # noqa: BLE001 - the message is the result
            res[f"damaged_{name}"] = {"victim": victim, "error": f"{type(e).__name__}: {e}"}
        shutil.rmtree(os.path.join(damaged, "step_00000004"))
        shutil.copytree(os.path.join(ckpts, "step_00000004"), os.path.join(damaged, "step_00000004"))

    # a ZeRO-0 bf16 checkpoint as a GPU run writes it (DeepSpeed's fused optimizer: fp32 masters
    # and Adam moments flat per group, no loss scaler in bf16), resumed on this CPU (unfused)
    z0 = ["train.max_steps=1", "train.precision=bf16"]
    code, _, t = train(cfg_of(corpus, out, "z0gpu", *z0), faults, ds_config="ds_configs/zero0.json")
    t.close()
    path = os.path.join(t.save_dir, "step_00000001", "mp_rank_00_model_states.pt")
    sd = torch.load(path, weights_only=False)
    opt = sd["optimizer"]
    opt["fp32_groups_flat"] = [torch.cat([p.reshape(-1) for p in g]) for g in opt.pop("fp32_groups")]
    for k in ("dynamic_loss_scale", "cur_scale", "cur_iter"):
        opt.pop(k, None)
    inner = opt["optimizer_state_dict"]
    flat = {}
    for gi, group in enumerate(inner["param_groups"]):
        states = [inner["state"][i] for i in group["params"]]
        flat[gi] = {k: (torch.cat([st[k].reshape(-1) for st in states]) if k != "step" else states[0][k])
                    for k in states[0]}
        group["params"] = [gi]
    inner["state"] = flat
    torch.save(sd, path)
    try:
        train(cfg_of(corpus, out, "z0gpu", "train.max_steps=2", "train.precision=bf16", "train.resume=auto"),
              faults, ds_config="ds_configs/zero0.json")
        res["zero0_layout"] = "no error"
    except Exception as e:  # noqa: BLE001 - the message is the result
        res["zero0_layout"] = f"{type(e).__name__}: {e}"
    print("RESULTS " + json.dumps(res), flush=True)

