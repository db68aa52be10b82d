"""The pretraining collator: layout, masking rules and their statistics, determinism, errors."""
from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
import torch

from tests.fixtures.mds import make_caption_samples, make_text_samples
from vltrain.config import ConfigError, DataConfig, ObjectivesConfig, load_config
from vltrain.data import schema
from vltrain.data.batch import MODE_BIDIRECTIONAL, MODE_SEQ2SEQ
from vltrain.data.collate import SKIPPED_KEY, TRUNCATED_KEY, PretrainCollator, StreamInfo
from vltrain.data.errors import BadSampleError
from vltrain.data.masking import num_to_mask

CLS, SEP, MASK, PAD = 101, 102, 103, 0
CAPS_META = schema.make_meta("captions", 8, 5, ("cls_prob",))
TEXT_META = schema.make_meta("text", None, None)


@pytest.fixture(scope="module")
def tok():
    from tests.fixtures.assets import minilm_path
    from vltrain.tokenization import Tokenizer
    return Tokenizer(minilm_path() + "/vocab.txt")


def make(tok, data=None, obj=None, seed=3, metas=(CAPS_META, TEXT_META), **kw):
    streams = [StreamInfo(f"s3://bkt/ds{i}", m) for i, m in enumerate(metas)]
    return PretrainCollator(tok, data or DataConfig(), obj or ObjectivesConfig(), seed, streams, **kw)


def caps(n, **kw):
    return make_caption_samples(n, **kw)


def texts(n, start_id=1000):
    return [dict(s, _stream=1) for s in make_text_samples(n, start_id=start_id)]


