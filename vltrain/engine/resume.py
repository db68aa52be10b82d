"""Checks and adjustments before a checkpoint is resumed (``train.resume=``) or read by the
checkpoint tools: are all its files there, does it fit this model, this world size, this
global batch. Every refusal is a :class:`CheckpointError` (a ``ValueError``: ``run.py`` exits
2) whose message names the file / tag / parameter and shapes / world sizes that would work.

What a resume keeps, whatever the new world size:
  * the global batch (samples per optimizer step): ``train.grad_accum`` is recomputed as
    ``global_batch / (train.micro_batch_size x world)``; if that is not a whole number the
    resume is refused with the world sizes (and micro batch sizes) that work;
  * streaming's ``num_canonical_nodes`` (saved in the loader state): the sample order then
    stays the same on any number of nodes, provided the node count divides it or is a
    multiple of it (streaming's rule), which is checked here too.

A ZeRO-1/2/3 checkpoint holds optimizer shards laid out for the world size it was saved on:
resuming it on another world size needs ``vltrain-ckpt reshard`` first (a universal
checkpoint, recognised by ``"universal": true`` in its completion record). A ZeRO-0 checkpoint
holds the full state once and resumes on any world size as it is.
"""
from __future__ import annotations

import glob
import logging
import os
from typing import Iterable, Optional

from vltrain.config import ConfigError
from vltrain.engine.distributed import first_rank, from_main_rank

log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as asked; the message says what to do instead."""


def model_states_files(tag_dir: str, zero_stage: int, world: int) -> list[str]:
    """DeepSpeed's model-states file names (one for ZeRO 0-2, one per rank for ZeRO-3)."""
    if zero_stage == 3:
        return [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in range(world)]
    return ["mp_rank_00_model_states.pt"]


def _first_model_states(tag_dir: str) -> Optional[str]:
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt"):
        if os.path.isfile(os.path.join(tag_dir, name)):
            return os.path.join(tag_dir, name)
    return None


def check_checkpoint_files(tag_dir: str, info: dict) -> None:
    """Every file the completion record ``info`` promises is in ``tag_dir``; else name the first
    missing one (and what it is), or for a universal checkpoint's per-parameter files, the
    missing ones. By name: no file is opened, but a universal checkpoint's model states, lazily
    (mmap), for its parameter names."""
    from vltrain.engine.checkpoint import rank_state_file

    world = int(info.get("world_size", 1))
    stage = int(info.get("zero_stage", 0))
    where = f"checkpoint {tag_dir} (saved on {world} rank(s) with ZeRO-{stage})"

    def missing(name: str, what: str):
        raise CheckpointError(f"{where} is incomplete: {name} is missing ({what}); "
                              "copy it back from where the checkpoint was written, or use another tag")

    # one listing of the folder, not a look-up per saved rank (every rank checks: 512 x 512)
    present = set(os.listdir(tag_dir))
    if "config.yaml" not in present:
        missing("config.yaml", "the resolved config the run was trained with")
    for r in range(world):
        name = os.path.basename(rank_state_file(tag_dir, r))
        if name not in present:
            missing(name, f"rank {r}'s dataloader and RNG state")
    if info.get("universal"):
        zero = os.path.join(tag_dir, "zero")
        if not os.path.isdir(zero):
            missing("zero/", "the universal checkpoint's per-parameter fp32 weights and optimizer state")
        if _first_model_states(tag_dir) is None:
            missing("mp_rank_00_model_states.pt", "DeepSpeed's model states")
        if not os.path.isfile(os.path.join(zero, "optimizer_state.pt")):
            missing("zero/optimizer_state.pt", "DeepSpeed's optimizer settings and loss scaler")
        # What DeepSpeed's universal loaders open for every parameter: fp32.pt, exp_avg.pt and
        # exp_avg_sq.pt; from a ZeRO-1/2 source also step.pt, Adam's step (deepspeed/checkpoint/
        # universal_checkpoint.py; the ZeRO-3 one, runtime/zero/stage3.py, takes the step from
        # optimizer_state.pt). Checked by name only: the files are not opened here.
        per_param = ("fp32.pt", "exp_avg.pt", "exp_avg_sq.pt") + (("step.pt",) if stage in (1, 2) else ())
        absent = [f"zero/{name}/{f}" for name in saved_param_shapes(tag_dir) or {} for f in per_param
                  if not os.path.isfile(os.path.join(zero, name, f))]
        if absent:
            raise CheckpointError(
                f"{where} is incomplete: {len(absent)} per-parameter file(s) of DeepSpeed's universal format are "
                f"missing: {', '.join(absent[:4])}" + (f" (+{len(absent) - 4} more)" if len(absent) > 4 else "")
                + "; copy them back from where the checkpoint was written, or reshard its source again")
        return
    for name in model_states_files(tag_dir, stage, world):
        if name not in present:
            missing(name, "DeepSpeed's model states" + (f" of rank {name.split('_')[3]}" if stage == 3 else ""))
    if stage >= 1:
        # (bf16 runs' carry a prefix: bf16_zero_pp_rank_...)
        shards = {"zero_pp_rank_" + f.split("zero_pp_rank_", 1)[1] for f in present if "zero_pp_rank_" in f}
        for r in range(world):
            name = f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt"
            if name not in shards:
                missing(name, f"rank {r}'s ZeRO optimizer shard: fp32 weights and Adam moments")


