"""Config tree: strict keys, dotted overrides, YAML round trip."""
import re

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
    path = write(tmp_path, "model:\n  hidden_size: 64\n  num_heads: 4\ntrain:\n  lr: 0.001\n")
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


def test_fine_tuning_recipes_build_their_pretraining_recipes_model():
    """A fine-tuning recipe starts from its pretraining recipe's checkpoint (train.init_from):
    the same model keys, or the load fails (shapes) or, for keys without parameters (VL-BERT's
    whole-image region and [END], the whole-image feature), runs another model than the one
    pretrained. Execution keys (backend, compile, checkpointing) may differ."""
    import dataclasses
    execution = {"attention_backend", "compile", "activation_checkpointing"}
    for pre, fine in (("vlbert_pretrain", ("vcr_vlbert", "refcoco_vlbert", "vqa_vlbert")),
                      ("vlp_pretrain_cc", ("caption_coco", "vqa_vlp"))):
        want = load_config(f"configs/{pre}.yaml")
        for r in fine:
            got = load_config(f"configs/{r}.yaml")
            a, b = dataclasses.asdict(want.model), dataclasses.asdict(got.model)
            assert {k: (a[k], b[k]) for k in a if a[k] != b[k] and k not in execution} == {}, r
            assert got.data.image_feature == want.data.image_feature, r


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [unclosed\n"))


def test_debug_recipe_uses_the_debug_model():
    """The tests' model, at BERT-base's weight scale for its width: the recipe a user pretrains
    and then fine-tunes from (the tests' fixed-weight comparisons keep BERT's 0.02)."""
    from vltrain.config import debug_model_config
    assert load_config("configs/debug.yaml").model == debug_model_config(initializer_range=0.07)
    assert load_config("configs/caption_debug.yaml").model.initializer_range == 0.07


def test_numbers_and_text_are_read_as_meant(tmp_path):
    """YAML reads 1e-4 (no dot) as text: a float key takes it as the number, in a file as on
    the command line. A text key given a number or a date on the command line keeps it as
    typed (a job array's RUN_NAME=%a becomes run_name=0); in a file a date reads as written,
    and a number (007 would be 7) or a yes/no word must be quoted, which the error says."""
    path = write(tmp_path, "train:\n  lr: 5e-5\n  adam_eps: 1e-6\nrun_name: 2024-12-04\n")
    cfg = load_config(path)
    assert cfg.train.lr == 5e-5 and cfg.train.adam_eps == 1e-6 and cfg.run_name == "2024-12-04"
    for typed in ("007", "0", "2024-12-04", "1e5"):
        assert load_config(path, [f"run_name={typed}"]).run_name == typed
    assert load_config(None, ["data.cache_dir=2024"]).data.cache_dir == "2024"
    for text in ("run_name: 007", "run_name: on"):
        with pytest.raises(ConfigError, match=r"run_name.*expected text, got (7|True) \(quote it in a YAML file\)"):
            load_config(write(tmp_path, text + "\n"))
    with pytest.raises(ConfigError, match=r"train.resume.*expected text, got False \('false' reads as yes/no; "
                                          r"for the text, quote it: train.resume='\"false\"'\)"):
        load_config(None, ["train.resume=false"])                   # not a checkpoint named "false"
    assert load_config(None, ['run_name="on"']).run_name == "on"     # as that message says
    with pytest.raises(ConfigError, match=r"train.lr.*expected float, got 'fast'"):
        load_config(None, ["train.lr=fast"])


def test_batch_sizes_must_be_positive():
    for key in ("train.micro_batch_size", "train.grad_accum"):
        with pytest.raises(ConfigError, match=rf"'{key}': must be at least 1, got 0"):
            load_config(None, [f"{key}=0"])
    with pytest.raises(ConfigError, match=r"'data.max_sequence': 0 \(off\) or at least 8"):
        load_config(None, ["data.max_sequence=7"])
    assert load_config(None, ["data.max_sequence=0"]).data.max_sequence == 0
    with pytest.raises(ConfigError, match=r"'train.log_every': must be at least 1, got 0"):
        load_config(None, ["train.log_every=0"])
    for key in ("train.lr", "train.val_every", "train.keep_last", "train.save_every_minutes", "train.global_batch"):
        with pytest.raises(ConfigError, match=rf"'{key}': 0 or more, got -1"):
            load_config(None, [f"{key}=-1"])
        assert load_config(None, [f"{key}=0"])                  # 0: off (or an lr of 0)


def test_a_run_path_deepspeed_would_read_as_a_pattern_is_refused(tmp_path):
    """DeepSpeed globs <checkpoint dir>/<tag>/*model_states.pt: a run named 'vqa[lr5e-5]' saved
    its checkpoints and then failed every resume with a bare AssertionError."""
    for override, key in (("run_name=vqa[lr5e-5]", "run_name"), (f"output_root={tmp_path}/a*b", "output_root"),
                          (f"train.resume={tmp_path}/run?/checkpoints", "train.resume")):
        with pytest.raises(ConfigError, match=rf"config key '{re.escape(key)}': .* DeepSpeed reads as a file pattern"):
            load_config(None, [override])
    assert load_config(None, ["run_name=sweep 50% lr=5e-5]", "train.resume=auto"]).run_name == "sweep 50% lr=5e-5]"


def test_run_name_worker_count_and_override_yaml_are_checked_naming_them():
    for bad in ("", "..", "../elsewhere", "a/b"):          # the run folder is output_root/run_name
        with pytest.raises(ConfigError, match=r"'run_name': a folder name under output_root"):
            load_config(None, [f"run_name={bad}"])
    with pytest.raises(ConfigError, match=r"'data.num_workers': 0 or more, got -1"):
        load_config(None, ["data.num_workers=-1"])
    with pytest.raises(ConfigError, match=r"override 'data.buckets=\[32,64': the value is not valid YAML"):
        load_config(None, ["data.buckets=[32,64"])
    assert load_config(None, ["data.buckets=[32, 64]", "run_name=a.b-1"]).data.buckets == [32, 64]


def test_a_key_of_one_task_set_for_another_is_refused():
    """A key only some tasks read, set for another task, would change nothing: refused, naming it."""
    for over, task in ((["data.max_sequence=64", "task.name=vqa"], "pretrain"),
                       (["objectives.mlm_weight=0.5", "task.name=caption"], "pretrain"),
                       (["objectives.separate_text_mlm=true", "task.name=refs"], "pretrain"),
                       (["objectives.mrc_prob=0.3", "task.name=caption"], "pretrain"),
                       (["objectives.mlm_prob=0.3", "task.name=mc"], "pretrain or caption"),
                       (["objectives.loss_reduction=example", "task.name=vqa"], "pretrain or caption"),
                       (["objectives.mask_token_prob=0.5", "task.name=refs"], "pretrain or caption or vqa"),
                       (["task.answer_vocab_sha256=ab", "task.name=caption"], "vqa"),
                       (["task.vqa_question_noise=1", "task.name=mc"], "vqa"),
                       (["task.mc_loss=sigmoid"], "mc"),
                       (["data.text_train=/t", "data.text_proportion=0.3", "task.name=vqa"], "pretrain"),
                       (["task.scst=true", "task.name=vqa"], "caption"), (["task.label_smoothing=0.1"], "caption"),
                       (["task.beam_size=3", "task.name=refs"], "caption"), (["task.vqa_head=vlbert"], "vqa"),
                       (["objectives.mrc=true", "task.name=vqa"], "pretrain"),
                       (["task.vqa_head=vlbert", "task.name=mc"], "vqa")):
        with pytest.raises(ConfigError, match=rf"is read by task.name={task} only, not by task.name="):
            load_config(None, over)
    assert load_config(None, ["task.mc_loss=sigmoid", "task.name=mc"]).task.mc_loss == "sigmoid"
    assert load_config(None, ["task.scst=true", "task.name=caption"]).task.scst
    for off in (["objectives.mlm=false"], ["objectives.mlm_weight=0"]):       # and mrc off (the default)
        with pytest.raises(ConfigError, match=r"'objectives.mlm': pretraining with .* trains nothing"):
            load_config(None, off)
        assert load_config(None, off + ["objectives.mrc=true"]).objectives.mrc
    with pytest.raises(ConfigError, match="'train.init_segment_b_from_a': needs train.init_from"):
        load_config(None, ["train.init_segment_b_from_a=true"])


def test_keys_a_task_reads_only_in_some_settings_are_refused_outside_them():
    """Where a task fixes a key or reads it only under another setting, a value that would change
    nothing is refused naming why; the values that do take effect load."""
    for task, v in (("caption", 0.5), ("vqa", 0.5), ("mc", 1.0), ("refs", 0.3)):
        with pytest.raises(ConfigError, match=rf"'objectives.seq2seq_prob': task.name={task} trains every example at"):
            load_config(None, [f"task.name={task}", f"objectives.seq2seq_prob={v}"])
    assert load_config(None, ["task.name=vqa", "objectives.seq2seq_prob=0.0"]).objectives.seq2seq_prob == 0.0
    assert load_config(None, ["task.name=caption", "objectives.seq2seq_prob=1.0"]).task.name == "caption"
    with pytest.raises(ConfigError, match=r"'objectives.random_token_prob': .* only with task.vqa_question_noise > 0"):
        load_config(None, ["task.name=vqa", "objectives.random_token_prob=0.2"])
    noisy = load_config(None, ["task.name=vqa", "task.vqa_question_noise=1", "objectives.random_token_prob=0.2"])
    assert noisy.objectives.random_token_prob == 0.2
    with pytest.raises(ConfigError, match=r"'data.max_sequence': 64 is pretraining's joint budget; caption .* "
                                          r"reference caption drawn"):
        load_config(None, ["task.name=caption", "data.max_sequence=64"])
    with pytest.raises(ConfigError, match=r"'objectives.mlm': caption training with .* trains nothing"):
        load_config(None, ["task.name=caption", "objectives.mlm=false"])
    for ok in (["task.scst=true"], ["mode=eval", "train.init_from=/w"]):
        assert not load_config(None, ["task.name=caption", "objectives.mlm=false", *ok]).objectives.mlm
    for over in (["task.name=refs"], ["task.name=vqa"]):
        with pytest.raises(ConfigError, match=r"'train.init_segment_b_from_a': .* puts no token in segment B"):
            load_config(None, [*over, "train.init_segment_b_from_a=true", "train.init_from=/w"])
    for over in (["task.name=refs", "model.image_token_type=1"], ["task.name=vqa", "task.vqa_head=vlbert"],
                 ["task.name=mc"]):
        assert load_config(None, [*over, "train.init_segment_b_from_a=true", "train.init_from=/w"]).train.init_from


def test_a_saved_config_reads_as_the_run_had_it(tmp_path):
    """A run's saved config.yaml is read as it was: keys newer than it take the value the run
    trained with (mrc_zero_prob 1.0: every predicted region zeroed), and the task-key check,
    newer than some saved configs, does not make it unreadable."""
    from vltrain.config import load_run_config, save_config
    path = tmp_path / "config.yaml"
    cfg = load_config(None, ["task.name=mc", "task.mc_loss=sigmoid"])
    cfg.task.name = "vqa"                                   # a combination the check now refuses
    save_config(cfg, str(path))
    assert load_run_config(str(path)).task.mc_loss == "sigmoid"
    assert load_run_config(str(path)).objectives.mrc_zero_prob == 0.9     # saved: kept as written
    text = path.read_text().replace("  mrc_zero_prob: 0.9\n", "").replace("  mrc_mask_word: true\n", "")
    assert len(text) < len(path.read_text()) - 30
    path.write_text(text)
    assert load_run_config(str(path)).objectives.mrc_zero_prob == 1.0     # older than the keys
    assert load_run_config(str(path)).objectives.mrc_mask_word is False
    from vltrain.engine.build import warn_config_changes                  # a resume of it says so
    now = load_config(None, ["task.name=vqa"])
    diffs = warn_config_changes(now, str(tmp_path))
    assert "objectives.mrc_zero_prob 1.0 -> 0.9" in diffs and "objectives.mrc_mask_word False -> True" in diffs


def test_a_recipes_placeholder_is_refused_where_it_would_be_read():
    """The cluster recipes name their data s3://CHANGE-ME/...: a run that reads one is refused
    naming the key; what a mode does not read (eval: the training data) may stay unset."""
    from vltrain.config import check_placeholders
    recipe = "configs/vlp_pretrain_cc.yaml"
    with pytest.raises(ConfigError, match=r"data.train=s3://CHANGE-ME/cc/train is the recipe's placeholder"):
        check_placeholders(load_config(recipe))
    ready = ["data.train=s3://b/cc/train", "train.init_from=/w/bert"]
    with pytest.raises(ConfigError, match=r"data.val=s3://CHANGE-ME/cc/val .*\(or data.val= to train without"):
        check_placeholders(load_config(recipe, ready))
    check_placeholders(load_config(recipe, [*ready, "data.val="]))
    ev = ["mode=eval", "task.eval_split=test", "data.test=s3://b/cc/test"]
    with pytest.raises(ConfigError, match=r"train.init_from=CHANGE-ME/bert-base-uncased"):
        check_placeholders(load_config(recipe, ev))
    check_placeholders(load_config(recipe, [*ev, "train.init_from=/w/ckpt"]))    # data.train/val unread
    # a resume reads its checkpoint's weights, not train.init_from (known once it is found)
    resume = load_config(recipe, ["data.train=s3://b/cc/train", "data.val=", "train.resume=auto"])
    check_placeholders(resume)
    check_placeholders(resume, resuming=True)
    with pytest.raises(ConfigError, match=r"train.init_from=CHANGE-ME"):
        check_placeholders(resume, resuming=False)                  # resume=auto found nothing


def test_a_choice_outside_its_values_is_refused_by_the_config():
    """Keys with a fixed set of values are checked as the config loads, so the sbatch templates'
    pre-check refuses them before any rank starts; the sets are those the code implements."""
    import typing
    from vltrain.config import DataConfig, ModelConfig, TrainConfig
    from vltrain.engine.ds_config import PRECISIONS
    from vltrain.model.attention import BACKENDS
    from vltrain.config import TaskConfig
    from vltrain.model.transformer import ACTIVATIONS
    from vltrain.model.vl_model import REGION_EMBEDDINGS
    from vltrain.tasks.vqa import VQA_HEADS
    for ov, choices in (("train.precision=bf32", "auto, fp32, bf16, fp16"), ("mode=evaluate", "train, eval"),
                        ("model.attention_backend=fast", "eager, sdpa, flex, varlen, triton, auto"),
                        ("data.pad_to=buckets", "longest, bucket"),
                        ("data.validate_hash=md55", 'auto, "", blake2b, .*, xxh64')):
        key, value = ov.split("=")
        with pytest.raises(ConfigError, match=rf"'{key}': '{value}' is not one of {choices}$"):
            load_config(None, [ov])
    hints = {**typing.get_type_hints(ModelConfig), **typing.get_type_hints(TrainConfig),
             **typing.get_type_hints(DataConfig)}
    assert set(typing.get_args(hints["hidden_act"])) == set(ACTIVATIONS)
    assert set(typing.get_args(hints["attention_backend"])) == set(BACKENDS)
    assert set(typing.get_args(hints["precision"])) == {"auto", *PRECISIONS}
    assert set(typing.get_args(hints["region_embedding"])) == set(REGION_EMBEDDINGS)
    assert set(typing.get_args(typing.get_type_hints(TaskConfig)["vqa_head"])) == set(VQA_HEADS)
    from vltrain.tasks import TASKS
    assert set(typing.get_args(typing.get_type_hints(TaskConfig)["name"])) == set(TASKS)
    from streaming.base.hashing import get_hashes
    assert set(typing.get_args(hints["validate_hash"])) == {"auto", "", *get_hashes()}


def test_yaml_duplicates_and_non_mappings_are_named(tmp_path):
    """PyYAML keeps the last of two equal keys: a second `train:` section dropped the first."""
    with pytest.raises(ConfigError, match=r"key 'train' given twice \(lines 1 and 3\)"):
        load_config(write(tmp_path, "train:\n  lr: 1e-3\ntrain:\n  max_steps: 5\n"))
    with pytest.raises(ConfigError, match=r"key 'lr' given twice"):
        load_config(write(tmp_path, "train:\n  lr: 1e-3\n  lr: 2e-3\n"))
    with pytest.raises(ConfigError, match=r"expected a mapping of sections .* got a list"):
        load_config(write(tmp_path, "- train\n"))
    with pytest.raises(ConfigError, match=rf"config file {re.escape(str(tmp_path))} cannot be read as YAML text"):
        load_config(str(tmp_path))
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00junk")
    with pytest.raises(ConfigError, match=r"bin.yaml cannot be read as YAML text"):
        load_config(str(tmp_path / "bin.yaml"))
    assert load_config(write(tmp_path, "")).train.lr == Config().train.lr           # empty: the defaults


def test_a_section_override_merges_and_home_is_expanded(tmp_path, monkeypatch):
    cfg = load_config("configs/debug.yaml", ["model={hidden_size: 32, num_heads: 2}"])
    assert (cfg.model.hidden_size, cfg.model.num_heads, cfg.model.num_layers) == (32, 2, 2)   # num_layers: the file's
    assert load_config("configs/debug.yaml", ["train={lr: 5.0e-4}"]).train.max_steps == \
        load_config("configs/debug.yaml").train.max_steps
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["output_root=~/runs", "data.train=~/data/train", "train.resume=auto"])
    assert cfg.output_root == str(tmp_path / "runs") and cfg.data.train == str(tmp_path / "data/train")


