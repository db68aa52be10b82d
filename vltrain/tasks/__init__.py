"""Tasks: what a batch means and how it is scored. ``get_task(name)`` -> ``TaskSpec``."""
from vltrain.tasks.base import TaskSpec, check_task_name
from vltrain.tasks.pretrain import PretrainTask

TASKS: dict[str, TaskSpec] = {
    "pretrain": TaskSpec("pretrain", build_module=lambda cfg, model: PretrainTask(model, cfg.objectives)),
}


def get_task(name: str) -> TaskSpec:
    return check_task_name(name, TASKS)


__all__ = ["TASKS", "TaskSpec", "get_task"]
