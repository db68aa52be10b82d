"""Engine pieces that need no second process: recipes, the tokenizer check, checkpoint
discovery, activation checkpointing."""
import glob
import json
import os
import re

import pytest
import torch

from vltrain.ckpt.layout import locate
from vltrain.config import load_config
from vltrain.engine import checkpoint as ckpt
from vltrain.engine.build import check_positions, check_tokenizer, warn_flex_shapes
from vltrain.engine.resume import CheckpointError
from vltrain.model import VLModel
from vltrain.tokenization import Tokenizer


@pytest.mark.parametrize("recipe", sorted(glob.glob("configs/*.yaml")))
def test_every_recipe_builds_its_model(recipe):
    cfg = load_config(recipe)
    with torch.device("meta"):           # BERT-base recipes cost nothing this way
        model = VLModel(cfg.model)
    assert sum(p.numel() for p in model.parameters()) > 0
    check_tokenizer(cfg, Tokenizer(cfg.data.vocab))   # its token ids are its vocabulary's
    check_positions(cfg)                               # its text fits the position table


def test_text_longer_than_the_position_table_is_refused_naming_the_key():
    """A caption decoded at positions 2 .. max_len + 1 (after [CLS] [SEP]) needs max_len + 2
    rows; one more fails at the first validation with an index error, hours in."""
    cfg = load_config("configs/caption_debug.yaml")
    P = cfg.model.max_position_embeddings
    cfg.task.max_len = P - 2
    check_positions(cfg)
    cfg.task.max_len = P - 1
    with pytest.raises(ValueError, match=f"task.max_len={P - 1}: .* set task.max_len <= {P - 2}"):
        check_positions(cfg)
    cfg.task.name = "vqa"                              # not decoded
    check_positions(cfg)
    cfg.data.max_text_len = P + 1
    with pytest.raises(ValueError, match=f"data.max_text_len={P + 1} exceeds model.max_position_embeddings={P}"):
        check_positions(cfg)


def test_flex_compiling_per_batch_length_is_warned_naming_the_keys(caplog):
    cfg = load_config("configs/debug.yaml", ["model.attention_backend=flex", "model.compile=false",
                                             "data.pad_to=longest"])
    assert warn_flex_shapes(cfg) and "data.pad_to=bucket" in caplog.text
    for fix in ("data.pad_to=bucket", "model.compile=true", "model.attention_backend=sdpa"):
        assert not warn_flex_shapes(load_config("configs/debug.yaml", ["model.attention_backend=flex",
                                                                       "model.compile=false", fix])), fix


def test_start_up_mistakes_are_named(tmp_path, caplog, capsys):
    """A weights file that is none, an output_root that cannot hold the run folder, an option
    between overrides, an error from a loader worker: each says what it is about; a failed
    start removes the run folder it made if nothing was written there."""
    from vltrain.engine.build import make_run_dir
    from vltrain.model.bert_weights import read_state_dict
    from vltrain.run import error_text, parse_args
    text = tmp_path / "notes.txt"
    text.write_text("not weights\n")
    for name in ("notes.txt", "notes.safetensors"):
        (tmp_path / name).write_text("not weights\n")
        with pytest.raises(ValueError, match=rf"{name} is not a weights file vltrain can read") as e:
            read_state_dict(str(tmp_path / name))
        assert "weights_only" not in str(e.value)     # torch's advice to its callers stays out
    cfg = load_config("configs/debug.yaml", [f"output_root={text}"])
    with pytest.raises(ValueError, match=rf"output_root='{text}', run_name='debug': cannot create the run folder"):
        make_run_dir(cfg, os.path.join(cfg.output_root, cfg.run_name))
    from vltrain.engine.build import removed_if_left_empty
    for created, files, kept in ((True, [], False), (True, ["train.log"], True), (False, [], True)):
        run = tmp_path / f"run_{created}_{len(files)}"
        run.mkdir()
        for f in files:
            (run / f).write_text("x")
        with pytest.raises(RuntimeError, match="start failed"):
            with removed_if_left_empty(str(run), created):
                raise RuntimeError("start failed")
        assert run.is_dir() == kept, (created, files)
    with removed_if_left_empty(str(run), True):          # no failure: nothing removed
        pass
    assert run.is_dir()
    args = parse_args(["--config", "c.yaml", "a.b=1", "--ds_config", "z.json", "run_name=x"])
    assert args.overrides == ["a.b=1", "run_name=x"] and args.ds_config == "z.json"
    for twice in (["--config", "a.yaml", "--config", "b.yaml"], ["--config", "c.yaml", "--ds_config", "y.json",
                                                               "--deepspeed_config", "z.json"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(twice)
        assert exit_.value.code == 2
    assert "given twice (a.yaml and b.yaml)" in capsys.readouterr().err
    from torch.utils.data import DataLoader
    from vltrain.data.errors import ShardError

    class Broken(torch.utils.data.Dataset):
        def __len__(self):
            return 1

        def __getitem__(self, i):
            raise ShardError("dataset d: shard shard.00000.mds could not be downloaded")
    with pytest.raises(ShardError) as e:
        list(DataLoader(Broken(), num_workers=1))
    assert "Traceback" in str(e.value)                 # torch's re-raise carries the worker's traceback
    assert error_text(e.value) == "(in a data loader worker) dataset d: shard shard.00000.mds could not be downloaded"


def test_img_token_id_must_be_the_tokenizers(tmp_path):
    """A vocab.txt without [unusedK] slots puts [IMG] after its last token, not at BERT's id 1:
    a VL-BERT model built with the default model.img_token_id is refused, naming the fix."""
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]) + "\n")
    tok = Tokenizer(str(vocab))
    assert tok.img_id == 7
    cfg = load_config("configs/debug.yaml", [f"data.vocab={vocab}", "model.vocab_size=9",
                                             "model.region_embedding=vlbert"])
    assert cfg.model.img_token_id == 1
    msg = f"data.vocab={vocab} has [IMG] at id 7 but model.img_token_id=1; set model.img_token_id=7"
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_tokenizer(cfg, tok)
    cfg.model.img_token_id = 7
    check_tokenizer(cfg, tok)
    # [END] after the regions (model.vlbert_end_token) is looked up the same way: appended at 8;
    # both wrong are named at once
    cfg.model.vlbert_end_token, cfg.model.img_token_id = True, 1
    msg = (f"data.vocab={vocab} has [IMG] at id 7 but model.img_token_id=1, [END] at id 8 but model.end_token_id=2; "
           "set model.img_token_id=7 model.end_token_id=8")
    with pytest.raises(ValueError, match=re.escape(msg)):
        check_tokenizer(cfg, tok)
    cfg.model.img_token_id, cfg.model.end_token_id = 7, 8
    check_tokenizer(cfg, tok)
    # VLP's region embedding has no [IMG] token: any id is fine there.
    cfg.model.region_embedding, cfg.model.img_token_id = "vlp", 1
    check_tokenizer(cfg, tok)
    cfg.model.vocab_size = 8
    with pytest.raises(ValueError, match="the tokenizer has 9 tokens but model.vocab_size=8"):
        check_tokenizer(cfg, tok)


