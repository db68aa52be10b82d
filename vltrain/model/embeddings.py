"""Text (BERT) and region (VLP, VL-BERT) embeddings.

Region embedders return the *feature* term only; the model adds the shared region
position, the image segment embedding and BERT's embedding LayerNorm to text and regions
alike, so both live in one space.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from vltrain.config import ModelConfig


class WordEmbedding(nn.Embedding):
    """Token embedding that also serves as the tied MLM decoder.

    The decoder goes through this module's ``__call__`` (``logits=True``) rather than
    reading ``.weight`` from elsewhere, so hooks that gather sharded parameters (ZeRO-3)
    fire for both uses, and the weight exists once in the state dict.
    """

    def forward(self, x: torch.Tensor, logits: bool = False) -> torch.Tensor:
        return F.linear(x, self.weight) if logits else super().forward(x)


class TextEmbeddings(nn.Module):
    """BERT's word + position + token-type embeddings (LayerNorm/dropout applied by the model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.word = WordEmbedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.position = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, input_ids, token_type_ids, position_ids) -> torch.Tensor:
        return self.word(input_ids) + self.position(position_ids) + self.token_type(token_type_ids)


def vlp_geometry(boxes: torch.Tensor, cls_probs: torch.Tensor | None, with_conf: bool) -> torch.Tensor:
    """VLP's G_i: normalised x1,y1,x2,y2, relative area, and (optionally) detector confidence.

    Confidence = the largest non-background class probability, which is what bottom-up
    attention's ``objects_conf`` holds, so it needs no extra input column.
    """
    area = (boxes[..., 2] - boxes[..., 0]).clamp(min=0) * (boxes[..., 3] - boxes[..., 1]).clamp(min=0)
    parts = [boxes, area[..., None]]
    if with_conf:
        parts.append(cls_probs[..., 1:].amax(-1, keepdim=True).to(boxes.dtype))
    return torch.cat(parts, dim=-1)


