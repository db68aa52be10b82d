"""A checkpoint is synced to the disk before it is marked complete.

The kernel keeps written files in its page cache; a node's power loss or kernel crash
right after a save could keep a completion record (small, journaled) whose shard data was
never written. No test here can cut the power, so these record the order of the syscalls
that make a save durable (the real ``os.fsync``/``os.replace``/``os.rename``, wrapped to
log each call's path) and check it: every file and folder of the tag is fsynced before the
record takes its name, the record and ``latest`` are each fsynced before their rename and
their folder after it, and the tag folder takes its name only after its record. Same for
the offline tools' outputs (reshard, export).
"""
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.fixtures.corpus import REPO, rank_env, run_one_rank
from vltrain.engine.distributed import free_port

RECORDER = textwrap.dedent(r"""
    import os
    EVENTS = []
    def _path(fd):
        return os.readlink(f"/proc/self/fd/{fd}")
    def _wrap(name, real, path_of):
        def call(*a, **k):
            out = real(*a, **k)
            EVENTS.append((name, *path_of(*a)))
            return out
        setattr(os, name, call)
    _wrap("fsync", os.fsync, lambda fd: (_path(fd),))
    _wrap("replace", os.replace, lambda src, dst: (os.path.abspath(src), os.path.abspath(dst)))
    _wrap("rename", os.rename, lambda src, dst: (os.path.abspath(src), os.path.abspath(dst)))
""")

TRAIN = RECORDER + textwrap.dedent(r"""
    import json, sys
    import torch
    torch.set_num_threads(1)
    from vltrain.config import load_config
    from vltrain.engine.build import build_training
    corpus, out = sys.argv[1], sys.argv[2]
    cfg = load_config("configs/debug.yaml", [f"data.train={corpus}/captions/pretrain", "data.val=",
                                             "train.max_steps=2", "train.warmup_steps=1", "train.save_every_steps=1",
                                             "train.keep_last=1", f"output_root={out}", "run_name=durable",
                                             f"data.cache_dir={out}/cache"])
    trainer = build_training(cfg)
    del EVENTS[:]
    code = trainer.train()
    print("RESULTS " + json.dumps({"code": code, "events": EVENTS, "save_dir": trainer.save_dir}), flush=True)
""")


def synced_before(events, paths, moment):
    """The paths not fsynced before ``events[moment]``."""
    synced = {e[1] for e in events[:moment] if e[0] == "fsync"}
    return sorted(set(paths) - synced)


def index_of(events, event):
    """Where ``event`` last happened."""
    return max(i for i, e in enumerate(events) if tuple(e) == event)


def check_record_commit(events, record_tmp, record):
    """``record_tmp`` fsynced, renamed to ``record``, then its folder fsynced. Returns the rename."""
    i = index_of(events, ("replace", record_tmp, record))
    assert not synced_before(events, [record_tmp], i), events
    assert ("fsync", os.path.dirname(record)) in [tuple(e) for e in events[i + 1:]], events
    return i


def test_a_training_checkpoint_is_synced_before_it_is_marked_complete(synthetic_corpus, tmp_path):
    """Written as <tag>.partial: every file and folder fsynced, then the record (fsynced, renamed,
    folder fsynced), then the rename to <tag> and an fsync of the folder holding it, then latest."""
    res = run_one_rank(TRAIN, synthetic_corpus, str(tmp_path))
    assert res["code"] == 0
    events, save_dir = [tuple(e) for e in res["events"]], res["save_dir"]
    tag_dir = os.path.join(save_dir, "step_00000002")
    staging = tag_dir + ".partial"
    assert [n for n in os.listdir(save_dir) if n.startswith("step_")] == ["step_00000002"]   # step 1 rotated
    record = os.path.join(staging, "vltrain_ckpt.json")
    commit = check_record_commit(events, record + ".tmp", record)
    tree = [os.path.join(root, n).replace(tag_dir, staging, 1)
            for root, dirs, files in os.walk(tag_dir) for n in files + dirs] + [staging, save_dir]
    data = [p for p in tree if p != record]
    assert len(data) >= 5, data            # DeepSpeed's model + optimizer files, our rank state, config
    assert not synced_before(events, data, commit), events
    named = index_of(events, ("rename", staging, tag_dir))
    assert named > commit and ("fsync", save_dir) in events[named + 1:], events
    latest = os.path.join(save_dir, "latest")     # the last move of latest: to step 2, after its rename
    assert check_record_commit(events, latest + ".tmp", latest) > named
    # The first save (step 1) went the same way before its record.
    first = os.path.join(save_dir, "step_00000001.partial", "vltrain_ckpt.json")
    assert check_record_commit(events, first + ".tmp", first) < commit