def test_init_from_source_trained_with_other_weightless_settings(tmp_path, caplog):
    """model.vlbert_image_box / vlbert_end_token (and the activation, LayerNorm epsilon, the
    regions' segment) add no parameter, so only the source's config tells what it was trained
    with: mode=eval refuses another, naming the settings to use; training warns; the same
    settings, a VLP model or a BERT folder say nothing."""
    import logging
    from vltrain.config import save_config
    from vltrain.engine.build import check_source_settings, source_config

    def check(c):                     # as build_training calls it
        check_source_settings(c, source_config(c.train.init_from))
    src = tmp_path / "export"                                   # an export-hf folder
    src.mkdir()
    (src / "config.json").write_text("{}")
    save_config(load_config("configs/debug.yaml", ["model.region_embedding=vlbert", "model.vlbert_end_token=true"]),
                str(src / "vltrain_config.yaml"))
    over = ["model.region_embedding=vlbert", f"train.init_from={src}"]
    run = load_config("configs/debug.yaml", [*over, "model.vlbert_image_box=true", "model.vlbert_end_token=true"])
    run.mode = "eval"
    with pytest.raises(ValueError, match=re.escape(
            f"train.init_from={src} was trained with model.vlbert_image_box=false ({src}/vltrain_config.yaml), "
            "this run has model.vlbert_image_box=true: settings without weights of their own, which the weights "
            "cannot tell; evaluate with the source's settings: model.vlbert_image_box=false")):
        check(run)
    other = load_config("configs/debug.yaml", [*over, "model.vlbert_end_token=true", "model.hidden_act=relu",
                                               "model.image_token_type=1", "mode=eval"])
    with pytest.raises(ValueError, match=re.escape("evaluate with the source's settings: model.hidden_act=gelu "
                                                   "model.image_token_type=0")):
        check(other)
    cased = tmp_path / "cased"                              # a run recorded the casing its auto chose
    cased.mkdir()
    (cased / "config.json").write_text("{}")
    save_config(load_config("configs/debug.yaml", ["data.casing=uncased"]), str(cased / "vltrain_config.yaml"))
    with pytest.raises(ValueError, match=re.escape("this run has data.casing=cased: settings without weights")):
        check(load_config("configs/debug.yaml", [f"train.init_from={cased}", "data.casing=cased", "mode=eval"]))
    check(load_config("configs/debug.yaml", [f"train.init_from={cased}", "data.casing=uncased", "mode=eval"]))
    run.mode = "train"
    with caplog.at_level(logging.WARNING, logger="vltrain.engine.build"):
        check(run)
    assert "fine-tuning starts from weights that never saw them (set model.vlbert_image_box=false" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="vltrain.engine.build"):
        same = load_config("configs/debug.yaml", [*over, "model.vlbert_end_token=true", "mode=eval"])
        check(same)
        check(load_config("configs/debug.yaml", [f"train.init_from={src}", "mode=eval"]))
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text("{}")
        check(load_config("configs/debug.yaml", [*over[:1], f"train.init_from={tmp_path / 'bert'}",
                                                 "model.vlbert_image_box=true", "mode=eval"]))
    assert caplog.text == ""
    # a folder of consolidated files (config.json shared): the sidecar of the file loaded from a
    # folder, model.safetensors, not another's beside it
    folder = tmp_path / "consolidated"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for stem, box in (("best", "false"), ("model", "true")):
        save_config(load_config("configs/debug.yaml", ["model.region_embedding=vlbert", f"model.vlbert_image_box={box}"]),
                    str(folder / f"{stem}.yaml"))
        (folder / f"{stem}.safetensors").write_bytes(b"")
    assert source_config(str(folder)) == str(folder / "model.yaml")
    assert source_config(str(folder / "best.safetensors")) == str(folder / "best.yaml")


