"""The unified model: BERT parity, attention-mask semantics, backends, gradients."""
import dataclasses
import logging

import pytest
import torch
from transformers import BertModel

from tests.fixtures.assets import bert_text_diff
from vltrain.config import debug_model_config
from vltrain.data.batch import MODE_BIDIRECTIONAL, MODE_LEFT_TO_RIGHT, MODE_SEQ2SEQ, Batch
from vltrain.model import VLModel
from vltrain.model.bert_weights import from_hf_state_dict, to_hf_state_dict
from vltrain.config import ObjectivesConfig
from vltrain.objectives import pretrain_losses


def random_inputs(cfg, B=4, T=12, N=6, seed=0, pad=True):
    """Image-text inputs in our layout: [CLS] [SEP] w.. [STOP]; text padded per row, regions too."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, cfg.vocab_size, (B, T), generator=g)
    ids[:, 0], ids[:, 1] = 101, 102
    am = torch.ones(B, T, dtype=torch.long)
    rm = torch.ones(B, N, dtype=torch.bool)
    if pad:
        for b in range(1, B):
            am[b, T - 2 * b:] = 0
            rm[b, N - b:] = False
    ids = ids * am
    tt = torch.zeros_like(ids)
    tt[:, 2:] = 1
    tt = tt * am
    feats = torch.randn(B, N, cfg.region_feat_dim, generator=g)
    xy = torch.rand(B, N, 2, generator=g) * 0.5
    boxes = torch.cat([xy, xy + 0.1 + torch.rand(B, N, 2, generator=g) * 0.4], -1)
    probs = torch.softmax(torch.randn(B, N, cfg.num_region_classes, generator=g), -1)
    return dict(input_ids=ids, token_type_ids=tt, attention_mask=am, region_feats=feats,
                region_boxes=boxes, region_cls_probs=probs, region_mask=rm)


def make_model(backend="eager", seed=0, **kw):
    torch.manual_seed(seed)
    return VLModel(debug_model_config(attention_backend=backend, **kw)).eval()


# the region embeddings, and VL-BERT with its code's sequence (whole-image region, [END])
KINDS = {"vlp": dict(region_embedding="vlp"), "vlbert": dict(region_embedding="vlbert"),
         "vlbert-slots": dict(region_embedding="vlbert", vlbert_image_box=True, vlbert_end_token=True)}


# --------------------------------------------------------------------------- BERT parity

@pytest.fixture(scope="module")
def hf_bert(minilm_dir):
    return BertModel.from_pretrained(minilm_dir).eval()


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_text_only_equals_transformers_bert(minilm_dir, hf_bert, backend):
    model = VLModel.from_pretrained(minilm_dir, attention_backend=backend).eval()
    assert bert_text_diff(model, hf_bert, seed=1, length=21) < 1e-4


def test_weight_name_map_round_trips(minilm_dir):
    from vltrain.model.transformer import named_pieces
    model = make_model()
    flat = model.state_dict()
    sd = named_pieces(flat, model.config)
    assert {"layers.1.qkv.weight", "layers.1.ffn_norm.bias"} <= sd.keys() and "layers.1.matrices" not in sd
    n_block = sum(flat[f"layers.1.{k}"].numel() for k in ("matrices", "vectors"))
    assert sum(v.numel() for k, v in sd.items() if k.startswith("layers.1.")) == n_block   # every element once
    back = from_hf_state_dict(to_hf_state_dict(sd))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)
    hf_names = to_hf_state_dict(sd)
    # BERT's pretraining-checkpoint layout: encoder under bert., MLM head as cls.predictions
    assert "bert.encoder.layer.1.attention.self.key.weight" in hf_names
    assert "bert.embeddings.word_embeddings.weight" in hf_names
    assert "cls.predictions.transform.dense.weight" in hf_names and "cls.predictions.bias" in hf_names


def test_from_pretrained_overrides_and_grown_token_types(minilm_dir):
    from safetensors.torch import load_file
    model = VLModel.from_pretrained(minilm_dir, region_embedding="vlbert", type_vocab_size=3,
                                    image_token_type=2, region_feat_dim=32)
    ref = load_file(f"{minilm_dir}/model.safetensors")["embeddings.token_type_embeddings.weight"]
    tt = model.embeddings.token_type.weight
    assert tt.shape[0] == 3 and torch.equal(tt[:2], ref)
    assert not torch.equal(tt[2], torch.zeros_like(tt[2]))
    assert model.region_embeddings.proj.in_features == 32 + 2048
    with pytest.raises(Exception, match="model.region_feat_dims"):
        VLModel.from_pretrained(minilm_dir, region_feat_dims=32)


def test_vlbert_from_bert_starts_with_zero_visual_terms(minilm_dir):
    """VL-BERT's pretraining init (visual_scale_*_init 0): the visual LayerNorms' gains are 0,
    so at the first step no text or region token depends on the features (text rows are BERT's
    inputs plus nothing); the gains get gradients and the visual terms grow from there."""
    from vltrain.config import ModelConfig
    assert ModelConfig().vlbert_visual_scale_init == 0.0 and ModelConfig().vlbert_visual_embedding == "vlbert"
    model = VLModel.from_pretrained(minilm_dir, region_embedding="vlbert", type_vocab_size=3, image_token_type=2,
                                    region_feat_dim=32, vlbert_geometry_dim=64)
    emb = model.region_embeddings
    assert all(torch.equal(n.weight, torch.zeros_like(n.weight)) for n in (emb.norm_text, emb.norm_region))
    inp = random_inputs(model.config)
    other = dict(inp, region_feats=torch.randn_like(inp["region_feats"]) * 30,
                 region_boxes=torch.rand_like(inp["region_boxes"]))
    model.eval()                                               # no dropout: two forwards comparable
    a, b = model(**inp), model(**other)
    torch.testing.assert_close(a.text_hidden, b.text_hidden, rtol=0, atol=0)
    torch.testing.assert_close(a.region_hidden, b.region_hidden, rtol=0, atol=0)
    a.text_hidden.square().sum().backward()
    assert emb.norm_text.weight.grad.abs().sum() > 0 and emb.norm_region.weight.grad.abs().sum() > 0


def test_from_pretrained_shape_mismatch_names_parameter(minilm_dir):
    with pytest.raises(ValueError, match="embeddings.word.weight") as e:
        VLModel.from_pretrained(minilm_dir, vocab_size=1000)
    assert "model.vocab_size=1000 here, 30522 in the source: set model.vocab_size=30522" in str(e.value)


def test_a_source_of_other_model_sizes_names_the_keys():
    """A checkpoint's token-type table larger than the model's (VL-BERT's 3 into 2) and another
    class count: the error names the keys and the source's values, not only the tensors."""
    from vltrain.model.bert_weights import load_into
    src = make_model(type_vocab_size=3, num_region_classes=9)
    with pytest.raises(ValueError, match="shapes do not match") as e:
        load_into(make_model(), src.state_dict(), "ckpt")
    assert "model.type_vocab_size=2 here, 3 in the source: set model.type_vocab_size=3" in str(e.value)
    assert "model.num_region_classes=17 here, 9 in the source: set model.num_region_classes=9" in str(e.value)


# --------------------------------------------------------------------------- VL-BERT geometry

def test_vlbert_geometry_is_the_papers_2048_sincos():
    """Default width 2048 = VL-BERT's coordinate_embeddings(boxes, 256): per coordinate, the sines
    then the cosines of 100 * c / 1000 ** (i / 256), coordinates one after another."""
    model = make_model(region_embedding="vlbert")
    emb = model.region_embeddings
    assert model.config.vlbert_geometry_dim == 2048
    assert emb.proj.in_features == model.config.region_feat_dim + 2048
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.1, 0.25, 0.6, 0.9], [0.33, 0.5, 0.34, 0.75]])
    wave = 1000.0 ** (torch.arange(256, dtype=torch.float64) / 256)
    ref = torch.stack([torch.cat([f(100.0 * c / wave) for c in box for f in (torch.sin, torch.cos)])
                       for box in boxes.double()]).float()
    assert ref.shape == (3, 2048)
    feats = torch.randn(3, model.config.region_feat_dim)
    relu = torch.nn.functional.relu              # VL-BERT's obj_downsample: FC then ReLU
    with torch.no_grad():
        torch.testing.assert_close(emb(feats, boxes), relu(emb.proj(torch.cat([feats, ref], -1))), rtol=0, atol=1e-5)
        # bf16 weights: the sin/cos still come from the float32 boxes (a bf16 corner near 1 is
        # off by ~0.002, ~0.2 rad at the highest frequency), rounded to bf16 only afterwards
        emb = emb.to(torch.bfloat16)
        torch.testing.assert_close(emb(feats, boxes), relu(emb.proj(torch.cat([feats, ref], -1).bfloat16())),
                                   rtol=0, atol=0)


