"""DeepSpeed JSON configs: fill ``"auto"`` from our config, refuse contradictions.

The Hugging Face convention: a ds_config says *how* to shard/offload/cast, our config
(``train.*``) says *what* to train with (batch sizes, optimizer hyper-parameters, clip,
precision). Every ``"auto"`` (and every batch/optimizer/clip key left out) is filled from
our config; an explicit value that disagrees with it is an error naming both keys, so the
two never silently disagree.

    ds = resolve_ds_config("ds_configs/zero2.json", cfg, world_size=8, accelerator_name="cuda")
    engine, opt, _, sched = deepspeed.initialize(model=m, model_parameters=groups, config=ds,
                                                 lr_scheduler=linear_warmup_decay(cfg.train))

What is filled (ds_config key <- our key):
    train_micro_batch_size_per_gpu   <- train.micro_batch_size
    gradient_accumulation_steps      <- train.grad_accum
    train_batch_size                 <- micro_batch_size * grad_accum * world_size
    gradient_clipping                <- train.grad_clip
    optimizer.params.lr/betas/eps/weight_decay <- train.lr/adam_betas/adam_eps/weight_decay
    optimizer.params.torch_adam      <- true on the CPU accelerator, false elsewhere
                                        (DeepSpeed's FusedAdam on GPU, DeepSpeedCPUAdam
                                        when the optimizer is offloaded)
    optimizer.params.fused           <- true with torch_adam (torch's fused AdamW kernel)
    bf16.enabled / fp16.enabled      <- train.precision (fp32 | bf16 | fp16; auto: what the
                                        ds_config sets explicitly, else bf16 on GPUs of compute
                                        capability >= 8 and fp32 elsewhere)
    bf16.check_grad_overflow         <- false unless set (the trainer skips non-finite losses)
    zero_optimization.reduce_bucket_size <- ZeRO-3: model.hidden_size**2 (as HF does);
                                        ZeRO-0/1/2: one rank: the model's parameter count;
                                        several: 25 MB of gradients (DDP's bucket); at most 5e8
    zero_optimization.overlap_comm   <- true with several ranks, false with one
    zero_optimization.stage3_prefetch_bucket_size, stage3_param_persistence_threshold
                                     <- model.hidden_size (0.9*H*H, 10*H, as HF does)
    timers.throughput.enabled        <- false unless set (vltrain's monitor logs samples/s;
                                        DeepSpeed's timer synchronizes the device twice per
                                        micro-step)

There is no DeepSpeed ``scheduler`` section: the LR schedule is ours
(:func:`vltrain.engine.schedule.linear_warmup_decay`, passed as ``lr_scheduler=``); a
``scheduler`` section is refused so that two schedules can never both be configured.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from typing import Any, MutableMapping, Optional, Union

from vltrain.config import ConfigError, missing_file_hint

from vltrain.engine.distributed import first_rank

log = logging.getLogger(__name__)

AUTO = "auto"
PRECISIONS = ("fp32", "bf16", "fp16")        # what train.precision=auto resolves to, one of these


class DSConfigError(ConfigError):
    """A ds_config that cannot be used with our config; the message names both keys."""


# ------------------------------------------------------------------------------ helpers

def _train(cfg):
    """Accept the whole Config or just its ``train`` section."""
    return getattr(cfg, "train", cfg)


def _hidden(cfg):
    model = getattr(cfg, "model", None)
    return getattr(model, "hidden_size", None)


def cfg_precision(cfg) -> str:
    """``train.precision``: auto | fp32 | bf16 | fp16 (fp32 when the config predates the field)."""
    p = getattr(_train(cfg), "precision", "fp32")
    if p not in PRECISIONS + (AUTO,):
        raise DSConfigError(f"config key 'train.precision': {p!r} is not one of {', '.join(PRECISIONS)} or auto")
    return p


def _ds_choice(ds: dict) -> Optional[str]:
    """The precision a ds_config sets explicitly (``enabled`` true/false, not "auto"), if any:
    with ``train.precision=auto`` it decides, as explicit DeepSpeed values do in HF's Trainer."""
    def enabled(section):
        return section.get("enabled", AUTO) if isinstance(section, dict) else AUTO
    bf, fp = enabled(ds.get("bf16")), enabled(ds.get("fp16"))
    if bf is True or fp is True:
        return "bf16" if bf is True else "fp16"
    return "fp32" if bf is False else None


def auto_precision(accelerator_name: str) -> str:
    """``train.precision=auto`` with nothing else to go by (no checkpoint continued, no explicit
    choice in the ds_config): bf16 on a GPU that computes it natively (CUDA
    compute capability 8.0 and newer: A100, H100, ...), as VLP and VL-BERT trained in mixed
    precision (fp16 with apex then); fp32 elsewhere: on CPUs, and on older GPUs, where fp16
    would need loss scaling and stays a choice to make explicitly."""
    if accelerator_name != "cuda":
        return "fp32"
    import torch
    return "bf16" if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8 else "fp32"


