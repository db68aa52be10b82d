"""Finding a checkpoint from what a user types: a tag folder, a folder of tags
(``<run>/checkpoints``), or a run folder; ``--tag`` picks a tag, else ``latest``.

Also the tools' output discipline: results are written into a temporary sibling of the
destination and renamed into place at the very end, so a failure leaves nothing behind.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys
import tempfile
from typing import Iterator, Optional

from vltrain.engine import checkpoint as ckpt
from vltrain.engine.resume import CheckpointError, check_checkpoint_files, unreadable_message


def list_tags(save_dir: str) -> tuple[list[str], list[str]]:
    """(complete tags, incomplete tag folders) in a folder of tags, newest step first."""
    complete, incomplete = [], []
    try:
        names = sorted(os.listdir(save_dir))
    except OSError:
        return [], []
    steps = [n for n in ckpt._tags_newest_first(save_dir)]
    others = [n for n in names if n not in steps and os.path.isdir(os.path.join(save_dir, n))]
    for n in steps + others:
        if ckpt.read_ckpt_info(os.path.join(save_dir, n)) is not None:
            complete.append(n)
        elif n in steps or os.path.isfile(os.path.join(save_dir, n, "mp_rank_00_model_states.pt")):
            incomplete.append(n)
    return complete, incomplete


def _save_dir_of(path: str) -> Optional[str]:
    """The folder of tags that ``path`` is, or holds as ``checkpoints/``."""
    for cand in (path, os.path.join(path, "checkpoints")):
        if os.path.isdir(cand) and (os.path.isfile(os.path.join(cand, ckpt.LATEST_FILE)) or list_tags(cand) != ([], [])):
            return cand
    return None


def locate(path: str, tag: Optional[str] = None, check_files: bool = True) -> ckpt.Found:
    """The checkpoint a user means by ``path`` (+ ``tag``); checks its files unless told not to.

    Raises ``CheckpointError`` naming the missing folder, the unknown/incomplete tag and the
    tags that exist, or the missing file."""
    path = os.path.abspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} does not exist"
                              + (ckpt.interrupted_replace(path) or ckpt.tags_beside(path)))
    info = ckpt.read_ckpt_info(path)
    if info is not None and (tag is None or tag == os.path.basename(path)):
        found = ckpt.Found(os.path.dirname(path), os.path.basename(path), info)
    else:
        save_dir = _save_dir_of(path)
        if save_dir is None and info is not None:
            save_dir = os.path.dirname(path)       # a tag folder given with another --tag
        if save_dir is None and ckpt.is_incomplete_tag(path):
            raise CheckpointError(ckpt.incomplete_message(path))
        if save_dir is None:
            raise CheckpointError(f"{path} is not a checkpoint: expected a tag folder holding {ckpt.COMPLETE_FILE}, "
                                  "a folder of such tags (a run's checkpoints/), or a run folder")
        complete, incomplete = list_tags(save_dir)
        if tag is None:
            found = ckpt.find_resume_point(save_dir)
            if found is None:
                raise CheckpointError(f"{save_dir} holds no complete checkpoint" + "".join(
                    f"; {ckpt.record_problem(os.path.join(save_dir, t))}" for t in incomplete))
        else:
            tag_dir = os.path.join(save_dir, tag)
            if tag in incomplete or (os.path.isdir(tag_dir) and tag not in complete):
                raise CheckpointError(f"{ckpt.record_problem(tag_dir)}; complete tags there: "
                                      f"{', '.join(complete) or 'none'}")
            if tag not in complete:
                raise CheckpointError(f"no tag {tag!r} in {save_dir}; tags there: {', '.join(complete) or 'none'}"
                                      + (f" (incomplete: {', '.join(incomplete)})" if incomplete else ""))
            found = ckpt.Found(save_dir, tag, ckpt.read_ckpt_info(tag_dir))
    if check_files:
        check_checkpoint_files(found.path, found.info)
    return found


def check_readable(found: ckpt.Found) -> None:
    """Refuse a checkpoint with files torch cannot open, naming them (a few, then a count).

    ``unreadable_files`` opens each file lazily: its zip index and pickle, not its tensor data,
    so this stays fast on files of many GB and finds what a copy or a save cut short leaves (a
    zip's index is at its end); damage inside the tensor data is not looked for."""
    bad = unreadable_message(found.path)
    if bad:
        raise CheckpointError(f"checkpoint {found.path} is damaged: {bad}. Copy them again from where the "
                              "checkpoint was written, or use another tag")


def read_config(found: ckpt.Found):
    """The resolved ``Config`` the checkpoint was trained with (its config.yaml)."""
    from vltrain.config import load_run_config
    path = os.path.join(found.path, "config.yaml")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {found.path} has no config.yaml (the resolved training config)")
    return load_run_config(path)


@contextlib.contextmanager
def staged_dir(out_dir: str, overwrite: bool = False) -> Iterator[str]:
    """Yield a fresh temporary folder beside ``out_dir``; on success it becomes ``out_dir``."""
    out_dir = os.path.abspath(out_dir)
    _refuse_existing(out_dir, overwrite)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())      # mkdtemp made it 0700: outputs are for sharing
        for root, _, files in os.walk(tmp):   # and so are files a library wrote 0600 (safetensors)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~_umask())
        ckpt.sync_tree(tmp)                   # durable before it takes the name (engine/checkpoint.py)
        if os.path.lexists(out_dir):
            shutil.rmtree(out_dir) if os.path.isdir(out_dir) else os.remove(out_dir)
        os.rename(tmp, out_dir)
        ckpt.sync_path(parent)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _refuse_existing(out: str, overwrite: bool) -> None:
    if os.path.lexists(out) and not overwrite:
        if os.path.isdir(out) and not os.listdir(out):
            return
        raise CheckpointError(f"{out} already exists; choose a new path or pass --overwrite")


@contextlib.contextmanager
def staged_files(paths: list[str], overwrite: bool = False) -> Iterator[list[str]]:
    """Temporary names for ``paths`` (same folders); all renamed into place on success."""
    paths = [os.path.abspath(p) for p in paths]
    for p in paths:
        _refuse_existing(p, overwrite)
        if os.path.isdir(p):
            raise CheckpointError(f"{p} is a folder; give a file path")
    tmps = []
    for p in paths:
        os.makedirs(os.path.dirname(p), exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(p)}.partial-", dir=os.path.dirname(p))
        os.close(fd)
        tmps.append(tmp)
    try:
        yield tmps
        for tmp, p in zip(tmps, paths):
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp made it 0600: outputs are for sharing
            ckpt.sync_path(tmp)
            os.replace(tmp, p)
        for folder in {os.path.dirname(p) for p in paths}:
            ckpt.sync_path(folder)
    finally:
        for tmp in tmps:
            if os.path.exists(tmp):
                os.remove(tmp)


@contextlib.contextmanager
def quiet(verbose: bool = False) -> Iterator[io.StringIO]:
    """Silence DeepSpeed converters' prints (kept, and shown on error)."""
    if verbose:
        yield io.StringIO()
        return
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):   # prints, progress bars
            yield buf
    except BaseException:
        sys.stderr.write(buf.getvalue()[-4000:])
        raise
