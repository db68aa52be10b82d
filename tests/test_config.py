"""Config tree: strict keys, dotted overrides, YAML round trip."""
import pytest

from vltrain.config import Config, ConfigError, load_config, save_config


def write(tmp_path, text):
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return str(p)


def test_unknown_key_names_it_and_suggests(tmp_path):
    path = write(tmp_path, "model:\n  hiden_size: 64\n")
    with pytest.raises(ConfigError, match=r"model\.hiden_size.*did you mean 'model\.hidden_size'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"unknown config key 'train\.lrr'"):
        load_config(None, ["train.lrr=1e-3"])
    with pytest.raises(ConfigError, match=r"unknown config key 'bogus\.x'"):
        load_config(None, ["bogus.x=1"])
    # a mistyped section is matched among sections, and the error says where the key came from
    (tmp_path / "ok.yaml").write_text("model:\n  hidden_size: 64\n")
    with pytest.raises(ConfigError, match=r"^command-line override: unknown config key 'modle\.hidden_size'; "
                                          r"did you mean 'model\.hidden_size'\?$"):
        load_config(str(tmp_path / "ok.yaml"), ["modle.hidden_size=32"])
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config key 'model\.hiden_size'"):
        load_config(path, ["train.lr=1e-3"])                     # the file's own error, named by the file


def test_nested_override_and_types(tmp_path):
    path = write(tmp_path, "model:\n  hidden_size: 64\ntrain:\n  lr: 0.001\n")
    cfg = load_config(path, ["train.lr=3e-4", "model.num_layers=4", "data.buckets=[8,16]",
                             "objectives.mrc=true", "run_name=abc"])
    assert cfg.model.hidden_size == 64 and cfg.model.num_layers == 4
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.data.buckets == [8, 16] and cfg.objectives.mrc is True and cfg.run_name == "abc"
    with pytest.raises(ConfigError, match="model.num_layers.*integer"):
        load_config(None, ["model.num_layers=two"])
    with pytest.raises(ConfigError, match="objectives.mrc.*true/false"):
        load_config(None, ["objectives.mrc=3"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.lr"])


def test_round_trip_is_identical(tmp_path):
    cfg = load_config(None, ["model.hidden_size=96", "data.train=s3://bucket/x", "train.adam_betas=[0.9,0.98]"])
    out = tmp_path / "resolved.yaml"
    save_config(cfg, str(out))
    assert load_config(str(out)) == cfg
    assert Config() == load_config(None)


def test_every_recipe_resolves():
    import glob
    recipes = sorted(glob.glob("configs/*.yaml"))
    assert recipes, "no recipes under configs/"
    for r in recipes:
        load_config(r)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_debug_recipe_uses_the_debug_model():
    from vltrain.config import debug_model_config
    assert load_config("configs/debug.yaml").model == debug_model_config()
