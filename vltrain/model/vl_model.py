"""The unified vision-language transformer (VLP / VL-BERT), pure torch.

Sequence order inside the model: ``[CLS] r1..rN <input_ids[1:]>`` — regions are spliced in
right after [CLS], so VLP's ``[CLS] r1..rN [SEP] w1..wT [STOP]`` comes from
``input_ids = [CLS] [SEP] w1..wT [STOP]``, and a text-only input is exactly BERT's.
Text tokens keep positions 0..T-1 whatever the regions (so text-only equals BERT, plus, for
VL-BERT, its learned visual term of text-only rows);
all regions share one learned position (VL-BERT) and the image segment embedding.
VL-BERT's code adds two slots around the regions of a row with an image (``region_slots``):
the whole image as a region before them (``model.vlbert_image_box``) and ``[END]`` after them
(``model.vlbert_end_token``): ``[CLS] img r1..rN [END] <input_ids[1:]>``. Outputs never show
them: ``region_hidden`` and ``region_positions`` keep indexing r1..rN.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vltrain.config import ModelConfig
from vltrain.data.batch import MODE_LEFT_TO_RIGHT, MODE_NAMES, MODE_SEQ2SEQ
from vltrain.model.attention import AttentionStructure, get_backend
from vltrain.model.embeddings import TextEmbeddings, VLBertRegionEmbedding, VLPRegionEmbedding, init_bert_
from vltrain.model.heads import ClsScoreHead, MLMHead, RegionClassHead
from vltrain.model.packed_dropout import check_p
from vltrain.model.transformer import Block

REGION_EMBEDDINGS = {"vlp": VLPRegionEmbedding, "vlbert": VLBertRegionEmbedding}
# VL-BERT's code's sequence around the regions (region_slots): no parameter of their own
SEQUENCE_KEYS = ("vlbert_image_box", "vlbert_end_token")


@dataclass
class VLModelOutput:
    text_hidden: Optional[torch.Tensor]           # (B, T, H), aligned with input_ids
    region_hidden: Optional[torch.Tensor]         # (B, N, H) or None without regions
    # with text_positions / region_positions: the final states at those positions only
    # (and text_hidden = region_hidden = None)
    text_selected: Optional[torch.Tensor] = None  # (len(text_positions), H)
    region_selected: Optional[torch.Tensor] = None  # (len(region_positions), H)


def validate_model_config(cfg: ModelConfig) -> None:
    """Errors that name the key, raised before any parameter is allocated."""
    if cfg.region_embedding not in REGION_EMBEDDINGS:
        raise ValueError(f"model.region_embedding={cfg.region_embedding!r}; choose one of "
                         f"{sorted(REGION_EMBEDDINGS)}")
    if not 0 <= cfg.image_token_type < cfg.type_vocab_size:
        raise ValueError(f"model.image_token_type={cfg.image_token_type} needs model.type_vocab_size > "
                         f"{cfg.image_token_type} (is {cfg.type_vocab_size})")
    if cfg.vlbert_geometry_dim <= 0 or cfg.vlbert_geometry_dim % 8:
        raise ValueError(f"model.vlbert_geometry_dim={cfg.vlbert_geometry_dim} must be a positive multiple of 8 "
                         "(4 box coordinates x sin/cos x frequencies; VL-BERT uses 2048)")
    if cfg.vlbert_visual_embedding not in ("vlbert", "linear"):
        raise ValueError(f"model.vlbert_visual_embedding={cfg.vlbert_visual_embedding!r}; choose 'vlbert' "
                         "(VL-BERT's) or 'linear' (checkpoints written before vltrain had VL-BERT's)")
    if cfg.vlbert_text_only_visual not in ("aux", "none"):
        raise ValueError(f"model.vlbert_text_only_visual={cfg.vlbert_text_only_visual!r}; choose 'aux' "
                         "(VL-BERT's learned term) or 'none' (checkpoints written before vltrain had it)")
    for key in SEQUENCE_KEYS:
        if getattr(cfg, key) and cfg.region_embedding != "vlbert":
            raise ValueError(f"model.{key}=true is VL-BERT's sequence; it needs model.region_embedding=vlbert")
    if cfg.region_embedding == "vlp" and cfg.geometry_conf and not cfg.use_cls_probs:
        raise ValueError("model.geometry_conf=true derives confidence from class probabilities; "
                         "set it false when model.use_cls_probs=false")
    get_backend(cfg.attention_backend)
    if cfg.hidden_dropout_masks == "packed":
        check_p(cfg.hidden_dropout, "model.hidden_dropout")
    if cfg.attention_backend == "triton":       # its keep bits are drawn the same way
        check_p(cfg.attention_dropout, "model.attention_dropout")


def region_slots(cfg: ModelConfig) -> tuple[int, int]:
    """(before, after) the regions of a row with an image: VL-BERT's whole-image region, its [END]."""
    return int(cfg.vlbert_image_box), int(cfg.vlbert_end_token)