TOOLS = RECORDER + textwrap.dedent(r"""
    import json, sys
    from vltrain.ckpt.layout import staged_dir, staged_files
    out = sys.argv[1]
    with staged_dir(os.path.join(out, "universal")) as tmp:
        os.makedirs(os.path.join(tmp, "zero", "layer"))
        for name in ("a.pt", "zero/layer/fp32.pt"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write("x" * 100)
        staged = tmp
    with staged_files([os.path.join(out, "w", "model.safetensors"), os.path.join(out, "w", "config.json")]) as tmps:
        for t in tmps:
            with open(t, "w") as f:
                f.write("{}")
        files = tmps
    print("RESULTS " + json.dumps({"events": EVENTS, "staged": staged, "files": files}), flush=True)
""")


def test_the_offline_tools_outputs_are_synced_before_they_take_their_names(tmp_path):
    """reshard/export write into a temporary name renamed into place at the end: the data is
    fsynced before that rename, the parent folder after it."""
    res = run_one_rank(TOOLS, str(tmp_path))
    events = [tuple(e) for e in res["events"]]
    staged, final = res["staged"], str(tmp_path / "universal")
    i = index_of(events, ("rename", staged, final))
    inside = [os.path.join(staged, p) for p in ("a.pt", "zero", "zero/layer", "zero/layer/fp32.pt")]
    assert not synced_before(events, inside + [staged], i), events
    assert ("fsync", str(tmp_path)) in events[i + 1:], events
    assert sorted(os.listdir(final)) == ["a.pt", "zero"]

    finals = [str(tmp_path / "w" / n) for n in ("model.safetensors", "config.json")]
    renames = [index_of(events, ("replace", t, f)) for t, f in zip(res["files"], finals)]
    for t, i in zip(res["files"], renames):
        assert not synced_before(events, [t], i), events
    assert ("fsync", str(tmp_path / "w")) in events[max(renames) + 1:], events


TRAIN_2 = (TRAIN.replace('"train.max_steps=2"', '"train.max_steps=1"')
           .replace('"run_name=durable"', '"run_name=durable2"'))


def run_two_ranks(script: str, *args: str) -> list[dict]:
    """``python -c script args`` as 2 ranks (CPU DeepSpeed, gloo); each rank's ``RESULTS`` line."""
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO,
                              env=rank_env(r, 2, port, OMP_NUM_THREADS=1), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    res = []
    for p, out in zip(procs, outs):
        lines = [ln for ln in out.splitlines() if ln.startswith("RESULTS ")]
        assert p.returncode == 0 and lines, out[-5000:]
        res.append(json.loads(lines[-1][len("RESULTS "):]))
    return res


@pytest.fixture(scope="module")
def two_rank_save(synthetic_corpus, tmp_path_factory):
    """One step of ZeRO-2 on two ranks, saved, each rank's fsyncs recorded."""
    return run_two_ranks(TRAIN_2, synthetic_corpus, str(tmp_path_factory.mktemp("durable2")))


def test_two_ranks_each_sync_the_files_they_wrote_and_together_all(two_rank_save):
    """ZeRO-2 on two ranks: each rank fsyncs its own optimizer shard and rank state (only the
    writer's page cache holds their unwritten data) and not the other's; rank 0 the model
    states, the config, the files no rank names and every folder; all before the record."""
    res = two_rank_save
    tag_dir = os.path.join(res[0]["save_dir"], "step_00000001")
    staging = tag_dir + ".partial"
    record = os.path.join(staging, "vltrain_ckpt.json")
    events = [[tuple(e) for e in r["events"]] for r in res]
    commit = check_record_commit(events[0], record + ".tmp", record)
    synced = [{e[1] for e in ev if e[0] == "fsync"} for ev in (events[0][:commit], events[1])]
    files = sorted(os.path.join(root, n).replace(tag_dir, staging, 1)
                   for root, _, names in os.walk(tag_dir) for n in names)
    own = [{f for f in files if re.search(rf"(zero_pp_rank_{r}_.*optim_states|vltrain_rank0000{r})\.pt$", f)}
           for r in range(2)]
    assert all(len(o) == 2 for o in own), files
    assert own[1] <= synced[1] and not own[0] & synced[1], (own, synced[1])
    assert own[0] <= synced[0] and not own[1] & synced[0], (own, synced[0])
    folders = {os.path.join(root, d).replace(tag_dir, staging, 1) for root, dirs, _ in os.walk(tag_dir) for d in dirs}
    assert not (set(files) - {record}) - synced[0] - synced[1], files           # every file by someone
    assert folders | {staging} <= synced[0], folders                           # rank 0: the folders


