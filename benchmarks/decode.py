"""Caption decoding speed: greedy and beam search, with and without the key/value cache.

    python benchmarks/decode.py [--quick] [--batch 2] [--regions 100] [--max-len 20]
                                [--rounds 3] [--device cpu|cuda] [--update-benchmarks]

Four configurations are timed in the same run, interleaved round by round (greedy and beam 5,
each cached and uncached), on one model (BERT-base sized unless ``--quick``: the debug model)
with random weights and random regions. ``min_len = max_len``, so every caption is exactly
``max_len`` words and every configuration does the same number of steps. Cached and uncached
decoding must return identical tokens; the run checks it and says so.

Uncached = the model's full forward over ``[CLS] r1..rN [SEP] w1..wt [MASK]`` at every step
(every hypothesis its own copy of the regions); cached = the prefix once per image, then only
the new positions per step (``vltrain.model.incremental``). Target: cached beam >= 3x uncached
at max length 20.

``--update-benchmarks`` writes the table into the "## Caption decoding" section of
BENCHMARKS.md at the repo root (replacing that section, creating the file if absent).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import emit_report, machine_description, markdown_table, median, sync  # noqa: E402
from vltrain.config import ModelConfig, debug_model_config  # noqa: E402
from vltrain.data.batch import Batch  # noqa: E402
from vltrain.decoding import DecodeOptions, DecodeTokens, decode  # noqa: E402

SECTION = "## Caption decoding"
TARGET = 3.0


def make_images(cfg: ModelConfig, batch: int, regions: int, device, dtype, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(batch, regions, 2, generator=g) * 0.5
    one = torch.zeros(batch, 1, dtype=torch.long)
    b = Batch(sample_id=torch.arange(batch), input_ids=one, token_type_ids=one, attention_mask=one + 1,
              mode=torch.ones(batch, dtype=torch.long),
              region_feats=torch.randn(batch, regions, cfg.region_feat_dim, generator=g).relu(),
              region_boxes=torch.cat([xy, xy + 0.1 + torch.rand(batch, regions, 2, generator=g) * 0.4], -1),
              region_cls_probs=torch.softmax(torch.randn(batch, regions, cfg.num_region_classes, generator=g), -1),
              region_mask=torch.ones(batch, regions, dtype=torch.bool))
    return b.to(device, float_dtype=dtype)


def run(args) -> dict:
    from vltrain.model import VLModel
    from vltrain.tokenization import Tokenizer
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    cfg = debug_model_config() if args.quick else ModelConfig(hidden_dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    model = VLModel(cfg).to(device=device, dtype=dtype).eval()
    tok = DecodeTokens.from_tokenizer(Tokenizer(cfg_vocab()))
    images = make_images(cfg, args.batch, args.regions, device, dtype)
    configs = [(f"{name}, {'cached' if cache else 'uncached'}",
                DecodeOptions(beam_size=beam, max_len=args.max_len, min_len=args.max_len, use_cache=cache))
               for name, beam in (("greedy", 1), (f"beam {args.beam}", args.beam)) for cache in (True, False)]
    results = {label: [] for label, _ in configs}
    tokens = {}
    with torch.inference_mode():
        for label, o in configs:                      # warm-up (allocator, kernels): 2 steps
            t0 = time.perf_counter()
            decode(model, images, tok, DecodeOptions(beam_size=o.beam_size, max_len=2, min_len=2,
                                                     use_cache=o.use_cache))
            sync(device)
            print(f"  warmup {label}: {time.perf_counter() - t0:.2f} s", flush=True)
        for r in range(args.rounds):
            for label, o in configs:
                sync(device)
                t0 = time.perf_counter()
                out = decode(model, images, tok, o)
                sync(device)
                results[label].append(time.perf_counter() - t0)
                assert tokens.setdefault(label, out.tokens) == out.tokens, f"{label}: tokens changed between rounds"
            print(f"  round {r + 1}/{args.rounds}: " +
                  ", ".join(f"{k} {v[-1]:.2f}s" for k, v in results.items()), flush=True)
    same = {name: tokens[f"{name}, cached"] == tokens[f"{name}, uncached"]
            for name in ("greedy", f"beam {args.beam}")}
    lengths = {len(t) for ts in tokens.values() for t in ts}
    rate = {k: args.batch / median(v) for k, v in results.items()}
    return dict(rate=rate, times=results, same=same, lengths=sorted(lengths), cfg=cfg, device=device,
                dtype=args.dtype)


def cfg_vocab() -> str:
    return "bert-base-uncased"


def report(args, res) -> str:
    cfg = res["cfg"]
    size = ("debug model (2 layers, hidden 64)" if args.quick else
            f"BERT-base sized ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size})")
    beam = f"beam {args.beam}"
    rows = []
    for name in ("greedy", beam):
        c, u = res["rate"][f"{name}, cached"], res["rate"][f"{name}, uncached"]
        rows.append([name, f"{c:.3g}", f"{u:.3g}", f"{c / u:.1f}x", "yes" if res["same"][name] else "NO"])
    speed = res["rate"][f"{beam}, cached"] / res["rate"][f"{beam}, uncached"]
    verdict = "met" if speed >= TARGET else "NOT met"
    cmd = "python benchmarks/decode.py" + (" --quick" if args.quick else "") + \
        f" --batch {args.batch} --regions {args.regions} --max-len {args.max_len} --rounds {args.rounds}" + \
        (f" --device {args.device}" if args.device != "cpu" else "") + \
        (f" --dtype {args.dtype}" if args.dtype != "fp32" else "") + \
        (f" --threads {args.threads}" if args.threads else "")
    lines = [
        SECTION, "",
        f"`{cmd}` — {size}, {args.batch} images x {args.regions} regions, random weights, "
        f"{res['dtype']}, every caption exactly {args.max_len} words (`min_len = max_len`). "
        "Uncached re-runs the full forward over regions + text for every hypothesis at every "
        "step; cached runs the prefix once per image (shared by its beams) and then only the "
        "new positions (the word that replaced the [MASK], and the new [MASK]). Medians of "
        f"{args.rounds} interleaved rounds; {machine_description(res['device'])}.", "",
        markdown_table(["decoding", "captions/s cached", "captions/s uncached", "cache speed-up",
                        "identical tokens"], rows), "",
        f"Target (cached {beam} >= {TARGET:.0f}x uncached at max length {args.max_len}): "
        f"**{verdict}** ({speed:.1f}x).", "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="debug-size model (CI)")
    p.add_argument("--batch", type=int, default=2, help="images per decode call")
    p.add_argument("--regions", type=int, default=100)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--beam", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--update-benchmarks", action="store_true",
                   help="write the section into BENCHMARKS.md at the repo root")
    p.add_argument("--out", help="write the Markdown section here too")
    args = p.parse_args(argv)
    res = run(args)
    text = report(args, res)
    emit_report(text, args.out, SECTION if args.update_benchmarks else None)
    ok = all(res["same"].values()) and res["lengths"] == [args.max_len]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