def test_written_step_of_exported_weights(tmp_path):
    """mode=eval names its results by the evaluated weights' step: consolidated and exported
    safetensors carry it in their metadata (an export-hf folder: its model.safetensors)."""
    from safetensors.torch import save_file
    from vltrain.ckpt.export import written_step
    (tmp_path / "export").mkdir()
    save_file({"w": torch.zeros(1)}, str(tmp_path / "export" / "model.safetensors"), metadata={"vltrain_step": "1200"})
    save_file({"w": torch.zeros(1)}, str(tmp_path / "nostep.safetensors"), metadata={"vltrain_step": "None"})
    torch.save({"w": torch.zeros(1)}, str(tmp_path / "w.pt"))
    assert written_step(str(tmp_path / "export")) == 1200
    assert written_step(str(tmp_path / "export" / "model.safetensors")) == 1200
    for other in ("nostep.safetensors", "w.pt", "missing.safetensors", ""):
        assert written_step(str(tmp_path / other)) is None, other


def _tag(save_dir, step, complete=True):
    d = os.path.join(save_dir, ckpt.step_tag(step))
    os.makedirs(d)
    if complete:
        with open(os.path.join(d, ckpt.COMPLETE_FILE), "w") as f:
            json.dump({"step": step, "world_size": 2}, f)
    return d


def test_rotation_keeps_this_runs_newest_complete_checkpoints(tmp_path):
    """keep_last counts the complete tags up to the step just saved. A run resumed from step 6
    of an older run (whose tags go to 16) saving 9 and 10 kept 12, 15, 16 and deleted its own
    new saves, `latest` pointing at nothing; an incomplete tag in the count could delete every
    complete one."""
    save = str(tmp_path)
    for step in (3, 6, 12, 15, 16):
        _tag(save, step)
    _tag(save, 9)
    assert ckpt.rotate(save, 9, keep_last=3) == []
    _tag(save, 10)
    assert ckpt.rotate(save, 10, keep_last=3) == ["step_00000003"]
    assert sorted(os.listdir(save)) == [ckpt.step_tag(s) for s in (6, 9, 10, 12, 15, 16)]
    assert ckpt.rotate(save, 10, keep_last=1) == ["step_00000009", "step_00000006"]
    # an incomplete tag (a save that died) takes no slot; an older one is deleted
    _tag(save, 11, complete=False)
    _tag(save, 8, complete=False)
    _tag(save, 14)
    assert ckpt.rotate(save, 14, keep_last=3) == ["step_00000011", "step_00000008"]
    assert sorted(os.listdir(save)) == [ckpt.step_tag(s) for s in (10, 12, 14, 15, 16)]
    assert ckpt.rotate(save, 14, keep_last=2) == ["step_00000010"]


def test_incomplete_latest_is_reported_and_skipped(tmp_path, caplog):
    save = str(tmp_path)
    _tag(save, 10)
    _tag(save, 20)
    _tag(save, 30, complete=False)                 # crashed while saving
    (tmp_path / ckpt.LATEST_FILE).write_text(ckpt.step_tag(30))
    found = ckpt.find_resume_point(save)
    assert found.tag == ckpt.step_tag(20) and found.info["step"] == 20
    assert "step_00000030" in caplog.text and "incomplete" in caplog.text
    caplog.clear()
    (tmp_path / ckpt.LATEST_FILE).write_text(ckpt.step_tag(40))            # names no folder at all
    assert ckpt.find_resume_point(save).tag == ckpt.step_tag(20)
    assert "step_00000040 (latest) is missing" in caplog.text and "step_00000040 is incomplete" not in caplog.text
    assert "step_00000040 (latest); taking step_00000020 instead, the newest complete checkpoint" in caplog.text


