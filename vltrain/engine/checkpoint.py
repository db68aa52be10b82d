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

Every save is written as ``<tag>.partial`` and renamed to ``<tag>`` once complete, so that
re-saving a tag that exists (``best`` at every improvement; a step saved again by a run
resumed before it) keeps the previous copy until the new one is whole: a save cut short
leaves ``<tag>`` as it was. Replacing an existing tag takes two renames (``<tag>`` to
``<tag>.old``, ``<tag>.partial`` to ``<tag>``); a crash between them leaves both complete,
and a reader that does not find ``<tag>`` says which to rename.

"On disk" means synced, not only written: before the record, every rank fsyncs the files it
wrote (DeepSpeed's writes end in the page cache of the node that wrote them; a sync from
another node flushes nothing of them), rank 0 the tag's folders and any file no rank claims,
and the record and ``latest`` are each synced, renamed into place and their folder synced. Without
that a node's power loss or kernel crash right after a save could leave a record the
journal kept and shard data it had not written yet: a tag marked complete with torn files.
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
from vltrain.data import host_limits
from vltrain.engine.distributed import from_main_rank

log = logging.getLogger(__name__)

COMPLETE_FILE = "vltrain_ckpt.json"
LATEST_FILE = "latest"
BEST_TAG = "best"
PARTIAL, OLD = ".partial", ".old"     # a save in progress; the copy it replaces, for two renames
_STEP_TAG = re.compile(r"step_(\d+)")
_STEP_LEFTOVER = re.compile(rf"step_(\d+)({re.escape(PARTIAL)}|{re.escape(OLD)})")


def step_tag(step: int) -> str:
    return f"step_{step:08d}"


def rank_state_file(tag_dir: str, rank: int) -> str:
    return os.path.join(tag_dir, f"vltrain_rank{rank:05d}.pt")


def _read_record(tag_dir: str) -> tuple[Optional[dict], str]:
    """(completion record, "") or (None, what is wrong with it, worded for record_problem)."""
    path = os.path.join(tag_dir, COMPLETE_FILE)
    try:
        with open(path) as f:
            info = json.load(f)
    except FileNotFoundError:
        return None, f"is incomplete (no {COMPLETE_FILE}: its save did not finish)"
    except (OSError, ValueError) as e:      # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return None, f"has a corrupt completion record {path} ({type(e).__name__}: {str(e)[:200]})"
    if not isinstance(info, dict):
        return None, f"has a corrupt completion record {path} (a JSON {type(info).__name__}, not an object)"
    return info, ""


def read_ckpt_info(tag_dir: str) -> Optional[dict]:
    """The completion record of a tag, or None if the tag is incomplete or its record corrupt
    (:func:`record_problem` says which)."""
    return _read_record(tag_dir)[0]


def record_problem(tag_dir: str) -> str:
    """Why ``tag_dir`` has no usable completion record, as "checkpoint <tag_dir> is/has ...". The
    record is written atomically (see the module docstring), so a corrupt one was damaged after
    its save: a disk fault, a copy cut short, an edit."""
    return f"checkpoint {tag_dir} {_read_record(tag_dir)[1]}"


@dataclass
class Found:
    save_dir: str            # folder that holds the tag folders
    tag: str
    info: dict

    @property
    def path(self) -> str:
        return os.path.join(self.save_dir, self.tag)


def steps_newest_first(save_dir: str) -> list[tuple[int, str]]:
    """(step, tag) of every ``step_*`` folder, highest step first."""
    try:
        names = os.listdir(save_dir)
    except FileNotFoundError:
        return []
    return sorted(((int(m.group(1)), n) for n in names if (m := _STEP_TAG.fullmatch(n))), reverse=True)


def _tags_newest_first(save_dir: str) -> list[str]:
    return [n for _, n in steps_newest_first(save_dir)]


