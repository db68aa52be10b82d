"""Checkpoint tools (`vltrain-ckpt`), end to end on CPU/gloo with the debug model.

Trained once per module, by the real ``build_training`` (tests/workers/ckpt_train.py), which
also reads the LIVE engine's full fp32 weights and Adam moments at every save and right
after every resume:

  A  2 ranks: z2 (ZeRO-2, train.global_batch 16 = grad_accum 1, 6 steps, saves at 3 and 6),
     z1 / z3b / z0 (ZeRO-1/3/0, 2 steps), z0bf (ZeRO-0 in bf16, 2 steps)
  B  1 rank:  z3 (ZeRO-3, the same train.global_batch of 16 = grad_accum 2, 6 steps, saves at 3, 6)
     -> `reshard` z2@3 -> U2 and z3@3 -> U3
  C  1 rank:  resume U2 (grad_accum becomes 2), then bad inputs through run.py's main()
  D  2 ranks: resume U3 (grad_accum becomes 1)
  N  4 ranks on 2 emulated nodes: n4 (ZeRO-2, micro-batch 4, 6 steps) -> `reshard` n4@3 ->
     M  2 ranks on one node resume it (grad_accum 2): the README's 64 GPUs on 8 nodes -> 8
        GPUs on one node, scaled down (only for test_reshard_from_two_nodes_to_one)
  (U2/U3 are written into the resuming runs' own checkpoints/ folders: train.resume=auto)

A and B run side by side, then C and D: four launches in all.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.fixtures.assets import bert_text_diff
from tests.fixtures.corpus import REPO, Ranks, rank_env
from vltrain.engine.distributed import free_port
from vltrain.ckpt.__main__ import main as ckpt_main
from vltrain.ckpt.export import written_step
from vltrain.config import debug_model_config
from vltrain.model.transformer import named_pieces

TAG3 = "step_00000003"
# Skipped-sample counts written into the resharded checkpoints' rank states (the runs had no
# bad samples): a resume at another world size must carry their sum.
SKIPPED = {"U2": [5, 7], "U3": [4]}


def launch(spec: dict, name: str, world: int, log_dir: str, per_node: int = 0):
    """``world`` ranks of the worker; ``per_node`` ranks per emulated node (default: one node)."""
    path = os.path.join(log_dir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    port = free_port()
    per_node = per_node or world
    logs = [os.path.join(log_dir, f"{name}.rank{r}.log") for r in range(world)]
    procs = [subprocess.Popen([sys.executable, "tests/workers/ckpt_train.py", path], cwd=REPO,
                              env=rank_env(r, world, port, LOCAL_RANK=r % per_node, LOCAL_WORLD_SIZE=per_node,
                                           LOCAL_SIZE=per_node, NODE_RANK=r // per_node),
                              stdout=open(logs[r], "w"), stderr=subprocess.STDOUT)
             for r in range(world)]
    return name, procs, logs


def finish(*launches, timeout=900):
    for name, procs, logs in launches:
        codes = []
        for p in procs:
            try:
                codes.append(p.wait(timeout))
            except subprocess.TimeoutExpired:
                for q in procs:
                    q.kill()
                codes.append(None)
        if codes != [0] * len(procs):
            tails = "\n".join(f"--- {l}\n" + open(l).read()[-3000:] for l in logs)
            raise AssertionError(f"launch {name} failed with {codes}:\n{tails}")


def cli(capsys, *argv):
    """`vltrain-ckpt ARGV` in this process: (exit code, stdout, stderr)."""
    code = ckpt_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def strip(state: dict) -> dict:
    return {k[len("model."):]: v for k, v in state.items()}


def load_dump(ckpts, name):
    return torch.load(os.path.join(ckpts["dumps"], f"{name}.pt"), weights_only=False)


def losses(ckpts, name):
    with open(os.path.join(ckpts["dumps"], f"{name}_losses.json")) as f:
        d = json.load(f)
    d["losses"] = {int(k): v for k, v in d["losses"].items()}
    return d


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory, synthetic_corpus):
    root = str(tmp_path_factory.mktemp("ckpt_tools"))
    dumps, runs, logs = (os.path.join(root, d) for d in ("dumps", "runs", "logs"))
    for d in (dumps, logs):
        os.makedirs(d)
    train = os.path.join(synthetic_corpus, "captions", "pretrain")

    def run(name, ds, *extra):
        return {"name": name, "ds_config": f"ds_configs/{ds}.json", "overrides": [
            f"output_root={runs}", f"run_name={name}", f"data.train={train}", "data.val=",
            f"data.cache_dir={root}/cache/{name}", "train.log_every=1",
            "train.dist_timeout_s=300", "train.keep_last=5", *extra]}

    long = ("train.max_steps=6", "train.save_every_steps=3", "train.global_batch=16")
    short = ("train.max_steps=2", "train.warmup_steps=1")
    a = launch({"out": dumps, "runs": [run("z2", "zero2", *long), run("z1", "zero1", *short),
                                       run("z3b", "zero3", *short), run("z0", "zero0", *short),
                                       run("z0bf", "zero0", *short, "train.precision=bf16"),
                                       run("z0vl", "zero0", *short, "model.region_embedding=vlbert",
                                           "model.vlbert_visual_embedding=linear", "data.image_feature=regions_mean"),
                                       run("z0vn", "zero0", *short, "model.region_embedding=vlbert",
                                           "model.vlbert_text_only_visual=none", "data.image_feature=regions_mean")]},
              "A", 2, logs)
    finish(a)   # one job at a time: a starting streaming job clears the host's stale shared memory
    b = launch({"out": dumps, "runs": [run("z3", "zero3", *long)]}, "B", 1, logs)
    finish(b)
    res = {"root": root, "dumps": dumps, "runs": runs, "logs": logs, "run": run, "train": train,
           "z2": os.path.join(runs, "z2", "checkpoints"), "z3": os.path.join(runs, "z3", "checkpoints")}
    for name in ("z1", "z3b", "z0", "z0bf", "z0vl", "z0vn"):
        res[name] = os.path.join(runs, name, "checkpoints")
    return res


@pytest.fixture(scope="module")
def resharded(ckpts):
    out = {}
    # Written where the next runs look for their own checkpoints (the README's recipe): they
    # resume with train.resume=auto, as a requeued Slurm job does.
    for key, src, run, extra in (("U2", ckpts["z2"], "r2to1", ["--world-size", "1"]),
                                 ("U3", ckpts["z3"], "r3to2", ["--world-size", "2"])):
        dest = os.path.join(ckpts["runs"], run, "checkpoints", TAG3)
        assert ckpt_main(["reshard", src, dest, "--tag", TAG3, *extra]) == 0
        out[key] = dest
        for r, n in enumerate(SKIPPED[key]):
            path = os.path.join(dest, f"vltrain_rank{r:05d}.pt")
            state = torch.load(path, weights_only=False)
            state["loader"]["num_skipped"] = n
            torch.save(state, path + ".tmp")
            os.replace(path + ".tmp", path)          # a new file: never edit a hard-linked source
    # A copy of z2@3 missing rank 1's optimizer shard (hard links: cheap).
    damaged = os.path.join(ckpts["root"], "damaged", TAG3)
    shutil.copytree(os.path.join(ckpts["z2"], TAG3), damaged, copy_function=os.link)
    os.remove(os.path.join(damaged, "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    out["damaged"] = damaged
    return out


@pytest.fixture(scope="module")
def resumed(ckpts, resharded):
    run, runs = ckpts["run"], ckpts["runs"]
    base = ["--config", "configs/debug.yaml", f"output_root={runs}", f"data.train={ckpts['train']}", "data.val=",
            f"data.cache_dir={ckpts['root']}/cache/bad", "train.max_steps=6"]
    u2, z2_3 = resharded["U2"], os.path.join(ckpts["z2"], TAG3)
    bad = [
        {"name": "shape_resume", "argv": base + ["run_name=b1", f"train.resume={u2}", "model.hidden_size=32"]},
        {"name": "shape_init", "argv": base + ["run_name=b2", f"train.init_from={z2_3}", "model.hidden_size=32"]},
        {"name": "not_resharded", "argv": base + ["run_name=b3", f"train.resume={z2_3}"]},
        {"name": "batch", "argv": base + ["run_name=b4", f"train.resume={u2}", "train.micro_batch_size=3"]},
        {"name": "other_global_batch", "argv": base + ["run_name=b8", f"train.resume={u2}", "train.global_batch=32"]},
        {"name": "global_batch_unfit", "argv": base + ["run_name=b9", "train.global_batch=12"]},
        {"name": "run_dir_is_a_checkpoint", "argv": base + [f"output_root={os.path.dirname(u2)}",
                                                            f"run_name={os.path.basename(u2)}"]},
        {"name": "global_batch_vs_accum", "argv": base + ["run_name=b10", "train.global_batch=16",
                                                          "train.grad_accum=3"]},
        {"name": "missing_file", "argv": base + ["run_name=b5", f"train.resume={resharded['damaged']}"]},
        {"name": "stage", "argv": base[:2] + ["--deepspeed_config", "ds_configs/zero3.json"] + base[2:]
         + ["run_name=b6", f"train.resume={u2}"]},
        {"name": "shape_resume_zero0", "argv": base[:2] + ["--deepspeed_config", "ds_configs/zero0.json"] + base[2:]
         + ["run_name=b7", f"train.resume={ckpts['z0']}", "model.hidden_size=32"]},
    ]
    c = launch({"out": ckpts["dumps"], "runs": [run("r2to1", "zero2", "train.max_steps=6", "train.save_every_steps=3",
                                                    "train.resume=auto")], "bad": bad}, "C", 1, ckpts["logs"])
    finish(c)   # one job at a time (see above)
    d = launch({"out": ckpts["dumps"], "runs": [run("r3to2", "zero3", "train.max_steps=6", "train.save_every_steps=3",
                                                    "train.resume=auto", "train.global_batch=16")]},
               "D", 2, ckpts["logs"])
    finish(d)
    with open(os.path.join(ckpts["dumps"], "bad_inputs.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def two_nodes(ckpts):
    """n4: 4 ranks as 2 nodes x 2 -> reshard at step 3 -> n4to2: 2 ranks on one node."""
    run, logs = ckpts["run"], ckpts["logs"]
    steps = ("train.max_steps=6", "train.save_every_steps=3", "train.micro_batch_size=4")
    finish(launch({"out": ckpts["dumps"], "runs": [run("n4", "zero2", *steps)]}, "N", 4, logs, per_node=2))
    dest = os.path.join(ckpts["runs"], "n4to2", "checkpoints", TAG3)
    assert ckpt_main(["reshard", os.path.join(ckpts["runs"], "n4", "checkpoints"), dest, "--tag", TAG3,
                      "--world-size", "2"]) == 0
    finish(launch({"out": ckpts["dumps"], "runs": [run("n4to2", "zero2", *steps, "train.resume=auto")]},
                  "M", 2, logs))
    return dest


# ------------------------------------------------------------------ reshard + resume

def assert_same_state(before: dict, after: dict):
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        assert before[key].keys() == after[key].keys()
        for name in before[key]:
            assert torch.equal(before[key][name], after[key][name]), (key, name)


@pytest.mark.parametrize("src,dest,world,accum", [("z2", "r2to1", 1, 2), ("z3", "r3to2", 2, 1)],
                         ids=["zero2_2ranks_to_1", "zero3_1rank_to_2"])
def test_reshard_then_resume_on_another_world_size(ckpts, resharded, resumed, src, dest, world, accum):
    # the live engine after resuming holds exactly what the live engine held when saving
    before, after = load_dump(ckpts, f"{src}_save3"), load_dump(ckpts, f"{dest}_built")
    assert after["step"] == 3 and after["world"] == world
    assert_same_state(before, after)
    # the global batch is kept by adjusting grad_accum; the first resumed step reproduces the
    # uninterrupted run's loss; training continues to the end and checkpoints
    u, r = losses(ckpts, src), losses(ckpts, dest)
    assert r["code"] == 0 and r["world"] == world and r["grad_accum"] == accum
    assert after["grad_accum"] == accum
    assert sorted(r["losses"]) == [4, 5, 6]
    # first resumed step, and the ones after it (a wrong Adam step count or weight decay
    # after loading -- DeepSpeed 0.19.8's ZeRO-3 universal loader -- shows from step 5 on)
    for s in (4, 5, 6):
        assert abs(r["losses"][s] - u["losses"][s]) <= 1e-5 * abs(u["losses"][s]), (s, r["losses"], u["losses"])
    end_u, end_r = load_dump(ckpts, f"{src}_save6")["fp32"], load_dump(ckpts, f"{dest}_save6")["fp32"]
    assert max((end_u[n] - end_r[n]).abs().max().item() for n in end_u) <= 1e-5
    rec = json.load(open(os.path.join(ckpts["runs"], dest, "checkpoints", "step_00000006", "vltrain_ckpt.json")))
    assert (rec["world_size"], rec["grad_accum"], rec["global_batch"], rec["step"]) == (world, accum, 16, 6)
    # data/skipped_samples (the sum over ranks) carried whole: on the new rank 0, none repeated
    step6 = os.path.join(ckpts["runs"], dest, "checkpoints", "step_00000006")
    skipped = [torch.load(os.path.join(step6, f"vltrain_rank{r:05d}.pt"), weights_only=False)["loader"]["num_skipped"]
               for r in range(world)]
    assert skipped == [sum(SKIPPED["U2" if src == "z2" else "U3"])] + [0] * (world - 1)


def test_reshard_from_two_nodes_to_one(ckpts, two_nodes):
    # each emulated node kept its own shard cache; the data order was fixed by 2 canonical nodes
    assert sorted(os.listdir(os.path.join(ckpts["root"], "cache", "n4"))) == ["node0", "node1"]
    rec = json.load(open(os.path.join(two_nodes, "vltrain_ckpt.json")))
    assert (rec["world_size"], rec["num_canonical_nodes"], rec["global_batch"]) == (4, 2, 16)
    before, after = load_dump(ckpts, "n4_save3"), load_dump(ckpts, "n4to2_built")
    assert (after["step"], after["world"], after["grad_accum"]) == (3, 2, 2)
    assert_same_state(before, after)
    # the same samples and masks in the same global batches: the losses of the 4-rank run
    u, r = losses(ckpts, "n4"), losses(ckpts, "n4to2")
    assert r["code"] == 0 and sorted(r["losses"]) == [4, 5, 6]
    for s in (4, 5, 6):
        assert abs(r["losses"][s] - u["losses"][s]) <= 1e-5 * abs(u["losses"][s]), (s, r["losses"], u["losses"])
    end = json.load(open(os.path.join(ckpts["runs"], "n4to2", "checkpoints", "step_00000006", "vltrain_ckpt.json")))
    assert (end["world_size"], end["grad_accum"], end["num_canonical_nodes"], end["step"]) == (2, 2, 2, 6)


def test_reshard_output_is_a_universal_checkpoint(ckpts, resharded, capsys):
    out = resharded["U2"]
    rec = json.load(open(os.path.join(out, "vltrain_ckpt.json")))
    assert rec["universal"] is True and rec["step"] == 3 and rec["world_size"] == 2 and rec["global_batch"] == 16
    assert rec["num_canonical_nodes"] == 1
    files = set(os.listdir(out))
    assert {"zero", "mp_rank_00_model_states.pt", "config.yaml", "vltrain_rank00000.pt", "vltrain_rank00001.pt"} <= files
    assert "latest_universal" not in files
    assert not [n for n in os.listdir(os.path.dirname(out)) if ".partial-" in n]
    code, out_text, _ = cli(capsys, "inspect", out, "--json")
    d = json.loads(out_text)
    assert code == 0 and d["universal"] is True and "micro batch 8: 1, 2" in d["resumes_on"]


# ------------------------------------------------------------------ consolidate

@pytest.mark.parametrize("name,tag,dump", [("z1", "step_00000002", "z1_save2"), ("z2", TAG3, "z2_save3"),
                                           ("z3b", "step_00000002", "z3b_save2"), ("z0", "step_00000002", "z0_save2"),
                                           ("z0bf", None, "z0bf_save2"), ("U3", None, "z3_save3")],
                         ids=["zero1", "zero2", "zero3_2ranks", "zero0", "zero0_bf16_masters", "universal_from_zero3"])
def test_consolidate_equals_live_engine_weights(ckpts, resharded, tmp_path, capsys, name, tag, dump):
    from safetensors import safe_open
    from safetensors.torch import load_file
    src = resharded[name] if name in resharded else ckpts[name]
    out = tmp_path / "w.safetensors"
    code, text, err = cli(capsys, "consolidate", src, out, *(["--tag", tag] if tag else []))
    assert code == 0, err
    assert "module state" not in text + err              # no precision note: fp32 weights (masters)
    got = load_file(str(out))
    # files name the blocks' pieces (layers.0.qkv.weight); the live engine holds flat parameters
    live = named_pieces(strip(load_dump(ckpts, dump)["fp32"]), debug_model_config())
    assert got.keys() == live.keys()
    for k in live:
        assert got[k].dtype == torch.float32 and torch.equal(got[k], live[k]), k
    if name == "z0bf":      # the fp32 masters, not the bf16 module weights cast up
        assert sum(not torch.equal(v, v.bfloat16().float()) for v in got.values()) > len(got) // 2
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["vltrain_model_config"])["hidden_size"] == 64
    assert (tmp_path / "config.json").is_file() and (tmp_path / "w.yaml").is_file()


def test_consolidated_file_round_trips_with_tied_decoder(ckpts, tmp_path, capsys):
    from safetensors.torch import load_file
    from vltrain.model import VLModel
    out = tmp_path / "model.safetensors"
    assert cli(capsys, "consolidate", ckpts["z2"], out)[0] == 0          # latest: step 6
    assert written_step(str(out)) == 6
    # a tag folder given with another --tag: that tag, beside it (the weights it says it holds)
    three = tmp_path / "three" / "model.safetensors"
    assert cli(capsys, "consolidate", os.path.join(ckpts["z2"], "step_00000006"), three,
               "--tag", "step_00000003")[0] == 0
    live3 = load_dump(ckpts, "z2_save3")["fp32"]
    got3 = load_file(str(three))
    assert written_step(str(three)) == 3
    assert torch.equal(got3["embeddings.word.weight"], live3["model.embeddings.word.weight"])
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o666 & ~umask               # for sharing: not mkstemp's 0600
    state = load_file(str(out))
    vocab_matrices = [k for k, v in state.items() if tuple(v.shape) == (30522, 64)]
    assert vocab_matrices == ["embeddings.word.weight"]                # the decoder is stored once
    model = VLModel.from_pretrained(str(tmp_path)).eval()
    own = named_pieces(model.state_dict(), model.config)
    assert own.keys() == state.keys() and all(torch.equal(own[k], state[k]) for k in state)
    # re-tied: the MLM decoder is the word-embedding matrix itself
    h = torch.randn(5, 64)
    with torch.no_grad():
        logits = model.mlm_head(h, model.embeddings.word)
        model.embeddings.word.weight[7].add_(1.0)
        moved = model.mlm_head(h, model.embeddings.word)
        expect = torch.nn.functional.linear(model.mlm_head.transform(h), model.embeddings.word.weight) + model.mlm_head.bias
    assert torch.allclose(moved, expect, atol=1e-5) and not torch.allclose(moved[:, 7], logits[:, 7])
    # a folder has one config.json: a second file of the same model shares it, another model's is refused
    assert cli(capsys, "consolidate", ckpts["z2"], tmp_path / "again.safetensors")[0] == 0
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "initializer_range": 0.07}))   # another model's
    code, _, err = cli(capsys, "consolidate", ckpts["z2"], tmp_path / "other.safetensors")
    assert code == 2 and "config.json describes another model" in err and "a folder of its own" in err, err
    assert not (tmp_path / "other.safetensors").exists() and not (tmp_path / "other.yaml").exists()


# ------------------------------------------------------------------ export-hf

def test_export_hf_loads_in_transformers_and_vltrain(ckpts, tmp_path, capsys):
    from safetensors.torch import load_file
    from transformers import BertForMaskedLM, BertModel
    from vltrain.config import load_config
    from vltrain.model import VLModel
    from vltrain.tokenization import Tokenizer
    out = tmp_path / "hf"
    code, _, err = cli(capsys, "export-hf", ckpts["z2"], out)
    assert code == 0, err
    umask = os.umask(0o022)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask               # for sharing: not mkdtemp's 0700
    assert {"config.json", "model.safetensors", "vocab.txt", "tokenizer_config.json", "README.md"} <= set(os.listdir(out))
    for name in os.listdir(out):      # safetensors writes its file 0600: readable by others too
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask, name
    cfg = load_config(os.path.join(ckpts["z2"], "step_00000006", "config.yaml"))
    assert (out / "vocab.txt").read_bytes() == open(Tokenizer(cfg.data.vocab).vocab_file, "rb").read()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bert" and config["vltrain"]["hidden_size"] == 64
    assert "bert.encoder.layer.0.attention.self.query.weight" in load_file(str(out / "model.safetensors"))

    ours = VLModel.from_pretrained(str(out)).eval()
    live = strip(load_dump(ckpts, "z2_save6")["fp32"])
    own = ours.state_dict()
    assert own.keys() == live.keys() and all(torch.equal(own[k], live[k]) for k in live)

    bert = BertModel.from_pretrained(str(out)).eval()
    assert bert_text_diff(ours, bert, seed=0, length=17) <= 1e-5
    from transformers import AutoTokenizer      # truncation stops at the model's 128 positions
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.model_max_length == 128 and len(tok("word " * 300, truncation=True)["input_ids"]) == 128
    assert config["vltrain_step"] == 6 and written_step(str(out)) == 6     # mode=eval names its results by it
    # with its MLM head: every weight found, text-only logits equal ours
    mlm, info = BertForMaskedLM.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(999, 30522, (2, 13), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 101
    with torch.no_grad():
        ref = mlm.eval()(input_ids=ids).logits
        h = ours(ids, torch.zeros_like(ids), torch.ones_like(ids), mode="bidirectional").text_hidden
        got = ours.mlm_head(h, ours.embeddings.word)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)
    # --overwrite replaces a folder that holds an export (one file of another kind left in it
    # goes with it), here by the step-3 tag given beside the folder of tags
    (out / "marker").write_text("x")
    code, _, err = cli(capsys, "export-hf", ckpts["z2"], out, "--tag", "step_00000003", "--overwrite")
    assert code == 0, err
    assert not (out / "marker").exists() and written_step(str(out)) == 3
    assert json.loads((out / "config.json").read_text())["vltrain_step"] == 3


@pytest.mark.parametrize("run, key, value", [("z0vl", "vlbert_visual_embedding", "linear"),
                                             ("z0vn", "vlbert_text_only_visual", "none")])
def test_old_vlbert_checkpoint_exports_as_what_its_weights_are(ckpts, tmp_path, capsys, run, key, value):
    """A VL-BERT checkpoint from before the visual LayerNorms (or before the aux term of
    text-only rows): its config.yaml lacks the key that says so (read as the default) and its
    weights lack those parameters. Both exports write the key's old value, with a note, and
    load as trained without overrides."""
    import yaml
    from vltrain.model import VLModel
    old = tmp_path / "old"
    shutil.copytree(ckpts[run], old)
    tag = old / "step_00000002"
    saved = yaml.safe_load((tag / "config.yaml").read_text())
    assert saved["model"].pop(key) == value
    (tag / "config.yaml").write_text(yaml.safe_dump(saved))
    for cmd, out, folder in (("export-hf", tmp_path / "hf", tmp_path / "hf"),
                             ("consolidate", tmp_path / "c" / "model.safetensors", tmp_path / "c")):
        code, _, err = cli(capsys, cmd, old, out)
        assert code == 0, err
        assert f"exported with model.{key}={value}" in err
        assert json.loads((folder / "config.json").read_text())["vltrain"][key] == value
        model = VLModel.from_pretrained(str(folder))
        assert getattr(model.config, key) == value and model.config.region_embedding == "vlbert"
    own, live = model.state_dict(), strip(load_dump(ckpts, f"{run}_save2")["fp32"])   # the trained weights
    assert own.keys() == live.keys() and all(torch.equal(own[k], live[k]) for k in live)


def test_init_from_accepts_export_consolidated_and_resharded(ckpts, resharded, tmp_path, capsys):
    from vltrain.config import debug_model_config
    from vltrain.engine.build import init_weights
    from vltrain.model import VLModel
    assert cli(capsys, "export-hf", ckpts["z2"], tmp_path / "hf", "--tag", TAG3)[0] == 0
    assert cli(capsys, "consolidate", ckpts["z2"], tmp_path / "c" / "w.safetensors", "--tag", TAG3)[0] == 0
    live = strip(load_dump(ckpts, "z2_save3")["fp32"])
    for src in (tmp_path / "hf", tmp_path / "c" / "w.safetensors", resharded["U2"]):
        torch.manual_seed(123)
        model = VLModel(debug_model_config())
        init_weights(model, str(src))
        own = model.state_dict()
        assert all(torch.equal(own[k], live[k]) for k in live), src


# ------------------------------------------------------------------ inspect

def test_inspect_reports_the_checkpoint(ckpts, capsys):
    code, out, _ = cli(capsys, "inspect", ckpts["z2"], "--tag", TAG3, "--json")
    assert code == 0
    d = json.loads(out)
    live = load_dump(ckpts, "z2_save3")["fp32"]
    assert (d["zero_stage"], d["world_size"], d["step"], d["global_batch"], d["universal"]) == (2, 2, 3, 16, False)
    assert d["parameters"] == sum(t.numel() for t in live.values()) and d["tensors"] == len(live)
    assert d["tags_in_folder"] == ["step_00000006", TAG3] and d["size_bytes"] > 0
    assert "fp32" in d["dtype"] and "hidden_size: 64" in d["config"] and d["problem"] is None
    assert "2 ranks only" in d["resumes_on"]
    code, out, _ = cli(capsys, "inspect", os.path.join(ckpts["runs"], "z3"))      # a run folder: latest tag
    assert code == 0 and "ZeRO stage      3" in out and "step            6" in out and "micro 8 x accum 2 x 1" in out
    # ZeRO-0: DeepSpeed records no parameter shapes; they come from the module state
    code, out, _ = cli(capsys, "inspect", ckpts["z0"], "--json")
    d = json.loads(out)
    live = load_dump(ckpts, "z0_save2")["fp32"]
    assert code == 0 and d["zero_stage"] == 0 and "any world size" in d["resumes_on"]
    assert d["parameters"] == sum(t.numel() for t in live.values()) and d["tensors"] == len(live)


def test_console_script_and_module_entry_point(ckpts, resharded):
    exe = shutil.which("vltrain-ckpt", path=os.path.dirname(sys.executable)) or shutil.which("vltrain-ckpt")
    assert exe, "vltrain-ckpt is not installed (pip install -e .)"
    p = subprocess.run([exe, "inspect", resharded["U3"]], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr
    assert "universal: resumes on any world size" in p.stdout
    # `vltrain-ckpt inspect ... | head`: a reader gone before the report is written is no error
    p = subprocess.Popen([exe, "inspect", resharded["U3"]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    p.stdout.close()                       # long before the tool has imported torch
    _, err = p.communicate(timeout=300)
    assert p.returncode == 0 and b"Traceback" not in err, err.decode()[-2000:]
    p = subprocess.run([sys.executable, "-m", "vltrain.ckpt", "reshard", ckpts["z2"], os.path.join(ckpts["root"], "x"),
                        "--tag", "nope"], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 2 and "no tag 'nope'" in p.stderr


# ------------------------------------------------------------------ bad input

def assert_nothing_written(*paths):
    for p in paths:
        assert not os.path.exists(p), p
        parent = os.path.dirname(os.fspath(p))
        if os.path.isdir(parent):
            assert not [n for n in os.listdir(parent) if ".partial-" in n], parent


def test_missing_optimizer_shard_is_named(ckpts, resharded, resumed, tmp_path, capsys):
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    damaged = resharded["damaged"]
    for argv, outs in ((["reshard", damaged, tmp_path / "u"], [tmp_path / "u"]),
                       (["consolidate", damaged, tmp_path / "w.safetensors"],
                        [tmp_path / "w.safetensors", tmp_path / "config.json", tmp_path / "w.yaml"]),
                       (["export-hf", damaged, tmp_path / "hf"], [tmp_path / "hf"])):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and name in err and "rank 1" in err, err
        assert_nothing_written(*outs)
    code, out, err = cli(capsys, "inspect", damaged)
    assert code == 2 and "INCOMPLETE" in out and name in err
    d = json.loads(cli(capsys, "inspect", damaged, "--json")[1])  # listed as what it now is, not as written
    assert d["tag"] in d["incomplete_tags"] and d["tag"] not in d["tags_in_folder"], d
    r = resumed["missing_file"]                                      # train.resume= through run.py
    assert r["code"] == 2 and name in r["errors"][0]


def test_wrong_tag_is_named_with_the_tags_that_exist(ckpts, tmp_path, capsys):
    for cmd, out in (("reshard", tmp_path / "u"), ("consolidate", tmp_path / "w.safetensors"),
                     ("export-hf", tmp_path / "hf")):
        code, _, err = cli(capsys, cmd, ckpts["z2"], out, "--tag", "step_00000099")
        assert code == 2 and "no tag 'step_00000099'" in err and TAG3 in err and "step_00000006" in err, err
        assert_nothing_written(out)
    code, _, err = cli(capsys, "inspect", tmp_path / "nowhere")
    assert code == 2 and "does not exist" in err


def test_world_size_that_cannot_keep_the_global_batch(ckpts, resumed, tmp_path, capsys):
    code, _, err = cli(capsys, "reshard", ckpts["z2"], tmp_path / "u", "--tag", TAG3, "--world-size", "3")
    assert code == 2 and "global batch of 16" in err and "World sizes that keep it with micro batch 8: 1, 2" in err
    assert "--world-size is a check only" in err and "drop it to write it anyway" in err
    assert_nothing_written(tmp_path / "u")
    r = resumed["batch"]                               # resume on 1 rank with micro batch 3
    assert r["code"] == 2 and "train.micro_batch_size in 1, 2, 4, 8, 16" in r["errors"][0]


def test_zero0_fp32_logs_the_gradient_norm_zero2_logs(ckpts):
    """DeepSpeed clips fp32 ZeRO-0 gradients but keeps no norm: train/grad_norm was missing
    there. Both runs' first step has the same gradients (same seed, data, ranks, batch)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    first = {}
    for name in ("z0", "z2"):
        acc = EventAccumulator(os.path.join(ckpts["runs"], name, "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        first[name] = [e.value for e in acc.Scalars("train/grad_norm") if e.step == 1]
    assert len(first["z0"]) == 1 and first["z0"][0] > 0, first
    assert first["z0"][0] == pytest.approx(first["z2"][0], rel=1e-4), first


def test_train_global_batch_fits_grad_accum_to_the_job(ckpts, resumed):
    """The same train.global_batch=16 at micro batch 8: accumulation 1 on 2 ranks, 2 on 1 rank,
    said in the log; refused where it cannot be kept or contradicts what was asked."""
    for name, world, accum in (("z2", 2, 1), ("z3", 1, 2)):
        with open(os.path.join(ckpts[name], "step_00000006", "vltrain_ckpt.json")) as f:
            rec = json.load(f)
        assert (rec["world_size"], rec["grad_accum"], rec["global_batch"]) == (world, accum, 16), rec
    log = open(os.path.join(ckpts["logs"], "B.rank0.log")).read()
    assert "global batch 16 samples per step = micro batch 8 x grad_accum 2 x 1 rank(s)" in log
    r = resumed["global_batch_unfit"]                  # a start: 12 on 1 rank of micro batch 8
    assert r["code"] == 2 and ("cannot keep train.global_batch of 12 samples per step on 1 rank(s)" in r["errors"][0]
                               and "use train.micro_batch_size in 1, 2, 3, 4, 6, 12" in r["errors"][0]), r
    r = resumed["global_batch_vs_accum"]
    assert r["code"] == 2 and "train.grad_accum=3 contradicts train.global_batch=16" in r["errors"][0], r
    r = resumed["other_global_batch"]                  # a resume keeps the checkpoint's
    assert r["code"] == 2 and ("train.global_batch=32, but checkpoint" in r["errors"][0]
                               and "trained with 16 samples per step" in r["errors"][0]), r
    for name in ("b9", "b10"):                         # refused before the run folder is made
        assert not os.path.exists(os.path.join(ckpts["runs"], name))


def test_different_model_shape_is_refused_naming_parameters(resumed):
    r = resumed["shape_resume"]
    assert r["code"] == 2 and "model.layers.0.qkv.weight: checkpoint (192, 64) vs model (96, 32)" in r["errors"][0]
    r = resumed["shape_init"]
    assert r["code"] == 2 and "layers.0.qkv.weight: checkpoint (192, 64) vs model (96, 32)" in r["errors"][0]
    r = resumed["shape_resume_zero0"]       # ZeRO-0 keeps no shape record: read from the module state
    assert r["code"] == 2 and "model.embeddings.word.weight: checkpoint (30522, 64) vs model (30522, 32)" in r["errors"][0]


def test_a_run_folder_that_is_a_checkpoint_is_refused(resumed):
    r = resumed["run_dir_is_a_checkpoint"]     # run_name = a tag folder: resume=auto would not see it
    assert r["code"] == 2 and "is a checkpoint itself, where run_name=step_00000003 keeps its folder" \
        in r["errors"][0], r


def test_resume_refusals_say_what_to_do(resumed):
    r = resumed["not_resharded"]           # a ZeRO-2 checkpoint of 2 ranks on 1 rank, not resharded
    assert r["code"] == 2 and "saved on 2 rank(s) with ZeRO-2" in r["errors"][0] and "vltrain-ckpt reshard" in r["errors"][0]
    r = resumed["stage"]                   # resharded from ZeRO-2, resumed under ZeRO-3
    assert r["code"] == 2 and "cannot load it under ZeRO-3" in r["errors"][0] and "zero2.json" in r["errors"][0]


def test_reshard_refusals(ckpts, resharded, tmp_path, capsys):
    code, _, err = cli(capsys, "reshard", ckpts["z0"], tmp_path / "u")
    assert code == 2 and "ZeRO stage 0" in err and "train.resume=" in err and "consolidate" in err
    code, _, err = cli(capsys, "reshard", resharded["U2"], tmp_path / "u")
    assert code == 2 and "already universal" in err
    assert_nothing_written(tmp_path / "u")
    os.makedirs(tmp_path / "taken")
    (tmp_path / "taken" / "keep.txt").write_text("x")
    code, _, err = cli(capsys, "reshard", ckpts["z2"], tmp_path / "taken", "--tag", TAG3)
    assert code == 2 and "already exists" in err and os.listdir(tmp_path / "taken") == ["keep.txt"]


def test_resume_keeps_global_batch_and_canonical_nodes(tmp_path):
    """The arithmetic behind `train.resume=` on another world size: the README's 64 -> 8 GPUs.
    (A folder laid out like a universal checkpoint of 64 ranks; only the record and the model
    states' parameter list are read.)"""
    from vltrain.config import load_config
    from vltrain.ckpt.layout import locate
    from vltrain.engine.resume import CheckpointError, batch_plan, canonical_nodes_ok, reconcile_resume
    assert batch_plan(4096, 8, 8) == 64 and batch_plan(4096, 8, 64) == 8
    with pytest.raises(CheckpointError, match=r"World sizes that keep it with micro batch 8: 1, 2\b"):
        batch_plan(16, 8, 3)
    assert canonical_nodes_ok(8, 1) and canonical_nodes_ok(8, 16) and not canonical_nodes_ok(8, 3)

    tag = tmp_path / "universal"
    os.makedirs(tag / "zero" / "model.w")
    torch.save({"param_shapes": [{"model.w": (2,)}]}, tag / "mp_rank_00_model_states.pt")   # its parameter list
    for name in (["config.yaml", "zero/optimizer_state.pt"]
                 + [f"zero/model.w/{k}.pt" for k in ("fp32", "exp_avg", "exp_avg_sq")]
                 + [f"vltrain_rank{r:05d}.pt" for r in range(64)]):
        (tag / name).write_bytes(b"")
    record = {"world_size": 64, "zero_stage": 3, "micro_batch_size": 8, "grad_accum": 8, "global_batch": 4096,
              "num_canonical_nodes": 8, "step": 1000, "universal": True}
    (tag / "vltrain_ckpt.json").write_text(json.dumps(record))
    found = locate(str(tag), check_files=False)
    cfg = load_config("configs/debug.yaml")                       # micro batch 8, grad_accum 1
    notes = reconcile_resume(cfg, found, world=8, nodes=1)
    assert cfg.train.grad_accum == 64 and cfg.data.num_canonical_nodes == 8
    assert notes[0] == ("the checkpoint's global batch of 4096 is kept as 8 x 64 x 8 ranks (micro batch x "
                        "train.grad_accum x ranks; saved as 8 x 8 x 64)")
    # a requeue on the job size it was saved on, the recipe's train.global_batch filling grad_accum:
    # nothing changed, nothing said (every Slurm requeue said "train.grad_accum 1 -> 8")
    same = load_config("configs/debug.yaml", ["train.global_batch=4096"])
    assert reconcile_resume(same, found, world=64, nodes=8) == [] and same.train.grad_accum == 8
    # the first run's train.grad_accum=8 left out of the resume's command: put back, and said
    assert reconcile_resume(load_config("configs/debug.yaml"), found, world=64, nodes=8) == [
        "train.grad_accum 1 -> 8: keeps the checkpoint's global batch of 4096"]
    # one given beside train.global_batch that the checkpoint overrides: said too
    assert reconcile_resume(load_config("configs/debug.yaml", ["train.global_batch=4096", "train.grad_accum=4"]),
                            found, world=64, nodes=8) == [
        "train.grad_accum 4 -> 8: keeps the checkpoint's global batch of 4096"]
    with pytest.raises(CheckpointError, match="Node counts that work: 1, 2, 4, 8, 16"):
        reconcile_resume(load_config("configs/debug.yaml"), found, world=16, nodes=6)
    with pytest.raises(CheckpointError, match="vltrain_rank00063.pt is missing"):
        os.remove(tag / "vltrain_rank00063.pt")
        reconcile_resume(load_config("configs/debug.yaml"), found, world=8, nodes=1)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_zero_checkpoint_on_another_world_size_must_be_resharded(tmp_path, stage):
    """ZeRO-1 partitions Adam's state by rank as ZeRO-2/3 do: a ZeRO-1 checkpoint of 2 ranks
    resumed on 1 rank, not resharded, must be refused like a ZeRO-2 one (only ZeRO-2 ran end to
    end), where DeepSpeed would otherwise fail on, or mis-load, shards laid out for 2 ranks.
    ZeRO-0 keeps whole optimizer states: it resumes on any world size. (A folder laid out like
    the checkpoint; only file names and the record are read.)"""
    from vltrain.config import load_config
    from vltrain.ckpt.layout import locate
    from vltrain.engine.resume import CheckpointError, model_states_files, reconcile_resume
    tag = tmp_path / f"z{stage}"
    os.makedirs(tag)
    shards = [f"bf16_zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)] if stage else []
    for name in ["config.yaml", "vltrain_rank00000.pt", "vltrain_rank00001.pt", *model_states_files(str(tag), stage, 2),
                 *shards]:
        (tag / name).write_bytes(b"")
    record = {"world_size": 2, "zero_stage": stage, "micro_batch_size": 8, "grad_accum": 1, "global_batch": 16,
              "num_canonical_nodes": 1, "step": 3, "universal": False}
    (tag / "vltrain_ckpt.json").write_text(json.dumps(record))
    found = locate(str(tag), check_files=False)
    cfg = load_config("configs/debug.yaml")                       # micro batch 8
    assert reconcile_resume(load_config("configs/debug.yaml"), found, world=2) == []   # same world: any stage
    if stage == 0:
        reconcile_resume(cfg, found, world=1)
        assert cfg.train.grad_accum == 2                           # the global batch of 16 kept on 1 rank
        return
    with pytest.raises(CheckpointError, match=rf"(?s)saved on 2 rank\(s\) with ZeRO-{stage}: .*vltrain-ckpt reshard"):
        reconcile_resume(cfg, found, world=1)
    os.remove(tag / shards[1])                                     # a shard lost in a copy: named
    with pytest.raises(CheckpointError, match=r"is incomplete: zero_pp_rank_1_mp_rank_00_optim_states.pt is missing"):
        reconcile_resume(load_config("configs/debug.yaml"), found, world=2)


def linked_copy(src, dest):
    """A copy of a tag folder made of hard links (cheap); change its files with `rewrite` only."""
    shutil.copytree(src, dest, copy_function=os.link)
    return dest


def rewrite(path, data: bytes):
    """Give ``path`` new contents as a new file: never edit a hard-linked source."""
    with open(f"{path}.tmp", "wb") as f:
        f.write(data)
    os.replace(f"{path}.tmp", path)


def test_cut_short_file_is_named(ckpts, resharded, tmp_path, capsys):
    """A shard cut short (a copy or save that stopped): inspect reports the checkpoint as damaged,
    the other tools refuse it with exit 2; each names the file."""
    cut = linked_copy(os.path.join(ckpts["z2"], TAG3), tmp_path / "z2" / TAG3)
    name = "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    rewrite(cut / name, (cut / name).read_bytes()[:4096])
    code, out, err = cli(capsys, "inspect", cut)
    assert code == 2 and "status          DAMAGED" in out and name in err and "PytorchStreamReader" in err, out + err
    assert json.loads(cli(capsys, "inspect", cut, "--json")[1])["status"] == "damaged"
    for argv, outs in ((["reshard", cut, tmp_path / "u"], [tmp_path / "u"]),
                       (["consolidate", cut, tmp_path / "w.safetensors"],
                        [tmp_path / "w.safetensors", tmp_path / "config.json", tmp_path / "w.yaml"]),
                       (["export-hf", cut, tmp_path / "hf"], [tmp_path / "hf"])):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and f"is damaged: 1 file(s) cannot be read: {name}" in err, err
        assert_nothing_written(*outs)
    # a universal checkpoint's per-parameter file
    cut = linked_copy(resharded["U2"], tmp_path / "U2")
    param = cut / "zero" / "model.mlm_head.bias" / "fp32.pt"
    rewrite(param, param.read_bytes()[:-100])
    code, _, err = cli(capsys, "consolidate", cut, tmp_path / "w.safetensors")
    assert code == 2 and "zero/model.mlm_head.bias/fp32.pt (" in err, err
    # whole: inspect says so
    code, out, _ = cli(capsys, "inspect", resharded["U2"])
    assert code == 0 and "complete (every file present and opens)" in out


def test_a_cut_short_file_of_one_rank_stops_every_rank_on_resume(ckpts, tmp_path):
    """Rank 1's optimizer shard cut short: DeepSpeed's load fails on rank 1 only, and rank 0
    used to load its own and die in the next collective with gloo's "Connection closed by
    peer". Both ranks now stop before the load with the same message naming the file."""
    cut = linked_copy(os.path.join(ckpts["z2"], TAG3), tmp_path / "z2" / TAG3)
    name = "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    rewrite(cut / name, (cut / name).read_bytes()[:4096])
    overrides = ckpts["run"]("cut", "zero2", "train.max_steps=6", f"train.resume={cut}")["overrides"]
    overrides = [o.replace(ckpts["runs"], str(tmp_path / "runs")) for o in overrides]
    ranks = Ranks(["--config", "configs/debug.yaml", "--deepspeed_config", "ds_configs/zero2.json", *overrides],
                  2, str(tmp_path / "logs"), free_port())
    assert ranks.wait(300) == [2, 2], ranks.log(0)[-3000:] + ranks.log(1)[-3000:]
    for r in range(2):
        log = ranks.log(r)
        assert f"CheckpointError: cannot load checkpoint {cut}: 1 file(s) cannot be read: {name}" in log, log[-3000:]
        assert "Connection closed by peer" not in log and "Traceback" not in log, log[-3000:]


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_reshard_world_size_must_be_a_positive_count(ckpts, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as exit_:
        ckpt_main(["reshard", ckpts["z2"], str(tmp_path / "u"), "--world-size", value])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "--world-size" in err, err
    assert ("whole number of ranks" if value == "two" else f"at least 1 rank, got {value}") in err
    assert_nothing_written(tmp_path / "u")


def test_universal_checkpoint_missing_per_parameter_files(ckpts, resharded, tmp_path, capsys):
    """DeepSpeed's universal loaders read fp32.pt, exp_avg.pt, exp_avg_sq.pt (and from a ZeRO-1/2
    source step.pt) of every parameter: one missing makes the checkpoint incomplete."""
    u2 = linked_copy(resharded["U2"], tmp_path / "U2")
    params = sorted(n for n in os.listdir(u2 / "zero") if (u2 / "zero" / n).is_dir())
    assert "model.mlm_head.bias" in params
    assert {"fp32.pt", "exp_avg.pt", "exp_avg_sq.pt", "step.pt"} <= set(os.listdir(u2 / "zero" / params[0]))
    os.remove(u2 / "zero" / "model.mlm_head.bias" / "exp_avg.pt")
    code, out, err = cli(capsys, "inspect", u2)
    assert code == 2 and "status          INCOMPLETE" in out and "zero/model.mlm_head.bias/exp_avg.pt" in err, err
    for p in params[:5]:
        os.remove(u2 / "zero" / p / "step.pt")
    code, _, err = cli(capsys, "consolidate", u2, tmp_path / "w.safetensors")
    assert code == 2 and "6 per-parameter file(s) of DeepSpeed's universal format are missing" in err, err
    assert "(+2 more)" in err and "/step.pt" in err
    # a ZeRO-3 source has no step.pt (its loader takes the step from optimizer_state.pt): complete
    assert "step.pt" not in os.listdir(os.path.join(resharded["U3"], "zero", params[0]))
    assert cli(capsys, "inspect", resharded["U3"])[0] == 0
    u3 = linked_copy(resharded["U3"], tmp_path / "U3")
    os.remove(u3 / "zero" / "optimizer_state.pt")
    code, _, err = cli(capsys, "inspect", u3)
    assert code == 2 and "zero/optimizer_state.pt is missing" in err, err


def test_corrupt_completion_record_is_named(ckpts, tmp_path, capsys):
    tag = linked_copy(os.path.join(ckpts["z2"], TAG3), tmp_path / "checkpoints" / TAG3)
    rewrite(tag / "vltrain_ckpt.json", b'{"world_size": 2, "zero')
    for argv in (["inspect", tag], ["inspect", tmp_path / "checkpoints", "--tag", TAG3],
                 ["inspect", tmp_path / "checkpoints"], ["consolidate", tag, tmp_path / "w.safetensors"]):
        code, _, err = cli(capsys, *argv)
        assert code == 2 and f"has a corrupt completion record {tag}/vltrain_ckpt.json (JSONDecodeError: " in err, err
        assert "did not finish" not in err
    assert_nothing_written(tmp_path / "w.safetensors")


def test_reshard_into_a_folder_of_tags_or_a_run_folder_is_refused(ckpts, tmp_path, capsys):
    """Written as <run>/checkpoints itself (or as a run folder), a universal checkpoint was
    missed by the run's resume=auto, which started over on top of it; a run whose folder (or
    folder of tags) is a checkpoint is refused too."""
    run = tmp_path / "new"
    code, _, err = cli(capsys, "reshard", ckpts["z2"], run / "checkpoints", "--tag", TAG3)
    assert code == 2 and f"write the checkpoint as a tag inside the checkpoints/ folder, {run}/checkpoints/{TAG3}" \
        in err, err
    assert_nothing_written(run / "checkpoints")
    os.makedirs(tmp_path / "oldrun")
    (tmp_path / "oldrun" / "config.yaml").write_text("run_name: oldrun\n")
    code, _, err = cli(capsys, "reshard", ckpts["z2"], tmp_path / "oldrun", "--tag", TAG3, "--overwrite")
    assert code == 2 and "a run folder" in err and os.listdir(tmp_path / "oldrun") == ["config.yaml"], err


def test_paths_deepspeed_would_glob_are_refused(ckpts, tmp_path, capsys):
    """DeepSpeed globs the checkpoint's path: from a folder named with [ the conversions blamed
    files that were there; to one, a checkpoint no run could resume was written."""
    odd = tmp_path / "br[1]"
    shutil.copytree(ckpts["z2"], odd, copy_function=os.link)
    code, _, err = cli(capsys, "consolidate", odd, tmp_path / "w.safetensors")
    assert code == 2 and f"CKPT: '{odd}' holds [" in err and "file pattern" in err, err
    code, _, err = cli(capsys, "reshard", ckpts["z2"], tmp_path / "out?" / "u", "--tag", TAG3)
    assert code == 2 and "OUT: " in err and "holds ?" in err, err
    assert_nothing_written(tmp_path / "w.safetensors", tmp_path / "out?" / "u")
    code, _, err = cli(capsys, "consolidate", ckpts["z2"], tmp_path / "c" / "")      # a folder, not a file
    assert code == 2 and "is not a .safetensors file name" in err and not (tmp_path / "c").exists(), err


def test_a_tag_removed_while_converting_is_named_as_such(ckpts, tmp_path, capsys, monkeypatch):
    """A running job's keep_last rotation deletes the tag a conversion reads: the errors that
    followed (no config.yaml, "copy the files again", DeepSpeed's can't find) sent users astray.
    (The deletion is injected between locating the tag and reading it.)"""
    from vltrain.ckpt import layout
    tag = tmp_path / "run" / "checkpoints" / TAG3
    shutil.copytree(os.path.join(ckpts["z2"], TAG3), tag, copy_function=os.link)
    real = layout.check_readable

    def rotated_away(found):
        shutil.rmtree(found.path)
        return real(found)
    monkeypatch.setattr(layout, "check_readable", rotated_away)
    code, _, err = cli(capsys, "export-hf", tag, tmp_path / "hf")
    assert code == 2 and f"{tag} was deleted while this command read it" in err and "keep_last" in err, err
    assert_nothing_written(tmp_path / "hf")


def test_sigterm_leaves_no_partial_output(ckpts, tmp_path):
    """Slurm's time limit and scancel send SIGTERM: reshard's staged folder beside the
    destination stayed (checkpoint-sized, never cleaned); it goes as on an error now."""
    out = tmp_path / "u"
    p = subprocess.Popen([sys.executable, "-m", "vltrain.ckpt", "reshard", ckpts["z2"], str(out), "--tag", TAG3],
                         cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not [n for n in os.listdir(tmp_path) if ".partial-" in n] and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, ("finished before a signal could be sent", p.communicate())
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 143, err[-2000:]
    assert_nothing_written(out)


def test_reshard_into_a_run_folder_only_as_a_tag_resume_auto_finds(ckpts, tmp_path, capsys):
    """train.resume=auto takes a run's checkpoints/latest, else its newest step_<8 digits> tag: a
    universal checkpoint written there under another name would be passed over (a fresh start)."""
    for name in ("universal", "step_00000006", "step_3"):
        out = tmp_path / "new" / "checkpoints" / name
        code, _, err = cli(capsys, "reshard", ckpts["z2"], out, "--tag", TAG3)
        assert code == 2 and f"name it {tmp_path}/new/checkpoints/{TAG3}" in err and "outside checkpoints/" in err, err
        assert_nothing_written(out)
    old = tmp_path / "old" / "checkpoints"
    os.makedirs(old)
    (old / "latest").write_text("step_00000040")
    code, _, err = cli(capsys, "reshard", ckpts["z2"], old / TAG3, "--tag", TAG3)
    assert code == 2 and "resumes step_00000040, not step_00000003" in err, err
    assert_nothing_written(old / TAG3)
    # no `latest`: resume=auto takes the complete tag of the highest step (an incomplete one is skipped)
    later = tmp_path / "later" / "checkpoints"
    os.makedirs(later / "step_00000009")
    os.makedirs(later / "step_00000012")                          # no completion record
    (later / "step_00000009" / "vltrain_ckpt.json").write_text("{}")
    code, _, err = cli(capsys, "reshard", ckpts["z2"], later / TAG3, "--tag", TAG3)
    assert code == 2 and "resumes step_00000009, not step_00000003" in err, err
    assert_nothing_written(later / TAG3)