class VLPRegionEmbedding(nn.Module):
    """r = W_r R + W_p [LN(W_c C) | LN(W_g G)]  (Zhou et al. 2020, eq. 1).

    With ``use_cls_probs=false`` (feature files without class distributions) the class
    term is dropped: r = W_r R + W_p LN(W_g G).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h = cfg.hidden_size
        self.use_cls = cfg.use_cls_probs
        self.with_conf = cfg.geometry_conf
        geo_dim = 5 + int(cfg.geometry_conf)
        self.feat = nn.Linear(cfg.region_feat_dim, h)                      # W_r
        self.geo = nn.Linear(geo_dim, h)                                    # W_g
        self.geo_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        if self.use_cls:
            self.cls = nn.Linear(cfg.num_region_classes, h)                 # W_c
            self.cls_norm = nn.LayerNorm(h, eps=cfg.layer_norm_eps)
        self.proj = nn.Linear(h * (2 if self.use_cls else 1), h)            # W_p

    def forward(self, feats, boxes, cls_probs) -> torch.Tensor:
        if self.use_cls and cls_probs is None:
            raise ValueError("model.use_cls_probs=true needs region_cls_probs (the dataset's cls_prob "
                             "column); set model.use_cls_probs=false and model.geometry_conf=false "
                             "for features without class distributions")
        dtype = self.feat.weight.dtype
        g = self.geo_norm(self.geo(vlp_geometry(boxes.to(dtype), cls_probs, self.with_conf)))
        if self.use_cls:
            c = cls_probs.to(dtype)
            # A region whose distribution is all zero (masked for region classification, or
            # padding) has no class information: LN(W_c 0) = LN(bias) would be a constant
            # vector whose LayerNorm gradient is ~1/sqrt(eps), so its class term is dropped.
            known = (c.abs().sum(-1, keepdim=True) > 0).to(dtype)
            parts = [self.cls_norm(self.cls(c)) * known, g]
        else:
            parts = [g]
        return self.feat(feats.to(dtype)) + self.proj(torch.cat(parts, dim=-1))


def sincos_box_embedding(boxes: torch.Tensor, num_freqs: int, wave_len: float = 1000.0) -> torch.Tensor:
    """VL-BERT's geometry embedding: sin/cos of each (x1,y1,x2,y2) at ``num_freqs`` frequencies.

    As in VL-BERT's ``coordinate_embeddings`` (after relation networks), coordinates in [0,1]
    are scaled by 100 and divided by ``wave_len ** (i / num_freqs)``; each coordinate's sines
    then cosines, coordinate after coordinate. Returns (..., 4 * 2 * num_freqs).
    """
    freqs = wave_len ** (torch.arange(num_freqs, device=boxes.device, dtype=torch.float32) / num_freqs)
    x = (boxes.float() * 100.0)[..., None] / freqs                      # (..., 4, F)
    return torch.cat([x.sin(), x.cos()], dim=-1).flatten(-2).to(boxes.dtype)


class VLBertRegionEmbedding(nn.Module):
    """VL-BERT's visual feature embedding: ReLU(FC(dropout([appearance ; sin/cos geometry]))) (its
    code's ``obj_downsample``, dropout ``model.hidden_dropout``), then a LayerNorm per kind of
    token (its ``visual_ln_object`` / ``visual_ln_text``).

    The geometry is ``model.vlbert_geometry_dim`` wide: the paper's 2048 by default (its code's
    ``coordinate_embeddings(boxes, 256)``: 4 coordinates x sin/cos x 256 frequencies). The
    paper's text embeds the corners x1,y1,x2,y2, which we keep; its code embeds centre/size.
    ``forward`` is that embedding before the LayerNorms; a region token gets ``norm_region`` of
    its own plus the [IMG] token embedding (the model adds it), a text token ``text_term`` of
    the whole image's (full box [0,0,1,1], ``image_term``) or, for VCR's linked words, of its
    region's. The LayerNorms' gains start at ``model.vlbert_visual_scale_init`` (VL-BERT
    pretraining: 0, so that at the first step every input is pretrained BERT's).
    ``model.vlbert_visual_embedding=linear`` is FC only, without dropout, ReLU or LayerNorms:
    what vltrain's checkpoints written before had.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_freqs = cfg.vlbert_geometry_dim // 8
        self.proj = nn.Linear(cfg.region_feat_dim + cfg.vlbert_geometry_dim, cfg.hidden_size)
        self.vlbert = cfg.vlbert_visual_embedding == "vlbert"
        self.dropout = cfg.hidden_dropout if self.vlbert else 0.0
        ln = (lambda: nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)) if self.vlbert else nn.Identity
        self.norm_region, self.norm_text = ln(), ln()
        # VL-BERT's aux_text_visual_embedding: the text tokens' visual input where there is no
        # image (its text-only corpus); under model.vlbert_visual_embedding=linear there is none
        self.aux_text = nn.Embedding(1, cfg.hidden_size) \
            if self.vlbert and cfg.vlbert_text_only_visual == "aux" else None

    def forward(self, feats, boxes, cls_probs=None) -> torch.Tensor:
        """The visual embedding of (..., D) features at (..., 4) boxes, before the LayerNorms."""
        dtype = self.proj.weight.dtype
        # sin/cos of the float32 boxes: in bf16 a coordinate near 1 is off by ~0.002, i.e.
        # ~0.2 rad at the highest frequency (x100 scale)
        geo = sincos_box_embedding(boxes.float(), self.num_freqs).to(dtype)
        x = self.proj(F.dropout(torch.cat([feats.to(dtype), geo], dim=-1), self.dropout, self.training))
        return F.relu(x) if self.vlbert else x

    def image_term(self, image_feat: torch.Tensor) -> torch.Tensor:
        """(B, D) whole-image feature -> (B, H) projection, the text tokens' input to ``text_term``."""
        # built on the device: new_tensor([0, 0, 1, 1]) would copy from pageable host memory,
        # which on CUDA waits for the GPU at the start of every forward
        full_box = image_feat.new_zeros(image_feat.shape[0], 4)
        full_box[:, 2:] = 1.0
        return self.forward(image_feat, full_box)

    def text_term(self, projected: Optional[torch.Tensor], has_image: Optional[torch.Tensor],
                  batch: int) -> Optional[torch.Tensor]:
        """The visual term of text tokens, from ``image_term`` / ``forward`` outputs (B, 1 or T, H).
        Rows without an image (``has_image`` (B,) False; all ``batch`` rows when ``projected`` is
        None: then (B, 1, H)) take the aux embedding through the same LayerNorm, as VL-BERT's
        text-only samples do; without one (``vlbert_text_only_visual=none``, linear) they get
        zero, and a batch without images None. The aux embedding is called for image batches
        too, so that every training batch runs the same modules in the same order (ZeRO-3
        gathers each one as it runs). Both inputs meet in the parameters' dtype, so a row gets
        the same term in a mixed batch as in a text-only one (under autocast too)."""
        if projected is not None:
            has_image = has_image.view(-1, *[1] * (projected.dim() - 1))     # over (B, ..., H)
        if self.aux_text is None:
            if projected is None:
                return None
            return self.norm_text(projected) * has_image.to(projected.dtype)
        aux = self.aux_text(torch.zeros(1, dtype=torch.long, device=self.aux_text.weight.device))   # (1, H)
        if projected is None:
            return self.norm_text(aux.expand(batch, 1, -1))
        aux = aux.view(*[1] * (projected.dim() - 1), -1)
        return self.norm_text(torch.where(has_image, projected.to(aux.dtype), aux))

    def reset_visual_scale(self, gain: float) -> None:
        for norm in (self.norm_region, self.norm_text):
            if isinstance(norm, nn.LayerNorm):
                nn.init.constant_(norm.weight, gain)


