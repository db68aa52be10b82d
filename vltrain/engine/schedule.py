"""Learning-rate schedule: linear warm-up, then linear decay to 0 at ``train.max_steps``.

The same curve as ``transformers.get_linear_schedule_with_warmup`` (VLP and VL-BERT both
use it): after ``s`` optimizer steps the multiplier is ``s / W`` while ``s < W``, then
``(max_steps - s) / (max_steps - W)``, floored at 0. ``W = train.warmup_steps``, or
``ceil(train.warmup_ratio * max_steps)`` when ``warmup_steps < 0`` (VL-BERT: 8,000 steps;
VLP: 10%).

    engine, opt, _, sched = deepspeed.initialize(..., lr_scheduler=linear_warmup_decay(cfg.train))

DeepSpeed steps the scheduler once per optimizer step (at the accumulation boundary) and
saves/loads its state with the checkpoint. The multiplier function is a closure, which
LambdaLR does not serialise: on resume the *config's* schedule applies at the restored step.
"""
from __future__ import annotations

import math
from typing import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _train(cfg):
    return getattr(cfg, "train", cfg)


def warmup_steps_of(cfg) -> int:
    """Warm-up length in optimizer steps from ``train.warmup_steps`` / ``train.warmup_ratio``."""
    t = _train(cfg)
    if t.warmup_steps >= 0:
        return int(t.warmup_steps)
    if not 0.0 <= t.warmup_ratio <= 1.0:
        raise ValueError(f"config key 'train.warmup_ratio': {t.warmup_ratio} is not in [0, 1]")
    return int(math.ceil(t.warmup_ratio * t.max_steps))


def lr_lambda(warmup_steps: int, max_steps: int) -> Callable[[int], float]:
    """The LR multiplier after ``step`` optimizer steps."""
    if max_steps <= 0:
        raise ValueError(f"config key 'train.max_steps': {max_steps} must be > 0")
    if warmup_steps > max_steps:
        raise ValueError(f"warm-up ({warmup_steps} steps) is longer than train.max_steps ({max_steps}): set "
                         f"train.warmup_steps={max_steps // 10} (10%) or anything up to {max_steps} (or "
                         f"train.warmup_ratio, used when train.warmup_steps < 0, at most 1)")

    def fn(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))
    return fn


def lr_at(cfg, step: int) -> float:
    """The learning rate after ``step`` optimizer steps (what the (step+1)-th update uses)."""
    t = _train(cfg)
    return t.lr * lr_lambda(warmup_steps_of(t), t.max_steps)(step)


def linear_warmup_decay(cfg) -> Callable[[Optimizer], LambdaLR]:
    """Factory for DeepSpeed's ``lr_scheduler=`` argument (a callable taking the optimizer)."""
    t = _train(cfg)
    fn = lr_lambda(warmup_steps_of(t), t.max_steps)

    def make(optimizer: Optimizer) -> LambdaLR:
        return LambdaLR(optimizer, fn)
    return make


def reapply(scheduler: LambdaLR, base_lrs: list[float]) -> None:
    """After a checkpoint load: this run's learning rates (``base_lrs``, as built from the
    config) on this run's schedule at the restored step. The load brings back the interrupted
    run's base rates (LambdaLR's state) and its current rate per group (the optimizer's), so a
    resume with another ``train.lr``, ``max_steps`` or warm-up would train its first update at
    the old rate and every later one from the old base. Without a change this rewrites the
    same values (same formula), so an exact resume stays exact."""
    scheduler.base_lrs = list(base_lrs)
    step = scheduler.last_epoch
    for group, base, fn in zip(scheduler.optimizer.param_groups, base_lrs, scheduler.lr_lambdas):
        group["initial_lr"] = base
        group["lr"] = base * fn(step)
    scheduler._last_lr = [g["lr"] for g in scheduler.optimizer.param_groups]
