"""Weights out of a checkpoint: one consolidated safetensors file, or a Hugging Face-style folder.

consolidate  OUT.safetensors  full fp32 weights, VLModel names (``model.`` stripped), metadata
                              (step, source, model config); beside it ``config.json`` (the model
                              config as an export has it) and ``<OUT stem>.yaml`` (the resolved
                              training config). Named ``model.safetensors``, its folder is what
                              ``VLModel.from_pretrained`` loads.
export-hf    OUT_DIR/         config.json (BERT keys + a ``vltrain`` section), model.safetensors
                              (text encoder under BERT's names, ``bert.``-prefixed, MLM head as
                              ``cls.predictions.*``, so ``transformers.BertModel`` and
                              ``BertForMaskedLM`` load them; everything else under ours), the tokenizer files
                              (vocab.txt, tokenizer_config.json, ...), vltrain_config.yaml, README.md

Both store the MLM decoder once (it *is* the word-embedding matrix in our model and
``cls.predictions.decoder`` is tied to ``word_embeddings`` in BERT's), so loading re-ties it.
"""
from __future__ import annotations

import json
import os
import shutil

from vltrain.config import save_config
from vltrain.engine import checkpoint as ckpt
from vltrain.ckpt.layout import CheckpointError, read_config, staged_dir, staged_files
from vltrain.ckpt.weights import model_state_dict, precision_note


def config_and_weights(found: ckpt.Found, verbose: bool = False):
    """(config, weights, note) of a checkpoint, the config describing the weights. A VL-BERT
    checkpoint from before the visual LayerNorms has a config.yaml without
    ``model.vlbert_visual_embedding`` (so it reads as the default, vlbert) and the FC-only
    embedding's weights: its export says ``linear``; one from before the aux term of text-only
    rows, likewise, ``model.vlbert_text_only_visual: none``. So the export loads as trained
    instead of being refused for what its weights lack."""
    from vltrain.model.embeddings import AUX_PARAM, VISUAL_LN_PARAMS
    cfg, state = read_config(found), model_state_dict(found, verbose)
    notes = [precision_note(found)]
    m = cfg.model
    if m.region_embedding == "vlbert" and m.vlbert_visual_embedding == "vlbert" and "region_embeddings.proj.weight" in state:
        if not any(n in state for n in VISUAL_LN_PARAMS):
            m.vlbert_visual_embedding = "linear"
            notes.append("VL-BERT weights without the visual LayerNorms (a checkpoint from before them): "
                         "exported with model.vlbert_visual_embedding=linear, which loads them as trained")
        elif m.vlbert_text_only_visual == "aux" and AUX_PARAM not in state:
            m.vlbert_text_only_visual = "none"
            notes.append("VL-BERT weights without the aux term of text-only rows (a checkpoint from before it): "
                         "exported with model.vlbert_text_only_visual=none, which loads them as trained")
    return cfg, state, "; ".join(n for n in notes if n) or None


def written_step(path: str):
    """The training step a consolidated or exported safetensors file was written from (its
    ``vltrain_step`` metadata; an export-hf folder: its model.safetensors); None for other
    weights (a BERT folder, a .pt file) or where it is not written."""
    if os.path.isdir(path):
        path = os.path.join(path, "model.safetensors")
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return None
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return int((f.metadata() or {}).get("vltrain_step"))
    except (OSError, SafetensorError, TypeError, ValueError):   # unreadable, no step, "None"
        return None


def _metadata(found: ckpt.Found, cfg) -> dict[str, str]:
    import dataclasses
    return {"format": "pt", "vltrain_step": str(found.info.get("step")), "vltrain_source": found.path,
            "vltrain_model_config": json.dumps(dataclasses.asdict(cfg.model)),
            "vltrain_tied": "mlm decoder = embeddings.word.weight (stored once)"}


EXPORT_CONFIG = "vltrain_config.yaml"     # an export-hf folder's complete training config


def sidecar_paths(out_file: str) -> tuple[str, str]:
    """(config.json, <stem>.yaml) written beside a consolidated file."""
    folder = os.path.dirname(os.path.abspath(out_file))
    stem = os.path.basename(out_file)
    stem = stem[: -len(".safetensors")] if stem.endswith(".safetensors") else stem
    return os.path.join(folder, "config.json"), os.path.join(folder, stem + ".yaml")