# What DeepSpeed's optimizer load (_load_global_state) takes from the checkpoint although it is
# this run's setting: the clipping (train.grad_clip, which a resume may change as it may the
# lr) and the loss scaler, which belongs to the precision (a universal checkpoint resumes at
# another one: an fp16 run's dynamic scaler would keep doubling in a bf16 run, an fp32 run's
# static scale 1 would replace fp16's dynamic scaling).
_RUN_CLIP = ("clip_grad",)
_RUN_SCALER = ("loss_scaler", "dynamic_loss_scale")


# DeepSpeed's ZeRO-0 bf16/fp16 optimizers save their fp32 masters differently: the fused one
# (FusedAdam: GPU runs) flat per group, the unfused one (torch's Adam: CPU runs, or
# optimizer.params.torch_adam=true) per parameter; neither loads the other's state.
_ZERO0_LAYOUTS = {"fp32_groups_flat": "DeepSpeed's fused bf16/fp16 optimizer (FusedAdam, a GPU run)",
                  "fp32_groups": "the unfused one (torch's Adam: a CPU run, or optimizer.params.torch_adam=true)"}


def zero0_layout_mismatch(tag_dir: str, optimizer) -> Optional[str]:
    """Why ``tag_dir``'s ZeRO-0 optimizer state cannot load into ``optimizer`` (DeepSpeed's
    wrapper of this run), or None. Read only after a failed load: the file holds the whole state."""
    import torch

    ours = next((k for k in _ZERO0_LAYOUTS if hasattr(optimizer, k)), None)
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if ours is None or not os.path.isfile(path):
        return None
    saved_opt = torch.load(path, map_location="cpu", weights_only=False, mmap=True).get("optimizer")
    saved = next((k for k in _ZERO0_LAYOUTS if isinstance(saved_opt, dict) and k in saved_opt), None)
    if saved is None or saved == ours:
        return None
    fix = ("resume it on GPUs with optimizer.params.torch_adam=true in the DeepSpeed config" if saved == "fp32_groups"
           else "resume it on GPUs with the DeepSpeed config it trained with")
    return (f"its ZeRO-0 optimizer state was saved by {_ZERO0_LAYOUTS[saved]}, this run has "
            f"{_ZERO0_LAYOUTS[ours]}, which cannot read it: {fix}, or start a new run from its weights "
            f"with train.init_from={tag_dir} (fresh optimizer state)")


def optimizer_run_settings(optimizer) -> dict:
    """This run's clipping and loss scaler on DeepSpeed's optimizer, before a checkpoint load
    (ZeRO-1/2/3 replace ``loss_scaler`` on load; ZeRO-0's fp16 optimizers write the checkpoint's
    scaling into their ``loss_scale_config`` in place, so a copy of it is kept)."""
    import copy
    kept = {k: getattr(optimizer, k) for k in _RUN_CLIP + _RUN_SCALER if hasattr(optimizer, k)}
    if getattr(getattr(optimizer, "loss_scale_config", None), "use_grad_scaling", False):
        kept["loss_scale_config"] = copy.copy(optimizer.loss_scale_config)
    return kept


