"""Hugging Face BERT <-> VLModel weights: one name map, used for loading and for export.

Our side of the map uses the blocks' piece names (``layers.{i}.qkv.weight``, see
``transformer.named_pieces``), not the flat parameters the blocks hold.

A folder is either a Hugging Face BERT checkpoint (``config.json`` of ``model_type: bert`` +
``model.safetensors`` or ``pytorch_model.bin``, keys with or without a ``bert.`` prefix) or
one we exported (its ``config.json`` also carries a ``vltrain`` section with the full
ModelConfig). Exported text weights use BERT's names, so ``transformers.BertModel`` and
``BertForMaskedLM`` load them; everything else keeps our names.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import pickle
import re

import torch

from vltrain.config import ModelConfig, build_section
from vltrain.model.embeddings import AUX_HINT, AUX_PARAM, VISUAL_LN_HINT, VISUAL_LN_PARAMS, vlbert_load_hint

log = logging.getLogger(__name__)

# (our name, BERT name) templates: {i} = layer index, {p} = weight|bias, {qkv} = query|key|value.
_NAME_MAP = [
    ("embeddings.word.weight", "embeddings.word_embeddings.weight"),
    ("embeddings.position.weight", "embeddings.position_embeddings.weight"),
    ("embeddings.token_type.weight", "embeddings.token_type_embeddings.weight"),
    ("embeddings.norm.{p}", "embeddings.LayerNorm.{p}"),
    ("layers.{i}.attn_out.{p}", "encoder.layer.{i}.attention.output.dense.{p}"),
    ("layers.{i}.attn_norm.{p}", "encoder.layer.{i}.attention.output.LayerNorm.{p}"),
    ("layers.{i}.ffn_in.{p}", "encoder.layer.{i}.intermediate.dense.{p}"),
    ("layers.{i}.ffn_out.{p}", "encoder.layer.{i}.output.dense.{p}"),
    ("layers.{i}.ffn_norm.{p}", "encoder.layer.{i}.output.LayerNorm.{p}"),
    ("cls_head.pooler.dense.{p}", "pooler.dense.{p}"),
    ("mlm_head.transform.dense.{p}", "cls.predictions.transform.dense.{p}"),
    ("mlm_head.transform.norm.{p}", "cls.predictions.transform.LayerNorm.{p}"),
    ("mlm_head.bias", "cls.predictions.bias"),
]
# Our fused projection holds BERT's query, key and value stacked along dim 0.
_QKV = ("layers.{i}.qkv.{p}", "encoder.layer.{i}.attention.self.{qkv}.{p}")
_GROUPS = {"i": r"\d+", "p": "weight|bias", "qkv": "query|key|value"}


@functools.lru_cache(maxsize=None)
def _regex(template: str) -> re.Pattern:
    pat = re.escape(template)
    for g, body in _GROUPS.items():
        pat = pat.replace(re.escape("{%s}" % g), f"(?P<{g}>{body})")
    return re.compile(pat)


def _translate(name: str, pairs) -> dict | None:
    """(groups, destination template) for the first (src, dst) pair matching ``name``."""
    for src, dst in pairs:
        m = _regex(src).fullmatch(name)
        if m:
            return m.groupdict(), dst
    return None


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict -> BERT names for the text encoder (q/k/v split), our names otherwise.

    Laid out as BERT's own pretraining checkpoints are: the encoder under ``bert.``, the MLM
    head as ``cls.predictions.*``. ``BertModel`` strips the prefix when loading and
    ``BertForMaskedLM`` needs it (without it transformers loads the encoder but drops the head)."""
    out = {}
    for name, t in state.items():
        hit = _translate(name, [_QKV])
        if hit:
            groups, dst = hit
            for part, chunk in zip(("query", "key", "value"), t.chunk(3, dim=0)):
                out["bert." + dst.format(qkv=part, **groups)] = chunk.contiguous()
            continue
        hit = _translate(name, _NAME_MAP)
        if hit:
            hf = hit[1].format(**hit[0])
            out[hf if hf.startswith("cls.") else "bert." + hf] = t
        else:
            out[name] = t
    return out


