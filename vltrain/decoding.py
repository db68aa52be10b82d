"""Caption decoding for the seq2seq mode: greedy, beam search and sampling, batched.

VLP's procedure: the text starts as ``[CLS] [SEP] [MASK]`` (regions spliced in after
[CLS] by the model; the [MASK] is a target, token type 1); the model predicts the word at
the [MASK], the [MASK] is replaced by it and a new [MASK] is appended, until ``[STOP]``
(= [SEP]) is predicted or ``max_len`` words are out.

``use_cache=True`` runs each step on the new positions only (``vltrain.model.incremental``:
the word that replaced the [MASK] and the new [MASK]) over cached keys/values;
``use_cache=False`` re-runs the model's full forward on the whole sequence every step (the
reference the cached path is tested against; both give the same tokens).

Constraints, applied to the log-probabilities of every step (the probabilities themselves
are never renormalised, so scores are the model's log-likelihoods):
  * special tokens other than [STOP] ([CLS], [MASK], [PAD], [UNK], [IMG], [END]) and BERT's
    reserved ``[unusedK]`` slots are never produced;
  * ``min_len``: [STOP] is forbidden before ``min_len`` words;
  * ``no_repeat_ngram`` = n > 0: no n-gram of words occurs twice (fairseq's rule).
Beam search ranks finished hypotheses by ``log P / lp`` with GNMT's length penalty
``lp = ((5 + |Y|) / 6) ** length_penalty`` (|Y| = words + [STOP]); ``length_penalty=0``
is plain log-likelihood, and then ``beam_size=1`` is exactly greedy decoding.
"""
from __future__ import annotations

import re

import contextlib
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from vltrain.data.batch import MODE_SEQ2SEQ
from vltrain.model.incremental import GenCache, encode_prefix, extend

NEG_INF = float("-inf")


@dataclass(frozen=True)
class DecodeTokens:
    """Token ids decoding needs."""
    cls_id: int
    sep_id: int
    stop_id: int
    mask_id: int
    pad_id: int
    forbidden: tuple[int, ...] = ()

    @classmethod
    def from_tokenizer(cls, tok) -> "DecodeTokens":
        # BERT's reserved [unusedK] slots never appear in text: a caption must not spell one
        reserved = {i for t, i in tok.hf.get_vocab().items() if re.fullmatch(r"\[unused\d+\]", t)}
        forbidden = tuple(sorted((set(tok.special_ids) | reserved) - {tok.stop_id}))
        return cls(tok.cls_id, tok.sep_id, tok.stop_id, tok.mask_id, tok.pad_id, forbidden)


@dataclass
class DecodeOptions:
    """How to decode (``task.*`` fields of the caption recipe map onto these)."""
    beam_size: int = 1
    max_len: int = 20                 # most words per caption ([STOP] not counted)
    min_len: int = 0                  # fewest words before [STOP] may be produced
    length_penalty: float = 0.0       # GNMT alpha (beam search only)
    no_repeat_ngram: int = 0          # 0 = off; n = no repeated n-gram
    use_cache: bool = True

    def check(self) -> None:
        if self.beam_size < 1:
            raise ValueError(f"beam_size must be >= 1, got {self.beam_size}")
        if self.max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {self.max_len}")
        if not 0 <= self.min_len <= self.max_len:
            raise ValueError(f"min_len must be in [0, max_len={self.max_len}], got {self.min_len}")
        if self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be >= 0, got {self.no_repeat_ngram}")


@dataclass
class DecodeResult:
    """One caption per image: word ids ([STOP] excluded), score, and whether [STOP] ended it
    (False: it reached ``max_len``). Greedy/sampling scores are sums of log-probabilities
    (with [STOP]); beam scores are divided by the length penalty."""
    tokens: list[list[int]]
    scores: list[float]
    stopped: list[bool]
    lengths: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.lengths:
            self.lengths = [len(t) for t in self.tokens]


# ------------------------------------------------------------------------------ helpers