def test_vlbert_text_regions_give_linked_words_their_regions_feature():
    """VL-BERT's VCR link: a token with text_regions = r gets region r's visual feature
    embedding (appearance + geometry, through the text tokens' visual LayerNorm) in place of
    the whole image's; -1 keeps the image's."""
    model = make_model(region_embedding="vlbert", type_vocab_size=3, image_token_type=2)
    inp = random_inputs(model.config)
    B, T = inp["input_ids"].shape
    seen = []
    hook = model.embeddings.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    links = torch.full((B, T), -1, dtype=torch.long)
    links[0, 3], links[0, 4], links[2, 2] = 1, 1, 4            # rows 0 and 2: real tokens and regions
    with torch.no_grad():
        base = model(**inp)
        same = model(**inp, text_regions=torch.full((B, T), -1, dtype=torch.long))
        model(**inp, text_regions=links)
    hook.remove()
    torch.testing.assert_close(same.text_hidden, base.text_hidden, rtol=0, atol=0)
    N = inp["region_feats"].shape[1]
    text = lambda x: torch.cat([x[:, :1], x[:, 1 + N:]], 1)    # noqa: E731  (regions follow [CLS])
    diff = text(seen[2]) - text(seen[0])
    m = inp["region_mask"][..., None].float()
    with torch.no_grad():
        emb = model.region_embeddings
        has = torch.ones(B, dtype=torch.bool)
        image = emb.text_term(emb.image_term((inp["region_feats"] * m).sum(1) / m.sum(1)), has, B)   # (B, H)
        visual = emb.text_term(emb(inp["region_feats"], inp["region_boxes"]), has, B)
    for b, t, r in ((0, 3, 1), (0, 4, 1), (2, 2, 4)):
        torch.testing.assert_close(diff[b, t], visual[b, r] - image[b], rtol=1e-5, atol=1e-5)
    diff[0, 3:5] = 0
    diff[2, 2] = 0
    assert diff.abs().max() == 0                                  # every other token as before
    with pytest.raises(ValueError, match="text_regions .* needs model.region_embedding=vlbert"):
        make_model()(**inp, text_regions=links)


def test_vlbert_region_ids_swap_only_those_regions_word_embedding():
    """region_ids (VL-BERT's masked regions, [MASK] where MRC zeroed the input): the region's
    input before the embedding LayerNorm changes by exactly word([MASK]) - word([IMG]); every
    other position is unchanged, and all-[IMG] ids equal the default."""
    model = make_model(region_embedding="vlbert", type_vocab_size=3, image_token_type=2)
    inp = random_inputs(model.config)
    B, N = inp["region_feats"].shape[:2]
    cfg = model.config
    ids = torch.full((B, N), cfg.img_token_id, dtype=torch.long)
    seen = []
    hook = model.embeddings.norm.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    with torch.no_grad():
        base = model(**inp)
        same = model(**inp, region_ids=ids)
        ids[1, 2] = ids[3, 0] = 103
        masked = model(**inp, region_ids=ids)
    hook.remove()
    torch.testing.assert_close(same.region_hidden, base.region_hidden, rtol=0, atol=0)
    assert not torch.allclose(masked.region_hidden, base.region_hidden)
    word = model.embeddings.word.weight.detach()
    diff = seen[2] - seen[0]
    for b, r in ((1, 2), (3, 0)):
        torch.testing.assert_close(diff[b, 1 + r], word[103] - word[cfg.img_token_id], rtol=1e-6, atol=1e-6)
        diff[b, 1 + r] = 0
    assert diff.abs().max() == 0
    with pytest.raises(ValueError, match=r"region_ids has shape \(4, 2\)"):
        model(**inp, region_ids=ids[:, :2])
    with pytest.raises(ValueError, match="region_ids .* needs model.region_embedding=vlbert"):
        make_model()(**inp, region_ids=ids)