def from_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of ``to_hf_state_dict``; accepts a ``bert.`` prefix and old gamma/beta names."""
    reverse = [(hf, ours) for ours, hf in _NAME_MAP]
    out: dict[str, torch.Tensor] = {}
    qkv: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in state.items():
        k = k[len("bert."):] if k.startswith("bert.") else k
        k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))
        hit = _translate(k, [(_QKV[1], _QKV[0])])
        if hit:
            groups, dst = hit
            qkv.setdefault(dst.format(**groups), {})[groups["qkv"]] = v
            continue
        hit = _translate(k, reverse)
        out[hit[1].format(**hit[0]) if hit else k] = v
    for name, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"{name}: checkpoint has only {sorted(parts)} of query/key/value")
        out[name] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    return out


# BERT config.json -> ModelConfig
_HF_CONFIG = {
    "vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads", "intermediate_size": "intermediate_size",
    "hidden_act": "hidden_act", "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size", "layer_norm_eps": "layer_norm_eps",
    "hidden_dropout_prob": "hidden_dropout", "attention_probs_dropout_prob": "attention_dropout",
    "initializer_range": "initializer_range", "pad_token_id": "pad_token_id",
}


# Activation names where transformers' differ from ours (its ACT2FN has no "gelu_tanh").
_HF_ACT = {"gelu_tanh": "gelu_pytorch_tanh"}


def read_model_config(path: str, **overrides) -> ModelConfig:
    """ModelConfig from a folder's config.json (ours or BERT's) plus field overrides."""
    cfg_file = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_file):
        raise FileNotFoundError(f"{path}: no config.json (expected a Hugging Face BERT folder or a "
                                "vltrain export)")
    with open(cfg_file) as f:
        raw = json.load(f)
    if "vltrain" in raw:
        data = dict(raw["vltrain"])
    else:
        if raw.get("model_type", "bert") != "bert":
            raise ValueError(f"{cfg_file}: model_type={raw.get('model_type')!r}, expected a BERT config")
        data = {ours: raw[hf] for hf, ours in _HF_CONFIG.items() if hf in raw}
        if "hidden_act" in data:
            data["hidden_act"] = {hf: ours for ours, hf in _HF_ACT.items()}.get(data["hidden_act"], data["hidden_act"])
    data.update(overrides)
    return build_section(ModelConfig, data, prefix="model.")


WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")    # what a weights folder is read from, in order


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights from ``model.safetensors`` or ``pytorch_model.bin`` in ``path`` (or a file path)."""
    if os.path.isfile(path):
        files = [path]
    else:
        files = [os.path.join(path, n) for n in WEIGHTS_FILES]
    for f in files:
        if os.path.isfile(f):
            try:
                if f.endswith(".safetensors"):
                    from safetensors.torch import load_file
                    state = load_file(f)
                else:
                    state = torch.load(f, map_location="cpu", weights_only=True)
            except Exception as e:   # noqa: BLE001 - torch/safetensors raise KeyError, RuntimeError, ...
                raise ValueError(f"{f} is not a weights file vltrain can read (a safetensors file, a "
                                 f"PyTorch state dict, a Hugging Face BERT folder or a vltrain checkpoint "
                                 f"folder): {_why_unreadable(e)}") from None
            if not isinstance(state, dict):
                raise ValueError(f"{f} holds a {type(state).__name__}, not a state dict of tensors")
            return state
    raise FileNotFoundError(f"{path}: no model.safetensors or pytorch_model.bin")


def _why_unreadable(e: Exception) -> str:
    # torch's unpickling error goes on with advice for code that calls torch.load, not for us
    if isinstance(e, pickle.UnpicklingError):
        return "it does not unpickle as a PyTorch file (UnpicklingError)"
    return f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"


# Parameters one dimension of which is one model key's value: (name, dimension, key)
SIZED_BY = (("embeddings.word.weight", 0, "vocab_size"), ("mlm_head.bias", 0, "vocab_size"),
            ("embeddings.position.weight", 0, "max_position_embeddings"),
            ("embeddings.token_type.weight", 0, "type_vocab_size"),
            ("region_embeddings.feat.weight", 1, "region_feat_dim"),
            ("region_embeddings.cls.weight", 1, "num_region_classes"),
            ("mrc_head.decoder.weight", 0, "num_region_classes"))


def sized_by_hint(ours: dict, own: dict, cfg) -> str:
    """Lines naming the model key behind a mismatch of SIZED_BY's parameters that differ in that
    dimension only, with the value the source was trained with."""
    hints = []
    for name, dim, key in SIZED_BY:
        a, b = ours.get(name), own.get(name)
        if a is None or b is None or a.dim() != b.dim() or a.shape == b.shape:
            continue
        if all(x == y for i, (x, y) in enumerate(zip(a.shape, b.shape)) if i != dim):
            hints.append(f"\n{name}: model.{key}={getattr(cfg, key)} here, {a.shape[dim]} in the source: set "
                         f"model.{key}={a.shape[dim]}")
    return "".join(hints)