def region_key_valid(cfg: ModelConfig, region_mask: torch.Tensor) -> torch.Tensor:
    """(B, before + N + after): which region slots are keys. The whole-image region and [END]
    exist in rows with an image only (a text-only row of a mixed batch has neither)."""
    before, after = region_slots(cfg)
    if not before + after:
        return region_mask
    has_image = region_mask.any(dim=1, keepdim=True)
    return torch.cat([has_image] * before + [region_mask] + [has_image] * after, dim=1)


def mode_tensor(mode: Union[str, int, torch.Tensor], batch: int, device) -> torch.Tensor:
    """Per-example mode ids (B,) from a name, an id, or a tensor."""
    if isinstance(mode, str):
        if mode not in MODE_NAMES:
            raise ValueError(f"mode={mode!r}; choose one of {sorted(MODE_NAMES)} or a (B,) tensor")
        mode = MODE_NAMES[mode]
    if isinstance(mode, int):
        return torch.full((batch,), mode, dtype=torch.long, device=device)
    if mode.shape != (batch,):
        raise ValueError(f"mode tensor must have shape ({batch},), got {tuple(mode.shape)}")
    if mode.device.type == "cpu":  # checked on the host only: on GPU it would sync every step
        bad = ~torch.isin(mode, torch.tensor(list(MODE_NAMES.values())))
        if bad.any():
            raise ValueError(f"unknown mode ids {mode[bad].tolist()}; valid: {MODE_NAMES}")
    return mode.to(device, non_blocking=True)


class RecordKV:
    """An attention backend that appends each call's keys and values to a list, then attends."""

    def __init__(self, backend, out: list):
        self.backend, self.out = backend, out

    def attend(self, q, k, v, mask, p):
        self.out.append((k, v))
        return self.backend.attend(q, k, v, mask, p)