def test_vlbert_slots_are_the_whole_image_region_and_end():
    """model.vlbert_image_box / vlbert_end_token: VL-BERT's code's sequence. The whole image is a
    region before the others (its feature and full box, as text tokens see it, with the [IMG]
    word), [END] follows them (its word embedding, no visual term); both only in rows with an
    image, never in the outputs; the MFU counter's tokens are the keys the blocks see."""
    from vltrain.config import Config
    from vltrain.tasks.base import batch_work
    slots = make_model(**KINDS["vlbert-slots"])
    plain = make_model(region_embedding="vlbert")
    plain.load_state_dict(slots.state_dict())                    # the slots add no parameter
    cfg = slots.config
    inp = random_inputs(cfg, B=3)
    inp["region_mask"][2] = False                                 # row 2: no image, in a mixed batch
    B, T = inp["input_ids"].shape
    N = inp["region_feats"].shape[1]
    m = inp["region_mask"][..., None].float()
    mean = (inp["region_feats"] * m).sum(1) / m.sum(1).clamp(min=1)      # the model's own whole-image feature
    for image_feat in (torch.randn(B, cfg.region_feat_dim), None):
        seen = []
        hooks = [m.layers[0].register_forward_pre_hook(lambda mod, args: seen.append(args[:2])) for m in (slots, plain)]
        with torch.no_grad():
            out = slots(**inp, image_feat=image_feat)
            plain(**inp, image_feat=image_feat)
            # the plain model given the whole image as its first region
            box = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(B, 1, 4)
            whole = mean if image_feat is None else image_feat
            first = dict(inp, region_feats=torch.cat([whole[:, None], inp["region_feats"]], 1),
                         region_boxes=torch.cat([box, inp["region_boxes"]], 1),
                         region_cls_probs=torch.cat([inp["region_cls_probs"][:, :1], inp["region_cls_probs"]], 1),
                         region_mask=torch.cat([inp["region_mask"].any(1, keepdim=True), inp["region_mask"]], 1))
            plain(**first, image_feat=whole)
            end = slots.embeddings.norm(slots.embeddings.word.weight[cfg.end_token_id] + slots.region_position +
                                        slots.embeddings.token_type.weight[cfg.image_token_type])
        for h in hooks:
            h.remove()
        (x, mask), (x0, _), (x1, _) = seen
        torch.testing.assert_close(x[:, 1:2 + N], x1[:, 1:2 + N], rtol=0, atol=1e-5)    # whole image, regions
    assert x.shape[1] == x0.shape[1] + 2 == 1 + 1 + N + 1 + (T - 1)
    torch.testing.assert_close(x[:, :1], x0[:, :1], rtol=0, atol=0)                 # [CLS]
    torch.testing.assert_close(x[:, 2 + N], end.expand(B, -1), rtol=0, atol=1e-6)   # [END]
    torch.testing.assert_close(x[:, 3 + N:], x0[:, 1 + N:], rtol=0, atol=0)         # the text
    keys = mask[:, 0, 0] == 0                                    # what [CLS] sees (bidirectional)
    assert keys[:2, [1, 2 + N]].all() and not keys[2, [1, 2 + N]].any()
    assert out.region_hidden.shape == (B, N, cfg.hidden_size) and out.text_hidden.shape == (B, T, cfg.hidden_size)
    batch = Batch(sample_id=torch.arange(B), input_ids=inp["input_ids"], token_type_ids=inp["token_type_ids"],
                  attention_mask=inp["attention_mask"], mode=torch.zeros(B, dtype=torch.long),
                  region_feats=inp["region_feats"], region_boxes=inp["region_boxes"],
                  region_cls_probs=inp["region_cls_probs"], region_mask=inp["region_mask"])
    work = batch_work(None, batch, Config(model=cfg))
    assert int(work.tokens) == int(keys.sum()) and int(work.tokens_sq) == int((keys.sum(1) ** 2).sum())
    # in training, the whole-image region and the text share one projection (one dropout draw,
    # as the code's obj_reps[:, 0]): the visual embedding runs twice per forward, as without slots
    calls = []
    for model in (slots, plain):
        hook = model.region_embeddings.proj.register_forward_hook(lambda *a: calls.append(1))
        model.train()(**inp)
        hook.remove()
        model.eval()
    assert len(calls) == 4
    with pytest.raises(ValueError, match="model.vlbert_end_token=true is VL-BERT's sequence; it needs "
                                         "model.region_embedding=vlbert"):
        make_model(vlbert_end_token=True)


@pytest.mark.parametrize("dim", [0, -8, 100])
def test_vlbert_geometry_dim_must_be_a_positive_multiple_of_8(dim):
    with pytest.raises(ValueError, match=f"model.vlbert_geometry_dim={dim} must be a positive multiple of 8"):
        make_model(region_embedding="vlbert", vlbert_geometry_dim=dim)


def save_export(model, folder, drop_keys=()):
    """``model`` as a vltrain export folder (config.json + model.safetensors), as ckpt/export.py
    writes one; ``drop_keys``: model keys its config was written without (before they existed)."""
    import json
    from safetensors.torch import save_file
    from vltrain.model.bert_weights import export_config_json
    from vltrain.model.transformer import named_pieces
    config = export_config_json(model.config)
    for key in drop_keys:
        del config["vltrain"][key]
    with open(folder / "config.json", "w") as f:
        json.dump(config, f)
    state = to_hf_state_dict(named_pieces(model.state_dict(), model.config))
    save_file({k: v.clone().contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))


def test_exported_vlbert_model_reloads_with_its_geometry_width(tmp_path):
    model = make_model(region_embedding="vlbert", vlbert_geometry_dim=64)
    save_export(model, tmp_path)
    back = VLModel.from_pretrained(str(tmp_path)).eval()
    assert back.config == model.config
    x = random_inputs(model.config, B=2)
    torch.testing.assert_close(run(back, x, "bidirectional").text_hidden, run(model, x, "bidirectional").text_hidden)


def test_tanh_gelu_is_named_as_transformers_names_it(tmp_path):
    """model.hidden_act=gelu_tanh is transformers' gelu_pytorch_tanh (it knows no gelu_tanh):
    an export loads in BertModel with the same activation, and a BERT config.json saying
    gelu_pytorch_tanh reads as ours."""
    import json
    import transformers
    from vltrain.model.bert_weights import read_model_config
    model = make_model(hidden_act="gelu_tanh")
    save_export(model, tmp_path)
    hf = transformers.BertModel.from_pretrained(str(tmp_path))
    assert hf.config.hidden_act == "gelu_pytorch_tanh"
    x = torch.randn(5)
    torch.testing.assert_close(transformers.activations.ACT2FN[hf.config.hidden_act](x),
                               torch.nn.functional.gelu(x, approximate="tanh"))
    assert VLModel.from_pretrained(str(tmp_path)).config.hidden_act == "gelu_tanh"
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_act": "gelu_pytorch_tanh",
                                                  "hidden_size": 64, "num_attention_heads": 4}))
    assert read_model_config(str(bert)).hidden_act == "gelu_tanh"