VISUAL_LN_PARAMS = ("region_embeddings.norm_region.weight", "region_embeddings.norm_region.bias",
                    "region_embeddings.norm_text.weight", "region_embeddings.norm_text.bias")
VISUAL_LN_HINT = ("VL-BERT checkpoints written before vltrain had VL-BERT's visual embedding (ReLU and "
                  "LayerNorms region_embeddings.norm_region / norm_text) lack the LayerNorms: load them "
                  "with model.vlbert_visual_embedding=linear")


AUX_PARAM = "region_embeddings.aux_text.weight"
AUX_HINT = ("vltrain's VL-BERT checkpoints written before it had VL-BERT's visual term of text-only rows "
            "(region_embeddings.aux_text) lack it: load them with model.vlbert_text_only_visual=none")


def vlbert_load_hint(mismatches: list[str], cfg: ModelConfig) -> str:
    """Lines for load errors that older VL-BERT checkpoints cause, whose saved configs lack the
    key that would restore them (so reusing "the same model settings" would not): a 128-d
    geometry (before ``model.vlbert_geometry_dim``), no visual LayerNorms (before
    ``model.vlbert_visual_embedding``)."""
    if cfg.region_embedding != "vlbert":
        return ""
    hint = ""
    if any("region_embeddings.proj.weight" in m for m in mismatches):
        hint += (f"\nregion_embeddings.proj reads [appearance (model.region_feat_dim={cfg.region_feat_dim}) ; "
                 f"sin/cos geometry (model.vlbert_geometry_dim={cfg.vlbert_geometry_dim})]; VL-BERT checkpoints "
                 "written before that key existed have a 128-d geometry: load them with "
                 "model.vlbert_geometry_dim=128")
    only_model = [m for m in mismatches if m.startswith("in the model but not in the checkpoint")]
    if any("norm_region" in m for m in only_model):
        hint += "\n" + VISUAL_LN_HINT
    elif any("aux_text" in m for m in only_model):
        hint += "\n" + AUX_HINT
    return hint


def init_bert_(module: nn.Module, std: float) -> None:
    """BERT's initialisation: N(0, std) for linear/embedding weights, zero bias, unit LayerNorm."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, 0.0, std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, 0.0, std)
        if module.padding_idx is not None and not module.weight.is_meta:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

