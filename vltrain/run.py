r"""Entry point: parse config -> build -> train (or eval) -> clean exit.

    deepspeed --num_gpus 8 vltrain/run.py --config configs/vlp_pretrain_cc.yaml \
        --deepspeed_config ds_configs/zero2.json train.lr=1e-4 run_name=cc-base
    torchrun --nproc_per_node 8 vltrain/run.py --config ...
    srun python vltrain/run.py --config ...          # one task per GPU (see slurm/)
    deepspeed vltrain/run.py --config configs/vqa_vlp.yaml mode=eval \
        train.init_from=runs/vqa/checkpoints/best [task.eval_split=test]

Exit codes: 0 done; 75 stopped on SIGUSR1/SIGTERM after checkpointing (requeue me);
69 the object store did not answer (requeue me later, a bounded number of times);
2 bad configuration or input; 130 Ctrl-C (SIGINT: no checkpoint); 1 any other failure.
"""
from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import re
import sys
import traceback

if __package__ in (None, ""):  # `python vltrain/run.py` / `deepspeed vltrain/run.py`
    _ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, _ROOT)
    # and for the DataLoader workers' forkserver, a new interpreter that must import vltrain
    # (vltrain/data/worker_signals.py) without this script; set now, before any thread runs.
    if _ROOT not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH")) if p)

EXIT_BAD_INPUT = 2
EXIT_STORAGE = 69      # sysexits' EX_UNAVAILABLE; slurm/common.sh requeues it


class _Once(argparse.Action):
    """A file option given twice is refused: argparse would keep the last one silently, and a
    user layering two recipes would train on one of them."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)} and {values}): "
                         "one file; change single keys with key=value overrides")
        setattr(namespace, self.dest, values)


def parse_args(argv=None):
    from vltrain.redact import RedactingArgumentParser
    p = RedactingArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, action=_Once, help="recipe YAML (configs/*.yaml)")
    p.add_argument("--deepspeed_config", "--ds_config", dest="ds_config", default=None, action=_Once,
                   help="DeepSpeed JSON (ds_configs/*.json); default ds_configs/zero2.json")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None,
                   help="set by the deepspeed launcher; LOCAL_RANK is used instead")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.lr=1e-4")
    return p.parse_intermixed_args(argv)      # options may come between the overrides


def main(argv=None) -> int:
    args = parse_args(argv)
    # A fatal signal (SIGBUS from a full /dev/shm, a segfault in an extension) prints the
    # Python stack instead of nothing; the variable carries it to the DataLoader workers'
    # forkserver, started later from this environment.
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    faulthandler.enable()
    from vltrain.engine.signals import STOP
    STOP.install()   # before the slow start-up: a preemption signal then is kept, not fatal
    STOP.shield_children()   # and taken by this rank alone, not by the helpers it starts
    if args.local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(args.local_rank))
    from vltrain.redact import setup_logging
    setup_logging()
    log = logging.getLogger("vltrain.run")
    from vltrain.config import ConfigError, load_config
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as e:
        log.error("%s", e)
        return EXIT_BAD_INPUT
    from vltrain.data.errors import DataError, StorageUnavailable
    from vltrain.engine.ds_config import DSConfigError

    if cfg.mode == "eval":
        cfg.train.resume = ""        # eval loads train.init_from; it never resumes a run
    trainer = None
    try:
        from vltrain.engine.build import build_training, removed_if_left_empty
        trainer = build_training(cfg, args.ds_config)
        if cfg.mode == "eval":
            with removed_if_left_empty(trainer.run_dir, trainer.created_run_dir):   # its data path is opened now
                return trainer.run_eval(cfg.task.eval_split)
        return trainer.train()
    except StorageUnavailable as e:
        log.error("%s: %s", type(e).__name__, error_text(e))
        log.error("exiting with %d (storage unavailable): the checkpoints are intact; the Slurm templates "
                  "requeue the job, elsewhere rerun it with train.resume=auto", EXIT_STORAGE)
        # The code is the verdict: a peer that lost this rank exits 1 first and srun ends the
        # step with SIGTERM, which, once Python finalizes (seconds, default handlers again),
        # made this rank 143 and the job a failure instead of a requeue.
        STOP.exiting()
        return EXIT_STORAGE
    except (ConfigError, DSConfigError, DataError, FileNotFoundError, ValueError) as e:
        log.error("%s: %s", type(e).__name__, error_text(e))
        log.debug("%s", traceback.format_exc())
        STOP.exiting()       # as above: the batch log names this rank's 2, not a 143
        return EXIT_BAD_INPUT
    finally:
        _shutdown()


def error_text(e: BaseException) -> str:
    """``e``'s own message. An error raised in a DataLoader worker comes back with the worker's
    whole traceback in front of it (torch's re-raise): then the message after it, marked."""
    text = str(e)
    if "Original Traceback (most recent call last):" in text:
        parts = re.split(rf"\n(?:[\w.]+\.)?{re.escape(type(e).__name__)}: ", text)
        if len(parts) > 1:
            return f"(in a data loader worker) {parts[-1].strip()}"
    return text


def _shutdown() -> None:
    dist = sys.modules.get("torch.distributed")     # never imported (torch missing): nothing to end
    if dist is not None and dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # a peer already died; nothing left to tidy
            pass


EXIT_INTERRUPTED = 130   # the shell's code for a SIGINT death, kept


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        # Ctrl-C (SIGINT to the terminal's whole process group): nothing to report but that;
        # a traceback per rank (and per launcher) only hid it. Said by rank 0: every rank got it.
        from vltrain.engine.distributed import launch_rank
        if launch_rank() == "0":
            logging.getLogger("vltrain.run").warning(
                "interrupted (SIGINT, Ctrl-C): stopped without a checkpoint; continue from the last one with "
                "train.resume=auto (kill -USR1 <rank pid> stops with one)")
        sys.exit(EXIT_INTERRUPTED)