def resume_into_default_vlbert(tmp_path, old):
    """check_model_matches of a checkpoint tag holding ``old``'s parameter shapes (its config.yaml:
    today's default VL-BERT model) against that default model, as a resume runs it."""
    from vltrain.config import Config, save_config
    from vltrain.engine.resume import check_model_matches
    from vltrain.tasks.pretrain import PretrainTask
    cfg = Config(model=debug_model_config(region_embedding="vlbert"))
    tag = tmp_path / "step_00000006"
    tag.mkdir()
    torch.save({"param_shapes": [{n: tuple(p.shape) for n, p in PretrainTask(old, ObjectivesConfig()).named_parameters()}]},
               tag / "mp_rank_00_model_states.pt")
    save_config(cfg, str(tag / "config.yaml"))
    check_model_matches(str(tag), PretrainTask(VLModel(cfg.model), ObjectivesConfig()))


def test_vlbert_text_only_rows_get_the_aux_visual_term():
    """VL-BERT's text-only samples add its aux_text_visual_embedding through the text tokens'
    visual LayerNorm: a row without an image gets the same term in a text-only batch as in a
    mixed one and in the cached decoder's prefix; with model.vlbert_text_only_visual=none, none."""
    from vltrain.model.incremental import encode_prefix
    model = make_model(region_embedding="vlbert")
    plain = make_model(region_embedding="vlbert", vlbert_text_only_visual="none")
    missing, _ = plain.load_state_dict(model.state_dict(), strict=False)
    assert missing == [] and "region_embeddings.aux_text.weight" not in plain.state_dict()
    inp = random_inputs(model.config)
    inp["region_mask"][1] = False                                 # row 1: no image, in a mixed batch
    text_only = {k: inp[k][1:2] for k in ("input_ids", "token_type_ids", "attention_mask")}
    seen = []
    hooks = [m.embeddings.norm.register_forward_pre_hook(lambda mod, args: seen.append(args[0])) for m in (model, plain)]
    with torch.no_grad():
        model(**inp)
        model(**text_only)
        plain(**text_only)
        aux = model.region_embeddings.text_term(None, None, 1)    # (1, 1, H)
        prefix = encode_prefix(model, **text_only)
    for h in hooks:
        h.remove()
    N = inp["region_feats"].shape[1]
    mixed = torch.cat([seen[0][1:2, :1], seen[0][1:2, 1 + N:]], 1)
    torch.testing.assert_close(seen[1], mixed, rtol=0, atol=1e-6)
    torch.testing.assert_close(seen[1] - seen[2], aux.expand_as(seen[1]), rtol=0, atol=1e-6)
    assert aux.abs().max() > 0
    torch.testing.assert_close(prefix.image_term, aux, rtol=0, atol=0)
    # under autocast too: the image rows' bf16 projections do not round the aux term
    emb = model.region_embeddings
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        mixed_term = emb.text_term(torch.randn(2, 1, aux.shape[-1]).to(torch.bfloat16), torch.tensor([True, False]), 2)
        alone = emb.text_term(None, None, 1)
    assert torch.equal(mixed_term[1], alone[0])


@pytest.mark.parametrize("key, value, choices", [("vlbert_visual_embedding", "fc", "'vlbert'"),
                                                 ("vlbert_text_only_visual", "zero", "'aux'")])
def test_vlbert_embedding_keys_refuse_unknown_values(key, value, choices):
    with pytest.raises(ValueError, match=f"model.{key}='{value}'; choose {choices}"):
        make_model(region_embedding="vlbert", **{key: value})


def test_old_128d_vlbert_checkpoint_is_refused_naming_the_projection(tmp_path):
    """A VL-BERT checkpoint from before model.vlbert_geometry_dim (128-d geometry, a config without
    the key, which then reads as 2048): loading it names the parameter, both shapes and the fix,
    for init_from / from_pretrained and for a resume."""
    from vltrain.engine.resume import CheckpointError
    old = make_model(region_embedding="vlbert", vlbert_geometry_dim=128)
    save_export(old, tmp_path, drop_keys=("vlbert_geometry_dim",))
    with pytest.raises(ValueError) as e:
        VLModel.from_pretrained(str(tmp_path))
    assert "region_embeddings.proj.weight: checkpoint (64, 192) vs model (64, 2112)" in str(e.value)
    assert "model.vlbert_geometry_dim=128" in str(e.value)
    assert VLModel.from_pretrained(str(tmp_path), vlbert_geometry_dim=128).config == old.config

    with pytest.raises(CheckpointError) as e:
        resume_into_default_vlbert(tmp_path, old)
    assert "model.region_embeddings.proj.weight: checkpoint (64, 192) vs model (64, 2112)" in str(e.value)
    assert "model.vlbert_geometry_dim=128" in str(e.value)


def test_vlbert_checkpoint_without_visual_layernorms_is_refused_naming_the_key(tmp_path):
    """A VL-BERT checkpoint from before the visual LayerNorms (a config without
    model.vlbert_visual_embedding, which then reads as vlbert): fresh LayerNorms would silently
    switch off (gain 0) or rescale its visual terms, so init_from / from_pretrained and a resume
    are refused naming model.vlbert_visual_embedding=linear, which loads it exactly."""
    from vltrain.engine.resume import CheckpointError
    old = make_model(region_embedding="vlbert", vlbert_visual_embedding="linear")
    assert not any("norm_" in n for n, _ in old.named_parameters())
    save_export(old, tmp_path, drop_keys=("vlbert_visual_embedding", "vlbert_visual_scale_init"))
    with pytest.raises(ValueError, match=r"has VL-BERT's region projection but not its visual LayerNorms.*"
                                         r"model.vlbert_visual_embedding=linear"):
        VLModel.from_pretrained(str(tmp_path))
    back = VLModel.from_pretrained(str(tmp_path), vlbert_visual_embedding="linear").eval()
    x = random_inputs(old.config, B=2)
    torch.testing.assert_close(run(back, x, "bidirectional").text_hidden, run(old, x, "bidirectional").text_hidden,
                               rtol=0, atol=0)
    # and the other way: a checkpoint with the LayerNorms into a linear model would drop them
    new = tmp_path / "new"
    new.mkdir()
    save_export(make_model(region_embedding="vlbert"), new)
    with pytest.raises(ValueError, match=r"has VL-BERT's visual LayerNorms .* model.vlbert_visual_embedding=linear"):
        VLModel.from_pretrained(str(new), vlbert_visual_embedding="linear")
    # into a VLP model (a debug recipe's), with or without the LayerNorms, and a VLP checkpoint
    # into a VL-BERT model: the key to set is the region embedding
    for src, kind, want in ((new, "vlp", "VL-BERT"), (tmp_path, "vlp", "VL-BERT"), (None, "vlbert", "VLP")):
        if src is None:
            src = tmp_path / "vlp"
            src.mkdir()
            save_export(make_model(), src)
        with pytest.raises(ValueError, match=rf"is a {want} model \(its region embedding\) but the model is built "
                                             rf"with model.region_embedding={kind}: set model.region_embedding="):
            VLModel.from_pretrained(str(src), region_embedding=kind)

    with pytest.raises(CheckpointError, match=r"in the model but not in the checkpoint: .*norm_region(.|\n)*"
                                              r"model.vlbert_visual_embedding=linear"):
        resume_into_default_vlbert(tmp_path, old)


