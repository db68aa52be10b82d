"""vltrain-ckpt: inspect, reshard, consolidate and export vltrain checkpoints.

  vltrain-ckpt inspect     CKPT [--tag T] [--json]
  vltrain-ckpt reshard     CKPT OUT_DIR [--tag T] [--world-size M ...]
  vltrain-ckpt consolidate CKPT OUT.safetensors [--tag T]
  vltrain-ckpt export-hf   CKPT OUT_DIR [--tag T]

CKPT is a tag folder (runs/<run>/checkpoints/step_00001000), a folder of tags
(runs/<run>/checkpoints: its `latest`, or --tag), or a run folder (runs/<run>).

Moving a run to another cluster size (64 GPUs -> 8):
  vltrain-ckpt reshard runs/cc-base/checkpoints runs/cc-base-universal --world-size 8
  srun ... python vltrain/run.py --config ... run_name=cc-base-8gpu train.resume=runs/cc-base-universal
The global batch is kept (train.grad_accum is recomputed) and so is the data order.

Outputs are written to a temporary folder beside the destination and renamed at the end:
on any error nothing is left at the destination. Exit codes: 0 done, 2 bad input (the
message says what is wrong and what to do), 1 anything else.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading

if __package__ in (None, ""):  # `python vltrain/ckpt/__main__.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

EXIT_BAD_INPUT = 2


def _rank_count(text: str) -> int:
    """--world-size: a whole number of ranks, at least 1."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of ranks, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"a world size is at least 1 rank, got {n}")
    return n


def build_parser() -> argparse.ArgumentParser:
    from vltrain.redact import RedactingArgumentParser
    p = RedactingArgumentParser(prog="vltrain-ckpt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def add(name, help_, out=None):
        s = sub.add_parser(name, help=help_, description=help_)
        s.add_argument("ckpt", help="tag folder, folder of tags (checkpoints/), or run folder")
        if out:
            s.add_argument("out", help=out)
        s.add_argument("--tag", default=None, help="tag inside CKPT (default: its latest complete tag)")
        if out:
            s.add_argument("--overwrite", action="store_true", help="replace an existing output")
            s.add_argument("--verbose", action="store_true", help="show DeepSpeed's converter output")
        return s

    s = add("inspect", "ZeRO stage, saved world size, step, global batch, tags, parameters, dtype, size, "
                       "universal or not, and the config it was trained with")
    s.add_argument("--json", action="store_true", help="machine-readable output")
    s = add("reshard", "ZeRO 1/2/3 checkpoint saved on N ranks -> a universal checkpoint that "
                       "`train.resume=OUT_DIR` resumes on any number of ranks", out="output folder (new)")
    s.add_argument("--world-size", type=_rank_count, action="append", default=[], metavar="M",
                   help="check up front that M ranks keep the global batch (repeatable)")
    s.add_argument("--workers", type=int, default=2, help="processes for DeepSpeed's conversion (default 2)")
    add("consolidate", "full fp32 weights in one safetensors file (+ config.json and the resolved "
                       "config beside it), any ZeRO stage", out="output .safetensors file")
    add("export-hf", "Hugging Face-style folder: config.json, model.safetensors, tokenizer files, README",
        out="output folder (new)")
    return p


def _print_result(kind: str, res: dict) -> None:
    if res.get("note"):
        print(f"note: {res['note']}", file=sys.stderr)
    if kind == "consolidate":
        print(f"wrote {res['file']} ({res['parameters']:,} parameters in {res['tensors']} tensors under vltrain's "
              "names, fp32)\n"
              f"      {res['config_json']} (model config)\n      {res['config_yaml']} (training config)")
    elif kind == "export-hf":
        print(f"wrote {res['dir']} ({res['parameters']:,} parameters in {res['tensors']} tensors, fp32: BERT's "
              "names, each block's query/key/value apart)")


def emit(text: str) -> None:
    """Print ``text``; a reader that stops early (``| head``) is not an error of ours."""
    try:
        print(text, flush=True)
    except BrokenPipeError:       # keep Python's exit-time flush from failing on the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _ended_by_signal(signum, frame):
    """SIGTERM (Slurm's time limit, scancel, kill): unwind as an error does, so the staged
    output beside the destination is removed (signal's default left it there)."""
    raise SystemExit(128 + signum)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("DS_ACCELERATOR", "cpu")      # the tools never need a GPU
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from vltrain.config import ConfigError, check_no_pattern
    from vltrain.engine.resume import CheckpointError
    from vltrain.ckpt.layout import check_readable, locate

    handler = signal.signal(signal.SIGTERM, _ended_by_signal) \
        if threading.current_thread() is threading.main_thread() else None
    found = None
    try:
        for what, path in (("CKPT", args.ckpt), ("OUT", getattr(args, "out", ""))):
            check_no_pattern(what, os.path.abspath(path) if path else "")
        if args.cmd == "inspect":
            from vltrain.ckpt.info import describe, format_report
            found = locate(args.ckpt, args.tag, check_files=False)
            d = describe(found)
            emit(json.dumps(d, indent=1) if args.json else format_report(d))
            if d["problem"]:
                print(f"error: {d['problem']}", file=sys.stderr)
                return EXIT_BAD_INPUT
            return 0
        found = locate(args.ckpt, args.tag)
        check_readable(found)
        if args.cmd == "reshard":
            from vltrain.ckpt.reshard import reshard
            rec = reshard(found, args.out, world_sizes=args.world_size, workers=args.workers,
                          overwrite=args.overwrite, verbose=args.verbose)
            out = os.path.abspath(args.out)
            print(f"wrote universal checkpoint {out} (step {rec['step']}, from ZeRO-{rec['zero_stage']} on "
                  f"{rec['world_size']} ranks, global batch {rec['global_batch']})\n"
                  f"resume it on any number of ranks with: train.resume={out}")
        elif args.cmd == "consolidate":
            if not args.out.endswith(".safetensors"):    # "out/" wrote a file named out, configs beside it
                raise CheckpointError(f"OUT {args.out} is not a .safetensors file name: consolidate writes one "
                                      f"file (and config.json beside it), e.g. "
                                      f"{os.path.join(args.out, 'model.safetensors')}")
            from vltrain.ckpt.export import consolidate
            _print_result("consolidate", consolidate(found, args.out, overwrite=args.overwrite, verbose=args.verbose))
        elif args.cmd == "export-hf":
            from vltrain.ckpt.export import export_hf
            _print_result("export-hf", export_hf(found, args.out, overwrite=args.overwrite, verbose=args.verbose))
        return 0
    except (CheckpointError, ConfigError, FileNotFoundError) as e:
        if found is not None and not os.path.isdir(found.path):
            # a running job's keep_last rotation removed the tag under us: its errors (no
            # config.yaml, an unreadable file, DeepSpeed's "can't find" ...) would mislead
            e = f"{found.path} was deleted while this command read it (a running job's train.keep_last " \
                f"rotation?): convert a tag the run keeps (--tag best), or once the run has stopped"
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        if handler is not None:           # an in-process caller's own handler back
            signal.signal(signal.SIGTERM, handler)


if __name__ == "__main__":
    sys.exit(main())