def _images(batch) -> dict:
    """Region inputs of a ``Batch`` (or any object with those attributes)."""
    return {k: getattr(batch, k, None) for k in
            ("region_feats", "region_boxes", "region_cls_probs", "region_mask", "image_feat")}


def _repeat(images: dict, k: int) -> dict:
    if k == 1:
        return images
    return {n: (v.repeat_interleave(k, dim=0) if isinstance(v, torch.Tensor) else v) for n, v in images.items()}


def _num_images(images: dict) -> int:
    feats = images.get("region_feats")
    if feats is None:
        raise ValueError("decoding needs image regions (batch.region_feats)")
    return feats.shape[0]


@contextlib.contextmanager
def eval_mode(model):
    """Eval mode (no dropout) for the duration, restoring the previous mode after."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


class _Stepper:
    """Logits at the trailing [MASK] for M = images x beams hypotheses, given the words so far."""

    def __init__(self, model, images: dict, tok: DecodeTokens, beam: int, use_cache: bool):
        self.model, self.tok, self.beam, self.use_cache = model, tok, beam, use_cache
        B = _num_images(images)
        dev = images["region_feats"].device
        self.prompt = torch.tensor([tok.cls_id, tok.sep_id], device=dev).expand(B, 2)
        if use_cache:
            self.prefix = encode_prefix(model, self.prompt, **images)
            self.gen = GenCache.empty(self.prefix, B * beam)
        else:
            self.images = _repeat(images, beam)
            self.prompt = self.prompt.repeat_interleave(beam, dim=0)
        self.mask_col = torch.full((B * beam, 1), tok.mask_id, dtype=torch.long, device=dev)

    def logits(self, words: torch.Tensor) -> torch.Tensor:
        """``words`` (M, t): the hypotheses' words so far (row order = the cache's)."""
        t = words.shape[1]
        if self.use_cache:
            new = self.mask_col if t == 0 else torch.cat([words[:, -1:], self.mask_col], dim=1)
            hidden, self.gen = extend(self.model, self.prefix, self.gen, new, commit=new.shape[1] - 1)
            h = hidden[:, -1]
        else:
            ids = torch.cat([self.prompt, words, self.mask_col], dim=1)
            types = torch.ones_like(ids)
            types[:, :self.prompt.shape[1]] = 0
            out = self.model(ids, types, None, mode=MODE_SEQ2SEQ, **self.images)
            h = out.text_hidden[:, -1]
        return self.model.mlm_logits(h)

    def reorder(self, index: torch.Tensor) -> None:
        if self.use_cache:
            self.gen = self.gen.reorder(index)


def _forbid(logp: torch.Tensor, words: torch.Tensor, tok: DecodeTokens, min_len: int,
            no_repeat_ngram: int, forbidden: Optional[torch.Tensor]) -> torch.Tensor:
    """Constraints of the next token given ``words`` (M, t); returns a new tensor."""
    t = words.shape[1]
    bias = torch.zeros(logp.shape[0], logp.shape[1] + 1, dtype=logp.dtype, device=logp.device)
    if forbidden is not None and forbidden.numel():
        bias[:, forbidden] = NEG_INF
    if t < min_len:
        bias[:, tok.stop_id] = NEG_INF
    n = no_repeat_ngram
    if n == 1 and t:
        bias.scatter_(1, words, NEG_INF)
    elif n > 1 and t >= n:
        # window j = words[j : j+n-1] (j = 0..t-n) is followed by words[j+n-1]; where the
        # window equals the current suffix, that follower would repeat an n-gram.
        windows = words.unfold(1, n - 1, 1)[:, : t - n + 1]                    # (M, t-n+1, n-1)
        match = (windows == words[:, t - n + 1:][:, None, :]).all(-1)          # (M, t-n+1)
        follow = words[:, n - 1:]                                              # (M, t-n+1)
        idx = torch.where(match, follow, torch.full_like(follow, logp.shape[1]))  # no-op column
        bias.scatter_(1, idx, NEG_INF)
    return logp + bias[:, :-1]


def _forbidden_index(tok: DecodeTokens, device) -> Optional[torch.Tensor]:
    return torch.tensor(tok.forbidden, dtype=torch.long, device=device) if tok.forbidden else None


def length_penalty(length: int, alpha: float) -> float:
    """GNMT (Wu et al. 2016): ((5 + |Y|) / 6) ** alpha."""
    return ((5.0 + length) / 6.0) ** alpha


# ------------------------------------------------------------------------------ greedy

@torch.no_grad()
def greedy_decode(model, batch, tok: DecodeTokens, *, max_len: int = 20, min_len: int = 0,
                  no_repeat_ngram: int = 0, use_cache: bool = True, early_exit: bool = True) -> DecodeResult:
    """Argmax decoding of every image of ``batch`` (eval mode, no gradient).

    ``early_exit=False`` runs all ``max_len`` steps even when every caption has stopped
    (keeps the number of forward calls equal on every rank, as ZeRO-3 needs)."""
    DecodeOptions(max_len=max_len, min_len=min_len, no_repeat_ngram=no_repeat_ngram).check()
    images = _images(batch)
    with eval_mode(model):
        words, logps, _, stopped = _run_greedy(model, images, tok, max_len, min_len, no_repeat_ngram,
                                               use_cache, early_exit, sample=False)
    return _result(words, logps, stopped, tok)


def sample_captions(model, batch, tok: DecodeTokens, *, samples: int = 1, max_len: int = 20, min_len: int = 0,
                    no_repeat_ngram: int = 0, temperature: float = 1.0,
                    generator: Optional[torch.Generator] = None, early_exit: bool = True):
    """Sample ``samples`` captions per image with the cache, *with* gradient (self-critical
    training). The images' prefix (regions, [CLS] [SEP]) is encoded once and shared by their
    samples, as beam search shares it by its hypotheses (most of a short caption's compute).

    Runs in the model's current mode (training: dropout on, as SCST samples). Returns
    ``(words (B·samples, L), logprobs, mask float)``, rows image-major: ``logprobs`` are the
    sampled tokens' log-probabilities under the distribution they were drawn from (the
    model's, renormalised over the tokens the constraints allow, at ``temperature``), the
    [STOP] step included, differentiable; ``mask`` marks the steps that belong to the caption
    (words and its [STOP])."""
    DecodeOptions(max_len=max_len, min_len=min_len, no_repeat_ngram=no_repeat_ngram).check()
    words, logps, mask, _ = _run_greedy(model, _images(batch), tok, max_len, min_len, no_repeat_ngram,
                                        True, early_exit, sample=True, temperature=temperature,
                                        generator=generator, rows_per_image=samples)
    return words, logps, mask.float()


def _run_greedy(model, images, tok, max_len, min_len, no_repeat_ngram, use_cache, early_exit,
                sample: bool, temperature: float = 1.0, generator=None, rows_per_image: int = 1):
    """(words (M, L) with [PAD] after [STOP], chosen tokens' log-probs (M, L), steps that
    belong to each caption (M, L) bool, stopped (M,) bool); M = images x ``rows_per_image``."""
    stepper = _Stepper(model, images, tok, beam=rows_per_image, use_cache=use_cache)
    M = _num_images(images) * rows_per_image
    dev = images["region_feats"].device
    forbidden = _forbidden_index(tok, dev)
    words = torch.zeros(M, 0, dtype=torch.long, device=dev)
    done = torch.zeros(M, dtype=torch.bool, device=dev)
    stopped = torch.zeros(M, dtype=torch.bool, device=dev)
    step_logps, alive = [], []
    pad = torch.full((M,), tok.pad_id, dtype=torch.long, device=dev)
    for t in range(max_len):
        logp = F.log_softmax(stepper.logits(words).float(), dim=-1)
        allowed = _forbid(logp, words, tok, min_len, no_repeat_ngram, forbidden)
        if sample:
            policy = allowed / temperature
            nxt = _sample(policy.detach(), generator)
            # log-probability under the policy that drew it (the model over the allowed tokens,
            # at the sampling temperature): REINFORCE's gradient needs that one
            lp = F.log_softmax(policy, dim=-1).gather(1, nxt[:, None]).squeeze(1)
        else:
            nxt = allowed.argmax(-1)
            lp = logp.gather(1, nxt[:, None]).squeeze(1)
        step_logps.append(torch.where(done, torch.zeros_like(lp), lp))
        alive.append(~done)
        is_stop = (nxt == tok.stop_id) & ~done
        stopped = stopped | is_stop          # not in place: ``done`` is saved for backward
        done = done | is_stop
        words = torch.cat([words, torch.where(done, pad, nxt)[:, None]], dim=1)
        if early_exit and bool(done.all()):
            break
    logps = torch.stack(step_logps, dim=1)
    return words, logps, torch.stack(alive, dim=1), stopped


def _sample(logits: torch.Tensor, generator=None) -> torch.Tensor:
    """One token per row from softmax(logits), by inverse-CDF sampling (``torch.multinomial``
    is ~20x slower on CPU at vocabulary size); tokens at -inf are never drawn."""
    cdf = F.softmax(logits, dim=-1).cumsum(-1)
    u = (1.0 - torch.rand(cdf.shape[0], 1, generator=generator, device=cdf.device)) * cdf[:, -1:]  # (0, total]
    return torch.searchsorted(cdf, u).squeeze(1).clamp_(max=cdf.shape[1] - 1)


def _result(words, logps, stopped, tok) -> DecodeResult:
    stopped_l = stopped.tolist()
    tokens = []
    for row, st in zip(words.tolist(), stopped_l):
        if st:
            row = row[: row.index(tok.pad_id)] if tok.pad_id in row else row
        tokens.append(row)
    return DecodeResult(tokens, logps.sum(1).tolist(), stopped_l)


# ------------------------------------------------------------------------------ beam search

@torch.no_grad()
def beam_search(model, batch, tok: DecodeTokens, *, beam_size: int = 5, max_len: int = 20,
                min_len: int = 0, length_penalty: float = 0.0, no_repeat_ngram: int = 0,
                use_cache: bool = True, early_exit: bool = True) -> DecodeResult:
    """Batched beam search (eval mode, no gradient); the best finished hypothesis per image.

    Per step, the 2K best extensions of the K live beams are ranked; a [STOP] among the
    first K finishes a hypothesis (scored ``log P / lp(words + 1)``), the first K others are
    the next beams. An image is done once it has K finished hypotheses and no live beam can
    beat the worst of them (the bound uses the most favourable length still reachable). At
    ``max_len`` words the live beams finish without [STOP] (``lp(max_len)``).
    ``early_exit=False`` runs every step even once all images are done (same call count on
    every rank, for ZeRO-3); the result is the same."""
    opts = DecodeOptions(beam_size=beam_size, max_len=max_len, min_len=min_len,
                         length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram, use_cache=use_cache)
    opts.check()
    images = _images(batch)
    with eval_mode(model):
        return _beam(model, images, tok, opts, early_exit)


def _beam(model, images, tok: DecodeTokens, o: DecodeOptions, early_exit: bool = True) -> DecodeResult:
    K, alpha = o.beam_size, o.length_penalty
    B = _num_images(images)
    dev = images["region_feats"].device
    M = B * K
    stepper = _Stepper(model, images, tok, beam=K, use_cache=o.use_cache)
    forbidden = _forbidden_index(tok, dev)
    words = torch.zeros(M, 0, dtype=torch.long, device=dev)
    scores = torch.full((B, K), NEG_INF, device=dev)
    scores[:, 0] = 0.0                                       # one live beam at first: no duplicates
    finished: list[list[tuple[float, list[int], bool]]] = [[] for _ in range(B)]
    done = [False] * B
    base = (torch.arange(B, device=dev) * K)[:, None]
    best_lp = length_penalty(o.max_len, alpha)

    def add(b: int, score: float, seq: list[int], stopped: bool) -> None:
        hyps = finished[b]
        if len(hyps) < K or score > hyps[-1][0]:
            hyps.append((score, seq, stopped))
            hyps.sort(key=lambda h: -h[0])             # stable: earlier wins ties
            del hyps[K:]

    for t in range(o.max_len):
        logp = F.log_softmax(stepper.logits(words).float(), dim=-1)
        logp = _forbid(logp, words, tok, o.min_len, o.no_repeat_ngram, forbidden)
        V = logp.shape[1]
        cand = (scores.view(M, 1) + logp).view(B, K * V)
        top_s, top_i = cand.topk(2 * K, dim=1)                                 # sorted, best first
        src = top_i // V                                                       # beam within image
        tok_i = top_i % V
        is_stop = tok_i == tok.stop_id
        # Next beams: the first K candidates that are not [STOP] (at most K of 2K are).
        rank = torch.arange(2 * K, device=dev).expand(B, 2 * K)
        order = torch.argsort(is_stop.long() * (2 * K) + rank, dim=1)[:, :K]
        new_scores = top_s.gather(1, order)
        new_src = (src.gather(1, order) + base).view(M)
        new_tok = tok_i.gather(1, order).view(M)
        # Finished: [STOP] among the first K candidates, of a live beam.
        fin = (is_stop & (rank < K) & (top_s > NEG_INF)).nonzero().tolist()
        if fin:
            fin_s, fin_src = top_s.tolist(), (src + base).tolist()
            rows = words.tolist()
            lp = length_penalty(t + 1, alpha)
            for b, j in fin:
                if not done[b]:
                    add(b, fin_s[b][j] / lp, rows[fin_src[b][j]], True)
        # Done check with the new live beams' best score.
        bound_lp = best_lp if alpha >= 0 else length_penalty(min(t + 2, o.max_len), alpha)
        best_live = new_scores[:, 0].tolist()
        for b in range(B):
            if not done[b] and len(finished[b]) >= K and best_live[b] / bound_lp <= finished[b][-1][0]:
                done[b] = True
        words = torch.cat([words.index_select(0, new_src), new_tok[:, None]], dim=1)
        stepper.reorder(new_src)
        scores = new_scores
        if early_exit and all(done):
            break
    # Images still open after max_len words: their live beams end here, without [STOP].
    live_s, rows = scores.tolist(), words.tolist()
    lp = length_penalty(o.max_len, alpha)
    for b in range(B):
        if done[b]:
            continue
        for k in range(K):
            if live_s[b][k] > NEG_INF:
                add(b, live_s[b][k] / lp, rows[b * K + k], False)
    tokens, out_scores, stopped = [], [], []
    for b in range(B):
        s, seq, st = finished[b][0]
        tokens.append(seq)
        out_scores.append(s)
        stopped.append(st)
    return DecodeResult(tokens, out_scores, stopped)


# ------------------------------------------------------------------------------ entry point

def decode(model, batch, tok: DecodeTokens, opts: DecodeOptions, early_exit: bool = True) -> DecodeResult:
    """Greedy when ``opts.beam_size == 1``, else beam search."""
    opts.check()
    if opts.beam_size == 1:
        return greedy_decode(model, batch, tok, max_len=opts.max_len, min_len=opts.min_len,
                             no_repeat_ngram=opts.no_repeat_ngram, use_cache=opts.use_cache,
                             early_exit=early_exit)
    return beam_search(model, batch, tok, beam_size=opts.beam_size, max_len=opts.max_len,
                       min_len=opts.min_len, length_penalty=opts.length_penalty,
                       no_repeat_ngram=opts.no_repeat_ngram, use_cache=opts.use_cache,
                       early_exit=early_exit)
