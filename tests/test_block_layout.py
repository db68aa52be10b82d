"""A transformer block's two flat parameters (vltrain/model/transformer.py): what the
optimizer groups, what a resume of a checkpoint in the older per-piece layout says."""
import pytest
import torch

from vltrain.config import Config, ObjectivesConfig, debug_model_config, save_config
from vltrain.engine.ds_config import no_decay_param_groups
from vltrain.engine.resume import CheckpointError, _piece_shapes, check_model_matches
from vltrain.model import VLModel
from vltrain.model.transformer import named_pieces
from vltrain.tasks.pretrain import PretrainTask


def test_block_holds_two_parameters_and_the_pieces_are_its_views():
    model = VLModel(debug_model_config(num_layers=3))
    names = [n for n, _ in model.layers.named_parameters()]
    assert names == [f"{i}.{k}" for i in range(3) for k in ("matrices", "vectors")]
    w = model.layers[1].weights()
    with torch.no_grad():
        w.ffn_norm_bias.fill_(7.0)             # a write through a view lands in the flat parameter
    assert torch.equal(named_pieces(model.state_dict(), model.config)["layers.1.ffn_norm.bias"],
                       torch.full((64,), 7.0))
    assert (model.layers[1].vectors == 7.0).sum() == 64


def test_weight_decay_groups_are_the_per_piece_rule():
    """Decay exactly on what BERT's rule decays with one parameter per piece: the weight
    matrices (2-d, not a bias), nothing on biases and LayerNorm parameters."""
    model = VLModel(debug_model_config())
    decay, no_decay = no_decay_param_groups(model, 0.01)
    pieces = named_pieces({n: p for n, p in model.named_parameters()}, model.config)
    want = sum(t.numel() for n, t in pieces.items() if t.ndim >= 2 and not n.endswith(".bias"))
    assert sum(p.numel() for p in decay["params"]) == want
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert sum(p.numel() for p in no_decay["params"]) == sum(t.numel() for t in pieces.values()) - want


def test_a_per_piece_checkpoint_is_refused_naming_init_from(tmp_path):
    """A checkpoint written before the flat layout (same model, 12 tensors per block): the
    resume check says so and how to start from its weights, instead of DeepSpeed's key errors."""
    cfg = Config(model=debug_model_config())
    task = PretrainTask(VLModel(cfg.model), ObjectivesConfig())
    ours = {n: tuple(p.shape) for n, p in task.named_parameters()}
    tag = tmp_path / "step_00000006"
    tag.mkdir()
    torch.save({"param_shapes": [_piece_shapes(ours, cfg.model)]}, tag / "mp_rank_00_model_states.pt")
    save_config(cfg, str(tag / "config.yaml"))
    with pytest.raises(CheckpointError) as e:
        check_model_matches(str(tag), task)
    assert "12 parameters" in str(e.value) and f"train.init_from={tag}" in str(e.value)
    # the same model in this layout passes
    torch.save({"param_shapes": [ours]}, tag / "mp_rank_00_model_states.pt")
    check_model_matches(str(tag), task)


def test_flat_block_state_of_another_size_is_refused_naming_it():
    """A plain torch.save of another model's state_dict (flat block parameters) loaded into
    this model: the error names the parameter and both sizes instead of a view error."""
    from vltrain.model.bert_weights import load_into
    small = VLModel(debug_model_config(hidden_size=32, num_heads=2, intermediate_size=64))
    model = VLModel(debug_model_config())
    with pytest.raises(ValueError) as e:
        load_into(model, small.state_dict(), source="small.pt")
    assert "layers.0.matrices" in str(e.value) and "hidden_size=64" in str(e.value)


def test_resume_shape_mismatch_names_the_model_keys_that_size_parameters(tmp_path):
    """A checkpoint of another hidden size and vocabulary resumed into a debug model: besides
    the parameters, the refusal names each model key that sizes them with both values, and not
    a key that differs without changing a shape (dropout; heads, although 3 heads do not divide
    the checkpoint's hidden size)."""
    old = Config(model=debug_model_config(hidden_size=32, intermediate_size=64, vocab_size=1000,
                                          num_heads=2, hidden_dropout=0.2))
    tag = tmp_path / "step_00000006"
    tag.mkdir()
    torch.save({"param_shapes": [{n: tuple(p.shape) for n, p in
                                  PretrainTask(VLModel(old.model), ObjectivesConfig()).named_parameters()}]},
               tag / "mp_rank_00_model_states.pt")
    save_config(old, str(tag / "config.yaml"))
    with pytest.raises(CheckpointError) as e:
        check_model_matches(str(tag), PretrainTask(VLModel(debug_model_config(hidden_size=48, num_heads=3)),
                                                   ObjectivesConfig()))
    msg = str(e.value)
    assert "model.embeddings.word.weight: checkpoint (1000, 32) vs model (30522, 48)" in msg
    for line in ("model.vocab_size=30522 here, 1000 in the checkpoint",
                 "model.hidden_size=48 here, 32 in the checkpoint",
                 "model.intermediate_size=128 here, 64 in the checkpoint"):
        assert line in msg
    assert "model.num_heads" not in msg and "model.hidden_dropout" not in msg
    assert f"train.init_from={tag}" in msg