def rows(batch):
    """Per sample id: (mode, real ids, types, in-row mlm positions, labels, mrc region ids)."""
    B, T = batch.input_ids.shape
    out = {}
    for r in range(B):
        L = int(batch.attention_mask[r].sum())
        sel = (batch.mlm_positions // T == r) if batch.mlm_positions is not None else torch.zeros(0, dtype=torch.bool)
        pos = (batch.mlm_positions[sel] - r * T).tolist() if batch.mlm_positions is not None else []
        lab = batch.mlm_labels[sel].tolist() if batch.mlm_labels is not None else []
        mrc = []
        if batch.mrc_positions is not None and batch.region_mask is not None:
            N = batch.region_mask.shape[1]
            mrc = (batch.mrc_positions[batch.mrc_positions // N == r] - r * N).tolist()
        out[int(batch.sample_id[r])] = (int(batch.mode[r]), batch.input_ids[r, :L].tolist(),
                                        batch.token_type_ids[r, :L].tolist(), pos, lab, mrc)
    return out


# ---------------------------------------------------------------------------- layout

def test_layout_token_types_and_truncation(tok):
    data = DataConfig(max_text_len=12)
    obj = ObjectivesConfig(mlm=False, seq2seq_prob=0.5)
    samples = caps(40, words=(2, 20)) + texts(10)
    b = make(tok, data, obj)(samples)
    assert b.input_ids.shape[1] <= 12 and b.mlm_positions is None
    seen_modes, cut = set(), 0
    for s in samples:
        mode, ids, types, *_ = rows(b)[s["sample_id"]]
        if "captions" in s:
            # The caption drawn is one of the references, truncated to fit 12 with 3 specials.
            assert ids[:2] == [CLS, SEP] and ids[-1] == SEP
            drawn = [c for c in s["captions"] if ids[2:-1] == tok.encode(c)[:9]]
            assert drawn
            cut += len(tok.encode(drawn[0])) > 9
            seen_modes.add(mode)
            want = [0, 0] + [1] * (len(ids) - 2) if mode == MODE_SEQ2SEQ else [0] * len(ids)
            assert types == want
        else:
            assert ids == [CLS] + tok.encode(s["text"])[:10] + [SEP]
            cut += len(tok.encode(s["text"])) > 10
            assert mode == MODE_BIDIRECTIONAL and not any(types)
    assert seen_modes == {MODE_SEQ2SEQ, MODE_BIDIRECTIONAL}
    # the loader counts the cut samples (data/truncated_text); no regions cut at the default 100
    assert 0 < cut < len(samples) and tuple(map(len, b.task[TRUNCATED_KEY])) == (cut, 0)
    few = make(tok, DataConfig(max_regions=5), obj)(samples)
    assert few.task[TRUNCATED_KEY] == ([s["sample_id"] for s in samples if len(tok.encode(s.get("text", ""))) > 38],
                                       [s["sample_id"] for s in samples if len(s.get("features", ())) > 5])
    assert few.task[TRUNCATED_KEY][1]
    assert TRUNCATED_KEY not in make(tok, DataConfig(), obj)(caps(8, words=(2, 5))).task
    assert b.attention_mask.sum(1).tolist() == [len(rows(b)[int(i)][1]) for i in b.sample_id]
    assert (b.input_ids[b.attention_mask == 0] == PAD).all()
    # Text-only rows: no real regions; image rows: as many real regions as the sample has.
    n_reg = {s["sample_id"]: len(s.get("features", ())) for s in samples}
    assert b.region_mask.sum(1).tolist() == [n_reg[int(i)] for i in b.sample_id]


def test_vlbert_captions_use_vlbert_text_layout(tok):
    """A VL-BERT model's captions are laid out as its text-only samples and fine-tuning inputs:
    [CLS] caption [SEP] (the regions go in after [CLS]); MLM picks word-pieces only (VLP's
    [STOP] prediction is a generation objective); a seq2seq draw still marks the caption."""
    data = DataConfig(max_text_len=12)
    samples = caps(60, words=(2, 20))
    b = make(tok, data, ObjectivesConfig(seq2seq_prob=0.5, max_pred=20), vlbert=True)(samples)
    got = rows(b)
    modes = set()
    for s in samples:
        mode, ids, types, pos, lab, _ = got[s["sample_id"]]
        assert ids[0] == CLS and ids[-1] == SEP and SEP not in ids[1:-1]
        orig = list(ids)
        for p, t in zip(pos, lab):
            orig[p] = t
        assert any(orig[1:-1] == tok.encode(c)[:10] for c in s["captions"])   # 12 - 2 specials
        assert all(1 <= p < len(ids) - 1 for p in pos) and len(pos) >= 1
        want = [0] + [1] * (len(ids) - 1) if mode == MODE_SEQ2SEQ else [0] * len(ids)
        assert types == want
        modes.add(mode)
    assert modes == {MODE_SEQ2SEQ, MODE_BIDIRECTIONAL}
    # the VLP layout of the same samples: [CLS] [SEP] caption [STOP], [STOP] maskable
    vlp = rows(make(tok, data, ObjectivesConfig(seq2seq_prob=0.5, max_pred=20))(samples))
    assert all(v[1][:2] == [CLS, SEP] for v in vlp.values())
    assert any(len(v[1]) - 1 in v[3] for v in vlp.values())


def test_share_budget_is_vlbert_rule():
    from vltrain.data.collate import share_budget
    assert share_budget(12, 100, 64) == (12, 52)       # a short caption keeps its words
    assert share_budget(40, 100, 64) == (32, 32)       # a long one shares evenly
    assert share_budget(70, 5, 64) == (59, 5)
    assert share_budget(10, 20, 64) == (10, 20)        # under the budget: nothing cut
    assert share_budget(10, 10, 4) == (2, 2)           # [CLS] [SEP] and a region always stay
    assert share_budget(13, 10, 6, min_text=3) == (3, 3)   # VLP's layout: [CLS] [SEP] [STOP] stay
    assert share_budget(40, 100, 63) == (31, 32)       # at a tie the text gives the token up


def test_joint_budget_orders_regions_by_confidence_and_shares_positions(tok):
    """data.max_sequence (VL-BERT's seq_len): an image-caption sample's regions are ordered by
    the detector's confidence (highest class probability first), then text and regions are cut
    together; the regions it drops are not counted as truncated. 0: stored order, separate caps."""
    from vltrain.data.collate import share_budget
    samples = caps(40, regions=(10, 30), words=(2, 25))
    obj = ObjectivesConfig(mlm=False, mrc=False)
    budget = DataConfig(max_text_len=40, max_sequence=24)
    b = make(tok, budget, obj, vlbert=True, require_cls_probs=True)(samples)
    got = rows(b)
    cut_regions = set(b.task.get(TRUNCATED_KEY, ((), ()))[1])
    for i, smp in enumerate(samples):
        ids = got[smp["sample_id"]][1]
        r = int(b.region_mask[i].sum())
        k = len(smp["features"])
        assert len(ids) + r <= 24 and smp["sample_id"] not in cut_regions
        full = [len(e) for e in (tok.encode(c)[:38] for c in smp["captions"]) if e[:len(ids) - 2] == ids[1:-1]]
        assert (len(ids), r) in {share_budget(n + 2, k, 24) for n in full}, (len(ids), r, full, k)
        order = np.argsort(-smp["cls_prob"].astype(np.float32).max(1), kind="stable")[:r]
        np.testing.assert_array_equal(b.region_feats[i, :r].float().numpy(),
                                      smp["features"][order].astype(np.float32))
    # VL-BERT's whole-image feature (data.image_feature=regions_mean) averages every region,
    # those the budget leaves out too, as VL-BERT's code averages its boxes before the cut
    assert sum(int(b.region_mask[i].sum()) < len(smp["features"]) for i, smp in enumerate(samples)) > 10
    for i, smp in enumerate(samples):
        np.testing.assert_allclose(b.image_feat[i].float().numpy(), smp["features"].astype(np.float32).mean(0),
                                   rtol=1e-2, atol=2e-3)
    # VL-BERT's whole-image region (model.vlbert_image_box) is one of the budget's positions
    boxed = make(tok, budget, obj, vlbert=True, require_cls_probs=True, image_box=True)(samples)
    got_boxed = rows(boxed)
    for i, smp in enumerate(samples):
        ids, r = got_boxed[smp["sample_id"]][1], int(boxed.region_mask[i].sum())
        full = [len(e) for e in (tok.encode(c)[:38] for c in smp["captions"]) if e[:len(ids) - 2] == ids[1:-1]]
        assert len(ids) + r + 1 <= 24
        assert (len(ids), r + 1) in {share_budget(n + 2, len(smp["features"]) + 1, 24) for n in full}
    assert sum(int(boxed.region_mask[i].sum()) < int(b.region_mask[i].sum()) for i in range(len(samples))) > 0
    # the training loader's collator takes the setting from the model's key
    from vltrain.config import load_config
    from vltrain.data.loader import pretrain_collator
    cfg = load_config("configs/debug.yaml", ["model.region_embedding=vlbert", "model.vlbert_image_box=true",
                                             "model.use_cls_probs=false", "model.geometry_conf=false",
                                             "data.max_text_len=40", "data.max_regions=100", "data.max_sequence=24",
                                             "objectives.mlm=false", "train.seed=3",
                                             "objectives.mrc=false", "model.region_feat_dim=8",
                                             "model.num_region_classes=5"], to_run=False)   # no objective: not a run
    built = pretrain_collator(cfg, tok, [StreamInfo("s3://bkt/ds0", CAPS_META)], train=True)(samples)
    torch.testing.assert_close(built.region_mask, boxed.region_mask)
    # the order needs the class distribution, not a use of it: read for the order alone
    alone = make(tok, budget, obj, vlbert=True)(samples)
    torch.testing.assert_close(alone.region_feats, b.region_feats)
    assert alone.region_cls_probs is None
    vlp = rows(make(tok, budget, obj, require_cls_probs=True)(samples))     # [CLS] [SEP] w.. [STOP]
    assert all(len(v[1]) >= 3 and v[1][:2] == [CLS, SEP] for v in vlp.values())
    plain = make(tok, DataConfig(max_text_len=40), obj, vlbert=True, require_cls_probs=True)(samples)
    for i, smp in enumerate(samples):
        k = len(smp["features"])
        assert int(plain.region_mask[i].sum()) == k
        np.testing.assert_array_equal(plain.region_feats[i, :k].float().numpy(), smp["features"].astype(np.float32))


def test_vlbert_mrc_keeps_the_stored_whole_image_feature_out(tok):
    """A stored whole-image feature was extracted with the masked regions in view: a VL-BERT
    model with MRC refuses it (naming the key); with regions_mean the batch carries the mean of
    the real regions left unmasked, as VL-BERT computes it (not of the zeroed inputs, which
    would shrink it by the masked share). VLP's model never reads it."""
    meta = schema.make_meta("captions", 8, 5, ("cls_prob", "image_feature"))
    samples = caps(4, optional=("cls_prob", "image_feature"))
    mrc = ObjectivesConfig(mrc=True)
    with pytest.raises(ValueError, match=r"s3://bkt/ds0 has a whole-image feature.*data.image_feature=regions_mean"):
        make(tok, obj=mrc, metas=(meta,), vlbert=True)
    b = make(tok, DataConfig(image_feature="regions_mean"), mrc, metas=(meta,), vlbert=True)(samples)
    plain = make(tok, DataConfig(image_feature="regions_mean"), metas=(meta,), vlbert=True)(samples)
    assert plain.image_feat is None and len(b.mrc_positions) > 0       # no MRC: the model averages
    B, N, D = plain.region_feats.shape
    keep = plain.region_mask.clone()
    flat = b.region_feats.view(B * N, D)
    keep.view(-1)[b.mrc_positions[(flat[b.mrc_positions] == 0).all(1)]] = False   # the zeroed ones
    assert keep.sum() < plain.region_mask.sum() and keep.any(1).all()
    for i in range(B):
        want = plain.region_feats[i][keep[i]].float().mean(0)
        assert torch.allclose(b.image_feat[i].float(), want, atol=1e-3), i
        assert not torch.allclose(want, plain.region_feats[i][plain.region_mask[i]].float().mean(0), atol=1e-3)
    # with the joint budget: the regions it leaves out count in the mean, the zeroed ones do not
    cut = make(tok, DataConfig(image_feature="regions_mean", max_sequence=10), mrc, metas=(meta,),
               vlbert=True, require_cls_probs=True)(samples)
    B, N, D = cut.region_feats.shape
    zeroed = cut.mrc_positions[(cut.region_feats.view(B * N, D)[cut.mrc_positions] == 0).all(1)]
    assert len(zeroed) and any(int(cut.region_mask[i].sum()) < len(smp["features"]) for i, smp in enumerate(samples))
    for i, smp in enumerate(samples):
        order = np.argsort(-smp["cls_prob"].astype(np.float32).max(1), kind="stable")
        feats = smp["features"][order].astype(np.float32)
        gone = [int(p) % N for p in zeroed if int(p) // N == i]
        want = (feats.sum(0) - feats[gone].sum(0)) / (len(feats) - len(gone))
        np.testing.assert_allclose(cut.image_feat[i].float().numpy(), want, rtol=1e-2, atol=2e-3)
    for kw in ({"obj": mrc}, {"vlbert": True}):         # VLP + MRC, or VL-BERT without MRC
        b = make(tok, metas=(meta,), **kw)(samples)
        assert torch.equal(b.image_feat, torch.from_numpy(np.stack([s["image_feature"] for s in samples])))
    with pytest.raises(ValueError, match=r"data.image_feature must be 'stored' or 'regions_mean'"):
        make(tok, DataConfig(image_feature="mean"))


def test_bucket_padding(tok):
    data = DataConfig(pad_to="bucket", buckets=[8, 16, 24], max_text_len=24, max_regions=12)
    col = make(tok, data)
    short = [dict(s, captions=["a dog"]) for s in caps(3)]
    b = col(short)
    assert b.input_ids.shape == (3, 8) and b.region_feats.shape[:2] == (3, 12)
    b = col(short + [dict(caps(1, seed=5)[0], sample_id=99, captions=["a " * 10])])
    assert b.input_ids.shape[1] == 16
    for n_words in (3, 6, 12, 14, 30):                # text-only batch: a plain BERT input (6, 14: exact fits)
        b = col([dict(t, text="dog " * n_words) for t in texts(2, start_id=5000)])
        longest = min(n_words + 2, 24)
        assert b.input_ids.shape[1] == min(x for x in (8, 16, 24) if x >= longest)
        assert b.region_feats is None and b.region_mask is None
    with pytest.raises(ValueError, match="data.buckets"):
        make(tok, DataConfig(pad_to="bucket", buckets=[8, 16], max_text_len=40))
    # Longest: padded to the batch's longest row; regions to the batch's max.
    b = make(tok)(short)
    assert b.input_ids.shape == (3, 5) and b.region_feats.shape[1] == max(len(s["features"]) for s in short)


# ---------------------------------------------------------------------------- masking

def test_exact_mlm_counts_positions_and_labels(tok):
    obj = ObjectivesConfig(max_pred=4)
    samples = caps(200, words=(1, 40)) + texts(50)
    data = DataConfig(max_text_len=48)
    masked = rows(make(tok, data, obj)(samples))
    clean = rows(make(tok, data, dataclasses.replace(obj, mlm=False))(samples))
    capped = 0
    for sid, (mode, ids, types, pos, lab, _) in masked.items():
        orig = clean[sid][1]
        is_text = sid >= 1000
        n_words = len(orig) - (2 if is_text else 3)
        want = min(4, max(1, int(round(0.15 * n_words))))
        assert want == num_to_mask(n_words, 0.15, 4)
        assert len(pos) == want, (sid, n_words)
        capped += want == 4 and round(0.15 * n_words) > 4
        # Candidates: caption word-pieces + [STOP] for captions; word-pieces for text.
        lo, hi = (1, len(orig) - 2) if is_text else (2, len(orig) - 1)
        assert all(lo <= p <= hi for p in pos) and len(set(pos)) == len(pos)
        assert lab == [orig[p] for p in pos]
        # Only masked positions differ from the clean sequence.
        assert all(ids[p] == orig[p] for p in range(len(ids)) if p not in pos)
    assert capped > 0


def test_special_token_strings_in_text_are_plain_words(tok):
    """A scraped caption holding "[SEP]" or "[MASK]": the strings are word-pieces, not the
    tokens (a [SEP] would end a VLP caption early, [CLS]/[PAD]/[MASK] would be MLM targets)."""
    s = caps(1)[0]
    s["captions"] = ["a dog [SEP] sits on the [CLS] grass [PAD] [MASK] now"]
    clean = make(tok, DataConfig(), ObjectivesConfig(mlm=False))([s])
    words = clean.input_ids[0, 2:int(clean.attention_mask[0].sum()) - 1].tolist()   # between [SEP] and [STOP]
    assert tok.encode("[")[0] in words and not {CLS, SEP, MASK, PAD} & set(words), words
    labels = make(tok, DataConfig(), ObjectivesConfig(max_pred=30, mlm_prob=1.0))([s]).mlm_labels.tolist()
    assert not {CLS, MASK, PAD} & set(labels) and labels.count(SEP) == 1       # VLP's [STOP], the one [SEP]
    assert tok.encode("a [SEP] b") == tok.encode("a [ sep ] b")


def _binom_ok(k, n, p, sigmas=5.0):
    return abs(k - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_80_10_10_split_and_lambda(tok):
    obj = ObjectivesConfig(max_pred=20, mlm_prob=0.4, seq2seq_prob=0.75)
    samples = caps(2000, words=(4, 14), regions=(1, 2), captions=(1, 1))
    masked = rows(make(tok, obj=obj, seed=11)(samples))
    n = n_mask = n_same = n_rand = 0
    special = set(tok.special_ids)
    for mode, ids, _, pos, lab, _ in masked.values():
        for p, l in zip(pos, lab):
            n += 1
            if ids[p] == MASK:
                n_mask += 1
            elif ids[p] == l:
                n_same += 1
            else:
                n_rand += 1
                assert ids[p] not in special and not tok.hf.convert_ids_to_tokens(ids[p]).startswith("[")
    assert n > 7000
    assert _binom_ok(n_mask, n, 0.8) and _binom_ok(n_rand, n, 0.1) and _binom_ok(n_same, n, 0.1)
    n_s2s = sum(m == MODE_SEQ2SEQ for m, *_ in masked.values())
    assert _binom_ok(n_s2s, len(masked), 0.75)
    # lambda = 1 and 0: captioning / VQA fine-tuning.
    for lam, mode in ((1.0, MODE_SEQ2SEQ), (0.0, MODE_BIDIRECTIONAL)):
        b = make(tok, obj=ObjectivesConfig(seq2seq_prob=lam))(samples[:50])
        assert (b.mode == mode).all()


def test_whole_word_masking_masks_whole_words(tok):
    obj = ObjectivesConfig(whole_word_mask=True, mlm_prob=0.3, max_pred=6)
    sentence = "unbelievably photographer playing unbelievably near the photographer unbelievably"
    samples = [dict(s, captions=[sentence]) for s in caps(300)]
    pieces = tok.encode(sentence)
    starts = tok.word_starts(pieces) + [True]          # + [STOP], its own word
    words, cur = [], []
    for i, st in enumerate(starts):                    # word spans as row positions (offset 2)
        if st and cur:
            words.append(cur)
            cur = []
        cur.append(i + 2)
    words.append(cur)
    assert max(len(w) for w in words) == 5
    n_mask = num_to_mask(len(pieces), 0.3, 6)
    saw_long = False
    for _, ids, _, pos, _, _ in rows(make(tok, obj=obj)(samples)).values():
        assert pos and len(pos) <= n_mask
        for w in words:
            hit = [p in pos for p in w]
            assert all(hit) or not any(hit), (w, pos)    # never part of a word
            saw_long |= len(w) == 5 and all(hit)
    assert saw_long


def test_bernoulli_sampling_is_vl_berts_rule(tok):
    """objectives.mask_sampling=bernoulli (VL-BERT's random_word_wwm / random_mask_region):
    each word and each region is a target with probability 0.15 on its own (no cap, some
    captions and images have none), and a word's pieces are corrupted alike, 80/10/10 per word.
    The same sample gets the same masks in another batch."""
    obj = ObjectivesConfig(mask_sampling="bernoulli", whole_word_mask=True, mrc=True, max_pred=1)
    samples = caps(1500, words=(2, 14), regions=(1, 30), captions=(1, 1))
    col = make(tok, DataConfig(max_text_len=40), obj, vlbert=True)
    got = rows(col(samples))
    n_words = n_picked = n_all_mask = n_more_than_cap = no_target = 0
    n_regions = n_mrc = no_region = 0
    for s in samples:
        _, ids, _, pos, lab, mrc = got[s["sample_id"]]
        orig = list(ids)
        for p, t in zip(pos, lab):
            orig[p] = t
        assert orig[1:-1] == tok.encode(s["captions"][0])          # nothing cut at 40
        starts = tok.word_starts(orig[1:-1])
        words = np.split(np.arange(1, len(orig) - 1), np.flatnonzero(starts)[1:])
        for w in words:
            hit = [int(p) in pos for p in w]
            assert all(hit) or not any(hit), (w, pos)              # whole words
            if all(hit):
                masked = [ids[p] == MASK for p in w]
                assert all(masked) or not any(masked), (w, ids)    # one choice per word
                n_all_mask += all(masked)
        n_words += len(words)
        n_picked += sum(int(w[0]) in pos for w in words)
        no_target += not pos
        n_more_than_cap += len(pos) > 1
        n_regions += len(s["features"])
        n_mrc += len(mrc)
        no_region += not mrc
    assert _binom_ok(n_picked, n_words, 0.15) and _binom_ok(n_all_mask, n_picked, 0.8)
    assert _binom_ok(n_mrc, n_regions, 0.15)
    assert no_target > 100 and no_region > 100 and n_more_than_cap > 100     # max_pred unused
    # Batch-independent, as the count rule: a different split of the same samples.
    other = {}
    for chunk in np.array_split(np.arange(200), [7, 50, 51]):
        other.update(rows(col([samples[i] for i in chunk])))
    assert all(other[k] == got[k] for k in other)
    with pytest.raises(ConfigError, match="objectives.mask_sampling"):
        load_config(None, ["objectives.mask_sampling=per_word"])


def test_masked_regions_zeroed_exactly_where_targets_exist(tok):
    obj = ObjectivesConfig(mrc=True, mrc_prob=0.15, mrc_zero_prob=1.0)
    samples = caps(60, regions=(1, 30)) + texts(5)
    b = make(tok, obj=obj)(samples)
    by_id = {s["sample_id"]: s for s in samples}
    B, N, D = b.region_feats.shape
    masked = torch.zeros(B * N, dtype=torch.bool)
    masked[b.mrc_positions] = True
    assert len(set(b.mrc_positions.tolist())) == len(b.mrc_positions)
    assert b.region_mask.view(-1)[b.mrc_positions].all()          # only real regions
    feats = b.region_feats.view(B * N, D)
    cls = b.region_cls_probs.view(B * N, -1)
    assert (feats[masked] == 0).all() and (cls[masked] == 0).all()
    k = 0
    for r, sid in enumerate(b.sample_id.tolist()):
        s = by_id[sid]
        if "features" not in s:
            assert not b.region_mask[r].any()
            continue
        n = len(s["features"])
        rm = masked.view(B, N)[r, :n]
        assert int(rm.sum()) == max(1, int(round(0.15 * n)))
        orig = torch.from_numpy(s["features"].astype(np.float32))
        assert torch.equal(b.region_feats[r, :n][~rm].float(), orig[~rm])
        assert torch.equal(b.region_boxes[r, :n], torch.from_numpy(s["boxes"]))   # boxes kept
        tgt = torch.from_numpy(s["cls_prob"].astype(np.float32))[rm]
        assert torch.equal(b.mrc_targets[k:k + len(tgt)], tgt)
        assert torch.equal(b.region_cls_probs[r, :n][~rm], torch.from_numpy(s["cls_prob"].astype(np.float32))[~rm])
        k += len(tgt)
        if n > 0:   # unmasked feature rows are non-zero, so zeros really mark the masked ones
            assert (orig[~rm].abs().sum(1) > 0).all()
    assert k == len(b.mrc_targets) and b.mrc_targets.dtype == torch.float16  # as stored


def test_mrc_zeroes_ninety_percent_of_the_predicted_regions(tok):
    """objectives.mrc_zero_prob (VL-BERT: 0.9): of the regions predicted, that share have their
    features and class distributions zeroed; the rest keep their inputs, and every one of them
    is a target with its stored distribution."""
    samples = caps(400, regions=(10, 30))
    b = make(tok, obj=ObjectivesConfig(mrc=True, mrc_prob=0.15))(samples)
    B, N, D = b.region_feats.shape
    by_row = {i: s for i, s in enumerate(samples)}
    zeroed = kept = 0
    for j, p in enumerate(b.mrc_positions.tolist()):
        r, n = divmod(p, N)
        s = by_row[r]
        orig = torch.from_numpy(s["features"][n].astype(np.float32))
        cls = torch.from_numpy(s["cls_prob"][n].astype(np.float32))
        assert torch.equal(b.mrc_targets[j].float(), cls)
        if (b.region_feats[r, n] == 0).all():
            assert (b.region_cls_probs[r, n] == 0).all()
            zeroed += 1
        else:
            assert torch.equal(b.region_feats[r, n].float(), orig) and torch.equal(b.region_cls_probs[r, n].float(), cls)
            kept += 1
    assert 0.85 <= zeroed / (zeroed + kept) <= 0.95, (zeroed, kept)
    assert zeroed + kept == len(b.mrc_positions) > 500
    with pytest.raises(ConfigError, match="objectives.mrc_zero_prob"):
        load_config(None, ["objectives.mrc_zero_prob=1.5"])


def test_vlbert_zeroed_regions_get_the_mask_word(tok):
    """VL-BERT under MRC: a region whose input was zeroed gets [MASK]'s word embedding
    (region_ids), every other region, the 10% kept as they are included, [IMG]'s; VLP's
    regions have no word embedding (no region_ids)."""
    samples = caps(200, regions=(10, 30))
    obj = ObjectivesConfig(mrc=True, mrc_prob=0.15)
    b = make(tok, obj=obj, vlbert=True)(samples)
    B, N, D = b.region_feats.shape
    zeroed = torch.zeros(B * N, dtype=torch.bool)
    pos = b.mrc_positions
    zeroed[pos[(b.region_feats.view(B * N, D)[pos] == 0).all(1)]] = True
    assert 0 < int(zeroed.sum()) < len(pos)                       # some zeroed, some kept
    ids = b.region_ids.view(-1)
    assert b.region_ids.shape == (B, N) and b.region_ids.dtype == torch.long
    assert (ids[zeroed] == tok.mask_id).all() and (ids[~zeroed] == tok.img_id).all()
    assert make(tok, obj=obj)(samples).region_ids is None
    assert make(tok, vlbert=True)(samples).region_ids is None     # no MRC: the model's [IMG]
    old = ObjectivesConfig(mrc=True, mrc_prob=0.15, mrc_mask_word=False)    # runs trained before the key
    assert make(tok, obj=old, vlbert=True)(samples).region_ids is None


# ---------------------------------------------------------------------------- determinism

def test_same_sample_same_masks_in_any_batch(tok):
    obj = ObjectivesConfig(mrc=True)
    samples = caps(24, captions=(2, 5)) + texts(8)
    col = make(tok, obj=obj)
    ref = rows(col(samples))
    rng = np.random.default_rng(0)
    for trial in range(3):
        order = rng.permutation(len(samples))
        data = DataConfig(pad_to="bucket") if trial == 1 else DataConfig()
        other = make(tok, data, obj)
        got = {}
        for chunk in np.array_split(order, [3, 10, 11, 20]):
            got.update(rows(other([samples[i] for i in chunk])))
        assert got == ref
    # Pickled into a DataLoader worker: same result.
    assert rows(pickle.loads(pickle.dumps(col))(samples)) == ref
    # Another epoch or another seed: different draws.
    col.set_epoch(1)
    assert sum(rows(col(samples))[k] != ref[k] for k in ref) > len(ref) // 2
    assert sum(rows(make(tok, obj=obj, seed=4)(samples))[k] != ref[k] for k in ref) > len(ref) // 2


# ---------------------------------------------------------------------------- errors

def test_missing_cls_prob_names_the_column(tok):
    meta = schema.make_meta("captions", 8, 5, ("obj_labels",))
    obj = ObjectivesConfig(mrc=True)
    with pytest.raises(ValueError, match=r"s3://bkt/ds0 has no 'cls_prob' column.*hard_class_targets"):
        make(tok, obj=obj, metas=(meta,))
    with pytest.raises(ValueError, match=r"s3://bkt/ds0 has no 'cls_prob' column") as e:
        make(tok, metas=(meta,), require_cls_probs=True)
    # every task's collator says both ways on: the keys that train without the class term, or
    # how to convert with class distributions
    assert "model.use_cls_probs=false model.geometry_conf=false" in str(e.value) and "--tsv-fields" in str(e.value)
    # both terms on (the VLP recipes): one message with every key to turn off, not one per try
    with pytest.raises(ValueError, match=r"which objectives.mrc=true and the model's class-embedding term need; "
                                         r".*--tsv-fields.*train without them: objectives.mrc=false "
                                         r"model.use_cls_probs=false model.geometry_conf=false"):
        make(tok, obj=obj, metas=(schema.make_meta("captions", 8, 5, ()),), require_cls_probs=True)
    # Opt-in hard targets: one-hot of obj_labels, for both targets and the class input. The
    # labels are bottom-up's objects_id (no background), so label k is class column k + 1;
    # the class count comes from the meta or, where the meta has none, from the model.
    no_count = {**meta, "num_classes": None}
    with pytest.raises(ValueError, match=r"hard_class_targets needs the class count.*model.num_region_classes"):
        make(tok, DataConfig(hard_class_targets=True), obj, metas=(no_count,))
    for m, kw in ((meta, {}), (no_count, {"num_classes": 5})):
        col = make(tok, DataConfig(hard_class_targets=True), obj, metas=(m,), **kw)
        samples = caps(6, optional=("obj_labels",))
        b = col(samples)
        for r, s in enumerate(samples):
            n = len(s["obj_labels"])
            onehot = torch.nn.functional.one_hot(torch.from_numpy(s["obj_labels"].astype(np.int64)) + 1, 5).float()
            keep = ~torch.isin(torch.arange(n), b.mrc_positions - r * b.region_mask.shape[1])
            assert torch.equal(b.region_cls_probs[r, :n][keep], onehot[keep])
            assert (b.region_cls_probs[r, :n, 0] == 0).all()          # never background
        assert torch.equal(b.mrc_targets.sum(1), torch.ones(len(b.mrc_positions)))
    samples[3]["obj_labels"][0] = 4                    # 4 non-background classes: ids 0..3
    with pytest.raises(BadSampleError, match=r"sample_id 3: column 'obj_labels' .* outside \[0, 4\)"):
        col(samples)
    # Meta says cls_prob exists but a sample lacks it: the sample is named.
    bad = caps(2)
    del bad[1]["cls_prob"]
    with pytest.raises(BadSampleError, match=r"ds0: sample_id 1: missing column 'cls_prob'"):
        make(tok, obj=obj)(bad)


@pytest.mark.parametrize("breakage, message", [
    (lambda s: s["features"].__setitem__((0, 3), np.nan), r"column 'features' has 1 NaN/inf"),
    (lambda s: s["boxes"].__setitem__((1, 0), np.inf), r"column 'boxes' has 1 NaN/inf"),
    (lambda s: s.__setitem__("features", s["features"][:, :6]), r"column 'features' has dim 6, .*feature_dim=8"),
    (lambda s: s.__setitem__("features", s["features"][:0]), r"image has zero regions"),
    (lambda s: s.__setitem__("boxes", s["boxes"][:-1]), r"column 'boxes' has shape"),
    (lambda s: s.__setitem__("captions", ["a cat", "  "]), r"caption 1 is empty"),
    (lambda s: s.__setitem__("captions", ["a cat", "\ufffd\ufffd\u200b"]),
     r"caption 1 is empty after tokenisation \(only characters BERT's tokenizer drops\)"),
    (lambda s: s.__setitem__("captions", ["a cat", None]), r"caption 1 is not text: None"),
    (lambda s: s.__setitem__("captions", []), r"column 'captions' holds no captions"),
    (lambda s: s.pop("features"), r"missing column 'features'"),
    (lambda s: s["cls_prob"].__setitem__((0, 0), np.nan), r"column 'cls_prob' has 1 NaN/inf"),
    # checks added after a malformed-data audit, each of which trained on silently or crashed unnamed
    (lambda s: s.__setitem__("captions", ["a red circle \ud83d"]),
     r"caption 0 is not valid Unicode \(a lone surrogate at character 13"),
    (lambda s: s.__setitem__("features", s["features"].astype(np.int32)),
     r"column 'features' has dtype int32, expected floating point"),
    (lambda s: s.__setitem__("boxes", s["boxes"] * 640),
     r"column 'boxes' holds values in \[.*\]; boxes are normalised"),
    (lambda s: s["boxes"].__setitem__(0, np.array([0.5, 0.2, 0.3, 0.9], np.float32)),
     r"column .boxes. has boxes with x2 < x1 or y2 < y1"),
    (lambda s: s.__setitem__("cls_prob", (s["cls_prob"] - 0.5).astype(np.float16)),
     r"column 'cls_prob' is no class distribution per region \(smallest value -0\.\d+"),
    (lambda s: s.__setitem__("cls_prob", (s["cls_prob"] * 50).astype(np.float16)),
     r"column 'cls_prob' is no class distribution per region \(smallest value .*, largest row sum 50"),
])
def test_bad_sample_errors_name_dataset_and_sample(tok, breakage, message):
    samples = caps(4)
    breakage(samples[2])
    with pytest.raises(BadSampleError, match=rf"dataset s3://bkt/ds0: sample_id 2: {message}"):
        make(tok, obj=ObjectivesConfig(mrc=True))(samples)


def test_a_caption_that_tokenizes_to_nothing_fails_its_sample_in_every_epoch(tok):
    """Every caption of a sample is checked, not only the one an epoch draws: a mojibake
    caption beside good ones failed (or, skipping, dropped) its sample in some epochs only."""
    col = make(tok, obj=ObjectivesConfig(mrc=True))
    samples = caps(4)
    samples[2]["captions"] = ["a cat", "a dog", "\ufffd\ufffd\u200b"]
    for epoch in range(6):
        col.set_epoch(epoch)
        with pytest.raises(BadSampleError, match=r"sample_id 2: caption 2 is empty after tokenisation"):
            col(samples)


def test_metaless_dataset_dims_checked_against_the_model_per_sample(tok):
    """Without a vltrain_meta.json nothing pins a dataset's feature dim or class count: each
    sample is checked against the model's, so an odd one is named (and skippable) instead of
    failing the whole batch or the model's matmul."""
    samples = caps(4)
    samples[2]["features"] = samples[2]["features"][:, :6]
    samples[3]["cls_prob"] = samples[3]["cls_prob"][:, :4]
    obj = ObjectivesConfig(mrc=True)
    with pytest.raises(BadSampleError, match=r"sample_id 2: column 'features' has dim 6, but model.region_feat_dim=8"):
        make(tok, obj=obj, metas=({},), feat_dim=8, num_classes=5)(samples)
    b = make(tok, DataConfig(skip_bad_samples=True), obj, metas=({},), feat_dim=8, num_classes=5)(samples)
    assert b.sample_id.tolist() == [0, 1] and len(b.task[SKIPPED_KEY]) == 2
    assert "sample_id 3: column 'cls_prob' has shape (" in b.task[SKIPPED_KEY][1]
    # Without the model's dims (a collator built by hand) the batch error names the samples.
    with pytest.raises(BadSampleError, match=r"feature dims: 6 \(sample_id 2\), 8 \(sample_id 0, 1, 3\)"):
        make(tok, obj=obj, metas=({},))(samples)
    with pytest.raises(BadSampleError, match=r"class counts: 4 \(sample_id 3\), 5 \(sample_id 0, 1\)"):
        make(tok, obj=obj, metas=({},))(samples[:2] + samples[3:])


def test_the_float16_finiteness_check_agrees_with_numpy_on_every_bit_pattern():
    """The collator tests float16 arrays through their bits (numpy's float16 math is slow):
    every one of the 65,536 values, alone and inside an otherwise finite array."""
    from vltrain.data.collate import _all_finite
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.isfinite(every.astype(np.float32))
    assert finite.sum() == 63488                       # 2 x 31 exponents x 1024 mantissas
    assert [_all_finite(np.array([v])) for v in every] == finite.tolist()
    base = np.full((4, 7), 1.5, np.float16)
    for v in every[~finite][::97].tolist() + [np.inf, -np.inf, np.nan]:
        arr = base.copy()
        arr[3, 6] = v
        assert not _all_finite(arr)
    assert _all_finite(base) and _all_finite(np.zeros((0, 7), np.float16))
    assert _all_finite(np.array([65504, -65504, 6e-8, -0.0], np.float16))


def test_skip_bad_samples_counts_them(tok):
    col = make(tok, DataConfig(skip_bad_samples=True), ObjectivesConfig(mrc=True))
    samples = caps(5) + texts(2)
    samples[1]["features"][0, 0] = np.inf
    samples[6]["text"] = " "
    samples[4]["captions"] = ["a cat \udc80"]          # the tokenizer's TypeError named no sample
    b = col(samples)
    assert sorted(b.sample_id.tolist()) == [0, 2, 3, 1000]
    assert len(b.task[SKIPPED_KEY]) == 3
    assert any("sample_id 1" in m for m in b.task[SKIPPED_KEY])
    assert any("sample_id 1001: text is empty" in m for m in b.task[SKIPPED_KEY])
    empty = col([samples[1]])
    assert empty.batch_size == 0 and len(empty.task[SKIPPED_KEY]) == 1


def test_whole_word_masking_never_exceeds_max_pred_nor_splits_a_word():
    """Whole words only, never more than n_mask pieces (max_pred): where no word fits (n_mask 1,
    words of 5 and 2 pieces) nothing is masked, as in Google BERT; a word's first pieces
    masked alone (as before) left its other pieces to give the answer away."""
    from vltrain.data.masking import choose_mlm_positions
    cand = np.arange(2, 9)                                        # words: [2..6] (5 pieces), [7, 8]
    starts = np.array([1, 0, 0, 0, 0, 1, 0], bool)
    for seed in range(20):
        assert choose_mlm_positions(np.random.default_rng(seed), cand, 1, starts).tolist() == []
        assert choose_mlm_positions(np.random.default_rng(seed), cand, 3, starts).tolist() == [7, 8]
        assert choose_mlm_positions(np.random.default_rng(seed), cand, 7, starts).tolist() == list(range(2, 9))


def test_class_distributions_are_collated_only_when_used(tok):
    """cls_prob (100 x 1601 at base size: more bytes than the features) goes into the batch for
    region classification or VLP's class-embedding term, not otherwise (e.g. VL-BERT fine-tuning)."""
    samples = caps(6)
    assert make(tok, obj=ObjectivesConfig(mrc=False))(samples).region_cls_probs is None
    assert make(tok, obj=ObjectivesConfig(mrc=False), require_cls_probs=True)(samples).region_cls_probs is not None
    b = make(tok, obj=ObjectivesConfig(mrc=True))(samples)
    assert b.region_cls_probs is not None and b.region_cls_probs.shape[-1] == samples[0]["cls_prob"].shape[-1]