def test_vlbert_checkpoint_without_the_aux_term_is_refused_naming_the_key(tmp_path, caplog):
    """A VL-BERT checkpoint from before the aux term of text-only rows (a config without
    model.vlbert_text_only_visual, which then reads as aux): a fresh aux embedding through its
    trained text LayerNorm would give text-only rows a term it never had, so init_from /
    from_pretrained and a resume are refused naming model.vlbert_text_only_visual=none, which
    loads it exactly; the other way round, dropping a checkpoint's aux term is logged."""
    from vltrain.engine.resume import CheckpointError
    old = make_model(region_embedding="vlbert", vlbert_text_only_visual="none")
    save_export(old, tmp_path, drop_keys=("vlbert_text_only_visual",))
    with pytest.raises(ValueError, match=r"has VL-BERT's visual LayerNorms but not its visual term of text-only "
                                         r"rows; .*model.vlbert_text_only_visual=none"):
        VLModel.from_pretrained(str(tmp_path))
    back = VLModel.from_pretrained(str(tmp_path), vlbert_text_only_visual="none").eval()
    x = {k: v for k, v in random_inputs(old.config, B=2).items() if not k.startswith("region_")}
    torch.testing.assert_close(run(back, x, "bidirectional").text_hidden, run(old, x, "bidirectional").text_hidden,
                               rtol=0, atol=0)
    # the other way: the aux term is dropped, said so (image rows are unaffected)
    new = tmp_path / "new"
    new.mkdir()
    save_export(make_model(region_embedding="vlbert"), new)
    with caplog.at_level(logging.WARNING, logger="vltrain.model.bert_weights"):
        VLModel.from_pretrained(str(new), vlbert_text_only_visual="none")
    assert any("region_embeddings.aux_text.weight) but the model is built with model.vlbert_text_only_visual=none"
               in r.getMessage() for r in caplog.records)

    with pytest.raises(CheckpointError, match=r"in the model but not in the checkpoint: .*aux_text(.|\n)*"
                                              r"model.vlbert_text_only_visual=none"):
        resume_into_default_vlbert(tmp_path, old)


# --------------------------------------------------------------------------- mask semantics

def run(model, inputs, mode):
    with torch.no_grad():
        return model(**inputs, mode=mode)


@pytest.mark.parametrize("kind", KINDS)
def test_seq2seq_mask_semantics(kind):
    model = make_model(**KINDS[kind])
    x = random_inputs(model.config, B=2, pad=False)
    base = run(model, x, "seq2seq")
    # Change a target token (position 6 of 12; targets are positions >= 2).
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][:, 6] = 2000
    out = run(model, y, "seq2seq")
    assert torch.allclose(out.region_hidden, base.region_hidden, atol=1e-6)
    assert torch.allclose(out.text_hidden[:, :6], base.text_hidden[:, :6], atol=1e-6)
    assert not torch.allclose(out.text_hidden[:, 6:], base.text_hidden[:, 6:], atol=1e-4)
    # Change one region: every text state moves.
    z = {k: v.clone() for k, v in x.items()}
    z["region_feats"][:, 0] += 1.0
    out = run(model, z, "seq2seq")
    diff = (out.text_hidden - base.text_hidden).abs().amax(-1)
    assert (diff > 1e-5).all()


def test_bidirectional_last_token_reaches_regions():
    model = make_model()
    x = random_inputs(model.config, B=2, pad=False)
    base = run(model, x, "bidirectional")
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][:, -1] = 2000
    out = run(model, y, "bidirectional")
    assert ((out.region_hidden - base.region_hidden).abs().amax(-1) > 1e-5).all()


def test_left_to_right_is_causal_over_text():
    model = make_model()
    x = random_inputs(model.config, B=2, pad=False)
    base = run(model, x, "left_to_right")
    y = {k: v.clone() for k, v in x.items()}
    y["input_ids"][:, 4] = 2000
    out = run(model, y, "left_to_right")
    assert torch.allclose(out.text_hidden[:, :4], base.text_hidden[:, :4], atol=1e-6)
    assert torch.allclose(out.region_hidden, base.region_hidden, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_mixed_modes_equal_each_example_alone(kind):
    model = make_model(**KINDS[kind])
    x = random_inputs(model.config, B=4)
    modes = torch.tensor([MODE_SEQ2SEQ, MODE_BIDIRECTIONAL, MODE_SEQ2SEQ, MODE_BIDIRECTIONAL])
    mixed = run(model, x, modes)
    for b in range(4):
        one = {k: v[b:b + 1] for k, v in x.items()}
        alone = run(model, one, int(modes[b]))
        tv, rv = x["attention_mask"][b].bool(), x["region_mask"][b]
        assert (mixed.text_hidden[b][tv] - alone.text_hidden[0][tv]).abs().max() < 1e-5
        assert (mixed.region_hidden[b][rv] - alone.region_hidden[0][rv]).abs().max() < 1e-5


@pytest.mark.parametrize("kind", ["vlp", "vlbert-slots"])
def test_padding_does_not_change_real_positions(kind):
    model = make_model(**KINDS[kind])
    x = random_inputs(model.config, B=1, pad=False)
    base = run(model, x, "seq2seq")
    padded = dict(x)
    padded["input_ids"] = torch.cat([x["input_ids"], torch.zeros(1, 5, dtype=torch.long)], 1)
    padded["token_type_ids"] = torch.cat([x["token_type_ids"], torch.zeros(1, 5, dtype=torch.long)], 1)
    padded["attention_mask"] = torch.cat([x["attention_mask"], torch.zeros(1, 5, dtype=torch.long)], 1)
    for k, extra in (("region_feats", torch.randn(1, 3, 64)), ("region_boxes", torch.rand(1, 3, 4)),
                     ("region_cls_probs", torch.rand(1, 3, 17)), ("region_mask", torch.zeros(1, 3, dtype=torch.bool))):
        padded[k] = torch.cat([x[k], extra], 1)
    out = run(model, padded, "seq2seq")
    assert (out.text_hidden[:, :12] - base.text_hidden).abs().max() < 1e-5
    assert (out.region_hidden[:, :6] - base.region_hidden).abs().max() < 1e-5
    assert torch.isfinite(out.text_hidden).all()


# --------------------------------------------------------------------------- backends

@pytest.mark.parametrize("mode", ["bidirectional", "seq2seq", "left_to_right", "mixed"])
def test_sdpa_equals_eager_forward_and_backward(mode):
    eager, sdpa = make_model("eager"), make_model("sdpa")
    sdpa.load_state_dict(eager.state_dict())
    x = random_inputs(eager.config, B=4)
    m = torch.tensor([1, 0, 2, 1]) if mode == "mixed" else mode
    outs, grads = [], []
    for model in (eager, sdpa):
        model.zero_grad()
        out = model(**x, mode=m)
        tv, rv = x["attention_mask"].bool(), x["region_mask"]
        (out.text_hidden[tv].square().mean() + out.region_hidden[rv].square().mean()).backward()
        outs.append((out.text_hidden[tv], out.region_hidden[rv]))
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert (outs[0][0] - outs[1][0]).abs().max() < 1e-5
    assert (outs[0][1] - outs[1][1]).abs().max() < 1e-5
    assert grads[0].keys() == grads[1].keys()
    # Relative to the largest gradient entry of the model: float32 noise on near-zero
    # gradients would make a per-tensor relative bound meaningless.
    scale = max(float(g.abs().max()) for g in grads[0].values())
    for n in grads[0]:
        assert float((grads[0][n] - grads[1][n]).abs().max()) / scale < 1e-5, n


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="attention_backend"):
        VLModel(debug_model_config(attention_backend="flashy"))


