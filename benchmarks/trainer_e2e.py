"""What a training job gets: vltrain's Trainer end to end, beside its parts, one run.

    python benchmarks/trainer_e2e.py [--batch 256] [--steps 20] [--workers 8] [--out e2e.md]
    python benchmarks/trainer_e2e.py --quick          # debug size on CPU (CI plumbing check)

Rows, all in one process on one device:
  trainer   ``build_training`` + ``Trainer.train()`` exactly as ``vltrain/run.py`` runs them:
            the VLP pretraining recipe (configs/vlp_pretrain_cc.yaml) on an MDS corpus of
            base-size samples written here (100 regions x 2048 fp16 features + 1601-class
            distributions, ~40-token captions), streamed through ``StreamingDataset`` by
            ``--workers`` DataLoader workers (pinned memory on GPU), the DeepSpeed engine of
            ds_configs/zero2.json (bf16 + compiled blocks on GPU, fp32 on CPU), the monitor's
            figures (samples/s, MFU, data wait) over the second half of the steps (the first
            half holds the compilation).
  engine    the same engine on one fixed batch already on the device (benchmarks/train_throughput.py's
            engine row): the trainer minus data loading and the trainer's own work.
  model     the model's own loop on that batch: bf16 weights + fused AdamW on GPU, fp32 on CPU.
MFU: ``vltrain.monitor``'s formula over the spec dense bf16 peak (GPU only).
Then where the trainer's step goes: ``--profile`` steps of the first half (after the
compilation, before the timed half) under ``train.profile_steps``, whose summary (the trainer's
phases; device time by kernel class and the GPU's idle time on CUDA) ends the report.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.common import (REPO, Size, emit_report, full_size, machine_description, make_batch,  # noqa: E402
                               markdown_table, median, quick_size, time_interleaved)
from benchmarks.loader import write_all  # noqa: E402
from benchmarks.train_throughput import build_engine, build_ours, init_single_process_group, log  # noqa: E402


def profile_window(steps: int, profile: int) -> tuple[int, int]:
    """(train.profile_start, train.profile_steps): ``profile`` steps (fewer if the run is short)
    ending one step before the timed second half begins."""
    k = min(profile, steps // 2 - 1) if profile > 0 else 0
    return (steps // 2 - 1 - k, k) if k > 0 else (0, 0)


def trainer_config(size: Size, mds: str, root: str, args, gpu: bool):
    """The VLP recipe (the debug one with --quick) pointed at the corpus, for ``args.steps`` steps."""
    from vltrain.config import load_config
    recipe = "configs/debug.yaml" if args.quick else "configs/vlp_pretrain_cc.yaml"
    m = size.model
    start, k = profile_window(args.steps, args.profile)
    return load_config(os.path.join(REPO, recipe), [
        f"data.train={mds}", "data.val=", f"data.cache_dir={root}/cache", f"data.num_workers={args.workers}",
        f"data.max_regions={size.regions}", f"data.max_text_len={size.text}",
        f"model.region_feat_dim={m.region_feat_dim}", f"model.num_region_classes={m.num_region_classes}",
        f"model.compile={str(gpu).lower()}", "model.attention_backend=sdpa",
        f"train.micro_batch_size={size.batch}", f"train.max_steps={args.steps}", f"train.log_every={args.steps // 2}",
        "train.init_from=", "train.save_every_steps=0", "train.save_every_minutes=0", "train.val_every=0",
        f"train.precision={'bf16' if gpu else 'fp32'}", f"output_root={root}/out", "run_name=e2e",
        f"train.profile_start={start}", f"train.profile_steps={k}"])


def run_trainer(cfg) -> tuple[dict, str]:
    """Train; the monitor's figures of the last log interval (steps/2 + 1 .. steps), and rank 0's
    profile summary ("" without a window)."""
    from vltrain.engine.build import build_training
    trainer = build_training(cfg)
    code = trainer.train()
    if code != 0:
        raise RuntimeError(f"Trainer.train() returned {code}")
    last = dict(trainer.monitor.last)
    summary = os.path.join(trainer.profiler.out_dir, "rank0.md")
    profile = open(summary).read() if cfg.train.profile_steps else ""
    trainer.close()
    return last, profile


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="debug size (CI / CPU plumbing check)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="micro-batch (default 256 on GPU, 8 on CPU, 4 --quick)")
    p.add_argument("--steps", type=int, default=20, help="optimizer steps of the trainer row (even)")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 8 on GPU, 1 on CPU)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds of the engine and model rows")
    p.add_argument("--profile", type=int, default=3,
                   help="trainer steps to profile before the timed half (train.profile_steps; 0 = none)")
    p.add_argument("--out", help="write the Markdown report here too")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.steps < 2 or args.steps % 2:
        p.error("--steps must be even and >= 2")
    args.workers = args.workers if args.workers is not None else (8 if gpu else 1)
    base = quick_size() if args.quick else full_size()
    size = dataclasses.replace(base, batch=args.batch or (4 if args.quick else 256 if gpu else 8))
    init_single_process_group(device)

    # ignore_cleanup_errors: after a failed run, loader workers may still be writing there; the
    # run's own error is what to see
    with tempfile.TemporaryDirectory(prefix="vltrain_e2e_", ignore_cleanup_errors=True) as root:
        n = size.batch * (args.steps + 2)          # one epoch covers the run: no worker restarts
        m = size.model
        log(f"writing {n} samples ({size.regions} regions x {m.region_feat_dim}, {m.num_region_classes} classes)")
        # captions of text - 3 words: [CLS] [SEP] words [STOP] fills the text part as make_batch does
        mds, _, _ = write_all(root, n, size.regions, m.region_feat_dim, m.num_region_classes, layouts=("mds",),
                              words=size.text - 3)
        log("training: the Trainer, as vltrain/run.py")
        e2e, profile = run_trainer(trainer_config(size, mds, root, args, gpu))

    batch = make_batch(size, seed=0)
    preds = int(batch.mlm_positions.numel())
    log("building: engine alone, model alone")
    engine = build_engine(size, batch, device, preds)
    model = build_ours(size, "sdpa", gpu, batch, device, preds, bf16_weights=gpu)
    model.label = "model's own loop: " + ("bf16 weights, fused AdamW, compiled blocks" if gpu else "fp32, AdamW")
    engine.label = "DeepSpeed engine alone (ZeRO-2), one batch on the device"
    time_interleaved([engine, model], device, warmup=3, rounds=args.rounds, log=log,
                     steps_per_round=5 if gpu else 1)

    from vltrain.monitor import device_peak_tflops
    peak = device_peak_tflops("bf16") if gpu else None
    rows = [["vltrain Trainer (run.py): data from MDS shards, "
             f"{args.workers} loader worker{'s' if args.workers != 1 else ''}, DeepSpeed ZeRO-2",
             e2e["perf/samples_per_s"], 1e3 * e2e["perf/step_time_s"],
             100 * e2e["perf/mfu"] if "perf/mfu" in e2e else float("nan"),
             100 * e2e["perf/data_wait_frac"], e2e["perf/peak_mem_gb"]]]
    for r in (engine, model):
        t = median(r.times)
        rows.append([r.label, size.batch / t, 1e3 * t,
                     100 * r.flops_per_step / t / 1e12 / peak if peak else float("nan"), float("nan"), float("nan")])
    ref = rows[-1][1]
    for r in rows:
        r.append(r[1] / ref)
    md = [f"Machine: {machine_description(device)}. Size: {size.name}, micro-batch {size.batch}, "
          f"{size.regions} regions + {size.text} text tokens; trainer: {args.steps} steps, figures over the last "
          f"{args.steps // 2}; engine and model rows: {args.rounds} rounds, interleaved.", "",
          markdown_table(["configuration", "samples/s", "step ms", "MFU %", "data wait %", "peak mem GB",
                          "× model's own loop"], rows)]
    if profile:      # its own heading one level down, under the report's
        md += ["", "Where the trainer's step goes (`train.profile_steps`, rank 0's summary):", "",
               profile.replace("# Profile:", "##### Profile:", 1).strip()]
    emit_report("\n".join(md), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