# DeepSpeed's default ZeRO-1/2 reduce bucket (elements), and the cap of our "auto" one.
ZERO12_MAX_BUCKET = 500_000_000
# With several ranks: PyTorch DDP's default bucket, 25 MB of gradients.
DDP_BUCKET_BYTES = 25 * 2**20


def model_param_count(model_cfg) -> int:
    """Parameters of ``VLModel(model_cfg)``, counted on the meta device (no memory, no init)."""
    import torch
    from vltrain.model import VLModel
    with torch.device("meta"):
        return sum(p.numel() for p in VLModel(model_cfg).parameters())


def _reduce_bucket(cfg, stage: int, world_size: int, precision: str):
    """``zero_optimization.reduce_bucket_size`` for "auto".

    ZeRO-3: H*H, as Hugging Face fills it. ZeRO-0/1/2, in gradient elements:
      * one rank: the model's parameter count. There is nothing to reduce with and nothing to
        overlap, so one bucket per backward; DeepSpeed allocates the contiguous-gradient
        bucket at its full configured size every backward (two with overlap_comm), and its
        default 5e8 meant 2 GB of bf16 buffers per GPU for our 116M-parameter base model,
        whose gradients need 0.23 GB.
      * several ranks: 25 MB of gradients (13.1M bf16 elements), PyTorch DDP's default
        bucket. A bucket is reduced as soon as it is full, so with ``overlap_comm`` the
        reductions of the upper layers' gradients run while the backward computes the lower
        layers'; with one model-sized bucket (or DeepSpeed's 5e8) the whole reduction waited
        for the end of the backward (~9 buckets for the base model instead of 1).
    Both capped at DeepSpeed's default 5e8."""
    model = getattr(cfg, "model", None)
    if model is None:
        return None
    if stage == 3:
        return model.hidden_size * model.hidden_size
    n = model_param_count(model)
    if world_size > 1:
        n = min(n, DDP_BUCKET_BYTES // (4 if precision == "fp32" else 2))
    return min(ZERO12_MAX_BUCKET, n)


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    return a == b


class _Resolver:
    def __init__(self, ds: dict, source: str):
        self.ds = ds
        self.source = source

    def err(self, msg: str) -> DSConfigError:
        return DSConfigError(f"ds_config {self.source}: {msg}")

    def fill(self, node: dict, key: str, dotted: str, ours, our_key: str, *, missing_is_auto=True,
             shown=None):
        """Set ``node[key]`` from our value when it is "auto" (or absent); else check it agrees."""
        if key not in node:
            if missing_is_auto:
                node[key] = copy.deepcopy(ours)
            return
        theirs = node[key]
        if theirs == AUTO:
            node[key] = copy.deepcopy(ours)
        elif isinstance(theirs, str) and not isinstance(ours, str):
            raise self.err(f"'{dotted}' = {json.dumps(theirs)} is text; DeepSpeed reads a "
                           f"{type(ours).__name__} there: write it unquoted, or \"auto\" "
                           f"({our_key} = {ours if shown is None else shown!r})")
        elif not _same(theirs, ours):
            shown = ours if shown is None else shown
            raise self.err(f"'{dotted}' = {json.dumps(theirs)} contradicts {our_key} = {shown!r}; "
                           f"set '{dotted}' to \"auto\" (filled from our config) or make the two agree")


def _unique_keys(pairs: list) -> dict:
    """json.load's object hook: a key given twice is refused (JSON keeps the last silently:
    a second "zero_optimization" would set the stage)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise DSConfigError(f"key '{k}' given twice in one object; JSON would keep the last one silently")
        out[k] = v
    return out


def _load(path_or_dict) -> tuple[dict, str]:
    if isinstance(path_or_dict, dict):
        return copy.deepcopy(path_or_dict), "<dict>"
    path = os.fspath(path_or_dict)
    try:
        with open(path) as f:
            data = json.load(f, object_pairs_hook=_unique_keys)
    except DSConfigError as e:
        raise DSConfigError(f"ds_config {path}: {e}") from None
    except FileNotFoundError:
        raise DSConfigError(f"ds_config file not found: {path}{missing_file_hint(path)}") from None
    except json.JSONDecodeError as e:
        raise DSConfigError(f"ds_config {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise DSConfigError(f"ds_config {path}: expected a JSON object at the top level")
    return data, path


def _section(r: _Resolver, key: str) -> dict:
    sec = r.ds.setdefault(key, {})
    if not isinstance(sec, dict):
        raise r.err(f"'{key}' must be an object, got {json.dumps(sec)}")
    return sec


def _enabled(sec: dict):
    return sec.get("enabled", False) if sec else False


# ------------------------------------------------------------------------------ public

def precision_of(ds: dict) -> str:
    """'bf16' | 'fp16' | 'fp32' of a resolved ds_config."""
    bf = _enabled(ds.get("bf16") or ds.get("bfloat16") or {})
    fp = _enabled(ds.get("fp16") or {})
    if AUTO in (bf, fp):
        raise DSConfigError("precision_of() needs a resolved ds_config (bf16/fp16 'enabled' is still \"auto\")")
    if bf and fp:
        raise DSConfigError("ds_config enables both bf16 and fp16")
    return "bf16" if bf else "fp16" if fp else "fp32"


def offloads_optimizer(ds: dict) -> bool:
    off = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return off.get("device", "none") not in ("none", None)


def resolve_ds_config(path_or_dict: Union[str, os.PathLike, dict], cfg, world_size: int,
                      accelerator_name: str, precision_why: str = "") -> dict:
    """Load a ds_config (path or dict), fill every "auto" from ``cfg``, check the rest.

    ``cfg`` is our :class:`vltrain.config.Config` (``train.*`` and ``model.hidden_size`` are
    read); ``world_size`` the data-parallel size; ``accelerator_name`` DeepSpeed's
    ``get_accelerator().device_name()`` ('cuda', 'cpu', ...). Raises :class:`DSConfigError`
    naming the ds_config key, its value and our config key and value on a contradiction.
    ``precision_why``: where ``train.precision`` came from when ``auto`` chose it before (a
    resumed checkpoint's), said in a contradiction instead of a value the user never gave.
    """
    ds, source = _load(path_or_dict)
    r = _Resolver(ds, source)
    t = _train(cfg)
    on_cpu = accelerator_name == "cpu"
    if world_size < 1:
        raise r.err(f"world_size must be >= 1, got {world_size}")
    # DeepSpeed stores the whole config in every checkpoint: no secret may be in it.
    if isinstance(ds.get("comet"), dict) and ds["comet"].get("api_key"):
        raise r.err("'comet.api_key' would be stored in every checkpoint (DeepSpeed saves its config there): "
                    "remove it and set COMET_API_KEY in the environment, which comet_ml reads")

    # --- batch sizes
    r.fill(ds, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu",
           t.micro_batch_size, "train.micro_batch_size")
    r.fill(ds, "gradient_accumulation_steps", "gradient_accumulation_steps", t.grad_accum, "train.grad_accum")
    r.fill(ds, "train_batch_size", "train_batch_size", t.samples_per_step(world_size),
           f"train.micro_batch_size * train.grad_accum * world_size "
           f"({t.micro_batch_size} * {t.grad_accum} * {world_size})")

    # --- clipping (always explicit in the resolved config)
    r.fill(ds, "gradient_clipping", "gradient_clipping", float(t.grad_clip), "train.grad_clip")

    # --- optimizer: AdamW from our config
    opt = _section(r, "optimizer")
    opt_type = opt.setdefault("type", "AdamW")
    if str(opt_type).lower() not in ("adamw", "adam"):
        raise r.err(f"'optimizer.type' = {json.dumps(opt_type)} is not supported: vltrain trains with AdamW "
                    f"configured by train.lr / train.adam_betas / train.adam_eps / train.weight_decay")
    params = opt.setdefault("params", {})
    if not isinstance(params, dict):
        raise r.err(f"'optimizer.params' must be an object, got {json.dumps(params)}")
    if str(opt_type).lower() == "adam" and params.get("adam_w_mode") is False:
        raise r.err("'optimizer.params.adam_w_mode' = false (L2-regularised Adam) is not supported; "
                    "vltrain trains with decoupled weight decay (AdamW)")
    r.fill(params, "lr", "optimizer.params.lr", float(t.lr), "train.lr")
    r.fill(params, "betas", "optimizer.params.betas", [float(b) for b in t.adam_betas], "train.adam_betas")
    r.fill(params, "eps", "optimizer.params.eps", float(t.adam_eps), "train.adam_eps")
    r.fill(params, "weight_decay", "optimizer.params.weight_decay", float(t.weight_decay), "train.weight_decay")
    if "max_grad_norm" in params:
        raise r.err("'optimizer.params.max_grad_norm' is not supported; clipping is 'gradient_clipping' "
                    "(filled from train.grad_clip)")

    # torch_adam: true on CPU (no fused/C++ Adam needed), DeepSpeed's own Adam elsewhere.
    torch_adam = params.get("torch_adam", AUTO)
    if torch_adam == AUTO:
        params["torch_adam"] = on_cpu
    elif on_cpu and torch_adam is not True:
        raise r.err("'optimizer.params.torch_adam' = false on the CPU accelerator: DeepSpeed's fused Adam "
                    "is a GPU kernel; set it to \"auto\" or true")
    if not params["torch_adam"]:
        params.pop("torch_adam")   # DeepSpeed's default: FusedAdam (GPU) / DeepSpeedCPUAdam (offload)
    else:
        # torch's fused AdamW kernel: one pass over each (ZeRO: flat fp32) tensor instead of
        # ~10; measured 4.88 -> 4.53 s per base-size ZeRO-2 step on the 2-core CPU.
        params.setdefault("fused", True)
        # DeepSpeed hands the rest of the params to torch.optim.AdamW, whose TypeError after the
        # model's build named no key (e.g. FusedAdam's bias_correction)
        import inspect

        import torch
        takes = set(inspect.signature(torch.optim.AdamW).parameters) - {"params"}
        foreign = sorted(set(params) - takes - {"torch_adam", "adam_w_mode"})
        if foreign:
            raise r.err(f"'optimizer.params.{foreign[0]}' is not an argument of torch.optim.AdamW, which "
                        f"optimizes with 'torch_adam' = true (on the CPU accelerator always); its arguments: "
                        f"{', '.join(sorted(takes))}")

    # --- sections that act through code vltrain does not run: silently nothing, or (an
    # incomplete data_efficiency) DeepSpeed's assertion after the model's build
    if _truthy(ds.get("activation_checkpointing")):
        raise r.err("has an 'activation_checkpointing' section, which configures deepspeed.checkpointing; "
                    "vltrain's model checkpoints its blocks itself (torch.utils.checkpoint): remove the section "
                    "and set model.activation_checkpointing=true")
    for key in ("data_efficiency", "curriculum_learning"):
        if _enabled_anywhere(ds.get(key)):
            raise r.err(f"enables '{key}' (curriculum learning, data sampling, random-LTD), which works through "
                        "DeepSpeed's own data loader; vltrain reads its data with mosaicml-streaming: remove it")

    # --- scheduler: ours, never DeepSpeed's
    if "scheduler" in ds:
        raise r.err("has a 'scheduler' section, but the LR schedule comes from our config "
                    "(train.warmup_steps / train.warmup_ratio / train.max_steps, linear warm-up then "
                    "linear decay); remove the 'scheduler' section")

    # --- precision
    if _enabled(ds.get("torch_autocast") or {}):
        # DeepSpeed would autocast the forward while the config, the checkpoint's record, the
        # resume checks and the MFU peak all said fp32 (or another precision)
        raise r.err("enables 'torch_autocast'; the precision is train.precision (bf16 / fp16 sections filled from "
                    "it): set train.precision=bf16 (or fp16) and remove 'torch_autocast'")
    if "bfloat16" in ds:                # DeepSpeed's legacy spelling
        if "bf16" in ds:
            raise r.err("has both 'bf16' and its legacy spelling 'bfloat16'; keep 'bf16'")
        ds["bf16"] = ds.pop("bfloat16")
    want = cfg_precision(cfg)
    shown = f"auto ({want}: {precision_why})" if precision_why else want
    if want == AUTO:
        want = _ds_choice(ds) or auto_precision(accelerator_name)
        shown = f"auto ({want} here)"
    bf16 = _section(r, "bf16")
    fp16 = _section(r, "fp16")
    r.fill(bf16, "enabled", "bf16.enabled", want == "bf16", "train.precision", shown=shown)
    r.fill(fp16, "enabled", "fp16.enabled", want == "fp16", "train.precision", shown=shown)
    if bf16["enabled"] and fp16["enabled"]:   # unreachable with fill(); kept for hand-made dicts
        raise r.err("enables both bf16 and fp16")
    if fp16["enabled"] and on_cpu:
        raise r.err("fp16 (train.precision = 'fp16') is not available on DeepSpeed's CPU accelerator "
                    "(it has no fp16 support); use train.precision=bf16 or fp32 on CPU")
    if fp16["enabled"]:
        fp16.setdefault("loss_scale", 0)   # 0 = dynamic loss scaling
    if bf16["enabled"]:
        # DeepSpeed scans every gradient for inf/NaN before each bf16 step (2 reductions + 5
        # small ops per gradient, on the host's critical path): 111 -> 90 ms per step on an H100
        # (BENCHMARKS.md). Overflow is fp16's problem (bf16 has fp32's exponent range), and the
        # trainer already skips every non-finite loss before backward on all ranks.
        bf16.setdefault("check_grad_overflow", False)

    # --- DeepSpeed's throughput timer. On by default, and "synchronized" by default: from the
    # third step on it calls torch.cuda.synchronize() at the start of every forward and the end
    # of every step, so the host can never queue a forward while the GPU still runs the step
    # before, and everything the host does between steps leaves the GPU idle. Its only output
    # is a samples/s line every steps_per_print steps; vltrain's monitor logs samples/s and MFU
    # without waiting for the device.
    timers = _section(r, "timers")
    throughput = timers.setdefault("throughput", {})
    if not isinstance(throughput, dict):
        raise r.err(f"'timers.throughput' must be an object, got {json.dumps(throughput)}")
    if throughput.get("enabled", AUTO) == AUTO:
        throughput["enabled"] = False
    if throughput["enabled"] and throughput.get("synchronized", True) and first_rank():
        log.warning("%s: 'timers.throughput' is enabled and synchronized: DeepSpeed will wait for the "
                    "whole device at every forward and step (GPU idle between steps); set "
                    "'timers.throughput.synchronized' to false, or leave the timer off (vltrain "
                    "logs samples/s itself)", source)

    # --- ZeRO
    zero = _section(r, "zero_optimization")
    stage = zero.setdefault("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):     # (true == 1 in Python)
        raise r.err(f"'zero_optimization.stage' = {json.dumps(stage)} must be 0, 1, 2 or 3")
    h = _hidden(cfg)
    if zero.get("overlap_comm") == AUTO:
        # Overlap reductions with the backward where there are any: on one GPU the reduction
        # stream and double buffers only cost (~10% of an H100 engine step, BENCHMARKS.md).
        zero["overlap_comm"] = world_size > 1
    for key, value_of in (("reduce_bucket_size", lambda: _reduce_bucket(cfg, stage, world_size, want)),
                          ("stage3_prefetch_bucket_size", lambda: None if h is None else int(0.9 * h * h)),
                          ("stage3_param_persistence_threshold", lambda: None if h is None else 10 * h)):
        if zero.get(key) == AUTO:
            value = value_of()
            if value is None:
                raise r.err(f"'zero_optimization.{key}' = \"auto\" needs the model config (model.*)")
            zero[key] = value
    if bf16["enabled"] and stage in (2, 3) and t.grad_accum > 1:
        # DeepSpeed sums a bf16 run's micro-batch gradients in bf16 unless told otherwise: at
        # grad_accum 8 / 32 that added 0.35% / 0.59% relative error to the step's gradient on
        # its own (BENCHMARKS.md, "Gradient accumulation in bf16"). ZeRO-2/3 then sum into an
        # fp32 partition (+2 bytes per parameter / ranks). With nothing to sum (grad_accum 1)
        # DeepSpeed's own path is kept. Not ZeRO-1: it would switch to BF16_Optimizer (an
        # unsharded fp32 gradient buffer, and a host wait per step that ds_readbacks does not remove).
        data_types = _section(r, "data_types")
        if data_types.get("grad_accum_dtype", AUTO) == AUTO:
            data_types["grad_accum_dtype"] = "fp32"
    if (zero.get("offload_param") or {}).get("device", "none") not in ("none", None) and stage != 3:
        raise r.err(f"'zero_optimization.offload_param' needs ZeRO stage 3, but 'zero_optimization.stage' = {stage}")
    if offloads_optimizer(ds) and stage == 0:
        raise r.err("'zero_optimization.offload_optimizer' needs ZeRO stage 1, 2 or 3, "
                    "but 'zero_optimization.stage' = 0")
    for what in ("offload_optimizer", "offload_param"):
        off = zero.get(what) or {}
        if isinstance(off, dict) and off.get("device") == "nvme" and not off.get("nvme_path"):
            raise r.err(f"'zero_optimization.{what}.device' = \"nvme\" needs "
                        f"'zero_optimization.{what}.nvme_path' (a folder on the NVMe drive)")
    for key in ("stage3_gather_16bit_weights_on_model_save", "gather_16bit_weights_on_model_save"):
        if zero.get(key) is True and first_rank():     # it configures save_16bit_model(), never called
            log.warning("%s: 'zero_optimization.%s' has no effect: vltrain saves DeepSpeed checkpoints only; "
                        "write their weights with vltrain-ckpt consolidate / export", source, key)

    _check_no_auto(r, ds, "")
    parsed = check_sections(r, ds)
    # a misspelling of a key DeepSpeed reads (zero_optimisation trained ZeRO-0 without it);
    # a key merely like one (a newer DeepSpeed's section) is only warned of below
    import difflib
    unread = unread_keys(ds, parsed) if parsed is not None else []
    typos = [(k, c) for k, c in unread if c and difflib.SequenceMatcher(None, k, c).ratio() >= 0.8]
    if typos:
        raise r.err("; ".join(f"unknown top-level key '{k}' (did you mean '{close}'?)" for k, close in typos))
    warn_unread_keys(unread, source)
    return ds


def _truthy(node) -> bool:
    """Any true / non-zero / non-empty value in ``node``'s leaves."""
    if isinstance(node, dict):
        return any(_truthy(v) for v in node.values())
    if isinstance(node, list):
        return any(_truthy(v) for v in node)
    return bool(node) and node not in ("none", "None")


def _enabled_anywhere(node) -> bool:
    """An ``"enabled": true`` in ``node`` or in a section nested in it."""
    return isinstance(node, dict) and (node.get("enabled") is True or any(map(_enabled_anywhere, node.values())))


def _parsed(ds: dict) -> _ReadRecorder:
    """``ds`` read by DeepSpeed's own config parser (its top-level reads recorded); raises what
    the parser raises."""
    from deepspeed.runtime.config import DeepSpeedConfig
    rec = _ReadRecorder(copy.deepcopy(ds))
    rec.pop("train_batch_size", None)      # checked against the world size, which may not be up yet
    DeepSpeedConfig(rec)
    return rec


def check_sections(r: _Resolver, ds: dict) -> Optional[_ReadRecorder]:
    """DeepSpeed's strict section models (zero_optimization, bf16, ...) refuse an unknown or
    ill-typed key at deepspeed.initialize with pydantic's bare text ("DeepSpeedZeroConfig /
    stag / Extra inputs are not permitted"), naming neither the file nor the section: parsed
    here, such an error names both, and a close known key. Returns the parse (``_parsed``), or
    None where DeepSpeed fails otherwise (it reports that itself at deepspeed.initialize)."""
    import pydantic
    try:
        return _parsed(ds)
    except pydantic.ValidationError as e:
        raise r.err("; ".join(_section_error(ds, e.title, err) for err in e.errors())) from None
    except Exception:  # noqa: BLE001 - anything else DeepSpeed reports itself at deepspeed.initialize
        return None


def _section_error(ds: dict, title: str, err: dict) -> str:
    import difflib
    loc = [str(p) for p in err.get("loc", ())]
    where = next(iter(_paths_ending(ds, loc)), ".".join(loc) or title)
    if err.get("type") != "extra_forbidden":
        return f"'{where}': {err.get('msg')} (got {err.get('input')!r})"
    known = _model_keys(title, loc[:-1])
    close = difflib.get_close_matches(loc[-1], known, n=1) if loc else []
    return f"unknown key '{where}'" + (f" (did you mean '{close[0]}'?)" if close else "")


def _paths_ending(node, loc: list[str], prefix: str = ""):
    """Dotted paths in ``node`` whose last parts are ``loc``."""
    if isinstance(node, dict):
        for k, v in node.items():
            path = f"{prefix}{k}"
            if loc and path.split(".")[-len(loc):] == loc:
                yield path
            yield from _paths_ending(v, loc, path + ".")


def _model_keys(title: str, inner: list[str]) -> list[str]:
    """The keys (field names and aliases) of DeepSpeed's config model ``title``, or of the model
    nested in it at ``inner``; [] if not found."""
    import typing

    import pydantic
    from deepspeed.runtime.config_utils import DeepSpeedConfigModel
    todo, cls = [DeepSpeedConfigModel], None
    while todo and cls is None:
        c = todo.pop()
        cls = c if c.__name__ == title else None
        todo.extend(c.__subclasses__())
    for part in inner:
        field = (cls.model_fields.get(part) if cls is not None else None)
        ann = getattr(field, "annotation", None)
        cls = next((c for c in (ann, *typing.get_args(ann))       # Optional[Model] too
                    if isinstance(c, type) and issubclass(c, pydantic.BaseModel)), None)
    if cls is None:
        return []
    return sorted({*cls.model_fields, *(f.alias for f in cls.model_fields.values() if f.alias)})


# Top-level keys DeepSpeed reads outside its config parser (deepspeed.initialize; the latter
# only once torch.distributed is up).
_READ_ELSEWHERE = {"data_parallel_size", "sequence_parallel_size"}


class _ReadRecorder(dict):
    """A ds_config whose top-level reads are recorded (DeepSpeedConfig reads it with get/[]/in)."""

    def __init__(self, *a):
        super().__init__(*a)
        self.read: set = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def unread_keys(ds: dict, parsed: Optional[_ReadRecorder] = None) -> list[tuple[str, str]]:
    """Top-level ds_config keys DeepSpeed's own config parser never reads, each with the closest
    key it looked for ("" if none): it ignores them (a typo such as 'zero_optimisation' or
    'train_micro_batch_size' would go unnoticed; its sections are checked by DeepSpeed's strict
    models, ``check_sections``). ``resolve_ds_config`` refuses those with a close key and warns
    of the rest (a newer DeepSpeed's section, say). ``parsed``: ``ds``'s ``_parsed``, made here if
    not given. [] when DeepSpeed cannot parse it (its own error comes at deepspeed.initialize)."""
    import difflib
    rec = parsed
    if rec is None:
        try:
            rec = _parsed(ds)
        except Exception:  # noqa: BLE001 - DeepSpeed reports it itself, with its own message
            return []
    looked_for = sorted(k for k in rec.read if isinstance(k, str))     # present or not
    return [(key, next(iter(difflib.get_close_matches(key, looked_for, n=1)), ""))
            for key in sorted(set(ds) - rec.read - _READ_ELSEWHERE)]


def warn_unread_keys(unread: list[tuple[str, str]], source: str) -> None:
    """``unread_keys``' list as a warning, from the first rank only (every rank resolves the config)."""
    if unread and first_rank():
        log.warning("%s: DeepSpeed's config parser never reads %s: ignored", source,
                    ", ".join(f"'{k}'" + (f" (did you mean '{c}'?)" if c else "") for k, c in unread))


def _check_no_auto(r: _Resolver, node: Any, prefix: str):
    """Any "auto" we do not know how to fill is an error, not a DeepSpeed crash later."""
    if isinstance(node, dict):
        for k, v in node.items():
            _check_no_auto(r, v, f"{prefix}{k}.")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _check_no_auto(r, v, f"{prefix}[{i}].")
    elif node == AUTO:
        raise r.err(f"'{prefix.rstrip('.')}' = \"auto\", but vltrain has no config value to fill it with; "
                    f"give it an explicit value")


def cpu_adam_status() -> tuple[bool, str]:
    """Can DeepSpeed build its CPU Adam op (needed for optimizer offload with DeepSpeedCPUAdam)?

    Returns (ok, message). Cheap: checks the builder's requirements, does not compile.
    """
    try:
        from deepspeed.ops.op_builder import CPUAdamBuilder
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"DeepSpeed's CPUAdamBuilder cannot be imported: {e}"
    try:
        builder = CPUAdamBuilder()
        if builder.is_compatible(verbose=False):
            return True, "DeepSpeed's CPU Adam op can be built (JIT, C++ compiler + ninja present)"
        return False, ("DeepSpeed's CPU Adam op cannot be built here (is_compatible() is false: a C++ "
                       "compiler and ninja are needed, or install DeepSpeed with DS_BUILD_CPU_ADAM=1)")
    except Exception as e:  # pragma: no cover
        return False, f"DeepSpeed's CPU Adam op cannot be built here: {e}"


def fused_adam_status() -> tuple[bool, str]:
    """Can DeepSpeed load FusedAdam, its GPU optimizer (``optimizer.params.torch_adam`` false or
    auto on a GPU)? Returns (ok, message). Prebuilt when DeepSpeed was installed with
    DS_BUILD_FUSED_ADAM=1, else compiled just in time at the first start, which needs ninja and
    a CUDA toolkit (nvcc under CUDA_HOME) of torch's CUDA major version. Cheap: compiles nothing."""
    import torch
    try:
        from deepspeed.git_version_info import installed_ops
        from deepspeed.ops.op_builder.builder import MissingCUDAException, installed_cuda_version
        from torch.utils.cpp_extension import is_ninja_available
    except Exception as e:  # pragma: no cover - depends on the install
        return False, f"DeepSpeed's op builder cannot be imported: {e}"
    if installed_ops.get("fused_adam", False) or torch.version.hip:
        return True, "DeepSpeed's FusedAdam is prebuilt (or ROCm builds its own)"
    if not is_ninja_available():
        return False, "it is built just in time at the first start, which needs ninja (pip install ninja)"
    try:
        major, minor = installed_cuda_version()
    except MissingCUDAException as e:
        return False, (f"it is built just in time at the first start, which needs a CUDA toolkit with nvcc "
                       f"(found none: {e}; set CUDA_HOME or load the cluster's CUDA module)")
    torch_major = (torch.version.cuda or "").split(".")[0]
    if str(major) != torch_major:
        return False, (f"it is built just in time at the first start with nvcc, which is CUDA {major}.{minor} here "
                       f"while torch was built for CUDA {torch.version.cuda} (the major versions must agree)")
    return True, f"DeepSpeed's FusedAdam can be built just in time (ninja, nvcc CUDA {major}.{minor})"


_ARCH_SPECIFIC = re.compile(r"^(\d+\.\d+)[af]((?:\+PTX)?)$")


def plain_cuda_arch_list(environ: MutableMapping[str, str] = os.environ) -> Optional[str]:
    """Rewrite arch-specific entries of ``TORCH_CUDA_ARCH_LIST`` ("9.0a", "10.0f") to plain
    ones ("9.0") in ``environ``; returns the old value if it changed, else None.

    Why: CUDA 12/13 images set e.g. ``TORCH_CUDA_ARCH_LIST=9.0a`` on H100 nodes, and
    DeepSpeed's JIT op builder (0.19) parses every entry as MAJOR.MINOR[+PTX], so building
    FusedAdam inside ``deepspeed.initialize`` fails with "invalid literal for int() with
    base 10: '0a'". The plain arch's code runs on the same GPUs (FusedAdam uses no
    arch-specific instructions)."""
    old = environ.get("TORCH_CUDA_ARCH_LIST")
    if not old:
        return None
    entries = re.split(r"[;\s]+", old.strip())
    new = ";".join(_ARCH_SPECIFIC.sub(r"\1\2", e) for e in entries if e)
    if new == ";".join(e for e in entries if e):
        return None
    environ["TORCH_CUDA_ARCH_LIST"] = new
    return old


def check_buildable(ds: dict) -> None:
    """Raise a clear error before deepspeed.initialize if the resolved config needs an op we
    can't build; make TORCH_CUDA_ARCH_LIST readable by DeepSpeed's JIT builder."""
    old = plain_cuda_arch_list()
    if old is not None and first_rank():
        log.warning("TORCH_CUDA_ARCH_LIST=%r has arch-specific entries DeepSpeed's op builder cannot parse; "
                    "using %r", old, os.environ["TORCH_CUDA_ARCH_LIST"])
    params = (ds.get("optimizer") or {}).get("params") or {}
    if params.get("torch_adam", False):
        return
    if offloads_optimizer(ds):
        ok, msg = cpu_adam_status()
        if not ok:
            raise DSConfigError(f"ZeRO optimizer offload uses DeepSpeedCPUAdam, but {msg}")
        check_build_lock("cpu_adam")
        return
    ok, msg = fused_adam_status()
    if not ok:
        raise DSConfigError(
            f"the GPU optimizer is DeepSpeed's FusedAdam ('optimizer.params.torch_adam' auto or false), but {msg}. "
            f"Or set \"torch_adam\": true under \"optimizer\": {{\"params\": ...}} in the ds_config: torch's "
            f"fused AdamW, nothing to build; keep one choice for a whole run)")
    check_build_lock("fused_adam")


STALE_LOCK_S = 15 * 60      # a JIT build of DeepSpeed's Adam takes a minute or two


def build_lock_path(op: str) -> str:
    """Where torch's JIT build of DeepSpeed op ``op`` keeps its lock file (torch's
    ``_get_build_directory`` naming, without making the folder)."""
    import sys
    import torch
    from torch.utils.cpp_extension import get_default_build_root
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        acc = (f"rocm{torch.version.hip.replace('.', '')}" if torch.version.hip
               else f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu")
        py = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
        root = os.path.join(get_default_build_root(), f"{py}_{acc}")
    return os.path.join(root, op, "lock")


def lock_file_blocks() -> bool:
    """Whether torch's JIT build waits for as long as its lock file exists (``FileBaton``: the
    builder deletes it when done, so a build killed mid-way leaves one that blocks every later
    build). torch since pytorch#189245 holds an OS lock on the file instead (``FileLock``): the
    kernel releases it with its holder, and the file stays behind every build, at any age."""
    from torch.utils import cpp_extension
    return hasattr(cpp_extension, "FileBaton")


def check_build_lock(op: str, now: Optional[float] = None) -> None:
    """Refuse to start on a build lock left by a job killed while compiling ``op`` (preempted,
    cancelled, timed out: every rank of every job on the shared home builds it at its first
    start), where torch's lock is a file whose existence blocks (``lock_file_blocks``): torch
    waits for it without a timeout, so every later job would hang there until its time limit,
    before training and before any checkpoint. An OS lock cannot go stale: nothing to check
    (its file, left by every build, was refused 15 minutes after the first)."""
    import time
    if not lock_file_blocks():
        return
    path = build_lock_path(op)
    try:
        age = (now if now is not None else time.time()) - os.path.getmtime(path)
    except OSError:
        return      # no lock: nothing building, or prebuilt
    if age > STALE_LOCK_S:
        raise DSConfigError(
            f"{path} is {age / 60:.0f} minutes old: a job killed while compiling DeepSpeed's {op} left it, and "
            f"torch waits for it to go without a timeout. Delete it (no build takes that long), or install "
            f"DeepSpeed with DS_BUILD_{op.upper()}=1 once (prebuilt: nothing to compile, no lock)")


def decays(name: str, ndim: int) -> bool:
    """Whether parameter ``name`` is in the weight-decayed group (see no_decay_param_groups)."""
    return name.endswith(".matrices") or (ndim >= 2 and not name.endswith((".bias", ".vectors")))


def no_decay_param_groups(model, weight_decay: float) -> list[dict]:
    """BERT's convention: no weight decay on biases and LayerNorm weights (1-d params, and a
    block's flat ``vectors``); decay on weight matrices (2-d params, and a block's flat
    ``matrices``: its four weight matrices, see vltrain/model/transformer.py).

    Pass as ``model_parameters`` to ``deepspeed.initialize``; the group's ``weight_decay``
    overrides the ds_config's ``optimizer.params.weight_decay`` for that group.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p.ndim) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": float(weight_decay)},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
