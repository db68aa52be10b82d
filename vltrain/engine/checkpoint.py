"""Checkpoints: DeepSpeed shards + our per-rank state, committed atomically.

Layout of ``<run_dir>/checkpoints``::

    step_00000040/            DeepSpeed's files (model states, ZeRO optimizer shards)
      vltrain_rank00000.pt    per-rank: dataloader state, RNG states
      config.yaml             the resolved config the run was trained with
      vltrain_ckpt.json       step, world size, ZeRO stage, global batch; written LAST by rank 0
    latest                    tag of the newest complete checkpoint (moved after a barrier)
    best/                     best checkpoint by the validation metric (kept apart from rotation)

A tag is complete only when ``vltrain_ckpt.json`` exists: it is written by rank 0 after a
barrier that every rank reaches only once its own files are on disk, and ``latest`` moves
after that. DeepSpeed's own ``latest`` (written by rank 0 without waiting for the others)
is switched off.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from vltrain.config import save_config

log = logging.getLogger(__name__)

COMPLETE_FILE = "vltrain_ckpt.json"
LATEST_FILE = "latest"
BEST_TAG = "best"
_STEP_TAG = re.compile(r"step_(\d+)")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"vltrain_rank{rank:05d}.pt")


def read_ckpt_info(tag_dir: str) -> Optional[dict]:
    """The completion record of a tag, or None if the tag is incomplete/unreadable."""
    path = os.path.join(tag_dir, COMPLETE_FILE)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


@dataclass
class Found:
    save_dir: str            # folder that holds the tag folders
    tag: str
    info: dict

    @property
    def path(self) -> str:
        return os.path.join(self.save_dir, self.tag)


def _steps_newest_first(save_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every ``step_*`` folder, highest step first."""
    try:
        names = os.listdir(save_dir)
    except FileNotFoundError:
        return []
    return sorted(((int(m.group(1)), n) for n in names if (m := _STEP_TAG.fullmatch(n))), reverse=True)


def _tags_newest_first(save_dir: str) -> list[str]:
    return [n for _, n in _steps_newest_first(save_dir)]


def find_resume_point(save_dir: str) -> Optional[Found]:
    """``latest`` if complete; else the newest complete tag (incomplete ones are reported)."""
    latest = None
    try:
        with open(os.path.join(save_dir, LATEST_FILE)) as f:
            latest = f.read().strip()
    except FileNotFoundError:
        pass
    candidates = ([latest] if latest else []) + [t for t in _tags_newest_first(save_dir) if t != latest]
    for tag in candidates:
        info = read_ckpt_info(os.path.join(save_dir, tag))
        if info is not None:
            if latest and tag != latest:
                log.warning("checkpoint %s is incomplete (no %s); resuming from %s instead",
                            os.path.join(save_dir, latest), COMPLETE_FILE, tag)
            return Found(save_dir, tag, info)
        log.warning("skipping incomplete checkpoint %s (no %s)", os.path.join(save_dir, tag), COMPLETE_FILE)
    return None


def resolve_checkpoint(path: str) -> Found:
    """A user-given checkpoint: a tag folder, or a save dir (its latest complete tag)."""
    info = read_ckpt_info(path)
    if info is not None:
        return Found(os.path.dirname(os.path.abspath(path)), os.path.basename(os.path.abspath(path)), info)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    found = find_resume_point(path)
    if found is None:
        raise FileNotFoundError(f"{path}: no complete checkpoint (a tag folder holding {COMPLETE_FILE}, "
                                f"or a folder of such tags)")
    return found


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, save_dir: str, tag: str, *, step: int, cfg, rank_state: dict, info: dict,
         rank: int, keep_last: int) -> str:
    """Save on every rank; commit (completion record, ``latest``, rotation) on rank 0."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    tag_dir = os.path.join(save_dir, tag)
    if rank == 0 and os.path.isdir(tag_dir):
        shutil.rmtree(tag_dir)  # a stale tag (e.g. `best`, or a crashed save) is rewritten whole
    _barrier()
    engine.save_checkpoint(save_dir, tag=tag, save_latest=False,
                           client_state={UNIVERSAL_CHECKPOINT_INFO: {}, "vltrain_step": step})
    torch.save({"step": step, "rng": rng_state(), **rank_state}, rank_state_file(tag_dir, rank))
    if rank == 0:
        save_config(cfg, os.path.join(tag_dir, "config.yaml"))
    _barrier()  # every rank's files are on disk
    if rank == 0:
        record = dict(info, step=step, tag=tag)
        tmp = os.path.join(tag_dir, COMPLETE_FILE + ".tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(tag_dir, COMPLETE_FILE))
        if tag != BEST_TAG:
            tmp = os.path.join(save_dir, LATEST_FILE + ".tmp")
            with open(tmp, "w") as f:
                f.write(tag)
            os.replace(tmp, os.path.join(save_dir, LATEST_FILE))
            rotate(save_dir, step, keep_last)
    _barrier()  # nobody exits or resumes before the commit
    return tag_dir


def rotate(save_dir: str, step: int, keep_last: int) -> list[str]:
    """After the save of ``step``: keep the ``keep_last`` newest complete tags up to ``step`` (the
    one just saved among them) and delete the older tags, complete or not. Returns the deleted.

    Tags *after* ``step`` are left alone and not counted: they belong to a run this one
    resumed before the end of (from an earlier checkpoint, e.g. after a divergence), or are a
    crashed save's leftovers, which the save of that step rewrites. Counting them by step
    number deleted the new saves, leaving ``latest`` pointing at a deleted tag; counting an
    incomplete tag could delete every complete one."""
    kept, deleted = 0, []
    for tag_step, tag in _steps_newest_first(save_dir):
        if tag_step > step:
            continue
        if kept < max(keep_last, 1) and read_ckpt_info(os.path.join(save_dir, tag)) is not None:
            kept += 1
            continue
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        deleted.append(tag)
    return deleted


def load_rank_state(tag_dir: str, rank: int, saved_world: int) -> dict:
    """This rank's saved state; after a world-size change, rank 0's (the loader state is global)."""
    path = rank_state_file(tag_dir, rank if rank < saved_world else 0)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {tag_dir} is missing {os.path.basename(path)}")
    return torch.load(path, map_location="cpu", weights_only=False)
