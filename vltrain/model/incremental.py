"""Key/value-cached incremental forward of ``VLModel`` for seq2seq decoding.

Decoding (VLP) grows ``[CLS] r1..rN [SEP] w1 .. w_t [MASK]``: each step predicts the word at
[MASK], replaces the [MASK] by it and appends a new [MASK]. In seq2seq mode the prefix
(``[CLS]``, regions, ``[SEP]``) never sees a target token and each target sees only the
prefix and the targets before it, so the keys/values of everything already fixed never
change. This module caches them and, per step, runs the layers on the new positions only
(the [MASK] just replaced by its word, and the new [MASK]); the [MASK]'s own key/value is
never cached, because the next step replaces that token.

* ``encode_prefix`` runs the model's own forward over the prefix once per image and keeps
  every layer's keys/values as its attention received them (``VLModel.forward(record_kv=)``),
  with the model's attention backend, run eagerly.
* ``extend`` runs new target tokens through the same blocks (``Block.__call__``, so ZeRO-3
  gathers their weights as in training) with :class:`CachedAttention` as the attention:
  eager attention over [prefix | generated | new] keys. The prefix is stored once per image
  and shared by its beams (broadcast in the score product), so beam reordering copies only
  the few generated positions, never the ~100 regions.

Everything is functional (no in-place writes into cache buffers), so ``extend`` can run
under autograd (self-critical training samples with it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from vltrain.data.batch import MODE_SEQ2SEQ
from vltrain.model.vl_model import region_key_valid


@dataclass
class PrefixCache:
    """Per-layer keys/values of the prefix, one row per image."""
    keys: list[torch.Tensor]          # per layer (B, h, P, d)
    values: list[torch.Tensor]        # per layer (B, h, P, d)
    bias: torch.Tensor                # (B, 1, 1, 1, P) additive: 0 valid key, dtype min padding
    image_term: Optional[torch.Tensor]  # (B, 1, H) VL-BERT visual term of text tokens, or None
    text_len: int                     # text positions the prefix uses ([CLS] [SEP] -> 2)

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


@dataclass
class GenCache:
    """Per-layer keys/values of the generated (committed) target tokens, one row per hypothesis."""
    keys: list[torch.Tensor]          # per layer (M, h, t, d)
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def reorder(self, index: torch.Tensor) -> "GenCache":
        """Rows ``index`` (beam search: each new beam continues an old one)."""
        return GenCache([k.index_select(0, index) for k in self.keys],
                        [v.index_select(0, index) for v in self.values])

    @staticmethod
    def empty(prefix: PrefixCache, rows: int) -> "GenCache":
        k0 = prefix.keys[0]
        shape = (rows, k0.shape[1], 0, k0.shape[3])
        return GenCache([k0.new_zeros(shape) for _ in prefix.keys], [k0.new_zeros(shape) for _ in prefix.keys])


def encode_prefix(model, input_ids, token_type_ids=None, attention_mask=None, region_feats=None,
                  region_boxes=None, region_cls_probs=None, region_mask=None, image_feat=None) -> PrefixCache:
    """Run the model's forward over the prefix (e.g. ``[CLS] [SEP]`` + regions) and keep every
    layer's keys/values. The prefix runs in seq2seq mode, so a prefix holding target tokens
    (token type 1) is cached exactly as the full forward computes it too."""
    B, T = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    kv: list[tuple[torch.Tensor, torch.Tensor]] = []
    model(input_ids, token_type_ids, attention_mask, region_feats=region_feats,
          region_boxes=region_boxes, region_cls_probs=region_cls_probs, region_mask=region_mask,
          mode=MODE_SEQ2SEQ, image_feat=image_feat, record_kv=kv)
    keys, values = [k for k, _ in kv], [v for _, v in kv]
    valid = attention_mask.bool()
    if region_feats is not None and region_feats.shape[1] > 0:
        N = region_feats.shape[1]
        rmask = region_mask.bool() if region_mask is not None else \
            torch.ones(B, N, dtype=torch.bool, device=input_ids.device)
        valid = torch.cat([valid[:, :1], region_key_valid(model.config, rmask), valid[:, 1:]], dim=1)
        image_term = model._image_term(region_feats, rmask, image_feat)
        if image_term is not None:
            image_term = model._text_visual(image_term, rmask.any(dim=1), B)
    else:       # VL-BERT: the aux term of a text-only batch, as the model's forward adds it
        image_term = model._text_only_term(B)
    dtype = keys[0].dtype
    bias = torch.zeros(valid.shape, dtype=dtype, device=valid.device)
    bias.masked_fill_(~valid, torch.finfo(dtype).min)
    return PrefixCache(keys, values, bias[:, None, None, None, :], image_term, T)


class CachedAttention:
    """The attention of one block on new positions (M, s): over the prefix's cached keys
    (shared by each image's ``beam`` rows), the generated ones and the new ones, the new ones
    causally. After the call ``keys`` / ``values`` hold the generated + new keys/values."""

    def __init__(self, pk, pv, pbias, gk, gv, beam: int):
        self.pk, self.pv, self.pbias, self.keys, self.values, self.beam = pk, pv, pbias, gk, gv, beam

    def attend(self, q, k, v, mask, p_attn: float) -> torch.Tensor:
        M, h, s, d = q.shape
        B = M // self.beam
        gk = self.keys = torch.cat([self.keys, k], dim=2)                        # (M, h, t+s, d)
        gv = self.values = torch.cat([self.values, v], dim=2)
        scale = d ** -0.5
        pk, pv = self.pk, self.pv
        P = pk.shape[2]
        # Prefix keys are shared by the beams of an image: (B, K, h, s, d) x (B, 1, h, d, P).
        sp = torch.matmul(q.view(B, self.beam, h, s, d), pk[:, None].transpose(-1, -2)) * scale
        sp = (sp + self.pbias).reshape(M, h, s, P)
        sg = torch.matmul(q, gk.transpose(-1, -2)) * scale                        # (M, h, s, t+s)
        t = gk.shape[2] - s
        if s > 1:   # new token j (absolute t+j) sees generated keys <= t+j
            idx = torch.arange(t + s, device=q.device)
            future = idx[None, :] > (t + torch.arange(s, device=q.device))[:, None]
            sg = sg.masked_fill(future, torch.finfo(sg.dtype).min)
        probs = torch.softmax(torch.cat([sp, sg], dim=-1).float(), dim=-1).to(q.dtype)
        if p_attn > 0:
            probs = F.dropout(probs, p=p_attn)
        out = torch.matmul(probs[..., :P].reshape(B, self.beam, h, s, P), pv[:, None]).reshape(M, h, s, d)
        return out + torch.matmul(probs[..., P:], gv)


def extend(model, prefix: PrefixCache, gen: GenCache, input_ids: torch.Tensor, commit: int,
           token_type: int = 1) -> tuple[torch.Tensor, GenCache]:
    """Hidden states (M, s, H) of ``s`` new target tokens ``input_ids`` (M, s) appended after
    the ``gen.length`` cached ones; M = images x beams (rows image-major). The first
    ``commit`` new tokens' keys/values are kept in the returned cache (the rest, e.g. the
    trailing [MASK], are dropped)."""
    M, s = input_ids.shape
    B = prefix.batch_size
    if M % B:
        raise ValueError(f"{M} hypothesis rows are not a multiple of {B} images")
    beam = M // B
    t = gen.length
    pos = torch.arange(prefix.text_len + t, prefix.text_len + t + s, device=input_ids.device).expand(M, s)
    x = model.embeddings(input_ids, torch.full_like(input_ids, token_type), pos)
    if prefix.image_term is not None:
        x = x + prefix.image_term.repeat_interleave(beam, dim=0)
    x = F.dropout(model.embeddings.norm(x), model.config.hidden_dropout, model.training)
    keys, values = [], []
    for i, layer in enumerate(model.layers):
        att = CachedAttention(prefix.keys[i], prefix.values[i], prefix.bias, gen.keys[i], gen.values[i], beam)
        x = layer(x, None, att, eager=True)
        keys.append(att.keys[:, :, :t + commit])
        values.append(att.values[:, :, :t + commit])
    return x, GenCache(keys, values)
