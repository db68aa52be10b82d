"""Caption decoding (vltrain/decoding.py) and the cached incremental forward
(vltrain/model/incremental.py), on small random models (CPU, fp32, eval mode).

The references here are written independently of the code under test: a naive decoder that
re-runs the model's full forward for every step of every hypothesis and applies the
constraints in plain Python, an exhaustive search over a 4-word vocabulary, and a plain-Python
beam search over a fixed logit table (where a beam of 2 prunes).
"""
import itertools
import math
import zlib
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from vltrain.config import debug_model_config
from vltrain.data.batch import Batch
from vltrain.decoding import (DecodeOptions, DecodeTokens, _images, _repeat, beam_search, decode, greedy_decode,
                              length_penalty, sample_captions)
from vltrain.model import VLModel
from vltrain.model.incremental import GenCache, encode_prefix, extend
from vltrain.tokenization import Tokenizer

D, C = 64, 17


@pytest.fixture(scope="module")
def tok():
    return Tokenizer("bert-base-uncased")


@pytest.fixture(scope="module")
def ids(tok):
    return DecodeTokens.from_tokenizer(tok)


def make_model(seed=0, stop_bias=None, **kw):
    torch.manual_seed(seed)
    m = VLModel(debug_model_config(initializer_range=0.2, **kw)).eval()
    if stop_bias is not None:
        with torch.no_grad():
            m.mlm_head.bias[102] = stop_bias          # [STOP] = [SEP] = 102 in BERT's vocab
    return m


def make_images(B=5, N=6, seed=1, ragged=True) -> Batch:
    g = torch.Generator().manual_seed(seed)
    rmask = torch.ones(B, N, dtype=torch.bool)
    if ragged:                                          # different region counts per image
        for b in range(B):
            rmask[b, 1 + (b * 2) % N:] = False
    one = torch.zeros(B, 1, dtype=torch.long)
    return Batch(sample_id=torch.arange(B), input_ids=one, token_type_ids=one, attention_mask=one + 1,
                 mode=torch.ones(B, dtype=torch.long), region_feats=torch.randn(B, N, D, generator=g),
                 region_boxes=torch.rand(B, N, 4, generator=g).sort(-1).values,
                 region_cls_probs=torch.softmax(3 * torch.randn(B, N, C, generator=g), -1),
                 region_mask=rmask, image_feat=torch.randn(B, D, generator=g))


def image(batch: Batch, b: int) -> Batch:
    take = lambda x: None if x is None else x[b:b + 1]          # noqa: E731
    return Batch(sample_id=batch.sample_id[b:b + 1], input_ids=batch.input_ids[b:b + 1],
                 token_type_ids=batch.token_type_ids[b:b + 1], attention_mask=batch.attention_mask[b:b + 1],
                 mode=batch.mode[b:b + 1], region_feats=take(batch.region_feats),
                 region_boxes=take(batch.region_boxes), region_cls_probs=take(batch.region_cls_probs),
                 region_mask=take(batch.region_mask), image_feat=take(batch.image_feat))


# ------------------------------------------------------------------------------ naive reference

@torch.no_grad()
def naive_logp(model, batch, b, words_list):
    """log-softmax at the trailing [MASK] of ``[CLS] [SEP] words [MASK]`` for each word list,
    by the model's full forward (one image ``b``, many hypotheses)."""
    n = len(words_list)
    L = max(len(w) for w in words_list)
    ids = torch.zeros(n, L + 3, dtype=torch.long)
    types = torch.zeros_like(ids)
    att = torch.zeros_like(ids)
    last = []
    for i, w in enumerate(words_list):
        row = [101, 102, *w, 103]
        ids[i, :len(row)] = torch.tensor(row)
        types[i, 2:len(row)] = 1
        att[i, :len(row)] = 1
        last.append(len(row) - 1)
    one = image(batch, b)
    rep = lambda x: None if x is None else x.expand(n, *x.shape[1:])   # noqa: E731
    out = model(ids, types, att, region_feats=rep(one.region_feats), region_boxes=rep(one.region_boxes),
                region_cls_probs=rep(one.region_cls_probs), region_mask=rep(one.region_mask),
                mode="seq2seq", image_feat=rep(one.image_feat))
    h = out.text_hidden[torch.arange(n), torch.tensor(last)]
    return F.log_softmax(model.mlm_logits(h).float(), -1)