def restore_run_settings(optimizer, kept: dict, same_precision: bool) -> Optional[str]:
    """After the load: this run's clipping always; its loss scaler when the checkpoint trained
    at another precision (at the same one, the checkpoint's scaler is the exact continuation),
    or when this run configures it otherwise (fp16's loss_scale, loss_scale_window,
    hysteresis, min_loss_scale: the checkpoint's would silently win), dynamic scaling then
    going on from the checkpoint's scale. Returns what changed, for the log, or None."""
    changed = None
    for key in ("loss_scaler", "loss_scale_config"):
        ours, theirs = kept.get(key), getattr(optimizer, key, None)
        if not same_precision or ours is None or theirs is None:
            continue
        setup, saved = _scaler_setup(ours), _scaler_setup(theirs)
        if setup == saved:
            continue
        changed = f"the fp16 loss scaling is this run's ({setup}), not the checkpoint's ({saved})"
        if setup["dynamic"] and saved["dynamic"]:
            # where the checkpoint's run had got to
            for state in ("cur_scale", "cur_iter", "last_overflow_iter"):
                setattr(ours, state, getattr(theirs, state))
            changed += f", continuing from its scale {theirs.cur_scale:g}"
        setattr(optimizer, key, ours)
        if key == "loss_scaler":
            optimizer.dynamic_loss_scale = kept.get("dynamic_loss_scale", setup["dynamic"])
    for k in _RUN_CLIP + (() if same_precision else _RUN_SCALER):
        if k in kept:
            setattr(optimizer, k, kept[k])
    return changed


def _scaler_setup(scaler) -> dict:
    """A DeepSpeed loss scaler's configuration, not its running state: ZeRO-1/2/3's
    ``LossScaler`` / ``DynamicLossScaler`` or ZeRO-0's ``LossScaleConfig``."""
    if getattr(scaler, "dynamic", getattr(scaler, "dynamic_loss_scale", False)):
        return {"dynamic": True, **{k: getattr(scaler, k) for k in ("scale_factor", "scale_window", "min_scale",
                                                                    "min_loss_scale", "delayed_shift",
                                                                    "consecutive_hysteresis") if hasattr(scaler, k)}}
    return {"dynamic": False, "scale": getattr(scaler, "cur_scale", None)}


def unreadable_message(tag_dir: str) -> Optional[str]:
    """"N file(s) cannot be read: <a few, then a count>" of ``tag_dir``, or None if all open."""
    bad = unreadable_files(tag_dir)
    if not bad:
        return None
    return (f"{len(bad)} file(s) cannot be read: " + "; ".join(bad[:4])
            + (f" (+{len(bad) - 4} more)" if len(bad) > 4 else ""))


def check_files_open(found, rank: int) -> None:
    """Refuse a resume from a checkpoint with a file torch cannot open, on every rank alike.

    A damaged file fails only the rank that reads it, inside DeepSpeed's load (whose errors
    name no file); the others would load theirs and die at the next collective with gloo's
    "Connection closed by peer". Rank 0 opens every file (lazily, a second or so) before the
    engine is built, and the verdict is broadcast: all ranks stop on the same message."""
    def check() -> None:
        bad = unreadable_message(found.path)
        if bad:
            raise CheckpointError(f"cannot load checkpoint {found.path}: {bad}. Resume from another checkpoint "
                                  "with train.resume=<its tag folder> (`vltrain-ckpt inspect` lists the complete "
                                  "ones)")
    from_main_rank(check, rank == 0)


def unreadable_files(tag_dir: str) -> list[str]:
    """``"<file> (<error>)"`` for each ``.pt`` file of a tag folder that torch cannot open
    (lazily, mmap: a cut or damaged file), for errors that name no file (DeepSpeed's load)."""
    import torch

    bad = []
    for path in sorted(glob.glob(os.path.join(glob.escape(tag_dir), "**", "*.pt"), recursive=True)):
        try:
            torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
            first = str(e).split(". ", 1)[0][:160]     # torch's zip errors go on with advice for its developers
            bad.append(f"{os.path.relpath(path, tag_dir)} ({type(e).__name__}: {first})")
    return bad


