"""Processes the multi-rank tests launch (one rank per process, see tests/fixtures)."""
import json
import os


def run_spec(spec_path: str, run_one) -> dict:
    """The loop shared by the spec-driven workers: read ``SPEC.json``, call
    ``run_one(run, out_dir, rank)`` for each of ``spec["runs"]`` in order on every rank, then
    barrier and tear the process group down. Returns the spec."""
    with open(spec_path) as f:
        spec = json.load(f)
    from vltrain.redact import setup_logging
    setup_logging()
    rank = int(os.environ.get("RANK", "0"))
    for run in spec["runs"]:
        run_one(run, spec["out"], rank)
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return spec


def record_losses(trainer) -> dict:
    """{step: globally reduced train/loss}, filled as ``trainer`` logs its steps."""
    losses = {}
    real_step_end = trainer.monitor.step_end

    def step_end(step, *a, **kw):
        res = real_step_end(step, *a, **kw)
        if res is not None and "train/loss" in res:
            losses[int(step)] = res["train/loss"]
        return res
    trainer.monitor.step_end = step_end
    return losses