def load_into(model, state: dict[str, torch.Tensor], source: str, strict_text: bool = True) -> list[str]:
    """Copy ``state`` (HF or our names) into ``model``; returns the parameter names left fresh.

    Shapes must match, except a token-type table that grew (VL-BERT's third segment): its
    first rows are copied and the new rows keep BERT initialisation.
    """
    from vltrain.model.transformer import named_pieces
    # Both sides under the blocks' piece names (layers.{i}.qkv.weight ...): an input that holds
    # the flat block parameters (a plain torch.save of state_dict()) is split by our config.
    ours = from_hf_state_dict(named_pieces(state, model.config))
    own = named_pieces(model.state_dict(), model.config)        # views: copying into them loads
    errors, loaded = [], set()
    # Which region embedding the source was trained with (VLP's has W_r, region_embeddings.feat;
    # VL-BERT's one projection of [appearance ; geometry]); a BERT checkpoint has none. Another
    # than the model's (a VL-BERT checkpoint into a debug recipe, whose model is VLP's) would
    # fail on a shape or, worse, leave the region embedding fresh: name the key instead.
    kind = ("vlp" if "region_embeddings.feat.weight" in ours else
            "vlbert" if "region_embeddings.proj.weight" in ours else None)
    if kind is not None and kind != model.config.region_embedding:
        raise ValueError(f"{source}: is a {'VL-BERT' if kind == 'vlbert' else 'VLP'} model (its region "
                         f"embedding) but the model is built with model.region_embedding="
                         f"{model.config.region_embedding}: set model.region_embedding={kind} and the rest of the "
                         f"model keys it was trained with (its recipe under configs/, or the source's saved config)")
    if any(n in ours for n in VISUAL_LN_PARAMS) and not any(n in own for n in VISUAL_LN_PARAMS):
        # the projection was trained under ReLU + LayerNorms this model would leave out
        raise ValueError(f"{source}: has VL-BERT's visual LayerNorms (region_embeddings.norm_*) but the model "
                         f"is built with model.vlbert_visual_embedding={model.config.vlbert_visual_embedding}: "
                         "leave that key at its default, vlbert")
    if AUX_PARAM in ours and AUX_PARAM not in own:    # (a linear or VLP model was refused above)
        # image rows are unaffected (VL-BERT's own fine-tuning models drop this embedding)
        log.warning("%s: has VL-BERT's visual term of text-only rows (%s) but the model is built with "
                    "model.vlbert_text_only_visual=none: text-only rows get no visual term (the key's "
                    "default, aux, keeps it)", source, AUX_PARAM)
    for name, t in ours.items():
        if name not in own:
            continue  # e.g. BERT's cls.predictions.decoder.* (tied), position_ids buffers, NSP head
        target = own[name]
        if t.shape == target.shape:
            target.copy_(t.to(target.dtype))
        elif name == "embeddings.token_type.weight" and t.shape[1:] == target.shape[1:] and t.shape[0] < target.shape[0]:
            target[: t.shape[0]].copy_(t.to(target.dtype))
        else:
            errors.append(f"{name}: checkpoint {tuple(t.shape)} vs model {tuple(target.shape)}")
            continue
        loaded.add(name)
    if errors:
        raise ValueError(f"{source}: parameter shapes do not match the model:\n  " + "\n  ".join(errors)
                         + sized_by_hint(ours, own, model.config) + vlbert_load_hint(errors, model.config))
    fresh = [n for n in own if n not in loaded]
    if "region_embeddings.proj.weight" in loaded and any(n in fresh for n in VISUAL_LN_PARAMS):
        # fresh LayerNorms (gain model.vlbert_visual_scale_init) would silently rescale or, at
        # gain 0, switch off the visual terms this checkpoint's projection was trained with
        raise ValueError(f"{source}: has VL-BERT's region projection but not its visual LayerNorms; "
                         + VISUAL_LN_HINT)
    if "region_embeddings.proj.weight" in loaded and AUX_PARAM in fresh:
        # a fresh aux term through the trained text LayerNorm would give text-only rows a
        # visual term this checkpoint never had
        raise ValueError(f"{source}: has VL-BERT's visual LayerNorms but not its visual term of text-only rows; "
                         + AUX_HINT)
    if strict_text:
        missing = [n for n in fresh if n.startswith(("embeddings.", "layers."))]
        if missing:
            raise ValueError(f"{source}: text encoder weights missing from the checkpoint: {missing[:8]}"
                             + (" ..." if len(missing) > 8 else ""))
    return fresh


def load_pretrained(cls, path: str, **overrides):
    cfg = read_model_config(path, **overrides)
    model = cls(cfg)
    with torch.no_grad():
        fresh = load_into(model, read_state_dict(path), source=path)
    if fresh:
        log.info("%s: %d tensors newly initialised (not in the checkpoint): %s", path, len(fresh),
                 ", ".join(sorted({n.split('.')[0] for n in fresh})))
    return model


def export_config_json(cfg: ModelConfig) -> dict:
    """config.json for an export: BERT's keys (for transformers) + the full ModelConfig."""
    d = dataclasses.asdict(cfg)
    out = {"model_type": "bert", "architectures": ["BertForMaskedLM"], "position_embedding_type": "absolute"}
    out.update({hf: d[ours] for hf, ours in _HF_CONFIG.items()})
    out["hidden_act"] = _HF_ACT.get(cfg.hidden_act, cfg.hidden_act)
    out["vltrain"] = d
    return out