# --------------------------------------------------------------------------- gradients

def pretrain_batch(cfg, seed=0):
    x = random_inputs(cfg, B=4, seed=seed)
    B, T = x["input_ids"].shape
    N = x["region_feats"].shape[1]
    mlm_pos = torch.tensor([0 * T + 3, 0 * T + 5, 1 * T + 4, 2 * T + 2, 3 * T + 3])
    mrc_pos = torch.tensor([0 * N + 1, 1 * N + 0, 2 * N + 2, 3 * N + 1])
    feats = x["region_feats"].clone().view(B * N, -1)
    feats[mrc_pos] = 0
    probs = x["region_cls_probs"].clone().view(B * N, -1)
    targets = probs[mrc_pos].clone()
    probs[mrc_pos] = 0  # as the collator does: the target must not leak through the class term
    region_ids = None
    if cfg.region_embedding == "vlbert":   # as the collator: the zeroed regions get [MASK]'s word
        region_ids = torch.full((B, N), cfg.img_token_id, dtype=torch.long)
        region_ids.view(-1)[mrc_pos] = 103
    return Batch(sample_id=torch.arange(B), input_ids=x["input_ids"], token_type_ids=x["token_type_ids"],
                 attention_mask=x["attention_mask"], mode=torch.tensor([1, 0, 1, 0]),
                 region_feats=feats.view(B, N, -1), region_boxes=x["region_boxes"],
                 region_cls_probs=probs.view(B, N, -1), region_mask=x["region_mask"],
                 mlm_positions=mlm_pos, mlm_labels=torch.randint(1000, 2000, (5,)),
                 mrc_positions=mrc_pos, mrc_targets=targets, region_ids=region_ids)


@pytest.mark.parametrize("kind", KINDS)
def test_pretraining_gradients_finite_and_nonzero(kind):
    torch.manual_seed(0)
    model = VLModel(debug_model_config(**KINDS[kind], hidden_dropout=0.1, attention_dropout=0.1))
    model.train()
    batch = pretrain_batch(model.config)
    loss, metrics = pretrain_losses(model, batch, ObjectivesConfig(mrc=True))
    loss.backward()
    assert torch.isfinite(loss) and {"loss_mlm", "loss_mrc", "mlm_acc", "mrc_acc"} <= metrics.keys()
    if kind != "vlp":   # the masked regions' [MASK] word reaches the model
        with torch.no_grad():
            model.eval()
            plain = dataclasses.replace(batch, region_ids=None)
            assert pretrain_losses(model, batch, ObjectivesConfig(mrc=True))[0] != \
                pretrain_losses(model, plain, ObjectivesConfig(mrc=True))[0]
            model.train()
    unused = ("cls_head.",)  # the [CLS] scoring head serves fine-tuning tasks, not these objectives
    for name, p in model.named_parameters():
        if name.startswith(unused):
            continue
        if name == "embeddings.position.weight" or name == "embeddings.word.weight":
            assert p.grad is not None and torch.isfinite(p.grad).all()
            assert p.grad.abs().sum() > 0, name
            continue
        if name == "region_embeddings.aux_text.weight":      # rows without an image only: none here
            assert p.grad is not None and p.grad.abs().max() == 0
            continue
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        # Zeroed class distributions once made LN(bias) explode (gradient ~1/sqrt(eps)).
        assert p.grad.norm() < 100, f"{name} gradient norm {float(p.grad.norm()):.3g}"
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


def trained_on_an_image_batch(kind):
    """(model in train mode with its gradients cleared, the image batch, the names of the
    parameters that batch's pretraining losses gave gradients)."""
    torch.manual_seed(0)
    model = VLModel(debug_model_config(**KINDS[kind])).train()
    image = pretrain_batch(model.config)
    pretrain_losses(model, image, ObjectivesConfig(mrc=True))[0].backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return model, image, with_grad


