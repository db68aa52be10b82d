"""Full fp32 weights of a checkpoint, whatever its ZeRO stage or form.

  ZeRO-1/2/3         DeepSpeed's ``zero_to_fp32`` (the fp32 master copy in the optimizer shards)
  universal          ``zero/<param>/fp32.pt`` written by ``ds_to_universal`` (our ``reshard``)
  ZeRO-0             the module state in ``mp_rank_00_model_states.pt`` (full on every rank)

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
from vltrain.engine.resume import CheckpointError, saved_param_shapes
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


def _stage0_state(found: ckpt.Found) -> dict[str, torch.Tensor]:
    sd = torch.load(os.path.join(found.path, "mp_rank_00_model_states.pt"), map_location="cpu",
                    weights_only=False)
    return {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in sd["module"].items()}


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
    """A warning when the weights are not an fp32 master copy (ZeRO-0 with bf16/fp16)."""
    if found.info.get("universal") or int(found.info.get("zero_stage", 0)) != 0:
        return None
    try:
        from vltrain.config import load_config
        p = load_config(os.path.join(found.path, "config.yaml")).train.precision
    except Exception:  # noqa: BLE001
        return None
    if p != "fp32":
        return (f"ZeRO-0 {p} checkpoint: the weights come from the {p} module state (DeepSpeed keeps "
                "no fp32 master copy in mp_rank_00_model_states.pt for stage 0); they are cast to fp32")
    return None