def saved_param_shapes(tag_dir: str) -> Optional[dict[str, tuple]]:
    """Parameter name -> shape as DeepSpeed recorded them (names as in the engine's module,
    i.e. ``model.``-prefixed). Reads one model-states file lazily (mmap)."""
    import torch

    path = _first_model_states(tag_dir)
    if path is None:
        return None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {e}") from e
    groups = sd.get("param_shapes")
    if groups is None:
        # ZeRO-0: DeepSpeed records no shapes (there is no ZeRO optimizer to ask); the module
        # state holds every parameter in full, the buffers named in ``buffer_names`` besides
        buffers = set(sd.get("buffer_names") or [])
        return {k: tuple(v.shape) for k, v in (sd.get("module") or {}).items() if k not in buffers}
    if isinstance(groups, dict):
        groups = [groups]
    shapes: dict[str, tuple] = {}
    for g in groups:
        shapes.update({k: tuple(v) for k, v in g.items()})
    for k, v in (sd.get("frozen_param_shapes") or {}).items():
        shapes[k] = tuple(v)
    return shapes


def shape_mismatches(saved: dict[str, tuple], ours: dict[str, tuple], limit: int = 12) -> list[str]:
    """Readable differences between two name -> shape maps (empty when they agree)."""
    out = [f"{n}: checkpoint {saved[n]} vs model {ours[n]}" for n in saved if n in ours and saved[n] != ours[n]]
    only_ckpt = [n for n in saved if n not in ours]
    only_model = [n for n in ours if n not in saved]
    if only_ckpt:
        out.append(f"in the checkpoint but not in the model: {', '.join(only_ckpt[:6])}"
                   + (f" (+{len(only_ckpt) - 6} more)" if len(only_ckpt) > 6 else ""))
    if only_model:
        out.append(f"in the model but not in the checkpoint: {', '.join(only_model[:6])}"
                   + (f" (+{len(only_model) - 6} more)" if len(only_model) > 6 else ""))
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def _piece_shapes(shapes: dict[str, tuple], model_cfg) -> dict[str, tuple]:
    """Name -> shape with the blocks' flat parameters as their pieces (``transformer.named_pieces``)."""
    import torch
    from vltrain.model.transformer import named_pieces
    meta = {n: torch.empty(s, device="meta") for n, s in shapes.items()}
    return {n: tuple(t.shape) for n, t in named_pieces(meta, model_cfg).items()}


def check_model_matches(tag_dir: str, module) -> None:
    """Refuse to resume ``tag_dir`` into ``module`` (the engine's module) when any parameter's
    name or shape differs, naming each mismatched parameter and both shapes."""
    saved = saved_param_shapes(tag_dir)
    if not saved:
        return
    ours = {n: tuple(p.shape) for n, p in module.named_parameters()}
    diffs = shape_mismatches(saved, ours)
    if diffs:
        hint = ""
        cfg_path = os.path.join(tag_dir, "config.yaml")
        model = getattr(module, "model", None)
        saved_cfg = None
        if os.path.isfile(cfg_path) and hasattr(model, "config"):
            # name the blocks' pieces (layers.0.qkv.weight), each side split by its own config
            from vltrain.config import load_config
            try:
                saved_cfg = load_config(cfg_path, to_run=False).model
                saved_pieces = _piece_shapes(saved, saved_cfg)
            except ValueError:        # the config does not describe these shapes: flat names then
                saved_pieces = None
            if saved_pieces is not None:
                diffs = shape_mismatches(saved_pieces, _piece_shapes(ours, model.config))
            if not diffs:             # same pieces, another layout: per-piece block parameters
                raise CheckpointError(
                    f"checkpoint {tag_dir} holds each transformer block as 12 parameters (written before "
                    "vltrain held a block in two flat ones, model.layers.{i}.matrices / .vectors): its "
                    "optimizer state cannot be resumed into this layout. Start a new run from its weights "
                    f"with train.init_from={tag_dir}")
        if os.path.isfile(cfg_path):
            hint = (f"\nThe checkpoint was trained with the model section of {cfg_path}; resume with the "
                    f"same model.* settings, or start a new run from its weights with train.init_from={tag_dir}")
        if saved_cfg is not None:
            hint += model_keys_differing(saved_cfg, model.config)
        if hasattr(model, "config"):
            from vltrain.model.embeddings import vlbert_load_hint
            hint += vlbert_load_hint(diffs, model.config)
        raise CheckpointError(f"checkpoint {tag_dir} does not fit this model (different shapes):\n  "
                              + "\n  ".join(diffs) + hint)