@pytest.mark.parametrize("override, message", [
    ("task.name=vqaa", r"'task.name': 'vqaa' is not one of pretrain, caption, vqa, mc, refs"),
    ("model.num_heads=5", r"'model.num_heads': 5 does not divide model.hidden_size=64"),
    ("model.num_heads=0", r"'model.num_heads': must be at least 1, got 0"),
    ("model.hidden_dropout=1.5", r"'model.hidden_dropout': a probability in \[0, 1\), got 1.5"),
    ("train.adam_betas=[0.9]", r"'train.adam_betas': two numbers in \[0, 1\)"),
    ("objectives.mlm_prob=2", r"'objectives.mlm_prob': a share in \[0, 1\], got 2.0"),
    ("objectives.mask_token_prob=0.9", r"objectives.random_token_prob = 1.1 is more than 1"),
    ("task.val_beam_size=0", r"'task.val_beam_size': must be at least 1, got 0"),
    ("train.grad_clip=.nan", r"'train.grad_clip': nan is not a finite number"),
    ("data.text_proportion=0.3", r"'data.text_proportion': 0.3 mixes in text-only samples from data.text_train, "
                                 r"which is empty"),
    ("objectives.max_pred=0", r"'objectives.max_pred': 0 predicts no token"),
    ("data.max_regions=0", r"'data.max_regions': must be at least 1, got 0"),
    ("data.text_train=/x", r"'data.text_proportion': data.text_train is set, so the share .* got 0.0"),
])
def test_values_no_run_can_mean_are_refused_naming_the_key(override, message):
    """They trained before (exit 0) with the value taken silently, or failed at the first
    validation hours in (task.val_beam_size), or with a traceback naming no key."""
    overrides = [override] + (["objectives.random_token_prob=0.2"] if "mask_token" in override else []) + \
        (["task.name=caption", "objectives.mrc=false"] if override.startswith("task.val_beam") else [])
    with pytest.raises(ConfigError, match=message):
        load_config("configs/debug.yaml", overrides)
    if not override.startswith("task.name"):                      # (a choice: refused in any config)
        load_config("configs/debug.yaml", overrides, to_run=False)   # a saved config is read as it ran


def test_a_missing_config_file_says_where_it_was_looked_for(tmp_path, monkeypatch):
    """A relative path is the working directory's: the error names that folder."""
    from vltrain.engine.ds_config import DSConfigError, resolve_ds_config
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=rf"config file not found: configs/x.yaml \(relative to the working "
                                          rf"directory {tmp_path}\)$"):
        load_config("configs/x.yaml")
    with pytest.raises(DSConfigError, match=rf"ds_config file not found: z.json \(relative to the working directory "
                                            rf"{tmp_path}\)$"):
        resolve_ds_config("z.json", Config(), 1, "cpu")
    # vltrain installed without its checkout (the package's parent holds no configs/): said so
    import vltrain.config
    monkeypatch.setattr(vltrain.config, "CHECKOUT", str(tmp_path))
    with pytest.raises(ConfigError, match=r"recipes \(configs/, ds_configs/\) .* files of its git checkout, which "
                                          r"this installed package lacks: clone it and `pip install -e .` there$"):
        load_config("configs/x.yaml")
