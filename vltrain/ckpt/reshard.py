"""ZeRO 1/2/3 checkpoint saved on N ranks -> a universal checkpoint any M ranks resume.

DeepSpeed's ``ds_to_universal`` does the conversion (one fp32 weight + Adam moments file per
parameter under ``zero/``); we add what makes it *our* checkpoint: every rank's loader/RNG
state, the resolved config, and a completion record marked ``"universal": true`` so that
``run.py`` sets ``"checkpoint": {"load_universal": true}`` by itself. The dataloader state is
global (samples consumed by all ranks, streaming's ``num_canonical_nodes``), so ranks beyond
the saved world size read rank 0's.

The result is a tag folder: ``train.resume=OUT_DIR`` with any world size; the global batch is
kept by ``vltrain.engine.resume.reconcile_resume`` (``train.grad_accum`` recomputed).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
from typing import Optional

from vltrain.engine import checkpoint as ckpt
from vltrain.engine.resume import CheckpointError, batch_plan
from vltrain.ckpt.layout import quiet, staged_dir


def stage0_message(found: ckpt.Found) -> str:
    return (f"checkpoint {found.path} was saved with ZeRO stage 0, which DeepSpeed's universal format does not "
            "take, and it needs no resharding: every rank saved the full model and optimizer state in "
            "mp_rank_00_model_states.pt, so resume it directly on any number of ranks with "
            f"train.resume={found.path} (the global batch is kept by adjusting train.grad_accum). "
            "To continue under ZeRO-1/2/3 instead, start a new run from its weights (the optimizer state is "
            "not carried over): `vltrain-ckpt consolidate CKPT OUT.safetensors`, then train.init_from=OUT.safetensors.")


def check_destination(found: ckpt.Found, out_dir: str) -> None:
    """Refuse an OUT_DIR in a run's ``checkpoints/`` folder that ``train.resume=auto`` would not
    resume: it takes the folder's ``latest``, else its newest ``step_<8 digits>`` tag, and the
    trainer names (and rotates) its saves the same way, so the tag must be the checkpoint's own
    step's. Elsewhere any name will do (``train.resume=OUT_DIR``)."""
    out = os.path.abspath(out_dir)
    folder, name = os.path.split(out)
    tag = ckpt.step_tag(int(found.info["step"]))
    if name == "checkpoints" or os.path.isfile(os.path.join(out, "config.yaml")):
        # as the folder of tags itself (or a run folder) a run would not find it there, and
        # start over on top of it
        tags = out if name == "checkpoints" else os.path.join(out, "checkpoints")
        raise CheckpointError(f"{out} is a run's checkpoints/ folder or a run folder: write the checkpoint as a "
                              f"tag inside the checkpoints/ folder, {os.path.join(tags, tag)}")
    if os.path.basename(folder) != "checkpoints":     # the trainer's save folder: <run>/checkpoints
        return
    if name != tag:
        raise CheckpointError(
            f"{out} is in a run's checkpoints/ folder, where train.resume=auto only finds tags named after their "
            f"step: name it {os.path.join(folder, tag)} (this checkpoint is at step {found.info['step']}), or "
            f"write it outside checkpoints/ and resume with train.resume=<that folder>")
    other = ckpt.read_latest(folder)          # resume=auto takes `latest` first,
    if other is None:                         # else the complete step tag of the highest step
        step = int(found.info["step"])
        other = next((t for s, t in ckpt.steps_newest_first(folder)
                      if s > step and ckpt.read_ckpt_info(os.path.join(folder, t)) is not None), name)
    if other != name:
        raise CheckpointError(
            f"{folder} already holds checkpoints of a run, and train.resume=auto there resumes "
            f"{other}, not {name}: reshard into the checkpoints/ folder of a new run, or write it elsewhere and "
            f"resume with train.resume=<that folder>")


def reshard(found: ckpt.Found, out_dir: str, *, world_sizes: Optional[list[int]] = None, workers: int = 2,
            overwrite: bool = False, verbose: bool = False) -> dict:
    """Write the universal form of ``found`` to ``out_dir``; returns its completion record.

    ``world_sizes``: check up front that each keeps the global batch (refuse naming the
    world sizes that do)."""
    info = found.info
    if info.get("universal"):
        raise CheckpointError(f"checkpoint {found.path} is already universal: resume it on any number of ranks "
                              f"with train.resume={found.path}")
    stage = int(info.get("zero_stage", 0))
    if stage == 0:
        raise CheckpointError(stage0_message(found))
    for m in world_sizes or []:
        try:
            batch_plan(int(info["global_batch"]), int(info["micro_batch_size"]), m)
        except CheckpointError as e:
            raise CheckpointError(f"--world-size {m}: {e}. --world-size is a check only: the universal checkpoint "
                                  f"resumes on any number of ranks whose train.micro_batch_size fits; drop it to "
                                  f"write it anyway") from None
    check_destination(found, out_dir)

    from deepspeed.checkpoint import ds_to_universal

    with staged_dir(out_dir, overwrite) as tmp:
        # ds_to_universal writes `latest_universal` beside its output folder: keep that inside tmp.
        conv = os.path.join(tmp, "universal")
        args = argparse.Namespace(input_folder=found.path, output_folder=conv, num_extract_workers=max(1, workers),
                                  num_merge_workers=max(1, workers), keep_temp_folder=False, strict=True,
                                  inject_missing_state=False)
        try:
            with quiet(verbose):
                ds_to_universal.main(args)
        except (AssertionError, RuntimeError, ValueError, KeyError, FileNotFoundError) as e:
            raise CheckpointError(f"DeepSpeed could not convert {found.path} to a universal checkpoint: "
                                  f"{type(e).__name__}: {e}") from e
        final = os.path.join(tmp, "final")
        os.rename(conv, final)
        for name in sorted(os.listdir(found.path)):
            if name.startswith("vltrain_rank") or name == "config.yaml":
                shutil.copy2(os.path.join(found.path, name), os.path.join(final, name))
        record = dict(info, universal=True, resharded_from=found.path, source_world_size=info.get("world_size"))
        with open(os.path.join(final, ckpt.COMPLETE_FILE), "w") as f:   # last: marks it complete
            json.dump(record, f, indent=1)
        # staged_dir renames tmp itself; move the result up so tmp == the finished folder
        for name in os.listdir(final):
            os.rename(os.path.join(final, name), os.path.join(tmp, name))
        os.rmdir(final)
        if os.path.exists(os.path.join(tmp, "latest_universal")):
            os.remove(os.path.join(tmp, "latest_universal"))
    return record