def model_keys_differing(saved_cfg, ours) -> str:
    """Lines naming each ``model.*`` key whose value differs between a checkpoint's saved config
    and this run's and changes the model's parameter shapes (the names alone leave the user to
    guess which setting made them). Each key is tried alone both ways on a meta-device model:
    this run's value in the checkpoint's config, the checkpoint's in this run's; a change that
    makes no valid model (heads that do not divide that hidden size) tells nothing."""
    from dataclasses import fields, replace

    import torch
    from vltrain.model.vl_model import VLModel

    def shapes(cfg, **change):
        try:
            with torch.device("meta"):
                return {n: p.shape for n, p in VLModel(replace(cfg, **change)).named_parameters()}
        except Exception:  # noqa: BLE001 - a combination no model accepts
            return None
    base = {"theirs": shapes(saved_cfg), "ours": shapes(ours)}
    lines = []
    for f in fields(ours):
        here, there = getattr(ours, f.name), getattr(saved_cfg, f.name)
        if here == there:
            continue
        tried = ((shapes(saved_cfg, **{f.name: here}), base["theirs"]), (shapes(ours, **{f.name: there}), base["ours"]))
        if any(a is not None and b is not None and a != b for a, b in tried):
            lines.append(f"\n  model.{f.name}={here!r} here, {there!r} in the checkpoint")
    return "\nThe model keys that size parameters and differ:" + "".join(lines) if lines else ""


def _stage_family(stage: int) -> str:
    return {0: "ZeRO-0", 3: "ZeRO-3"}.get(stage, "ZeRO-1/2")


def check_resume_stage(found, ds: dict) -> None:
    """Refuse a ZeRO stage the checkpoint's files cannot be loaded under (DeepSpeed 0.19 keeps
    model states once for stages 0-2 and per rank for stage 3; stage 0 keeps no ZeRO shards),
    naming the ds_config to use instead."""
    saved = int(found.info.get("zero_stage", 0))
    target = int((ds.get("zero_optimization") or {}).get("stage", 0))
    if _stage_family(saved) == _stage_family(target):
        return
    want = {"ZeRO-0": "ds_configs/zero0.json", "ZeRO-3": "ds_configs/zero3.json",
            "ZeRO-1/2": "ds_configs/zero2.json (or zero1.json)"}[_stage_family(saved)]
    kind = "universal checkpoint resharded from" if found.info.get("universal") else "checkpoint saved with"
    raise CheckpointError(
        f"{found.path} is a {kind} ZeRO-{saved}; DeepSpeed cannot load it under ZeRO-{target} (the "
        f"ds_config's zero_optimization.stage). Resume it with --deepspeed_config {want}, or start a new run "
        f"from its weights only: vltrain-ckpt consolidate {found.path} OUT.safetensors, then "
        "train.init_from=OUT.safetensors")


def saved_config(tag_dir: str):
    """The resolved ``Config`` a checkpoint was trained with (its ``config.yaml``), or None when
    it has none readable (an old or foreign checkpoint): callers then skip what they compare."""
    from vltrain.config import load_run_config
    try:
        return load_run_config(os.path.join(tag_dir, "config.yaml"))
    except Exception:  # noqa: BLE001 - missing, unreadable or from another version
        return None


def written_section(path: str, section: str) -> dict:
    """``section`` of a saved config file as written (plain YAML: also from a file another
    version wrote, which ``load_run_config`` cannot load); {} where it lacks it. Raises what
    reading or parsing raises (OSError, yaml.YAMLError, AttributeError)."""
    import yaml
    with open(path) as f:
        return (yaml.safe_load(f) or {}).get(section) or {}


