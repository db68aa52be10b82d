"""Checkpoint-tools worker: train (or resume) with the real ``build_training`` and record the
LIVE engine state, several runs per launch (one launch = one set of ranks).

Usage: python tests/workers/ckpt_train.py SPEC.json

SPEC = {"out": DIR, "runs": [{"name": N, "ds_config": PATH, "overrides": [...]}, ...],
        "bad": [{"name": N, "argv": [...]}, ...]}      # "bad": one-rank launches only

For each run, every rank builds the trainer exactly as ``vltrain/run.py`` does (resume,
``train.resume=`` included) and trains to ``train.max_steps``. Instrumentation only, no
behaviour changed: after every checkpoint save and right after the build (i.e. after any
resume, before the first step) the full fp32 weights and Adam moments are read from the live
engine with ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state``
(collective under ZeRO-3) and rank 0 writes them to ``DIR/<name>_<when>.pt``; the globally
reduced loss of every step goes to ``DIR/<name>_losses.json``.

Then each "bad" case runs ``vltrain/run.py``'s ``main(argv)`` in this process and records its
exit code and the errors it logged in ``DIR/bad_inputs.json``.
"""
import json
import logging
import os
import sys

import torch


def live_state(engine) -> dict:
    """{"fp32"|"exp_avg"|"exp_avg_sq": {name: full tensor}} read from the live engine (all ranks)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    opt = engine.optimizer
    if hasattr(opt, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19.8, ZeRO-1/2: the optimizer-state views are linked lazily right after
        # the FIRST param group's first step (and reset by load_checkpoint), so with our two
        # groups (decay / no decay) the second group's exp_avg would read as "not found".
        # Re-linking only refreshes those views; nothing is copied or changed.
        opt._hp_optimizer_states_linked = False
        opt._lazy_init_hp_params_optimizer_state()
    out = {"fp32": {}, "exp_avg": {}, "exp_avg_sq": {}}
    zero = engine.zero_optimization_stage()
    base = getattr(opt, "optimizer", opt)
    # ZeRO-0 in bf16/fp16: DeepSpeed's unfused optimizer steps an fp32 master per parameter
    masters = {id(p16): p32 for g16, g32 in zip(getattr(opt, "fp16_groups", []), getattr(opt, "fp32_groups", []))
               for p16, p32 in zip(g16, g32)}
    for name, p in engine.module.named_parameters():
        if zero == 0:   # no ZeRO: the module (or the master) holds the fp32 weights, torch's AdamW the moments
            p = masters.get(id(p), p)
            out["fp32"][name] = p.detach().clone().cpu()
            for key in ("exp_avg", "exp_avg_sq"):
                out[key][name] = base.state[p][key].detach().clone().cpu()
            continue
        out["fp32"][name] = safe_get_full_fp32_param(p).detach().clone().cpu()
        for key in ("exp_avg", "exp_avg_sq"):
            out[key][name] = safe_get_full_optimizer_state(p, key).detach().clone().cpu()
    return out


def run_one(spec: dict, out: str, rank: int) -> None:
    from tests.workers import record_losses
    from vltrain.config import load_config
    from vltrain.engine.build import build_training

    name = spec["name"]
    cfg = load_config("configs/debug.yaml", spec["overrides"])
    trainer = build_training(cfg, spec["ds_config"])

    def dump(when: str):
        state = live_state(trainer.engine)
        if rank == 0:
            state.update(step=trainer.step, grad_accum=trainer.engine.gradient_accumulation_steps(),
                         world=trainer.info.world)
            torch.save(state, os.path.join(out, f"{name}_{when}.pt"))

    real_save = trainer.save

    def save(tag=None):
        path = real_save(tag)
        dump(f"save{trainer.step}")
        return path

    trainer.save = save
    losses = record_losses(trainer)
    if cfg.train.resume:
        dump("built")                     # the resumed state, before any step
    code = trainer.train()
    if rank == 0:
        with open(os.path.join(out, f"{name}_losses.json"), "w") as f:
            json.dump({"code": code, "losses": losses, "grad_accum": trainer.cfg.train.grad_accum,
                       "world": trainer.info.world}, f)
    trainer.close()


class _Errors(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def bad_inputs(cases: list, out: str) -> None:
    """``vltrain.run.main(argv)`` once per case (one-rank world): exit code + error messages."""
    from vltrain import run
    handler = _Errors()
    logging.getLogger("vltrain.run").addHandler(handler)    # not root: run.main resets root's handlers
    result = {}
    for case in cases:
        handler.messages = []
        code = run.main(case["argv"])
        result[case["name"]] = {"code": code, "errors": list(handler.messages)}
    with open(os.path.join(out, "bad_inputs.json"), "w") as f:
        json.dump(result, f, indent=1)


def main(spec_path: str) -> int:
    from tests.workers import run_spec
    spec = run_spec(spec_path, run_one)
    if spec.get("bad"):
        bad_inputs(spec["bad"], spec["out"])
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main(sys.argv[1]))