def test_latest_is_the_resume_point_before_newer_tags(tmp_path):
    """A run restarted from step 10 (after a divergence) with the old run's step 20 still there:
    `latest` names what this run saved last, and resume takes it, not the newest step."""
    save = str(tmp_path)
    _tag(save, 10)
    _tag(save, 20)
    (tmp_path / ckpt.LATEST_FILE).write_text(ckpt.step_tag(10))
    assert ckpt.find_resume_point(save).tag == ckpt.step_tag(10)
    assert locate(save, check_files=False).tag == ckpt.step_tag(10)
    # a tag folder given with another tag: that tag, beside it
    assert locate(os.path.join(save, ckpt.step_tag(20)), tag=ckpt.step_tag(10), check_files=False).tag == \
        ckpt.step_tag(10)
    # best/ without its record is named incomplete, with the complete tags there
    os.makedirs(os.path.join(save, ckpt.BEST_TAG))
    with pytest.raises(CheckpointError, match=r"is incomplete.*complete tags there"):
        locate(save, tag=ckpt.BEST_TAG, check_files=False)


def test_keep_last_0_keeps_the_save_just_made(tmp_path):
    """train.keep_last=0 keeps one (the newest): deleting the tag just saved left `latest`
    naming nothing."""
    save = str(tmp_path)
    _tag(save, 5)
    _tag(save, 10)
    assert ckpt.rotate(save, 10, keep_last=0) == ["step_00000005"]
    assert os.listdir(save) == ["step_00000010"]


class TagWriter:
    """DeepSpeed's engine as far as a save sees it: writes a rank-0 model file into the tag."""
    checkpoint_engine = None

    def save_checkpoint(self, save_dir, tag, **kwargs):
        os.makedirs(os.path.join(save_dir, tag), exist_ok=True)
        torch.save({"w": torch.ones(2)}, os.path.join(save_dir, tag, "mp_rank_00_model_states.pt"))


def test_a_best_save_moves_no_latest_and_rotates_nothing(tmp_path):
    """best/ is no resume point: its save leaves `latest` and the step tags alone, and a stale
    best.partial (a cut-short save of another world size: rank 1's shard) is not carried in."""
    save = str(tmp_path)
    for step in (3, 4):
        _tag(save, step)
    (tmp_path / ckpt.LATEST_FILE).write_text(ckpt.step_tag(4))
    stale = os.path.join(save, "best.partial", "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    os.makedirs(os.path.dirname(stale))
    open(stale, "w").close()
    cfg = load_config("configs/debug.yaml")
    ckpt.save(TagWriter(), save, ckpt.BEST_TAG, step=5, cfg=cfg, rank_state={}, info={}, rank=0, keep_last=1)
    assert ckpt.read_latest(save) == ckpt.step_tag(4)
    assert sorted(os.listdir(save)) == [ckpt.BEST_TAG, ckpt.LATEST_FILE, "step_00000003", "step_00000004"]
    assert sorted(os.listdir(os.path.join(save, ckpt.BEST_TAG))) == [
        "config.yaml", "mp_rank_00_model_states.pt", "vltrain_ckpt.json", "vltrain_rank00000.pt"]
    assert ckpt.read_ckpt_info(os.path.join(save, ckpt.BEST_TAG))["step"] == 5


def test_cut_short_saves_are_named_and_cleaned_up(tmp_path, caplog):
    """A save writes <tag>.partial; one cut short is named at the next resume and deleted by a
    later save's rotation; a replace cut between its two renames is named with what to rename."""
    save = str(tmp_path)
    _tag(save, 10)
    (tmp_path / ckpt.LATEST_FILE).write_text(ckpt.step_tag(10))
    os.makedirs(os.path.join(save, "step_00000012.partial"))          # a save that died
    assert ckpt.find_resume_point(save).tag == ckpt.step_tag(10)
    assert "step_00000012.partial was cut short" in caplog.text
    _tag(save, 14)
    assert ckpt.rotate(save, 14, keep_last=3) == ["step_00000012.partial"]
    # best replaced: renamed to best.old, then the crash before best.partial became best
    for name in ("best.partial", "best.old"):
        os.makedirs(os.path.join(save, name))
        with open(os.path.join(save, name, ckpt.COMPLETE_FILE), "w") as f:
            json.dump({"step": 14 if name == "best.partial" else 10, "world_size": 2}, f)
    with pytest.raises(CheckpointError, match=r"best does not exist; a save that replaced it was cut short "
                                                r"between two renames.*best.partial and .*best.old"):
        locate(os.path.join(save, "best"), check_files=False)


def test_a_save_clears_cut_short_saves_first_and_names_a_full_disk(tmp_path, monkeypatch):
    """A save that failed on a full disk left step_25.partial; resumed from step 20, every later
    save failed again for the space it held (a requeued job, at every requeue): a save removes
    cut-short step saves first (not a complete .partial: a replace cut between its renames).
    A save that fails says what failed and what is intact; torch's own words on a full disk
    were "basic_ios::clear: iostream error"."""
    import shutil
    from collections import namedtuple
    save = str(tmp_path)
    _tag(save, 20)
    (tmp_path / ckpt.LATEST_FILE).write_text(ckpt.step_tag(20))
    os.makedirs(os.path.join(save, "step_00000025.partial", "global_step25"))          # cut short
    os.makedirs(os.path.join(save, "step_00000030.partial"))                           # complete
    with open(os.path.join(save, "step_00000030.partial", ckpt.COMPLETE_FILE), "w") as f:
        json.dump({"step": 30, "world_size": 1}, f)
    os.makedirs(os.path.join(save, "best.partial"))                                   # best's own save clears it

    class DiskFull:      # the engine's writer on a full filesystem, as torch reports it
        checkpoint_engine = None

        def save_checkpoint(self, *a, **k):
            raise RuntimeError("basic_ios::clear: iostream error")
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
    cfg = load_config("configs/debug.yaml")
    with pytest.raises(ckpt.SaveFailed) as e:
        ckpt.save(DiskFull(), save, ckpt.step_tag(40), step=40, cfg=cfg, rank_state={}, info={}, rank=0,
                  keep_last=3)
    assert str(e.value) == (f"saving checkpoint step_00000040 to {save} failed: the filesystem is full (1 MiB free): "
                            "free space there, lower train.keep_last, or set output_root on a larger one "
                            "(RuntimeError: basic_ios::clear: iostream error); step_00000020 (latest) is intact "
                            "and a resume (train.resume=auto) starts there")
    assert sorted(os.listdir(save)) == ["best.partial", ckpt.LATEST_FILE, "step_00000020", "step_00000030.partial"]
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(1 << 40, 1 << 30, 1 << 39))
    with pytest.raises(ckpt.SaveFailed, match=r"step_00000040 to .* failed: RuntimeError: basic_ios::clear: iostream "
                                              r"error; step_00000020 \(latest\) is intact"):
        ckpt.save(DiskFull(), save, ckpt.step_tag(40), step=40, cfg=cfg, rank_state={}, info={}, rank=0,
                  keep_last=3)


