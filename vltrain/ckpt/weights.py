"""Full fp32 weights of a checkpoint, whatever its ZeRO stage or form.

  ZeRO-1/2/3         DeepSpeed's ``zero_to_fp32`` (the fp32 master copy in the optimizer shards)
  universal          ``zero/<param>/fp32.pt`` written by ``ds_to_universal`` (our ``reshard``)
  ZeRO-0             ``mp_rank_00_model_states.pt``: the module state (full on every rank); with
                     bf16/fp16, the fp32 master copy DeepSpeed's optimizer keeps beside it

The engine wraps a task module whose ``.model`` is the ``VLModel``: ``model.`` is stripped so
the names are ``VLModel.state_dict()``'s; anything else the task holds keeps its own name.
The MLM decoder is the word-embedding module itself (``WordEmbedding``), so that weight is
one tensor here, and loading it is what ties the decoder again.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from vltrain.engine import checkpoint as ckpt
from vltrain.engine.resume import CheckpointError, saved_config, saved_param_shapes
from vltrain.ckpt.layout import quiet

PREFIX = "model."


def strip_prefix(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[len(PREFIX):] if k.startswith(PREFIX) else k): v for k, v in state.items()}


def _universal_state(found: ckpt.Found) -> dict[str, torch.Tensor]:
    zero = os.path.join(found.path, "zero")
    shapes = saved_param_shapes(found.path) or {}
    names = list(shapes) or sorted(n for n in os.listdir(zero) if os.path.isdir(os.path.join(zero, n)))
    out = {}
    for name in names:
        f = os.path.join(zero, name, "fp32.pt")
        if not os.path.isfile(f):
            raise CheckpointError(f"universal checkpoint {found.path} is incomplete: zero/{name}/fp32.pt is missing")
        obj = torch.load(f, map_location="cpu", weights_only=False)
        t = obj["param"] if isinstance(obj, dict) else obj      # ZeRO-1/2 source: a dict; ZeRO-3: a tensor
        if name in shapes and tuple(t.shape) != shapes[name]:
            t = t.reshape(shapes[name])
        out[name] = t.float().contiguous()
    out.update(_buffers(found.path, out))
    return out


def _buffers(tag_dir: str, have: dict) -> dict[str, torch.Tensor]:
    path = os.path.join(tag_dir, "mp_rank_00_model_states.pt")
    if not os.path.isfile(path):
        path = os.path.join(tag_dir, "zero_pp_rank_0_mp_rank_00_model_states.pt")
    sd = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    module = sd.get("module") or {}
    return {n: module[n].clone() for n in sd.get("buffer_names") or [] if n in module and n not in have}


def stage0_file(found: ckpt.Found) -> dict:
    return torch.load(os.path.join(found.path, "mp_rank_00_model_states.pt"), map_location="cpu",
                      weights_only=False, mmap=True)


def stage0_masters(sd: dict) -> dict[str, torch.Tensor]:
    """ZeRO-0 with bf16/fp16: the fp32 master weights by name, or {} where there are none.

    DeepSpeed saves them per parameter group, without names: its unfused FP16/BF16 optimizer
    (torch's Adam: CPU) as ``optimizer["fp32_groups"]``, a list of tensors per group; its fused
    one (FusedAdam: GPU) as ``optimizer["fp32_groups_flat"]``, the group's tensors flattened
    and concatenated. Our groups are ``no_decay_param_groups``' (decayed, then not, each in
    ``named_parameters`` order), so the module state's parameters split by the same rule name
    them; taken only if every size and shape agrees."""
    opt = sd.get("optimizer")
    if not isinstance(opt, dict):
        return {}
    from vltrain.engine.ds_config import decays
    buffers = set(sd.get("buffer_names") or [])
    module = sd["module"]
    names = [n for n, t in module.items() if n not in buffers and t.is_floating_point()]
    ours = [g for g in ([n for n in names if decays(n, module[n].ndim)],
                        [n for n in names if not decays(n, module[n].ndim)]) if g]
    groups, flat = opt.get("fp32_groups"), opt.get("fp32_groups_flat")
    if not groups and flat and all(torch.is_tensor(f) for f in flat) and len(flat) == len(ours):
        sizes = [[module[n].numel() for n in g] for g in ours]
        if any(f.numel() != sum(s) for f, s in zip(flat, sizes)):
            return {}
        groups = [[t.view(module[n].shape) for n, t in zip(g, f.reshape(-1).split(s))]
                  for g, f, s in zip(ours, flat, sizes)]
    if not groups or not all(isinstance(g, (list, tuple)) for g in groups):
        return {}
    if [len(g) for g in ours] != [len(g) for g in groups]:
        return {}
    masters = {n: t for g_names, g in zip(ours, groups) for n, t in zip(g_names, g)}
    if any(not torch.is_tensor(t) or tuple(t.shape) != tuple(sd["module"][n].shape) for n, t in masters.items()):
        return {}
    return masters


def _stage0_state(found: ckpt.Found) -> dict[str, torch.Tensor]:
    sd = stage0_file(found)
    masters = stage0_masters(sd)
    return {k: masters.get(k, v).float().contiguous() if v.is_floating_point() else v.contiguous()
            for k, v in sd["module"].items()}


def fp32_state_dict(found: ckpt.Found, verbose: bool = False) -> dict[str, torch.Tensor]:
    """Full fp32 weights (engine-module names, ``model.``-prefixed) of a located checkpoint."""
    if found.info.get("universal"):
        return _universal_state(found)
    stage = int(found.info.get("zero_stage", 0))
    if stage == 0:
        return _stage0_state(found)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with quiet(verbose):
        state = get_fp32_state_dict_from_zero_checkpoint(found.save_dir, tag=found.tag)
    return {k: v.contiguous() for k, v in state.items()}


def model_state_dict(found: ckpt.Found, verbose: bool = False) -> dict[str, torch.Tensor]:
    """``fp32_state_dict`` with VLModel names (``model.`` stripped), the blocks' flat parameters
    as their pieces (``layers.{i}.qkv.weight`` ..., ``transformer.named_pieces``), tensors unshared."""
    from vltrain.ckpt.layout import read_config
    from vltrain.model.transformer import named_pieces
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    state = named_pieces(strip_prefix(fp32_state_dict(found, verbose)), read_config(found).model)
    for k, v in state.items():
        # safetensors refuses shared storage: a second name for one tensor gets its own copy
        key = v.untyped_storage().data_ptr() if v.numel() else None
        out[k] = v.clone() if key is not None and key in seen else v
        if key is not None:
            seen.setdefault(key, k)
    return out


def precision_note(found: ckpt.Found) -> Optional[str]:
    """A warning when the weights are not the fp32 master copy (ZeRO-0 with bf16/fp16)."""
    if found.info.get("universal") or int(found.info.get("zero_stage", 0)) != 0:
        return None
    cfg = saved_config(found.path)
    if cfg is None:
        return None
    p = cfg.train.precision
    if p != "fp32" and not stage0_masters(stage0_file(found)):
        return (f"ZeRO-0 {p} checkpoint without an fp32 master copy that maps onto the model's parameters: "
                f"the weights come from the {p} module state, cast to fp32")
    return None