def written_setting(path: str, section: str, key: str, default):
    """``section.key`` of a saved config file as written (``written_section``); ``default``
    where it lacks the key."""
    return written_section(path, section).get(key, default)


def recorded_setting(path: Optional[str], section: str, key: str, default):
    """``written_setting`` of a setting a run records for later runs to compare with, or
    ``default`` where there is no record to read (``path`` None, missing or unreadable): then
    nothing is compared, as for a run written before the setting was recorded."""
    import yaml
    if path is None:
        return default
    try:
        return written_setting(path, section, key, default)
    except (OSError, yaml.YAMLError, AttributeError):
        return default


def checkpoint_precision(tag_dir: str) -> Optional[str]:
    """The ``train.precision`` a checkpoint trained at, read from its config.yaml as written; a
    file without the key trained fp32 (as ``load_run_config`` reads it); None without a
    readable file."""
    from vltrain.engine.ds_config import PRECISIONS
    try:
        p = written_setting(os.path.join(tag_dir, "config.yaml"), "train", "precision", "fp32")
    except Exception:  # noqa: BLE001 - missing or unreadable
        return None
    return p if p in PRECISIONS else None


def continued_precision(precision: str, cfg, found) -> tuple[str, str]:
    """(``train.precision``, why) for a run that continues a checkpoint with ``auto``: a resume
    (``found``) keeps the checkpoint's (its optimizer files are that precision's, and the
    continuation stays exact); so does an evaluation of one of our checkpoints
    (``mode=eval``, ``train.init_from``), as its validation ran. A checkpoint whose precision
    cannot be read resumes at fp32, the default before ``auto``. Anything else is left to the
    ds_config and the machine (:func:`vltrain.engine.ds_config.resolve_ds_config`)."""
    if precision != "auto":
        return precision, "given"
    tag_dir = found.path if found is not None else None
    if tag_dir is None and cfg.mode == "eval" and os.path.isdir(cfg.train.init_from or ""):
        from vltrain.ckpt.layout import locate
        try:
            tag_dir = locate(cfg.train.init_from, check_files=False).path
        except Exception:  # noqa: BLE001 - not one of our checkpoints (an export, a BERT folder)
            tag_dir = None
    if tag_dir is None:
        return "auto", ""
    p = checkpoint_precision(tag_dir)
    return (p, f"the checkpoint's, {tag_dir}") if p else ("fp32", f"{tag_dir} does not say; fp32, the old default")


def check_resume_precision(found, precision: str) -> None:
    """Refuse to resume a DeepSpeed checkpoint at another ``train.precision``: its optimizer
    files are the precision's own (bf16 keeps ``bf16_zero_pp_rank_*`` shards, fp16/fp32
    ``zero_pp_rank_*``, and ZeRO-0 bf16 a bf16 optimizer's state), and DeepSpeed would fail
    on a file it expects by name, which reads like a damaged checkpoint. A universal
    checkpoint (``vltrain-ckpt reshard``) holds plain fp32 state and resumes at any."""
    saved_cfg = None if found.info.get("universal") else saved_config(found.path)
    if saved_cfg is None:      # universal, or no readable config.yaml: DeepSpeed's own load decides
        return
    saved = saved_cfg.train.precision
    if saved != precision:
        hint = ("start a new run from its weights with train.init_from" if int(found.info.get("zero_stage", 0)) == 0
                else f"convert it first: vltrain-ckpt reshard {found.path} OUT (a universal checkpoint resumes "
                     "at any precision), then train.resume=OUT")
        raise CheckpointError(f"{found.path} was saved with train.precision={saved}; resuming it with "
                              f"train.precision={precision} is not possible as it is (DeepSpeed's optimizer "
                              f"files are per precision). Resume with train.precision={saved}, or {hint}")


