"""``vltrain-ckpt inspect``: what a checkpoint is, and where it can be resumed."""
from __future__ import annotations

import os

from vltrain.engine import checkpoint as ckpt
from vltrain.engine.resume import CheckpointError, check_checkpoint_files, saved_config, saved_param_shapes, \
    workable_world_sizes
from vltrain.ckpt.layout import check_readable, list_tags


def _size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def describe(found: ckpt.Found) -> dict:
    """Everything ``inspect`` reports, as a dict (``--json`` prints it as is)."""
    info = found.info
    status, problem = "complete", None
    try:
        check_readable(found)      # first: the file check of a universal checkpoint reads its model states
    except CheckpointError as e:
        status, problem = "damaged", str(e)
    else:
        try:
            check_checkpoint_files(found.path, info)
        except CheckpointError as e:
            status, problem = "incomplete", str(e)
    shapes = {}
    try:
        shapes = saved_param_shapes(found.path) or {}
    except CheckpointError as e:
        if problem is None:
            status, problem = "damaged", str(e)
    n_params = 0
    for s in shapes.values():
        k = 1
        for d in s:
            k *= int(d)
        n_params += k
    config_text, precision = None, None
    cfg_path = os.path.join(found.path, "config.yaml")
    if os.path.isfile(cfg_path):
        with open(cfg_path) as f:
            config_text = f.read()
        saved = saved_config(found.path)      # an old/foreign config is still shown
        precision = saved.train.precision if saved is not None else None
    stage = int(info.get("zero_stage", 0))
    universal = bool(info.get("universal"))
    if universal or stage >= 1:
        dtype = f"{precision or '?'} training; fp32 master weights and Adam moments"
    else:
        from vltrain.ckpt.weights import stage0_file, stage0_masters
        masters = problem is None and precision not in (None, "fp32") and bool(stage0_masters(stage0_file(found)))
        dtype = (f"{precision or '?'} (ZeRO-0: module weights in the training dtype"
                 + ("; fp32 master weights in the optimizer state)" if masters else ")"))
    marked, incomplete = list_tags(found.save_dir)
    complete = []
    for tag in marked:            # marked complete when written: are its files still all there?
        if tag == found.tag:
            whole = status == "complete"
        else:
            path = os.path.join(found.save_dir, tag)
            try:
                check_checkpoint_files(path, ckpt.read_ckpt_info(path) or {})
                whole = True
            except CheckpointError:
                whole = False
        (complete if whole else incomplete).append(tag)
    gb, mb = info.get("global_batch"), info.get("micro_batch_size")
    if universal or stage == 0:
        where = (f"any world size that keeps the global batch of {gb} with micro batch {mb}: "
                 f"{', '.join(map(str, workable_world_sizes(int(gb), int(mb))[:16]))}") if gb and mb else "any"
    else:
        n = info.get("world_size")
        where = (f"{n} rank{'' if n == 1 else 's'} only (run `vltrain-ckpt reshard` to resume on another "
                 "world size)")
    return {
        "path": found.path, "tag": found.tag, "tags_in_folder": complete, "incomplete_tags": incomplete,
        "step": info.get("step"), "zero_stage": stage, "universal": universal,
        "world_size": info.get("world_size"), "micro_batch_size": mb, "grad_accum": info.get("grad_accum"),
        "global_batch": gb, "num_canonical_nodes": info.get("num_canonical_nodes"),
        "resharded_from": info.get("resharded_from"), "parameters": n_params, "tensors": len(shapes),
        "dtype": dtype, "size_bytes": _size(found.path), "resumes_on": where, "status": status, "problem": problem,
        "config": config_text,
    }


def format_report(d: dict) -> str:
    lines = [
        f"checkpoint      {d['path']}",
        f"tag             {d['tag']}   (complete tags here: {', '.join(d['tags_in_folder']) or '-'}"
        + (f"; incomplete: {', '.join(d['incomplete_tags'])}" if d["incomplete_tags"] else "") + ")",
        f"step            {d['step']}",
        f"ZeRO stage      {d['zero_stage']}" + ("   (universal: resumes on any world size)" if d["universal"] else ""),
        f"saved on        {d['world_size']} rank(s)" + (f", resharded from {d['resharded_from']}" if d["resharded_from"] else ""),
        f"global batch    {d['global_batch']} = micro {d['micro_batch_size']} x accum {d['grad_accum']} x "
        f"{d['world_size']} ranks",
        f"canonical nodes {d['num_canonical_nodes']}   (streaming's data order; fixed across world sizes)",
        f"parameters      {d['parameters']:,} in {d['tensors']} tensors (as the checkpoint holds them: "
        "vltrain's blocks keep their weights in two flat tensors each)",
        f"dtype           {d['dtype']}",
        f"size on disk    {human(d['size_bytes'])}",
        f"resumes on      {d['resumes_on']}",
        "status          " + (f"{d['status'].upper()}: {d['problem']}" if d["problem"] else
                                  "complete (every file present and opens)"),
    ]
    if d["config"]:
        lines += ["", "config it was trained with (config.yaml):", *("  " + l for l in d["config"].rstrip().splitlines())]
    return "\n".join(lines)
