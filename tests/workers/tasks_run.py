"""Task worker: several fine-tuning or evaluation runs in one launch (one set of ranks pays
the imports once), each built and run exactly as ``vltrain/run.py`` does it.

Usage: python tests/workers/tasks_run.py SPEC.json

SPEC = {"out": DIR, "runs": [{"name": N, "config": YAML, "overrides": [...]}, ...]}

A run with ``mode=eval`` among its overrides calls ``Trainer.run_eval(task.eval_split)``, any
other ``Trainer.train()``. Rank 0 writes ``DIR/<name>.json``: the exit code and, for training
runs, the metrics of every validation (``{step: metrics}``).
"""
import json
import os
import sys


def run_one(spec: dict, out: str, rank: int) -> None:
    from vltrain.config import load_config
    from vltrain.engine.build import build_training

    cfg = load_config(spec["config"], spec["overrides"])
    if cfg.mode == "eval":
        cfg.train.resume = ""                 # as vltrain/run.py
    trainer = build_training(cfg, spec.get("ds_config"))
    vals = {}
    real_validate = trainer.validate

    def validate():
        res = real_validate()
        vals[trainer.step] = res
        return res

    trainer.validate = validate
    code = trainer.run_eval(cfg.task.eval_split) if cfg.mode == "eval" else trainer.train()
    if rank == 0:
        with open(os.path.join(out, f"{spec['name']}.json"), "w") as f:
            json.dump({"code": code, "val": vals, "step": trainer.step}, f)
    trainer.close()


def main(spec_path: str) -> int:
    from tests.workers import run_spec
    run_spec(spec_path, run_one)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    sys.exit(main(sys.argv[1]))