def divisors(n: int) -> list[int]:
    small = [d for d in range(1, int(n ** 0.5) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def workable_world_sizes(global_batch: int, micro_batch: int) -> list[int]:
    """World sizes W with global_batch = micro_batch x W x (whole grad_accum >= 1)."""
    if micro_batch <= 0 or global_batch % micro_batch:
        return []
    return divisors(global_batch // micro_batch)


def _fmt(values: Iterable[int], limit: int = 16) -> str:
    values = list(values)
    text = ", ".join(map(str, values[:limit]))
    return text + (f", ... ({len(values)} in all)" if len(values) > limit else "") if values else "none"


def batch_plan(global_batch: int, micro_batch: int, world: int, what: str = "the global batch",
               error: type = CheckpointError) -> int:
    """``grad_accum`` that keeps ``global_batch`` on ``world`` ranks of ``micro_batch``; raises
    ``error`` naming ``what`` asked for it and the world sizes (and micro batch sizes) that work."""
    per_step = micro_batch * world
    if per_step > 0 and global_batch % per_step == 0:
        return global_batch // per_step
    sizes = workable_world_sizes(global_batch, micro_batch)
    micros = divisors(global_batch // world) if global_batch % world == 0 else []
    msg = (f"cannot keep {what} of {global_batch} samples per step on {world} rank(s) with "
           f"train.micro_batch_size={micro_batch} ({global_batch} is not a multiple of "
           f"{micro_batch} x {world}). World sizes that keep it with micro batch {micro_batch}: "
           f"{_fmt(sizes)}")
    if micros:
        msg += f"; on {world} rank(s) use train.micro_batch_size in {_fmt(micros)}"
    raise error(msg)


def fit_global_batch(cfg, world: int) -> None:
    """A start (not a resume) with ``train.global_batch`` set: derive ``train.grad_accum`` from it
    on ``world`` ranks, or refuse. A grad_accum set to another value than 1 must agree with it:
    which of two explicit settings the user meant is not ours to pick."""
    t = cfg.train
    if not t.global_batch:
        return
    accum = batch_plan(t.global_batch, t.micro_batch_size, world, "train.global_batch", ConfigError)
    if t.grad_accum not in (1, accum):
        raise ConfigError(f"train.grad_accum={t.grad_accum} contradicts train.global_batch={t.global_batch}, "
                          f"which needs grad_accum {accum} ({t.micro_batch_size} x {accum} x {world} ranks): "
                          "leave train.grad_accum out, or set train.global_batch=0 to use it")
    t.grad_accum = accum


def canonical_nodes_ok(num_canonical_nodes: Optional[int], nodes: int) -> bool:
    if not num_canonical_nodes or nodes <= 0:
        return True
    a, b = max(num_canonical_nodes, nodes), min(num_canonical_nodes, nodes)
    return a % b == 0


def reconcile_resume(cfg, found, world: int, nodes: int = 1) -> list[str]:
    """Fit ``cfg`` to resuming ``found`` on ``world`` ranks over ``nodes`` nodes, or refuse.

    Checks the checkpoint's files; refuses a ZeRO-1/2/3 checkpoint saved on another world
    size (reshard it first); sets ``cfg.train.grad_accum`` so the global batch stays the
    saved one; pins ``cfg.data.num_canonical_nodes`` to the saved value. Returns notes on
    what changed (also logged)."""
    info = found.info
    path = found.path
    check_checkpoint_files(path, info)
    saved_world = int(info.get("world_size", world))
    stage = int(info.get("zero_stage", 0))
    universal = bool(info.get("universal"))
    notes: list[str] = []
    if world != saved_world and not universal and stage >= 1:
        raise CheckpointError(
            f"checkpoint {path} was saved on {saved_world} rank(s) with ZeRO-{stage}: its optimizer shards "
            f"are laid out for {saved_world} ranks and cannot be loaded on {world}. Convert it once with\n"
            f"  vltrain-ckpt reshard {path} OUT_DIR\n"
            f"and resume with train.resume=OUT_DIR on any number of ranks (or resume on {saved_world} ranks)")

    t = cfg.train
    global_batch = int(info.get("global_batch") or 0)
    if global_batch and t.global_batch not in (0, global_batch):
        raise CheckpointError(
            f"train.global_batch={t.global_batch}, but checkpoint {path} trained with {global_batch} samples per "
            f"step: a resume keeps its global batch (its LR schedule and data position count those steps). "
            f"Resume with train.global_batch={global_batch} (or 0), or start a new run from its weights "
            f"with train.init_from={path}")
    if global_batch:
        accum = batch_plan(global_batch, int(t.micro_batch_size), world)
        saved_split = (info.get("micro_batch_size"), info.get("grad_accum"), saved_world)
        if (int(t.micro_batch_size), accum, world) != saved_split:     # a requeue on the same job size: nothing
            notes.append(f"the checkpoint's global batch of {global_batch} is kept as {t.micro_batch_size} x "
                         f"{accum} x {world} ranks (micro batch x train.grad_accum x ranks; saved as "
                         f"{saved_split[0]} x {saved_split[1]} x {saved_world})")
        elif accum != t.grad_accum and (t.grad_accum != 1 or not t.global_batch):
            # the first run's train.grad_accum left out, or one given that the checkpoint overrides
            notes.append(f"train.grad_accum {t.grad_accum} -> {accum}: keeps the checkpoint's global batch of "
                         f"{global_batch}")
        t.grad_accum = accum

    ncn = info.get("num_canonical_nodes")
    if ncn:
        if not canonical_nodes_ok(ncn, nodes):
            ok = [n for n in range(1, 4 * int(ncn) + 1) if canonical_nodes_ok(ncn, n)]
            raise CheckpointError(
                f"checkpoint {path}: the data order is fixed by streaming's num_canonical_nodes={ncn} (from the "
                f"first run); {nodes} node(s) neither divide it nor are a multiple of it, so streaming cannot "
                f"keep that order. Node counts that work: {_fmt(ok, 12)}")
        if cfg.data.num_canonical_nodes not in (0, ncn):
            notes.append(f"data.num_canonical_nodes {cfg.data.num_canonical_nodes} -> {ncn}: the saved loader "
                         "state fixes it (changing it would change the sample order)")
        cfg.data.num_canonical_nodes = int(ncn)
    for n in notes if first_rank() else ():     # alike on every rank
        log.warning("resume: %s", n)
    return notes


# Adam's per-group hyperparameters. DeepSpeed's load puts the checkpoint's into the groups,
# so a resume with another train.weight_decay / adam_eps / adam_betas (which it warns of as
# this run's settings) would silently keep the old ones; its ZeRO-3 universal loader even
# copies group 0's into every group, giving the no-decay group (biases, LayerNorm) decay.
_GROUP_SETTINGS = ("weight_decay", "eps", "betas")


def _inner_optimizer(engine):
    return getattr(engine.optimizer, "optimizer", engine.optimizer)


def optimizer_group_settings(engine) -> list[dict]:
    """This run's per-group Adam settings as built, before a checkpoint is loaded."""
    return [{k: g[k] for k in _GROUP_SETTINGS if k in g} for g in getattr(_inner_optimizer(engine), "param_groups", [])]


def restore_group_settings(engine, settings: list[dict]) -> None:
    """After the load: each group gets this run's settings back (the learning rate is the
    schedule's, ``schedule.reapply``)."""
    groups = getattr(_inner_optimizer(engine), "param_groups", [])
    if len(groups) != len(settings):
        raise RuntimeError(f"the loaded optimizer has {len(groups)} parameter groups, this run built {len(settings)}")
    for group, saved in zip(groups, settings):
        group.update(saved)


def repair_universal_zero3_load(engine) -> bool:
    """Undo a side effect of DeepSpeed 0.19.8's ZeRO-3 universal loader
    (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) with more than one param group:
    it gives every sub-group's Adam state the SAME ``step`` tensor, which torch's Adam
    increments in place once per sub-group, so the step count (bias correction) would advance
    by the number of groups per optimizer step. Each state gets its own ``step`` copy (same
    value). Returns whether anything was repaired. No-op for other optimizers."""
    import torch

    opt = engine.optimizer
    flats = getattr(opt, "fp32_partitioned_groups_flat", None)
    if not flats:
        return False
    inner = _inner_optimizer(engine)
    for p in flats:
        state = inner.state.get(p)
        if state and torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
    return True