def test_no_checkpoint_and_explicit_paths(tmp_path):
    assert ckpt.find_resume_point(str(tmp_path / "none")) is None
    d = _tag(str(tmp_path), 40)
    assert locate(d, check_files=False).tag == "step_00000040"          # a tag folder
    assert locate(str(tmp_path), check_files=False).tag == "step_00000040"  # a save dir
    with pytest.raises(CheckpointError, match=rf"missing does not exist; {tmp_path} holds step_00000040$"):
        locate(str(tmp_path / "missing"), check_files=False)                # the README's step_00000100, say
    run = tmp_path / "run"                                               # a run folder
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text("")
    _tag(str(run / "checkpoints"), 50)
    assert locate(str(run), check_files=False).path == str(run / "checkpoints" / "step_00000050")
    cut = _tag(str(tmp_path), 60, complete=False)
    open(os.path.join(cut, "mp_rank_00_model_states.pt"), "w").close()
    with pytest.raises(CheckpointError, match="step_00000060 is incomplete .*its save did not finish"):
        locate(cut, check_files=False)


def test_activation_checkpointing_gives_the_same_losses_and_grads():
    from tests.test_model import pretrain_batch
    from vltrain.config import ObjectivesConfig, debug_model_config
    from vltrain.objectives import pretrain_losses
    results = []
    for flag in (False, True):
        torch.manual_seed(0)
        model = VLModel(debug_model_config(activation_checkpointing=flag)).train()
        loss, _ = pretrain_losses(model, pretrain_batch(model.config), ObjectivesConfig(mrc=True))
        loss.backward()
        results.append((float(loss.detach()), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    assert results[0][0] == results[1][0]
    for n, g in results[0][1].items():
        assert torch.allclose(g, results[1][1][n], atol=1e-7), n


@pytest.mark.parametrize("n,ranks,batch", [(1001, 8, 4), (37, 2, 8), (48, 2, 4)])
def test_validation_counts_each_sample_once_across_ranks(n, ranks, batch):
    """Trainer.mean_metrics weighs each batch by first_seen_counts. Streaming pads every rank's
    share with other ranks' samples (here its own partition for an eval loader); counted per
    rank, 1001 samples on 8 ranks would be 1008."""
    from streaming.base.partition.orig import get_partitions_orig
    from vltrain.tasks.evaluation import first_seen_counts
    parts = get_partitions_orig(n, 1, 1, ranks, 1, batch)[0, :, 0]        # (ranks, batches, batch)
    per_rank = [[[int(i) for i in b if i >= 0] for b in r] for r in parts]
    per_rank = [[b for b in r if b] for r in per_rank]
    assert len({len(r) for r in per_rank}) == 1                          # same batch count: ZeRO-3 safe
    per_rank_unique = sum(len({i for b in r for i in b}) for r in per_rank)
    assert per_rank_unique == {1001: 1008, 37: 37, 48: 48}[n]            # what counting per rank gave
    counts = first_seen_counts(per_rank)
    assert sum(map(sum, counts)) == n
    # each sample is counted in exactly one batch: the first that holds it
    owner = {}
    for r, batches in enumerate(per_rank):
        for b, ids in enumerate(batches):
            for i in ids:
                owner.setdefault(i, (r, b))
    expect = [[len({i for i in ids if owner[i] == (r, b)}) for b, ids in enumerate(batches)]
              for r, batches in enumerate(per_rank)]
    assert counts == expect
    assert first_seen_counts([[[1, 1, 2]], [[2, 3]]]) == [[2], [1]]     # a repeat inside a batch too


def test_validation_accuracy_over_masked_tokens_weighs_tokens():
    """val/mlm_acc as BERT's masked_lm_accuracy: correct / masked over the split (10/10 and
    45/90 read 55%, not 75%), the loss a mean over samples; a batch holding repeats of samples
    another batch counted weighs only its share of samples seen first."""
    from vltrain.monitor import accuracy
    from vltrain.tasks.evaluation import metric_sums
    ones, half = torch.ones(10), torch.tensor([1.0] * 45 + [0.0] * 45)
    batches = [([0, 1, 2, 3], {"mlm_acc": accuracy(ones, torch.ones(10)), "loss": torch.tensor(1.0)}),
               ([4, 5, 6, 7], {"mlm_acc": accuracy(half, torch.ones(90)), "loss": torch.tensor(3.0)})]
    keys = ["loss", "mlm_acc"]

    def means(weights):
        sums = metric_sums(batches, weights, keys, "cpu").tolist()
        return {k: sums[i] / sums[len(keys) + i] for i, k in enumerate(keys)}
    assert means([4, 4]) == pytest.approx({"loss": 2.0, "mlm_acc": 55 / 100})
    # the second batch's samples half counted before (streaming's padding): half its tokens
    assert means([4, 2]) == pytest.approx({"loss": (4 + 6) / 6, "mlm_acc": (10 + 22.5) / (10 + 45)})


def test_a_fresh_run_over_a_runs_checkpoints_sets_them_aside(tmp_path, caplog):
    """Starting over (no resume) where a run's checkpoints are: they move to
    checkpoints.replaced-<time>/, whole, so the two runs' tags never mix."""
    from vltrain.engine.build import set_aside_previous_run
    assert set_aside_previous_run(str(tmp_path)) is None                 # nothing there
    tag = tmp_path / "checkpoints" / "step_00000040"
    tag.mkdir(parents=True)
    assert set_aside_previous_run(str(tmp_path)) is None                 # incomplete: not a run's
    assert tag.is_dir()
    (tag / "vltrain_ckpt.json").write_text(json.dumps({"step": 40}))
    (tmp_path / "checkpoints" / "latest").write_text("step_00000040")
    with caplog.at_level("WARNING"):
        msg = set_aside_previous_run(str(tmp_path))
    (aside,) = tmp_path.glob("checkpoints.replaced-*")
    assert not (tmp_path / "checkpoints").exists()
    assert (aside / "step_00000040" / "vltrain_ckpt.json").is_file()
    assert (aside / "latest").read_text() == "step_00000040"
    assert "up to step 40" in msg and str(aside) in msg and "train.resume=auto" in msg and msg in caplog.text


def test_a_resume_with_other_settings_says_which(tmp_path, caplog):
    """The README tour's mistake: resuming without the first command's overrides runs on with
    debug.yaml's max_steps and lr; the resume names what differs from the checkpoint's config."""
    from vltrain.config import save_config
    from vltrain.engine.build import warn_config_changes
    first = load_config("configs/debug.yaml", ["train.max_steps=100", "train.lr=5e-4"])
    save_config(first, str(tmp_path / "config.yaml"))
    again = load_config("configs/debug.yaml", ["train.resume=auto", "train.grad_accum=2"])
    with caplog.at_level("WARNING"):
        diffs = warn_config_changes(again, str(tmp_path))
    assert sorted(diffs) == ["train.lr 0.0005 -> 0.001", "train.max_steps 100 -> 40"], diffs
    assert "train.max_steps 100 -> 40" in caplog.text
    same = load_config("configs/debug.yaml", ["train.max_steps=100", "train.lr=5e-4", "train.resume=auto"])
    assert warn_config_changes(same, str(tmp_path)) == []                     # resume keys are expected to differ


def test_zero0_fused_fp16_optimizer_masters_map_back_to_parameter_names(monkeypatch):
    """On GPU, ZeRO-0 bf16/fp16 with DeepSpeed's FusedAdam goes through its fused FP16_Optimizer,
    which saves each group's fp32 masters as ONE flat tensor (``fp32_groups_flat``); the CPU
    runs of test_ckpt_tools take the unfused optimizer (a list per group). The real
    FP16_Optimizer, built here on the CPU accelerator, gives the flat layout: every master is
    found under its parameter's name, not the bf16 weight."""
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    from deepspeed.runtime.fp16.fused_optimizer import FP16_Optimizer
    from vltrain.ckpt.weights import stage0_masters
    from vltrain.config import debug_model_config
    from vltrain.engine.ds_config import no_decay_param_groups
    torch.manual_seed(0)
    model = VLModel(debug_model_config()).to(torch.bfloat16)
    opt = FP16_Optimizer(torch.optim.AdamW(no_decay_param_groups(model, 0.01)), low_precision_dtype=torch.bfloat16,
                         verbose=False)
    for flat in opt.fp32_groups_flat:       # masters that the bf16 weights cannot hold exactly
        flat.data.add_(torch.randn_like(flat) * 1e-4)
    sd = {"module": model.state_dict(), "buffer_names": [n for n, _ in model.named_buffers()],
          "optimizer": opt.state_dict()}
    assert "fp32_groups_flat" in sd["optimizer"] and "fp32_groups" not in sd["optimizer"]
    masters = stage0_masters(sd)
    params = dict(model.named_parameters())
    assert masters.keys() == params.keys()
    want = {}
    for group, flat in zip(opt.fp16_groups, opt.fp32_groups_flat):
        offset = 0
        for p in group:
            want[next(n for n, q in params.items() if q is p)] = flat[offset:offset + p.numel()].view(p.shape)
            offset += p.numel()
    for n, t in masters.items():
        assert t.dtype == torch.float32 and torch.equal(t, want[n]), n
    assert sum(not torch.equal(t, params[n].float()) for n, t in masters.items()) == len(masters)
    # a layout that does not add up is not guessed at
    sd["optimizer"]["fp32_groups_flat"] = [f[:-1] for f in sd["optimizer"]["fp32_groups_flat"]]
    assert stage0_masters(sd) == {}


def test_precision_auto_follows_a_continued_checkpoint(tmp_path):
    """train.precision=auto continuing a checkpoint (a resume, or mode=eval of one of ours):
    the checkpoint's precision; a config.yaml from before the key existed trained fp32, one
    this version cannot load still says its precision, one that says nothing means fp32.
    Nothing to continue: left to the ds_config and the machine (test_ds_config)."""
    import types
    import yaml
    from vltrain.config import Config, config_to_dict
    from vltrain.engine.resume import continued_precision, saved_config

    def tag(name, train_precision=None, drop=False, extra=None):
        d = tmp_path / name
        d.mkdir()
        (d / "vltrain_ckpt.json").write_text('{"step": 1}')
        cfg = config_to_dict(Config())
        if drop:
            del cfg["train"]["precision"]
        elif train_precision:
            cfg["train"]["precision"] = train_precision
        cfg["train"].update(extra or {})
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        return types.SimpleNamespace(path=str(d))

    train, ev = Config(), Config(mode="eval")
    assert continued_precision("fp16", train, tag("given", "bf16")) == ("fp16", "given")
    assert continued_precision("auto", train, None) == ("auto", "")
    assert continued_precision("auto", train, tag("fp16", "fp16"))[0] == "fp16"
    old = tag("old", drop=True)
    assert saved_config(old.path).train.precision == "fp32"               # what exports and info see too
    assert continued_precision("auto", train, old)[0] == "fp32"
    assert continued_precision("auto", train, tag("newer", "bf16", extra={"a_later_key": 1}))[0] == "bf16"
    silent = tag("silent")
    os.remove(os.path.join(silent.path, "config.yaml"))
    assert continued_precision("auto", train, silent) == ("fp32", f"{silent.path} does not say; fp32, the old default")
    ev.train.init_from = tag("evaluated", "bf16").path
    assert continued_precision("auto", ev, None)[0] == "bf16"               # evaluated as it validated
    ev.train.init_from = str(tmp_path)                                        # not a checkpoint: the machine's
    assert continued_precision("auto", ev, None) == ("auto", "")


def test_load_universal_follows_the_checkpoint_resumed_and_monitors_write_in_the_run(tmp_path):
    """checkpoint.load_universal is the resumed checkpoint's kind (a ds_config's true made every
    ordinary checkpoint of the run fail to load, reading like damage); DeepSpeed's own
    TensorBoard / CSV monitors write under the run folder, not the working directory."""
    from vltrain.engine.build import set_checkpoint_keys
    from vltrain.engine.checkpoint import Found
    from vltrain.engine.ds_config import DSConfigError
    plain, universal = Found(str(tmp_path), "step_00000003", {}), Found(str(tmp_path), "u", {"universal": True})
    for found, want in ((None, False), (plain, False), (universal, True)):
        ds = {"tensorboard": {"enabled": True}, "csv_monitor": {"enabled": True, "output_path": "/elsewhere/"}}
        set_checkpoint_keys(ds, found, str(tmp_path / "run"))
        assert ds["checkpoint"]["load_universal"] is want
        assert ds["tensorboard"]["output_path"] == str(tmp_path / "run" / "deepspeed_monitor") + os.sep
        assert ds["csv_monitor"]["output_path"] == "/elsewhere/"                  # the user's path kept
    with pytest.raises(DSConfigError, match=r"'checkpoint.load_universal' = true, but .*step_00000003 is an "
                                            r"ordinary checkpoint: vltrain sets it from the checkpoint resumed"):
        set_checkpoint_keys({"checkpoint": {"load_universal": True}}, plain, str(tmp_path))
    set_checkpoint_keys({"checkpoint": {"load_universal": True}}, universal, str(tmp_path))   # agrees: fine


def test_a_resume_keeps_this_runs_fp16_loss_scaler_settings():
    """DeepSpeed's load installs the checkpoint's loss scaler; at the same precision that is the
    exact continuation, unless this run configures it otherwise (fp16 loss_scale, window,
    hysteresis, min scale), which was then silently ignored: this run's scaler is kept, a dynamic
    one going on from the checkpoint's scale; clipping is always this run's. (DeepSpeed's real
    scaler classes; the optimizer is a holder of the attributes its load sets.)"""
    from types import SimpleNamespace

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from vltrain.engine.resume import optimizer_run_settings, restore_run_settings

    def dynamic(window, scale=2.0 ** 16):
        return DynamicLossScaler(scale, window, 1.0, 2, False)

    def loaded(run_scaler, ckpt_scaler):
        opt = SimpleNamespace(loss_scaler=run_scaler, dynamic_loss_scale=run_scaler.dynamic, clip_grad=1.0)
        kept = optimizer_run_settings(opt)
        # what DeepSpeed's load sets
        opt.loss_scaler, opt.dynamic_loss_scale, opt.clip_grad = ckpt_scaler, ckpt_scaler.dynamic, 5.0
        return opt, restore_run_settings(opt, kept, same_precision=True)
    ckpt = dynamic(1000, scale=512.0)
    opt, changed = loaded(dynamic(1000), ckpt)                                   # same settings: the checkpoint's
    assert opt.loss_scaler is ckpt and changed is None and opt.clip_grad == 1.0
    run = dynamic(200)
    opt, changed = loaded(run, dynamic(1000, scale=512.0))                       # another window
    assert opt.loss_scaler is run and run.cur_scale == 512.0 and run.scale_window == 200
    assert "'scale_window': 200" in changed and "continuing from its scale 512" in changed
    static = LossScaler(128)
    opt, changed = loaded(static, dynamic(1000, scale=512.0))                    # loss_scale 128: static now
    assert opt.loss_scaler is static and static.cur_scale == 128 and "{'dynamic': False, 'scale': 128}" in changed
    assert opt.dynamic_loss_scale is False

    # ZeRO-0's fp16 optimizers keep a LossScaleConfig, which their load overwrites in place
    import torch
    from deepspeed.runtime.fp16.loss_scaler import LossScaleConfig

    def zero0(window):
        return LossScaleConfig(torch.float16, True, 1.0, {"init_scale": 2.0 ** 16, "scale_window": window,
                                                          "min_scale": 1.0, "delayed_shift": 2,
                                                          "consecutive_hysteresis": False})
    opt = SimpleNamespace(loss_scale_config=zero0(200), clip_grad=1.0)
    kept = optimizer_run_settings(opt)
    c = opt.loss_scale_config            # as FP16_Optimizer.load_state_dict sets it from a window-1000 run
    c.dynamic_loss_scale, c.cur_scale, c.cur_iter, c.last_overflow_iter, c.scale_factor, c.scale_window = \
        True, 512.0, 7000, 6990, 2.0, 1000
    changed = restore_run_settings(opt, kept, same_precision=True)
    assert opt.loss_scale_config.scale_window == 200 and opt.loss_scale_config.cur_scale == 512.0
    assert opt.loss_scale_config.cur_iter == 7000 and "continuing from its scale 512" in changed


def test_a_resume_keeps_the_casing_its_run_recorded(tmp_path):
    """data.casing=auto is recorded as what it chose; a resume whose tokenizer would read the
    text otherwise (another vocab folder, a changed tokenizer_config.json) is refused."""
    from vltrain.engine.build import check_resume_casing
    from vltrain.engine.checkpoint import Found
    tag = tmp_path / "step_00000003"
    tag.mkdir()
    (tag / "config.yaml").write_text("data:\n  casing: uncased\n")
    found = Found(str(tmp_path), "step_00000003", {})
    assert check_resume_casing(found, "uncased") == "uncased" and check_resume_casing(None, "cased") == "cased"
    with pytest.raises(ValueError, match=r"step_00000003 trained on uncased text, and this run's tokenizer reads "
                                         r"it cased: resume with data.casing=uncased"):
        check_resume_casing(found, "cased")
    (tag / "config.yaml").write_text("data:\n  vocab: bert-base-uncased\n")           # written before the key
    assert check_resume_casing(found, "cased") == "cased"