@pytest.mark.parametrize("kind", KINDS)
def test_text_only_batch_gives_the_image_batch_parameters_zero_gradients(kind):
    """Data-parallel ranks must produce gradients for the same parameters: a text-only
    micro-batch (VL-BERT's <Text, None> mixing) on one rank beside image batches on others
    failed ZeRO-2's first reduction (sizes differ). Its region parameters get exact zeros, and
    the loss and every other gradient are what they would be without them; VL-BERT's aux term
    of text-only rows and the text tokens' visual LayerNorm it passes get real gradients."""
    model, image, with_grad = trained_on_an_image_batch(kind)
    text = Batch(sample_id=image.sample_id, input_ids=image.input_ids, token_type_ids=torch.zeros_like(image.input_ids),
                 attention_mask=image.attention_mask, mode=torch.zeros(4, dtype=torch.long),
                 mlm_positions=image.mlm_positions, mlm_labels=image.mlm_labels)
    loss, metrics = pretrain_losses(model, text, ObjectivesConfig(mrc=True))
    loss.backward()
    assert "loss_mrc" not in metrics
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad <= grads.keys(), sorted(with_grad - grads.keys())
    aux = {"region_embeddings.aux_text.weight", "region_embeddings.norm_text.weight",
           "region_embeddings.norm_text.bias"} if kind != "vlp" else set()
    assert all(grads[n].abs().max() > 0 for n in aux)
    region = [n for n in grads if n.startswith(("region_embeddings.", "region_position", "mrc_head.")) and n not in aux]
    assert region and all(grads[n].abs().max() == 0 for n in region)
    # the same forward in eval mode has no anchor: same loss, same text gradients
    ref = {n: g.clone() for n, g in grads.items()}
    model.zero_grad(set_to_none=True)
    model.eval()
    with torch.no_grad():
        assert pretrain_losses(model, text, ObjectivesConfig(mrc=False))[0] == loss
    model.train()
    pretrain_losses(model, text, ObjectivesConfig(mrc=False))[0].backward()
    for n, p in model.named_parameters():
        if p.grad is not None and n not in region:
            assert torch.equal(p.grad, ref[n]), n


@pytest.mark.parametrize("kind", ["vlp", "vlbert"])
def test_a_micro_batch_without_targets_gives_every_head_zero_gradients(kind):
    """objectives.mask_sampling=bernoulli can leave a micro-batch with no masked token and no
    masked region while other ranks have some: the loss is 0 and the MLM and MRC heads still
    get gradients (exact zeros), so that every rank reduces the same ones under ZeRO."""
    model, image, want = trained_on_an_image_batch(kind)
    empty = dataclasses.replace(image, mlm_positions=image.mlm_positions[:0], mlm_labels=image.mlm_labels[:0],
                                mrc_positions=image.mrc_positions[:0], mrc_targets=image.mrc_targets[:0],
                                region_ids=None)
    loss, metrics = pretrain_losses(model, empty, ObjectivesConfig(mrc=True))
    loss.backward()
    assert loss == 0 and metrics.keys() == {"loss"}
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert want <= grads.keys(), sorted(want - grads.keys())
    assert all(g.abs().max() == 0 for g in grads.values())


