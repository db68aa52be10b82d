"""Tasks: what a batch means and how it is scored. ``get_task(name)`` -> ``TaskSpec``."""
from vltrain.objectives.pretrain import loss_positions
from vltrain.tasks.base import TaskSpec, mlm_work
from vltrain.tasks.pretrain import PretrainTask, pretrain_heads
from vltrain.tasks import mc as _mc, refs as _refs, vqa as _vqa
from vltrain.tasks import caption as _caption

TASKS: dict[str, TaskSpec] = {
    "pretrain": TaskSpec("pretrain", build_module=lambda cfg, model: PretrainTask(model, cfg.objectives),
                         work=lambda cfg, batch: mlm_work(cfg, batch, loss_positions(batch, cfg.objectives)[0]),
                         token_mean=lambda cfg: cfg.objectives.loss_reduction == "token",
                         model_heads=lambda cfg: pretrain_heads(cfg.objectives)),
    "vqa": _vqa.SPEC,
    "mc": _mc.SPEC,
    "refs": _refs.SPEC,
    "caption": _caption.SPEC,
}


def get_task(name: str) -> TaskSpec:
    return TASKS[name]          # a name outside them is refused as the config loads (TaskConfig.name)


__all__ = ["TASKS", "TaskSpec", "get_task"]
