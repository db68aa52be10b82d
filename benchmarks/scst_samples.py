"""Self-critical training's sampling, n captions per image: one prefix per image vs the images repeated.

    python benchmarks/scst_samples.py [--quick] [--images 2] [--samples 5] [--regions 100]
                                      [--max-len 20] [--rounds 3] [--threads 0] [--out F.md]

``task.scst_samples=n`` samples n captions per image (forward with gradient, then backward of
the sampled log-probabilities, as an SCST step does). Two ways in the same run, interleaved
round by round, on one model (BERT-base sized unless ``--quick``) in training mode without
dropout (so both draw the same captions, which the run checks): the images' prefix (regions,
[CLS] [SEP]) encoded once and shared by their n samples (``sample_captions(samples=n)``,
vltrain's), and the batch repeated n-fold before sampling (how vltrain did it before: the
regions' forward and backward n times over). ``early_exit`` off: every caption runs
``--max-len`` steps, so both do the same number of steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit_report, machine_description, markdown_table, median  # noqa: E402
from benchmarks.decode import make_images  # noqa: E402
from vltrain.config import ModelConfig, debug_model_config  # noqa: E402
from vltrain.decoding import DecodeTokens, _images, _repeat, sample_captions  # noqa: E402

SECTION = "## SCST samples"


def run(args) -> dict:
    from vltrain.model import VLModel
    from vltrain.tokenization import Tokenizer
    if args.threads:
        torch.set_num_threads(args.threads)
    no_dropout = dict(hidden_dropout=0.0, attention_dropout=0.0)
    cfg = debug_model_config(**no_dropout) if args.quick else ModelConfig(**no_dropout)
    torch.manual_seed(0)
    model = VLModel(cfg).train()
    tok = DecodeTokens.from_tokenizer(Tokenizer("bert-base-uncased"))
    images = make_images(cfg, args.images, args.regions, torch.device("cpu"), torch.float32)
    repeated = dataclasses.replace(images, **_repeat(_images(images), args.samples))   # the decoder's own copy
    ways = {"shared prefix (vltrain)": (images, args.samples), "images repeated n-fold (before)": (repeated, 1)}
    times: dict = {k: [] for k in ways}
    words = {}

    def step(label):
        batch, n = ways[label]
        t0 = time.perf_counter()
        w, lp, m = sample_captions(model, batch, tok, samples=n, max_len=args.max_len, early_exit=False,
                                   generator=torch.Generator().manual_seed(1))
        (lp * m).sum().backward()
        model.zero_grad(set_to_none=True)
        words.setdefault(label, w)
        return time.perf_counter() - t0

    for label in ways:
        print(f"  warmup {label}: {step(label):.2f} s", flush=True)
    for r in range(args.rounds):
        for label in ways:
            times[label].append(step(label))
        print(f"  round {r + 1}/{args.rounds}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in times.items()),
              flush=True)
    a, b = words.values()
    return dict(times=times, same=torch.equal(a, b), cfg=cfg)


def report(args, res) -> str:
    cfg = res["cfg"]
    size = ("debug model (2 layers, hidden 64)" if args.quick else
            f"BERT-base sized ({cfg.num_layers} layers, hidden {cfg.hidden_size})")
    n = args.images * args.samples
    med = {k: median(v) for k, v in res["times"].items()}
    base = med["images repeated n-fold (before)"]
    rows = [[k, f"{t:.3g}", f"{n / t:.3g}", f"{base / t:.2f}x"] for k, t in med.items()]
    cmd = "python benchmarks/scst_samples.py" + (" --quick" if args.quick else "") + \
        f" --images {args.images} --samples {args.samples} --regions {args.regions} --max-len {args.max_len} " \
        f"--rounds {args.rounds}" + (f" --threads {args.threads}" if args.threads else "")
    return "\n".join([
        SECTION, "",
        f"`{cmd}` — {size}, {args.images} images x {args.regions} regions, {args.samples} sampled captions per "
        f"image of {args.max_len} words, forward with gradient and backward, fp32, no dropout; medians of "
        f"{args.rounds} interleaved rounds; {machine_description(torch.device('cpu'))}. Same captions drawn both "
        f"ways: {'yes' if res['same'] else 'NO'}.", "",
        markdown_table(["sampling", "s per call", "captions/s", "speed-up"], rows), "",
    ])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="debug-size model (CI)")
    p.add_argument("--images", type=int, default=2)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--regions", type=int, default=100)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", help="write the Markdown section here too")
    args = p.parse_args(argv)
    res = run(args)
    emit_report(report(args, res), args.out)
    return 0 if res["same"] else 1


if __name__ == "__main__":
    sys.exit(main())