INIT_FROM = textwrap.dedent(r"""
    import hashlib, json, os, shutil, sys
    import torch
    torch.set_num_threads(1)
    LOADS = []
    real_load = torch.load
    def spy_load(f, *a, **k):
        LOADS.append(os.path.basename(str(f)))
        return real_load(f, *a, **k)
    torch.load = spy_load
    from vltrain.config import load_config
    from vltrain.engine.build import init_weights
    from vltrain.engine.distributed import init_distributed
    from vltrain.model import VLModel
    tag, bad = sys.argv[1], sys.argv[2]
    info = init_distributed(120)
    model = VLModel(load_config("configs/debug.yaml").model)
    try:
        init_weights(model, bad, info.is_main)
        error = None
    except Exception as e:
        error = f"{type(e).__name__}: {e}"
    del LOADS[:]
    init_weights(model, tag, info.is_main)
    digest = {k: hashlib.sha256(v.detach().double().numpy().tobytes()).hexdigest()
              for k, v in model.state_dict().items()}
    print("RESULTS " + json.dumps({"loads": LOADS, "digest": digest, "error": error}), flush=True)
""")


def test_init_from_a_zero_checkpoint_is_read_by_the_main_rank_alone(two_rank_save, tmp_path):
    """train.init_from a ZeRO-2 checkpoint on two ranks: rank 0 reads the shards and broadcasts
    the weights (rank 1 reads no shard and ends with the same tensors); a shard rank 0 cannot
    read fails every rank with its error, not rank 0 alone while rank 1 waits."""
    tag = os.path.join(two_rank_save[0]["save_dir"], "step_00000001")
    bad = str(tmp_path / "step_00000001")
    shutil.copytree(tag, bad, copy_function=os.link)
    shard = os.path.join(bad, "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt")
    if not os.path.exists(shard):
        shard = os.path.join(bad, "zero_pp_rank_1_mp_rank_00_optim_states.pt")
    os.remove(shard)
    with open(shard, "wb") as f:
        f.write(b"not a torch file")
    res = run_two_ranks(INIT_FROM, tag, bad)
    assert any("optim_states" in n for n in res[0]["loads"]), res[0]["loads"]
    assert res[1]["loads"] == [], res[1]["loads"]
    assert res[0]["digest"] == res[1]["digest"]
    assert res[0]["error"] and res[1]["error"] == res[0]["error"], (res[0]["error"], res[1]["error"])


SYNC_RELATIVE = RECORDER + textwrap.dedent(r"""
    import json, sys
    from vltrain.engine.checkpoint import sync_written
    os.chdir(sys.argv[1])
    os.makedirs("runs/ck/step_1.partial/sub")
    for name in ("mine.pt", "sub/unnamed.py"):
        with open(os.path.join("runs/ck/step_1.partial", name), "w") as f:
            f.write("x")
    sync_written("runs/ck/step_1.partial", [os.path.abspath("runs/ck/step_1.partial/mine.pt")], rank=0)
    print("RESULTS " + json.dumps({"events": EVENTS}), flush=True)
""")


def test_a_relative_output_root_syncs_each_file_once(tmp_path):
    """output_root is relative by default ("runs"): the files a rank names are absolute, and
    rank 0's walk of the tag compared relative paths with them, syncing every rank's files again."""
    res = run_one_rank(SYNC_RELATIVE, str(tmp_path))
    synced = [e[1] for e in res["events"] if e[0] == "fsync"]
    tag = str(tmp_path / "runs" / "ck" / "step_1.partial")
    assert synced.count(os.path.join(tag, "mine.pt")) == 1, synced
    assert synced.count(os.path.join(tag, "sub", "unnamed.py")) == 1, synced
    assert {tag, os.path.join(tag, "sub"), os.path.dirname(tag)} <= set(synced), synced