def test_separate_text_mlm_adds_the_means_of_text_and_image_text_rows():
    """objectives.separate_text_mlm (VL-BERT): the MLM loss of a micro-batch mixing text-only and
    image-text rows is the mean over the text rows' masked tokens plus the mean over the
    image-text rows' (per example first with loss_reduction=example); with one kind only it is
    the plain loss."""
    import torch.nn.functional as F
    model = make_model(region_embedding="vlbert", type_vocab_size=3, image_token_type=2)
    batch = pretrain_batch(model.config)
    batch.region_mask = batch.region_mask.clone()
    batch.region_mask[2:] = False                       # rows 2, 3: text-only rows of a mixed batch
    T = batch.input_ids.shape[1]
    with torch.no_grad():
        hidden = model(batch.input_ids, batch.token_type_ids, batch.attention_mask, region_feats=batch.region_feats,
                       region_boxes=batch.region_boxes, region_cls_probs=batch.region_cls_probs,
                       region_mask=batch.region_mask, mode=batch.mode, text_positions=batch.mlm_positions).text_selected
        per = F.cross_entropy(model.mlm_logits(hidden).float(), batch.mlm_labels, reduction="none")
    assert (batch.mlm_positions // T).tolist() == [0, 0, 1, 2, 3]    # tokens 0-2 image rows, 3-4 text rows

    def loss(how, separate=True, b=batch):
        cfg = ObjectivesConfig(loss_reduction=how, separate_text_mlm=separate)
        with torch.no_grad():
            return pretrain_losses(model, b, cfg)[1]["loss_mlm"]
    torch.testing.assert_close(loss("token"), per[:3].mean() + per[3:].mean())
    torch.testing.assert_close(loss("example"), (per[:2].mean() + per[2]) / 2 + (per[3] + per[4]) / 2)
    torch.testing.assert_close(loss("token", separate=False), per.mean())      # one mean over all: differs
    assert not torch.allclose(loss("token"), per.mean())
    for how in ("token", "example"):
        image_only = dataclasses.replace(batch, region_mask=pretrain_batch(model.config).region_mask)
        torch.testing.assert_close(loss(how, b=image_only), loss(how, separate=False, b=image_only))
        no_mask = dataclasses.replace(image_only, region_mask=None)      # regions without a mask: all real
        torch.testing.assert_close(loss(how, b=no_mask), loss(how, separate=False, b=no_mask))
        text_only = dataclasses.replace(batch, region_feats=None, region_boxes=None, region_cls_probs=None,
                                        region_mask=None, mrc_positions=None, mrc_targets=None)
        torch.testing.assert_close(loss(how, b=text_only), loss(how, separate=False, b=text_only))


def test_example_reduction_is_accumulation_invariant():
    model = make_model()
    batch = pretrain_batch(model.config)
    cfg = ObjectivesConfig(mrc=True, loss_reduction="example")
    with torch.no_grad():     # values only (float() of a loss that needs grad warns)
        full, _ = pretrain_losses(model, batch, cfg)
        halves = []
        for sl in (slice(0, 2), slice(2, 4)):
            T, N = batch.input_ids.shape[1], batch.region_feats.shape[1]
            b0 = sl.start
            keep = (batch.mlm_positions // T >= b0) & (batch.mlm_positions // T < sl.stop)
            keep_r = (batch.mrc_positions // N >= b0) & (batch.mrc_positions // N < sl.stop)
            part = Batch(sample_id=batch.sample_id[sl], input_ids=batch.input_ids[sl],
                         token_type_ids=batch.token_type_ids[sl], attention_mask=batch.attention_mask[sl],
                         mode=batch.mode[sl], region_feats=batch.region_feats[sl], region_boxes=batch.region_boxes[sl],
                         region_cls_probs=batch.region_cls_probs[sl], region_mask=batch.region_mask[sl],
                         mlm_positions=batch.mlm_positions[keep] - b0 * T, mlm_labels=batch.mlm_labels[keep],
                         mrc_positions=batch.mrc_positions[keep_r] - b0 * N, mrc_targets=batch.mrc_targets[keep_r])
            halves.append(pretrain_losses(model, part, cfg)[0])
    assert abs(float(full) - float(sum(halves) / 2)) < 1e-5


def test_loss_reductions_by_hand():
    from vltrain.objectives.reduce import reduce_loss
    per_item, example = torch.tensor([1.0, 3.0, 5.0, 2.0]), torch.tensor([0, 0, 2, 2])   # example 1: no item
    assert float(reduce_loss(per_item, example, 3, "example")) == pytest.approx((2.0 + 0.0 + 3.5) / 3)
    assert float(reduce_loss(per_item, example, 3, "token")) == pytest.approx(11.0 / 4)


def test_vlp_needs_class_probs_unless_switched_off():
    model = make_model()
    x = random_inputs(model.config)
    x["region_cls_probs"] = None
    with pytest.raises(ValueError, match="use_cls_probs"):
        model(**x)
    model = make_model(use_cls_probs=False, geometry_conf=False)
    assert torch.isfinite(model(**x).text_hidden).all()
    with pytest.raises(ValueError, match="geometry_conf"):
        make_model(use_cls_probs=False)


def test_meta_device_base_model_builds():
    from vltrain.config import ModelConfig
    with torch.device("meta"):
        model = VLModel(ModelConfig())
    n = sum(p.numel() for p in model.parameters())
    assert 100e6 < n < 150e6


# --------------------------------------------------------------------------- last block at selected rows

@pytest.mark.parametrize("backend,checkpointing", [("eager", False), ("sdpa", False), ("varlen", False),
                                                   ("eager", True)])
@pytest.mark.parametrize("kind", KINDS)
def test_selected_positions_equal_the_full_forward(backend, checkpointing, kind):
    """text_positions / region_positions: the last block only at those rows gives the full
    forward's states there, and the same parameter gradients, in every mode with padding."""
    ref = make_model("eager", **KINDS[kind])
    sel = make_model(backend, **KINDS[kind], activation_checkpointing=checkpointing)
    sel.load_state_dict(ref.state_dict())
    if checkpointing:
        ref.train(), sel.train()                    # checkpointing applies in training; dropout is 0
    x = random_inputs(ref.config)
    B, T = x["input_ids"].shape
    N = x["region_feats"].shape[1]
    mode = torch.tensor([MODE_SEQ2SEQ, MODE_BIDIRECTIONAL, MODE_LEFT_TO_RIGHT, MODE_SEQ2SEQ])
    # [CLS], masked-looking text positions (some in padding rows' valid part), regions incl. a padded one
    tpos = torch.tensor([0, 3, 5, T + 0, T + 4, 2 * T + 2, 3 * T + 1, 3 * T + 5])
    rpos = torch.tensor([1, N + 0, 2 * N + 3, 3 * N + 2, 3 * N + N - 1])
    if backend == "varlen":
        rpos = rpos[:-1]      # a padded region's row: varlen leaves padding rows undefined by design
    w_t, w_r = torch.randn(len(tpos), ref.config.hidden_size), torch.randn(len(rpos), ref.config.hidden_size)

    full = ref(**x, mode=mode)
    ft = full.text_hidden.reshape(B * T, -1)[tpos]
    fr = full.region_hidden.reshape(B * N, -1)[rpos]
    ((ft * w_t).sum() + (fr * w_r).sum()).backward()
    out = sel(**x, mode=mode, text_positions=tpos, region_positions=rpos)
    assert out.text_hidden is None and out.region_hidden is None
    ((out.text_selected * w_t).sum() + (out.region_selected * w_r).sum()).backward()
    assert (out.text_selected - ft).abs().max() < 1e-5
    assert (out.region_selected - fr).abs().max() < 1e-5
    grads = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    scale = max(float(g.abs().max()) for g in grads.values())
    for n, p in sel.named_parameters():
        if n in grads:
            assert float((p.grad - grads[n]).abs().max()) / scale < 1e-5, n
        else:
            assert p.grad is None or not p.grad.any(), n

    only_text = sel(**x, mode=mode, text_positions=tpos)
    assert only_text.region_selected.shape[0] == 0 and (only_text.text_selected - ft).abs().max() < 1e-5
    nothing = sel(**x, mode=mode, text_positions=tpos[:0])
    assert nothing.text_selected.shape == (0, ref.config.hidden_size)


def test_pretraining_losses_equal_the_full_forward_gathered():
    """pretrain_losses reads only the selected rows; the numbers are those of gathering the
    full forward's states (the way the losses were computed before)."""
    model = make_model()
    batch = pretrain_batch(model.config)
    with torch.no_grad():
        check_losses_equal_gathered_full_forward(model, batch)


def check_losses_equal_gathered_full_forward(model, batch):
    import torch.nn.functional as F
    loss, metrics = pretrain_losses(model, batch, ObjectivesConfig(mrc=True))
    full = model(batch.input_ids, batch.token_type_ids, batch.attention_mask, region_feats=batch.region_feats,
                 region_boxes=batch.region_boxes, region_cls_probs=batch.region_cls_probs,
                 region_mask=batch.region_mask, mode=batch.mode)
    B, T = batch.input_ids.shape
    N = batch.region_feats.shape[1]
    logits = model.mlm_logits(full.text_hidden.reshape(B * T, -1)[batch.mlm_positions])
    mlm = F.cross_entropy(logits, batch.mlm_labels)
    logp = F.log_softmax(model.mrc_head(full.region_hidden.reshape(B * N, -1)[batch.mrc_positions]), -1)
    mrc = -(batch.mrc_targets * logp).sum(-1).mean()
    assert abs(float(metrics["loss_mlm"]) - float(mlm)) < 1e-5
    assert abs(float(metrics["loss_mrc"]) - float(mrc)) < 1e-5
    assert abs(float(loss) - float(mlm + mrc)) < 1e-5


def test_vlp_geometry_is_the_box_its_area_and_the_best_object_class_confidence():
    """VLP's G_i: x1, y1, x2, y2, the relative area and the detector's confidence, which is the
    largest class probability other than background (column 0), as bottom-up attention's
    objects_conf."""
    from vltrain.model.embeddings import vlp_geometry
    boxes, probs = torch.tensor([[0.1, 0.2, 0.5, 0.6]]), torch.tensor([[0.7, 0.2, 0.1]])
    torch.testing.assert_close(vlp_geometry(boxes, probs, True), torch.tensor([[0.1, 0.2, 0.5, 0.6, 0.16, 0.2]]))
    torch.testing.assert_close(vlp_geometry(boxes, probs, False), torch.tensor([[0.1, 0.2, 0.5, 0.6, 0.16]]))