def read_latest(save_dir: str) -> Optional[str]:
    """The tag ``latest`` names, or None (no such file, or an empty one)."""
    try:
        with open(os.path.join(save_dir, LATEST_FILE)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def find_resume_point(save_dir: str) -> Optional[Found]:
    """``latest`` if complete; else the newest complete tag (incomplete ones are reported)."""
    latest = read_latest(save_dir)
    if latest and not os.path.isdir(os.path.join(save_dir, latest)):
        log.warning("checkpoint %s (latest) is missing%s", os.path.join(save_dir, latest),
                    interrupted_replace(os.path.join(save_dir, latest)))
    candidates = ([latest] if latest else []) + [t for t in _tags_newest_first(save_dir) if t != latest]
    for tag in candidates:
        info = read_ckpt_info(os.path.join(save_dir, tag))
        if info is not None:
            if latest and tag != latest:
                latest_path = os.path.join(save_dir, latest)
                problem = record_problem(latest_path) if os.path.isdir(latest_path) else f"{latest_path} (latest)"
                log.warning("%s; taking %s instead, the newest complete checkpoint", problem, tag)
            cut = sorted(n for n in os.listdir(save_dir) if (m := _STEP_LEFTOVER.fullmatch(n))
                         and m.group(2) == PARTIAL and int(m.group(1)) > int(info.get("step", 0)))
            if cut:
                log.warning("the save of %s was cut short (incomplete, left as is); the newest complete "
                            "checkpoint is %s", ", ".join(cut), tag)
            return Found(save_dir, tag, info)
        if os.path.isdir(os.path.join(save_dir, tag)):
            log.warning("%s; skipping it", record_problem(os.path.join(save_dir, tag)))
    return None


def interrupted_replace(path: str) -> str:
    """For a missing tag folder: what a save cut between its two renames left, or ""."""
    left = [p for p in (path + PARTIAL, path + OLD) if read_ckpt_info(p) is not None]
    if not left:
        return ""
    return (f"; a save that replaced it was cut short between two renames, leaving complete copies: "
            f"{' and '.join(left)} (the first is the newer): rename one to {os.path.basename(path)}")


def tags_beside(path: str) -> str:
    """For a missing tag folder: the complete tags its folder does hold (newest first), or ""."""
    parent = os.path.dirname(os.path.abspath(path))
    tags = [t for t in _tags_newest_first(parent) + [BEST_TAG] if read_ckpt_info(os.path.join(parent, t)) is not None]
    if not tags:
        return ""
    return f"; {parent} holds " + ", ".join(tags[:6]) + (f" and {len(tags) - 6} more" if len(tags) > 6 else "")


def is_incomplete_tag(path: str) -> bool:
    """A tag folder holding a save's files but no usable completion record."""
    return read_ckpt_info(path) is None and os.path.isdir(path) and any(
        n.endswith("model_states.pt") or n.startswith("vltrain_rank") for n in os.listdir(path))


def incomplete_message(path: str) -> str:
    return f"{record_problem(path)}; use another tag of its folder"


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


def sync_path(path: str) -> None:
    """fsync a file or a folder."""
    fd = os.open(path, os.O_RDONLY)   # a folder too: Linux syncs its entries this way
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(path: str, skip: frozenset = frozenset()) -> None:
    """fsync every file under ``path`` but those in ``skip`` (absolute paths, synced by the
    ranks that wrote them), then each folder (deepest first), then ``path``'s parent, which
    holds its entry."""
    for root, _, files in os.walk(path, topdown=False):
        for name in files:
            if os.path.join(root, name) not in skip:
                sync_path(os.path.join(root, name))
        sync_path(root)
    sync_path(os.path.dirname(os.path.abspath(path)))


class RecordingEngine:
    """DeepSpeed's checkpoint engine (``engine.checkpoint_engine``: torch's, or the one the
    ds_config picks), recording the files this rank saves through it: the save fsyncs its own
    files, by name from DeepSpeed itself rather than a guess at its file naming. Each node
    syncing every file of a 512-rank tag was ~1,000 opens and fsyncs per node and save on the
    shared filesystem's metadata server, 64 nodes at once, for nothing: only the writer's
    page cache holds a file's unwritten data."""

    def __init__(self, inner):
        self.inner = inner
        self.saved: list[str] = []

    def save(self, state_dict, path, *args, **kwargs):
        self.saved.append(os.path.abspath(path))
        return self.inner.save(state_dict, path, *args, **kwargs)

    def __getattr__(self, name):
        if name == "inner":          # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)


def _recording(engine) -> RecordingEngine:
    if not isinstance(engine.checkpoint_engine, RecordingEngine):
        engine.checkpoint_engine = RecordingEngine(engine.checkpoint_engine)
    engine.checkpoint_engine.saved.clear()
    return engine.checkpoint_engine


def sync_written(staging: str, own: list[str], rank: int) -> None:
    """Every rank fsyncs ``own`` (the files it wrote into ``staging``); rank 0 then the files no
    rank named (a file DeepSpeed writes outside its checkpoint engine: ``zero_to_fp32.py``) and
    every folder. Collective."""
    for path in own:
        sync_path(path)
    named = [own]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        named = [None] * dist.get_world_size()
        dist.all_gather_object(named, own)
    if rank == 0:      # absolute, as the named are (output_root is relative by default: "runs")
        sync_tree(os.path.abspath(staging), skip=frozenset(p for paths in named for p in paths))


def _write_durably(path: str, text: str) -> None:
    """Replace ``path`` by ``text`` atomically and durably: a crash leaves the old or the new."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    sync_path(os.path.dirname(os.path.abspath(path)))


def save(engine, save_dir: str, tag: str, *, step: int, cfg, rank_state: dict, info: dict,
         rank: int, keep_last: int) -> str:
    """Save on every rank into ``<tag>.partial``; commit on rank 0 (completion record, rename to
    ``tag``, ``latest``, rotation)."""
    from deepspeed.checkpoint.constants import UNIVERSAL_CHECKPOINT_INFO

    tag_dir = os.path.join(save_dir, tag)
    staging = tag_dir + PARTIAL

    def prepare() -> None:
        if os.path.isdir(staging):
            shutil.rmtree(staging)  # a save of this tag that was cut short
        clear_cut_short_saves(save_dir)

    def commit() -> None:
        _write_durably(os.path.join(staging, COMPLETE_FILE), json.dumps(dict(info, step=step, tag=tag), indent=1))
        _rename_into_place(staging, tag_dir)
        if tag != BEST_TAG:
            _write_durably(os.path.join(save_dir, LATEST_FILE), tag)
            rotate(save_dir, step, keep_last)
    # rank 0's folder work, its error raised on every rank (not rank 0's alone, the others
    # waiting at the next collective); the others wait for it as at a barrier
    from_main_rank(prepare, rank == 0)
    writer = _recording(engine)
    own = [os.path.abspath(rank_state_file(staging, rank))] + ([os.path.abspath(os.path.join(staging, "config.yaml"))]
                                                                if rank == 0 else [])
    try:
        engine.save_checkpoint(save_dir, tag=tag + PARTIAL, save_latest=False,
                               client_state={UNIVERSAL_CHECKPOINT_INFO: {}, "vltrain_step": step})
        torch.save({"step": step, "rng": rng_state(), **rank_state}, own[0])
        if rank == 0:
            save_config(cfg, own[1])
    except Exception as e:  # noqa: BLE001 - torch's writer names no file and no cause when the disk is full
        raise SaveFailed(save_failed_message(save_dir, tag, e)) from e
    sync_written(staging, writer.saved + own, rank)   # its gather: every rank's files written and synced
    from_main_rank(commit, rank == 0)                 # nobody exits or resumes before the commit
    return tag_dir


class SaveFailed(OSError):
    """A checkpoint save that could not write its files; the message says what is still safe."""


def save_failed_message(save_dir: str, tag: str, e: BaseException) -> str:
    """What went wrong (a full filesystem named as such: torch's writer says "iostream error"),
    and what is intact: ``latest`` is moved only after a whole save."""
    cause = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
    try:
        free = shutil.disk_usage(save_dir).free
    except OSError:
        free = None
    full = host_limits.disk_full(e) is not None or (free is not None and free < 64 << 20)
    latest = read_latest(save_dir)
    kept = (f"{latest} (latest) is intact and a resume (train.resume=auto) starts there" if latest
            else "no earlier checkpoint of this run exists")
    mib = "?" if free is None else f"{free / 2**20:.0f}"      # unreadable: an ENOSPC still says full
    what = (f"the filesystem is full ({mib} MiB free): free space there, lower train.keep_last, or "
            f"set output_root on a larger one ({cause})" if full else cause)
    return f"saving checkpoint {tag} to {save_dir} failed: {what}; {kept}"


def clear_cut_short_saves(save_dir: str) -> list[str]:
    """Remove the cut-short saves of steps (``step_*.partial`` without a completion record) before
    a save: their space may be what the save needs (a save that failed on a full disk, resumed
    from an earlier step, failed there again at every requeue). A complete ``.partial`` (a
    replace cut between its renames) stays. Returns the removed."""
    removed = []
    for name in sorted(os.listdir(save_dir)) if os.path.isdir(save_dir) else ():
        m = _STEP_LEFTOVER.fullmatch(name)
        path = os.path.join(save_dir, name)
        if m and m.group(2) == PARTIAL and read_ckpt_info(path) is None:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(name)
    if removed:
        log.info("removed the cut-short save(s) %s before saving", ", ".join(removed))
    return removed


def _rename_into_place(staging: str, tag_dir: str) -> None:
    """``staging`` (complete) becomes ``tag_dir``; a previous ``tag_dir`` is deleted only after."""
    old = tag_dir + OLD
    if os.path.isdir(old):
        shutil.rmtree(old)     # left by a replace cut between its renames; staging is newer
    if os.path.lexists(tag_dir):
        os.rename(tag_dir, old)
    os.rename(staging, tag_dir)
    sync_path(os.path.dirname(tag_dir))
    shutil.rmtree(old, ignore_errors=True)


def rotate(save_dir: str, step: int, keep_last: int) -> list[str]:
    """After the save of ``step``: keep the ``keep_last`` newest complete tags up to ``step`` (the
    one just saved among them) and delete the older tags, complete or not. Returns the deleted.

    Tags *after* ``step`` are left alone and not counted: they belong to a run this one
    resumed before the end of (from an earlier checkpoint, e.g. after a divergence), or are a
    crashed save's leftovers, which the save of that step rewrites. Counting them by step
    number deleted the new saves, leaving ``latest`` pointing at a deleted tag; counting an
    incomplete tag could delete every complete one."""
    kept, deleted = 0, []
    for tag_step, tag in steps_newest_first(save_dir):
        if tag_step > step:
            continue
        if kept < max(keep_last, 1) and read_ckpt_info(os.path.join(save_dir, tag)) is not None:
            kept += 1
            continue
        shutil.rmtree(os.path.join(save_dir, tag), ignore_errors=True)
        deleted.append(tag)
    for name in os.listdir(save_dir):     # cut-short saves of earlier steps
        m = _STEP_LEFTOVER.fullmatch(name)
        if m and int(m.group(1)) < step:
            shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
            deleted.append(name)
    return deleted


def load_rank_state(tag_dir: str, rank: int, saved_world: int, world: int) -> dict:
    """This rank's saved state; after a world-size change (``world != saved_world``), rank 0's:
    the loader position is global. The one per-rank count in it, the loader's skipped samples
    (summed over ranks when logged), then moves whole to the new rank 0 so the total neither
    drops nor repeats."""
    def read(r: int) -> dict:
        path = rank_state_file(tag_dir, r)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"checkpoint {tag_dir} is missing {os.path.basename(path)}")
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # noqa: BLE001 - a cut or damaged file: name it
            from vltrain.engine.resume import CheckpointError
            raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {str(e)[:300]}; resume from another "
                                  "checkpoint with train.resume=<its tag folder>") from e

    if world == saved_world:
        return read(rank)
    state = read(0)
    others = [read(r) for r in range(1, saved_world)] if rank == 0 else None
    state["loader"]["num_skipped"] = (0 if others is None else
                                      sum(int(s["loader"].get("num_skipped", 0)) for s in [state, *others]))
    return state