def consolidate(found: ckpt.Found, out_file: str, *, overwrite: bool = False, verbose: bool = False) -> dict:
    """Write the checkpoint's full fp32 weights to ``out_file`` (+ configs beside it)."""
    from safetensors.torch import save_file
    from vltrain.model.bert_weights import export_config_json

    cfg, state, note = config_and_weights(found, verbose)
    cfg_json, cfg_yaml = sidecar_paths(out_file)
    json_text = json.dumps(export_config_json(cfg.model), indent=2)
    # config.json is shared by every file in the folder: an identical one is left as it is
    same_json = os.path.isfile(cfg_json) and open(cfg_json).read() == json_text
    if os.path.lexists(cfg_json) and not same_json and not overwrite:
        raise CheckpointError(
            f"{cfg_json} describes another model (its config differs from this checkpoint's), and a folder "
            f"has one config.json for all its weight files: write {os.path.basename(out_file)} to a folder of "
            "its own, or pass --overwrite to replace that config.json")
    paths = [out_file, cfg_yaml] + ([] if same_json else [cfg_json])
    with staged_files(paths, overwrite) as tmps:
        save_file(state, tmps[0], metadata=_metadata(found, cfg))
        save_config(cfg, tmps[1])
        if not same_json:
            with open(tmps[2], "w") as f:
                f.write(json_text)
    return {"file": os.path.abspath(out_file), "config_json": cfg_json, "config_yaml": cfg_yaml,
            "tensors": len(state), "parameters": int(sum(t.numel() for t in state.values())), "note": note}


_README = """# {name}

Weights exported by `vltrain-ckpt export-hf` from the vltrain checkpoint
`{source}` (step {step}): a unified vision-language transformer ({kind} region embeddings,
{layers} layers, hidden size {hidden}), full fp32.

- `config.json`: BERT's keys (so `transformers` reads it) plus a `vltrain` section with the full
  model config; `vltrain_config.yaml` is the complete training config of the run.
- `model.safetensors`: the text encoder under BERT's names (`bert.embeddings.*`,
  `bert.encoder.layer.*`, `bert.pooler.*`, `cls.predictions.*`), the region embeddings and other
  heads under vltrain's names.
  The MLM decoder is tied to the word embeddings and stored once.
- `vocab.txt` and tokenizer files: the WordPiece tokenizer the model was trained with.

Load it:

```python
from vltrain.model import VLModel
model = VLModel.from_pretrained("{out}")            # everything, for fine-tuning / inference

from transformers import BertForMaskedLM, BertModel, BertTokenizerFast
bert = BertModel.from_pretrained("{out}")           # the text encoder only (text-only inputs; VL-BERT
                                                    # adds a learned visual term to those, not in BERT)
mlm = BertForMaskedLM.from_pretrained("{out}")      # the text encoder and its MLM head
tok = BertTokenizerFast.from_pretrained("{out}")
```

Fine-tune with vltrain: `train.init_from={out} data.vocab={out}`.
"""


def export_hf(found: ckpt.Found, out_dir: str, *, overwrite: bool = False, verbose: bool = False) -> dict:
    """Write a Hugging Face-style folder for ``found`` to ``out_dir``."""
    from safetensors.torch import save_file
    from vltrain.model.bert_weights import export_config_json, to_hf_state_dict
    from vltrain.tokenization import Tokenizer

    cfg, state, note = config_and_weights(found, verbose)
    tok = Tokenizer(cfg.data.vocab, cfg.data.casing)
    state = to_hf_state_dict(state)
    out_abs = os.path.abspath(out_dir)
    with staged_dir(out_dir, overwrite) as tmp:
        # truncation=True in transformers then stops at the model's positions (unset: ~1e30, no cap)
        tok.hf.model_max_length = cfg.model.max_position_embeddings
        tok.hf.save_pretrained(tmp)                    # vocab.txt, tokenizer_config.json, tokenizer.json, ...
        shutil.copyfile(tok.vocab_file, os.path.join(tmp, "vocab.txt"))   # byte-identical to training's
        save_file(state, os.path.join(tmp, "model.safetensors"), metadata=_metadata(found, cfg))
        config = export_config_json(cfg.model)
        config["vltrain_step"] = found.info.get("step")
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        save_config(cfg, os.path.join(tmp, EXPORT_CONFIG))
        m = cfg.model
        with open(os.path.join(tmp, "README.md"), "w") as f:
            f.write(_README.format(name=os.path.basename(out_abs), source=found.path, step=found.info.get("step"),
                                   kind=m.region_embedding, layers=m.num_layers, hidden=m.hidden_size, out=out_abs))
    if m.region_embedding == "vlbert" and m.vlbert_text_only_visual != "none":
        # BertModel loads it without a word: say here what the export's README says
        note = "; ".join(n for n in (note, "a VL-BERT model adds a learned visual term to text-only rows, which "
                                     "BertModel lacks: its hidden states differ from vltrain's (README.md)") if n)
    return {"dir": out_abs, "tensors": len(state), "parameters": int(sum(t.numel() for t in state.values())),
            "note": note}