class VLModel(nn.Module):
    """One shared transformer over image regions and text; heads for pretraining objectives."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        validate_model_config(config)
        self.config = config
        h = config.hidden_size
        self.embeddings = TextEmbeddings(config)
        self.region_embeddings = REGION_EMBEDDINGS[config.region_embedding](config)
        self.region_position = nn.Parameter(torch.empty(h))
        self.layers = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.mlm_head = MLMHead(config)
        self.mrc_head = RegionClassHead(config)
        self.cls_head = ClsScoreHead(config)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.initializer_range
        self.apply(lambda m: init_bert_(m, std))
        nn.init.normal_(self.region_position, 0.0, std)
        nn.init.zeros_(self.mlm_head.bias)
        for layer in self.layers:
            layer.reset_parameters(std)
        if self.config.region_embedding == "vlbert":
            self.region_embeddings.reset_visual_scale(self.config.vlbert_visual_scale_init)

    @classmethod
    def from_pretrained(cls, path: str, **overrides) -> "VLModel":
        """Load a Hugging Face BERT folder (text weights; the rest fresh) or our exported folder."""
        from vltrain.model.bert_weights import load_pretrained
        return load_pretrained(cls, path, **overrides)

    # ------------------------------------------------------------------ forward pieces

    def _embed_regions(self, region_feats, region_boxes, region_cls_probs, region_ids=None, image_proj=None):
        """(region slot inputs (B, before + N + after, H), the regions' visual feature embeddings
        (B, N, H)). VL-BERT adds each region's word embedding: ``region_ids`` (B, N), else
        ``[IMG]``'s; and, with ``region_slots``, the whole-image region (``image_proj`` (B, 1, H),
        ``_image_term``'s projection: the feature and box text tokens see, an ``[IMG]`` word) and
        ``[END]`` (its word embedding alone, as VL-BERT's code gives it no visual term). The
        slots reuse the calls a plain region block makes, one each, so that ZeRO-3 gathers the
        same modules in the same order either way."""
        cfg = self.config
        B, N, _ = region_feats.shape
        if region_boxes is None:
            raise ValueError("region_boxes is required when region_feats is given")
        visual = x = self.region_embeddings(region_feats, region_boxes, region_cls_probs)
        before, after = region_slots(cfg)
        if cfg.region_embedding == "vlbert":
            if region_ids is None:
                region_ids = torch.full((B, N), cfg.img_token_id, dtype=torch.long, device=x.device)
            if before:
                x = torch.cat([image_proj.to(x.dtype).expand(B, 1, -1), x], dim=1)
                region_ids = torch.cat([torch.full_like(region_ids[:, :1], cfg.img_token_id), region_ids], dim=1)
            x = self.region_embeddings.norm_region(x)
            if after:
                x = torch.cat([x, x.new_zeros(B, 1, x.shape[-1])], dim=1)
                region_ids = torch.cat([region_ids, torch.full_like(region_ids[:, :1], cfg.end_token_id)], dim=1)
            x = x + self.embeddings.word(region_ids)
        types = torch.full(x.shape[:2], cfg.image_token_type, dtype=torch.long, device=x.device)
        return x + self.embeddings.token_type(types) + self.region_position, visual

    def _image_term(self, region_feats, region_mask, image_feat):
        """VL-BERT: whole-image visual projection for text tokens (B, 1, H), before ``_text_visual``;
        None otherwise.

        Uses the dataset's whole-image feature when given, else the mean of the real region
        features.
        """
        if self.config.region_embedding != "vlbert" or region_feats is None:
            return None
        if image_feat is None:
            m = region_mask[..., None].to(region_feats.dtype)
            image_feat = (region_feats * m).sum(1) / m.sum(1).clamp(min=1)
        return self.region_embeddings.image_term(image_feat.to(self.region_position.dtype))[:, None, :]

    def _text_visual(self, projected, has_image, batch: int):
        """VL-BERT's visual term of text tokens (B, 1 or T, H) from their projections; rows
        without an image (``has_image`` False; every row when ``projected`` is None, a
        text-only batch) get the learned aux term, or zero (None for a whole text-only batch)
        with ``model.vlbert_text_only_visual=none``."""
        return self.region_embeddings.text_term(projected, has_image, batch)

    def _text_only_term(self, batch: int):
        """The visual term (B, 1, H) of a batch without images: VL-BERT's aux term, else None."""
        return self._text_visual(None, None, batch) if self.config.region_embedding == "vlbert" else None

    def _region_anchor(self, like: torch.Tensor) -> torch.Tensor:
        """A zero that depends on every region-embedding parameter, for a training batch with no
        regions (VL-BERT's text-only samples). Another data-parallel rank's batch has regions:
        ZeRO's reduce buckets and DDP's all-reduce need the same parameters to get gradients
        on every rank, or the first reduction fails (sizes differ between ranks). Under ZeRO-3
        the modules must also run in the same order as for an image batch (each call gathers
        its parameters collectively), hence the calls ``forward`` makes for an image batch;
        the text tokens' visual term only where ``forward`` does not compute it for a
        text-only batch (no aux term)."""
        cfg = self.config
        feats, mask = like.new_zeros(1, 1, cfg.region_feat_dim), torch.ones(1, 1, dtype=torch.bool, device=like.device)
        term = self._image_term(feats, mask, None)
        regions, _ = self._embed_regions(feats, like.new_zeros(1, 1, 4), like.new_zeros(1, 1, cfg.num_region_classes),
                                         image_proj=term)
        zero = regions.sum() + (term.sum() if term is not None else 0.0)
        if term is not None and self.region_embeddings.aux_text is None:
            zero = zero + self._text_visual(term, mask.any(1), 1).sum()
        return 0.0 * zero

    def forward(self, input_ids, token_type_ids=None, attention_mask=None,
                region_feats=None, region_boxes=None, region_cls_probs=None, region_mask=None,
                mode: Union[str, int, torch.Tensor] = "bidirectional", image_feat=None,
                record_kv: Optional[list] = None, text_positions: Optional[torch.Tensor] = None,
                region_positions: Optional[torch.Tensor] = None,
                text_regions: Optional[torch.Tensor] = None,
                region_ids: Optional[torch.Tensor] = None) -> VLModelOutput:
        """``record_kv``: a list to which every layer's attention keys and values (B, h, L, d)
        are appended, for the decoding KV cache; the blocks then run eagerly (the compiled
        function is traced for training's backends only).

        ``text_positions`` (flat indices into B x T, as ``Batch.mlm_positions``) and/or
        ``region_positions`` (into B x N, as ``Batch.mrc_positions``): return the final states
        at those positions only (``text_selected``, ``region_selected``). The last block then
        computes its attention output and FFN only there (attention itself everywhere):
        MLM/MRC losses read ~15% of the tokens, so this skips most of one block's work.

        ``text_regions`` (B, T), VL-BERT only: for each text token the region whose visual
        feature embedding it gets instead of the whole image's (-1: the whole image), as
        VL-BERT links VCR's object references to their regions.

        ``region_ids`` (B, N), VL-BERT only: the word id whose embedding each region gets
        (default ``[IMG]``; masked region classification gives its zeroed regions ``[MASK]``)."""
        B, T = input_ids.shape
        dev = input_ids.device
        if text_regions is not None and self.config.region_embedding != "vlbert":
            raise ValueError("text_regions (object references linked to regions) needs "
                             "model.region_embedding=vlbert: VLP's text tokens have no visual feature")
        if region_ids is not None and self.config.region_embedding != "vlbert":
            raise ValueError("region_ids (a word embedding per region) needs model.region_embedding=vlbert: "
                             "VLP's regions have no word embedding")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        text_valid = attention_mask.bool()
        modes = mode_tensor(mode, B, dev)

        pos = torch.arange(T, device=dev).expand(B, T)
        text = self.embeddings(input_ids, token_type_ids, pos)
        if region_feats is not None and region_feats.shape[1] == 0:
            region_feats = None
        image_term = None
        if region_feats is not None:
            N = region_feats.shape[1]
            if region_mask is None:
                region_mask = torch.ones(B, N, dtype=torch.bool, device=dev)
            region_mask = region_mask.bool()
            image_term = self._image_term(region_feats, region_mask, image_feat)
            if region_ids is not None and region_ids.shape != (B, N):
                raise ValueError(f"region_ids has shape {tuple(region_ids.shape)}, the regions ({B}, {N})")
            regions, visual = self._embed_regions(region_feats, region_boxes, region_cls_probs, region_ids, image_term)
            if image_term is not None and text_regions is not None:
                linked = text_regions >= 0
                idx = text_regions.clamp(0, N - 1)[..., None].expand(B, T, visual.shape[-1])
                image_term = torch.where(linked[..., None], visual.gather(1, idx), image_term)
        else:
            N = 0
            if self.training and torch.is_grad_enabled():
                text = text + self._region_anchor(text)
        if image_term is not None:
            text = text + self._text_visual(image_term, region_mask.any(dim=1), B)
        elif (aux := self._text_only_term(B)) is not None:
            text = text + aux

        # Causal targets: seq2seq -> text tokens of segment 1; left-to-right -> all text after [CLS].
        is_s2s = (modes == MODE_SEQ2SEQ)[:, None]
        is_l2r = (modes == MODE_LEFT_TO_RIGHT)[:, None]
        after_cls = torch.arange(T, device=dev)[None, :] >= 1
        text_target = text_valid & ((is_s2s & (token_type_ids == 1)) | (is_l2r & after_cls))

        if N:
            slots = region_key_valid(self.config, region_mask)
            x = torch.cat([text[:, :1], regions, text[:, 1:]], dim=1)
            key_valid = torch.cat([text_valid[:, :1], slots, text_valid[:, 1:]], dim=1)
            target = torch.cat([text_target[:, :1], torch.zeros_like(slots), text_target[:, 1:]], dim=1)
        else:
            x, key_valid, target = text, text_valid, text_target
        x = F.dropout(self.embeddings.norm(x), self.config.hidden_dropout, self.training)

        backend = get_backend(self.config.attention_backend)
        structure = AttentionStructure(key_valid=key_valid, target=target)
        prepared = backend.prepare(structure, x.dtype)
        select = text_positions is not None or region_positions is not None
        eager = record_kv is not None
        if eager:
            backend = RecordKV(backend, record_kv)
        # not with record_kv: a recomputation in the backward would record the layers again
        ckpt = self.config.activation_checkpointing and self.training and not eager

        def run(layer, x, rows=None):
            if ckpt:
                return checkpoint(layer, x, prepared, backend, rows, eager, use_reentrant=False)
            return layer(x, prepared, backend, rows, eager)

        for layer in (self.layers[:-1] if select else self.layers):
            x = run(layer, x)
        if select:
            b_idx, q_idx, n_text = self._joint_rows(T, N, text_positions, region_positions, dev)
            y = run(self.layers[-1], x, (b_idx, q_idx))
            return VLModelOutput(text_hidden=None, region_hidden=None, text_selected=y[:n_text],
                                 region_selected=y[n_text:] if N else None)

        if N:
            before = 1 + region_slots(self.config)[0]        # [CLS] and the whole-image region
            text_hidden = torch.cat([x[:, :1], x[:, 1 + regions.shape[1]:]], dim=1)
            region_hidden = x[:, before:before + N]
        else:
            text_hidden, region_hidden = x, None
        return VLModelOutput(text_hidden=text_hidden, region_hidden=region_hidden)

    def _joint_rows(self, T: int, N: int, text_positions, region_positions, dev):
        """(example, position in [CLS] <slots> r1..rN <slots> <text[1:]>) of the selected text
        then region positions, and how many of them are text."""
        before, after = region_slots(self.config) if N else (0, 0)
        b, q = [], []
        if text_positions is not None:
            t = text_positions % T
            b.append(text_positions // T)
            q.append(torch.where(t == 0, t, t + before + N + after))
        if region_positions is not None and N:
            b.append(region_positions // N)
            q.append(1 + before + region_positions % N)
        n_text = 0 if text_positions is None else text_positions.numel()
        if not b:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            return empty, empty, 0
        return torch.cat(b).to(dev), torch.cat(q).to(dev), n_text

    # ------------------------------------------------------------------ heads

    def mlm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits for gathered (M, H) hidden states (masked positions only)."""
        return self.mlm_head(hidden, self.embeddings.word)