def allowed(tokens: DecodeTokens, words, cand, min_len, n):
    """The decoding rules, written out: may ``cand`` follow ``words``?"""
    if cand in tokens.forbidden:
        return False
    if cand == tokens.stop_id and len(words) < min_len:
        return False
    if n == 1 and cand in words:
        return False
    if n > 1 and len(words) >= n - 1:
        seen = {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
        if tuple(words[len(words) - n + 1:]) + (cand,) in seen:
            return False
    return True


def naive_greedy(model, batch, tokens, max_len, min_len=0, n=0):
    outs = []
    for b in range(batch.batch_size):
        words, stopped = [], False
        for _ in range(max_len):
            logp = naive_logp(model, batch, b, [words])[0]
            for c in logp.argsort(descending=True).tolist():
                if allowed(tokens, words, c, min_len, n):
                    break
            if c == tokens.stop_id:
                stopped = True
                break
            words.append(c)
        outs.append((words, stopped))
    return outs


def repeated_ngram(words, n) -> bool:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return len(grams) != len(set(grams))


# ------------------------------------------------------------------------------ incremental forward

@pytest.mark.parametrize("embedding", ["vlp", "vlbert", "vlbert-slots"])
def test_incremental_forward_equals_full_forward(embedding):
    slots = embedding == "vlbert-slots"      # VL-BERT's whole-image region and [END]: two more prefix keys
    model = make_model(region_embedding=embedding.split("-")[0], vlbert_image_box=slots, vlbert_end_token=slots)
    batch = make_images(B=4)
    batch.region_mask[1] = False                                            # an image-less row
    words = torch.randint(1000, 3000, (4, 5))
    words[:, -1] = 103                                                      # a trailing [MASK]
    ids = torch.cat([torch.tensor([[101, 102]] * 4), words], 1)
    types = torch.zeros_like(ids)
    types[:, 2:] = 1
    imgs = dict(region_feats=batch.region_feats, region_boxes=batch.region_boxes,
                region_cls_probs=batch.region_cls_probs, region_mask=batch.region_mask,
                image_feat=batch.image_feat)
    with torch.no_grad():
        full = model(ids, types, None, mode="seq2seq", **imgs).text_hidden[:, 2:]
        prefix = encode_prefix(model, ids[:, :2], **imgs)
        assert prefix.keys[0].shape[2] == 2 + batch.region_feats.shape[1] + 2 * slots
        # in pieces of 1, 2 and 2 new positions, committing all but the final [MASK]
        gen = GenCache.empty(prefix, 4)
        h1, gen = extend(model, prefix, gen, words[:, :1], commit=1)
        h2, gen = extend(model, prefix, gen, words[:, 1:3], commit=2)
        h3, gen = extend(model, prefix, gen, words[:, 3:], commit=1)
        assert gen.length == 4                          # the [MASK]'s key/value is not cached
        torch.testing.assert_close(torch.cat([h1, h2, h3], 1), full, atol=2e-5, rtol=1e-5)
        # three beams per image sharing one prefix
        gen = GenCache.empty(prefix, 12)
        hb, _ = extend(model, prefix, gen, words.repeat_interleave(3, 0), commit=0)
        torch.testing.assert_close(hb, full.repeat_interleave(3, 0), atol=2e-5, rtol=1e-5)


def test_incremental_forward_has_gradients():
    model = make_model()
    model.train()
    batch = make_images(B=2)
    prefix = encode_prefix(model, torch.tensor([[101, 102]] * 2), region_feats=batch.region_feats,
                           region_boxes=batch.region_boxes, region_cls_probs=batch.region_cls_probs,
                           region_mask=batch.region_mask)
    h, gen = extend(model, prefix, GenCache.empty(prefix, 2), torch.tensor([[2000, 103]] * 2), commit=1)
    h2, _ = extend(model, prefix, gen, torch.tensor([[2001, 103]] * 2), commit=1)
    (h.sum() + h2.sum()).backward()
    assert model.layers[0].matrices.grad.abs().sum() > 0
    assert model.region_embeddings.feat.weight.grad.abs().sum() > 0     # through the cached prefix


# ------------------------------------------------------------------------------ cache / beam / greedy

CONSTRAINTS = [dict(), dict(no_repeat_ngram=2), dict(min_len=4, no_repeat_ngram=1), dict(no_repeat_ngram=3)]


@pytest.mark.parametrize("kw", CONSTRAINTS)
def test_cached_and_uncached_decoding_give_identical_tokens(ids, kw):
    model = make_model(stop_bias=6.5)
    batch = make_images(B=6)
    for fn, extra in ((greedy_decode, {}), (beam_search, dict(beam_size=4, length_penalty=0.6))):
        cached = fn(model, batch, ids, max_len=9, use_cache=True, **extra, **kw)
        plain = fn(model, batch, ids, max_len=9, use_cache=False, **extra, **kw)
        assert cached.tokens == plain.tokens, fn.__name__
        assert cached.stopped == plain.stopped
        assert cached.scores == pytest.approx(plain.scores, abs=1e-4)


@pytest.mark.parametrize("kw", CONSTRAINTS)
def test_beam_size_one_equals_greedy(ids, kw):
    model = make_model(stop_bias=6.5)
    batch = make_images(B=6)
    g = greedy_decode(model, batch, ids, max_len=9, **kw)
    b = beam_search(model, batch, ids, beam_size=1, max_len=9, **kw)
    assert b.tokens == g.tokens and b.stopped == g.stopped
    assert b.scores == pytest.approx(g.scores, abs=1e-5)
    assert decode(model, batch, ids, DecodeOptions(beam_size=1, max_len=9, **kw)).tokens == g.tokens


@pytest.mark.parametrize("kw", [dict(), dict(min_len=3, no_repeat_ngram=1), dict(no_repeat_ngram=2)])
def test_greedy_equals_naive_full_forward_decoder(ids, kw):
    model = make_model(stop_bias=6.5)
    batch = make_images(B=6)
    g = greedy_decode(model, batch, ids, max_len=8, **kw)
    ref = naive_greedy(model, batch, ids, 8, kw.get("min_len", 0), kw.get("no_repeat_ngram", 0))
    assert [(t, s) for t, s in zip(g.tokens, g.stopped)] == ref


def test_decoding_stops_at_stop(ids):
    batch = make_images(B=6)
    # [STOP] far above everything: every caption ends as soon as it may.
    eager = make_model(stop_bias=50.0)
    for min_len in (0, 3):
        for res in (greedy_decode(eager, batch, ids, max_len=10, min_len=min_len),
                    beam_search(eager, batch, ids, beam_size=3, max_len=10, min_len=min_len)):
            assert res.stopped == [True] * 6
            assert [len(t) for t in res.tokens] == [min_len] * 6
    # [STOP] never likely: every caption runs to max_len, unstopped.
    never = make_model(stop_bias=-50.0)
    res = greedy_decode(never, batch, ids, max_len=7)
    assert res.stopped == [False] * 6 and res.lengths == [7] * 6
    # In between: each stopped caption's next argmax (full forward) is [STOP], and no word
    # before it was; no output contains [STOP] or any other special token.
    # The bias that gives such a mix depends on the random init: take the first that does.
    for bias in (4.0, 5.0, 5.5, 6.0, 6.5, 7.0, 7.5, 8.0, 9.0):
        model = make_model(stop_bias=bias)
        res = greedy_decode(model, batch, ids, max_len=8, no_repeat_ngram=1)
        if any(res.stopped) and not all(len(t) == 0 for t in res.tokens):
            break
    assert any(res.stopped) and not all(len(t) == 0 for t in res.tokens)
    for b, (words, stopped) in enumerate(zip(res.tokens, res.stopped)):
        assert not set(words) & ({ids.stop_id} | set(ids.forbidden))
        logp = naive_logp(model, batch, b, [words[:i] for i in range(len(words) + 1)])
        for i in range(len(words)):      # [STOP] is never blocked here, so it never won before
            assert logp[i].argmax().item() != ids.stop_id
        if stopped:
            best = [c for c in logp[-1].argsort(descending=True).tolist()
                    if c not in words and c not in ids.forbidden]
            assert best[0] == ids.stop_id


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_blocking_and_min_length_hold_on_every_output(ids, n):
    batch = make_images(B=6)
    for seed, bias in ((0, None), (1, 6.0), (2, 7.0)):
        model = make_model(seed=seed, stop_bias=bias)
        for min_len in (0, 5):
            outs = [greedy_decode(model, batch, ids, max_len=12, min_len=min_len, no_repeat_ngram=n),
                    beam_search(model, batch, ids, beam_size=4, max_len=12, min_len=min_len,
                                no_repeat_ngram=n, length_penalty=1.0)]
            for res in outs:
                for words, stopped in zip(res.tokens, res.stopped):
                    assert not repeated_ngram(words, n), (n, words)
                    assert len(words) >= min_len
                    assert len(words) <= 12 and (stopped or len(words) == 12)
                    assert not set(words) & set(ids.forbidden)
    # without blocking the random model does repeat itself, so the check above has teeth
    plain = greedy_decode(make_model(), batch, ids, max_len=12)
    assert any(repeated_ngram(w, 2) for w in plain.tokens)


def test_batched_beam_search_equals_one_image_at_a_time(ids):
    model = make_model(stop_bias=6.0)
    batch = make_images(B=5)
    together = beam_search(model, batch, ids, beam_size=3, max_len=8, no_repeat_ngram=2, length_penalty=1.0)
    for b in range(5):
        alone = beam_search(model, image(batch, b), ids, beam_size=3, max_len=8, no_repeat_ngram=2,
                            length_penalty=1.0)
        assert alone.tokens[0] == together.tokens[b]
        assert alone.scores[0] == pytest.approx(together.scores[b], abs=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
def test_beam_search_is_exact_when_the_beam_holds_every_hypothesis(ids, alpha):
    """A 4-word vocabulary (everything else forbidden), max_len 3: a beam of 64 never prunes,
    so beam search must return the exhaustive optimum of log P / lp(|Y|)."""
    model = make_model(stop_bias=3.0)
    batch = make_images(B=2)
    vocab = [2000, 2001, 2002, 2003]
    keep = set(vocab) | {ids.stop_id}
    small = DecodeTokens(ids.cls_id, ids.sep_id, ids.stop_id, ids.mask_id, ids.pad_id,
                         tuple(i for i in range(model.config.vocab_size) if i not in keep))
    max_len = 3
    for use_cache in (True, False):
        res = beam_search(model, batch, small, beam_size=64, max_len=max_len, length_penalty=alpha,
                          use_cache=use_cache)
        for b in range(2):
            prefixes = [list(p) for L in range(max_len + 1) for p in itertools.product(vocab, repeat=L)]
            logp = {tuple(p): row for p, row in zip(prefixes, naive_logp(model, batch, b, prefixes))}
            best = None
            for p in prefixes:
                base = sum(logp[tuple(p[:i])][p[i]].item() for i in range(len(p)))
                if len(p) < max_len:    # ends with [STOP]
                    cand = ((base + logp[tuple(p)][ids.stop_id].item()) / length_penalty(len(p) + 1, alpha), p, True)
                else:                   # reached max_len
                    cand = (base / length_penalty(max_len, alpha), p, False)
                if best is None or cand[0] > best[0] + 1e-9:
                    best = cand
            assert res.tokens[b] == best[1] and res.stopped[b] == best[2]
            assert res.scores[b] == pytest.approx(best[0], abs=1e-4)


TABLE_V, TABLE_STOP = 6, 0            # a 6-token vocabulary: [STOP] and 5 words


def table_logits(image_no: int, words) -> torch.Tensor:
    """A fixed logit table: the next-token logits of image ``image_no`` after ``words``, drawn
    from a seed of both (flat enough that [STOP] often ranks just behind the beam)."""
    g = torch.Generator().manual_seed(zlib.crc32(repr((image_no, tuple(words))).encode()))
    return 0.5 * torch.randn(TABLE_V, generator=g)


class TableModel(torch.nn.Module):
    """Stands in for the model in the uncached decoding path (``model(ids, ...)`` then
    ``mlm_logits``): the logits at the trailing [MASK] of ``[CLS] [SEP] words [MASK]`` are
    ``table_logits`` of the image (numbered by its region features) and the words."""

    def forward(self, ids, token_types, attention_mask, *, mode, region_feats, **_):
        hidden = torch.zeros(*ids.shape, TABLE_V)
        for r in range(ids.shape[0]):
            hidden[r, -1] = table_logits(int(region_feats[r, 0, 0]), ids[r, 2:-1].tolist())
        return SimpleNamespace(text_hidden=hidden)

    def mlm_logits(self, hidden):
        return hidden


def reference_beam(image_no, K, max_len, alpha, stop_ranks=None):
    """Beam search as HF/VLP run it, for one image, in plain Python: per step the 2K best
    extensions of the live beams; a [STOP] among the first ``stop_ranks`` (K) of them finishes
    a hypothesis (``log P / lp(words + 1)``), the first K others are the next beams; done once K
    have finished and the best live beam, at the most favourable length penalty still
    reachable, cannot beat the worst; at ``max_len`` the live beams finish without [STOP]."""
    stop_ranks = K if stop_ranks is None else stop_ranks
    live, fin = [(0.0, [])], []

    def add(score, words, stopped):
        if len(fin) < K or score > fin[-1][0]:
            fin.append((score, words, stopped))
            fin.sort(key=lambda h: -h[0])
            del fin[K:]

    for t in range(max_len):
        cands = []
        for s, words in live:
            logp = F.log_softmax(table_logits(image_no, words), -1).tolist()
            cands += [(s + logp[v], words, v) for v in range(TABLE_V)]
        nxt = []
        for rank, (s, words, v) in enumerate(sorted(cands, key=lambda c: -c[0])[:2 * K]):
            if v == TABLE_STOP:
                if rank < stop_ranks:
                    add(s / length_penalty(t + 1, alpha), words, True)
            elif len(nxt) < K:
                nxt.append((s, words + [v]))
        bound = length_penalty(max_len if alpha >= 0 else min(t + 2, max_len), alpha)
        if len(fin) >= K and nxt[0][0] / bound <= fin[-1][0]:
            return fin[0]
        live = nxt
    for s, words in live:
        add(s / length_penalty(max_len, alpha), words, False)
    return fin[0]


@pytest.mark.parametrize("alpha", [0.0, 1.0, -0.5])
def test_beam_search_prunes_as_the_reference_does(alpha):
    """With a beam of 2 that prunes (the exhaustive test above never does): only a [STOP] among
    the best K of the 2K candidates finishes a hypothesis. One ranked K..2K-1 finishing too
    (a [STOP] the reference never keeps) changes the chosen caption of some images here."""
    B, K, max_len = 8, 2, 4
    # decoding reads only the images' region inputs; the one "region feature" numbers the image
    batch = SimpleNamespace(region_feats=torch.arange(B, dtype=torch.float).view(B, 1, 1))
    tokens = DecodeTokens(cls_id=TABLE_V, sep_id=TABLE_STOP, stop_id=TABLE_STOP, mask_id=TABLE_V + 1,
                          pad_id=TABLE_V + 2)
    # the table model only runs the full forward (no cache to step); the cached path equals it elsewhere
    res = beam_search(TableModel(), batch, tokens, beam_size=K, max_len=max_len, length_penalty=alpha,
                      use_cache=False)
    for b in range(B):
        score, words, stopped = reference_beam(b, K, max_len, alpha)
        assert (res.tokens[b], res.stopped[b]) == (words, stopped), b
        assert res.scores[b] == pytest.approx(score, abs=1e-4)
    # the table makes the rank rule matter: with [STOP]s ranked K..2K-1 finishing too, some differ
    assert any(reference_beam(b, K, max_len, alpha, stop_ranks=2 * K)[1:] != reference_beam(b, K, max_len, alpha)[1:]
               for b in range(B))


def test_beam_scores_are_length_penalised_log_probabilities(ids):
    model = make_model(stop_bias=6.0)
    batch = make_images(B=4)
    for alpha in (0.0, 1.0):
        res = beam_search(model, batch, ids, beam_size=4, max_len=8, length_penalty=alpha)
        for b, (words, stopped, score) in enumerate(zip(res.tokens, res.stopped, res.scores)):
            logp = naive_logp(model, batch, b, [words[:i] for i in range(len(words) + 1)])
            total = sum(logp[i, w].item() for i, w in enumerate(words))
            if stopped:
                total += logp[-1, ids.stop_id].item()
            assert score == pytest.approx(total / length_penalty(len(words) + int(stopped), alpha), abs=1e-4)


def test_sampling_is_differentiable_and_reproducible(ids):
    model = make_model(stop_bias=6.0)
    model.train()
    batch = make_images(B=4)
    w1, lp1, m1 = sample_captions(model, batch, ids, max_len=6, min_len=2, generator=torch.Generator().manual_seed(3))
    w2, lp2, m2 = sample_captions(model, batch, ids, max_len=6, min_len=2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(w1, w2) and torch.equal(m1, m2)
    assert lp1.requires_grad and (lp1 * m1).sum().isfinite()
    assert torch.all(lp1.detach()[m1 == 0] == 0) and torch.all(lp1.detach()[m1 == 1] <= 0)
    (lp1 * m1).sum().backward()
    assert model.mlm_head.transform.dense.weight.grad.abs().sum() > 0
    # the sampled log-probabilities are the sampling policy's: the model's (re-scored with the
    # full forward) over the tokens the constraints allow (special tokens never; [STOP] not
    # before min_len), renormalised: REINFORCE's gradient is of that distribution
    model.eval()
    n = int(m1[0].sum())
    words = [w for w in w1[0, :n].tolist()]
    raw = naive_logp(model, batch, 0, [[x for x in words[:i] if x != ids.pad_id] for i in range(n)])
    allowed = raw.clone()
    allowed[:, list(ids.forbidden)] = float("-inf")
    allowed[:2, ids.stop_id] = float("-inf")
    chosen = [w if w != ids.pad_id else ids.stop_id for w in words]
    want = torch.log_softmax(allowed, -1)[torch.arange(n), chosen]
    assert lp1[0, :n].tolist() == pytest.approx(want.tolist(), abs=1e-4)
    assert lp1[0, :n].tolist() != pytest.approx(raw[torch.arange(n), chosen].tolist(), abs=1e-4)  # it differs


def test_samples_of_an_image_share_its_prefix_and_equal_those_of_repeated_images(ids):
    """SCST's n samples per image (``samples=n``) encode the image's prefix once, not n times
    (the batch repeated n-fold did), and are the same draws, log-probabilities and gradients
    (without dropout, which would otherwise differ per copy of the prefix)."""
    import dataclasses
    model = make_model(stop_bias=2.0)
    batch = make_images(B=3)
    repeated = dataclasses.replace(batch, **_repeat(_images(batch), 4))
    rows = []
    hook = model.embeddings.register_forward_hook(lambda m, args, out: rows.append(out.shape[0]))
    got = []
    for b, n in ((batch, 4), (repeated, 1)):
        model.zero_grad()
        rows.clear()
        w, lp, m = sample_captions(model, b, ids, samples=n, max_len=6, generator=torch.Generator().manual_seed(5))
        (lp * m).sum().backward()
        got.append((w, lp.detach(), m, model.mlm_head.transform.dense.weight.grad.clone(), rows[0]))
    hook.remove()
    (w1, lp1, m1, g1, prefix1), (w2, lp2, m2, g2, prefix2) = got
    assert (prefix1, prefix2) == (3, 12)                     # the prefix pass: 3 images, not 12 rows
    assert torch.equal(w1, w2) and torch.equal(m1, m2) and w1.shape[0] == 12
    assert torch.allclose(lp1, lp2, atol=1e-5) and torch.allclose(g1, g2, atol=1e-4)


def test_sampler_draws_from_the_softmax_and_never_a_forbidden_token():
    from vltrain.decoding import _sample
    logits = torch.tensor([[0.0, 1.0, 2.0, float("-inf"), 0.5, float("-inf")]]).expand(40000, 6)
    draws = _sample(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=6).float() / len(draws)
    want = torch.softmax(logits[0], -1)
    assert freq[3] == 0 and freq[5] == 0
    torch.testing.assert_close(freq, want, atol=0.01, rtol=0)


def test_options_are_checked(ids):
    model = make_model()
    batch = make_images(B=1)
    for bad in (dict(beam_size=0), dict(max_len=0), dict(min_len=5, max_len=4), dict(no_repeat_ngram=-1)):
        with pytest.raises(ValueError):
            decode(model, batch, ids, DecodeOptions(**bad))
    assert math.isclose(length_penalty(7, 1.0), 2.0)


def test_compiled_model_decodes_with_the_cache(ids):
    """model.compile=true: the cache's prefix keys/values come from the hidden states entering
    each block, not from hooks (a compiled block ignores hooks added after compilation)."""
    from vltrain.model.compile import compile_blocks
    ref = make_model(stop_bias=6.5)
    compiled = compile_blocks(make_model(stop_bias=6.5))
    batch = make_images(B=4)
    for fn, extra in ((greedy_decode, {}), (beam_search, dict(beam_size=3, length_penalty=0.6))):
        want = fn(ref, batch, ids, max_len=7, use_cache=True, **extra)
        got = fn(compiled, batch, ids, max_len=7, use_cache=True, **extra)
        assert got.tokens == want.tokens, fn.__name__
        assert got.scores == pytest.approx(want.scores, abs=1e-4)


def test_reserved_unused_slots_are_forbidden(tok, ids):
    """BERT's [unused0..993] never appear in text: a caption must not spell "[unused5]"."""
    vocab = tok.hf.get_vocab()
    reserved = {i for t, i in vocab.items() if t.startswith("[unused")}
    assert len(reserved) == 994 and reserved <= set(ids.forbidden)
    assert ids.stop_id not in ids.forbidden and vocab["cat"] not in ids.forbidden
    assert {tok.cls_id, tok.mask_id, tok.pad_id} <= set(ids.forbidden)
