"""Reading MDS shards through StreamingDataset: 2 ranks from S3 (moto), resume, mixing, corruption.

Ranks are real processes (forked from pytest, so they skip the ~10 s streaming/transformers
import), each with its own RANK/WORLD_SIZE/LOCAL_RANK/LOCAL_WORLD_SIZE, a gloo process group,
streaming's shared-memory coordination and the real loader + collator with a DataLoader worker.
"""
from __future__ import annotations

import atexit
import collections
import json
import multiprocessing as mp
import os
import re
import time

import numpy as np
import pytest

from tests.fixtures.corpus import REPO
from tests.fixtures.mds import make_caption_samples, write_captions, write_mds, write_text
from vltrain.engine.distributed import free_port

N_CAPS = 48          # divisible by world (2) x batch (4) x workers
BATCH = 4


def _cfg(spec):
    from vltrain.config import Config
    cfg = Config()
    d = cfg.data
    d.train, d.cache_dir, d.num_workers = spec["train"], spec["cache"], spec.get("workers", 1)
    d.text_train, d.text_proportion = spec.get("text", ""), spec.get("text_proportion", 0.0)
    d.validate_hash = spec.get("validate_hash", "")
    cfg.model.region_feat_dim, cfg.model.num_region_classes = 8, 5
    cfg.objectives.mrc = True
    cfg.train.seed = 7
    cfg.train.micro_batch_size = BATCH
    cfg.train.grad_accum = spec.get("grad_accum", 1)
    cfg.train.dist_timeout_s = spec.get("dist_timeout_s", 600.0)
    return cfg


def _signature(batch, row):
    """Everything random about one row: mode, corrupted ids, types, mlm and mrc positions."""
    T = batch.input_ids.shape[1]
    L = int(batch.attention_mask[row].sum())
    mlm = [int(p) - row * T for p in batch.mlm_positions if row * T <= p < (row + 1) * T]
    sig = [int(batch.mode[row]), batch.input_ids[row, :L].tolist(),
           batch.token_type_ids[row, :L].tolist(), mlm]
    if batch.region_mask is not None:
        N = batch.region_mask.shape[1]
        sig.append([int(p) - row * N for p in batch.mrc_positions if row * N <= p < (row + 1) * N])
    return sig


def _rank_main(rank, world, local_world, spec, out):
    """One training rank: read `spec["epochs"]` epochs (or stop after `stop_after` batches)."""
    atexit._clear()   # forked: never run pytest's exit handlers; run only ours at the end
    env = {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": rank % local_world,
           "LOCAL_WORLD_SIZE": local_world, "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": spec["port"], "OMP_NUM_THREADS": 1}
    os.environ.update({k: str(v) for k, v in env.items()})
    os.environ.pop("NODE_RANK", None)
    import torch
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        import vltrain.data.datasets as vds
        from vltrain.data.loader import build_train_loader
        from vltrain.tokenization import Tokenizer
        reads, read_text = [], vds._read_text

        def recorded_read(remote, name, timeout):       # what this rank downloads or opens itself
            reads.append(f"{remote.rstrip('/').rsplit('/', 1)[-1]}/{name}")
            return read_text(remote, name, timeout)
        vds._read_text = recorded_read
        try:
            loader, _ = build_train_loader(_cfg(spec), Tokenizer(spec["vocab"]))
        except Exception as e:
            if not spec.get("expect_error"):
                raise
            with open(out, "w") as f:
                json.dump({"error": f"{type(e).__name__}: {e}", "reads": reads}, f)
            return
        if spec.get("log"):
            import logging
            logging.getLogger().addHandler(logging.FileHandler(f"{spec['log']}.rank{rank}"))
        if spec.get("gone_before_epoch") == rank:
            # a rank that never starts the epoch. It leaves (freeing its shared memory) once
            # rank 0's watchdog has given up on it: freed at once, the barrier segment could be
            # gone before rank 0's worker attached to it (seen once in CI, under load)
            deadline = time.time() + 60
            while time.time() < deadline and not (os.path.exists(f"{spec['log']}.rank0") and "no batch from"
                                                  in open(f"{spec['log']}.rank0").read()):
                time.sleep(0.2)
            return
        if spec.get("state"):
            loader.load_state_dict(spec["state"])
        res = {"epochs": [], "sigs": {}, "kinds": {}, "reads": reads}
        n = 0
        for _ in range(spec.get("epochs", 1)):
            ids = []
            for batch in loader:
                for r, sid in enumerate(batch.sample_id.tolist()):
                    text = batch.region_mask is None or not bool(batch.region_mask[r].any())
                    key = f"{'t' if text else 'c'}{sid}@{loader.epoch}"
                    ids.append(key)
                    res["sigs"][key] = _signature(batch, r)
                n += 1
                if n == spec.get("stop_after"):
                    break
            res["epochs"].append({"epoch": loader.epoch, "ids": ids})
            if n == spec.get("stop_after"):
                break
        res["state"] = loader.state_dict()
        res["cache_dirs"] = sorted(os.listdir(spec["cache"]))
        with open(out, "w") as f:
            json.dump(res, f)
        del loader
    finally:
        dist.destroy_process_group()
        atexit._run_exitfuncs()   # streaming's shared-memory cleanup


def run_ranks(tmp_path, spec, world=2, local_world=2, timeout=90):
    ctx = mp.get_context("fork")
    spec = dict(spec, port=free_port())
    outs = [str(tmp_path / f"rank{r}-{spec['port']}.json") for r in range(world)]
    procs = [ctx.Process(target=_rank_main, args=(r, world, local_world, spec, outs[r])) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
            pytest.fail(f"rank process hung: {spec}")
    assert [p.exitcode for p in procs] == [0] * world, "a rank failed (see captured stderr)"
    return [json.load(open(o)) for o in outs]


@pytest.fixture
def s3_caps(s3_bucket):
    """48 captions samples on moto S3 in several hashed shards."""
    return write_captions(f"s3://{s3_bucket}/caps", N_CAPS, hashes=["xxh64"], size_limit=1 << 13)


def test_two_ranks_from_s3_partition_and_exact_resume(s3_caps, vocab_file, tmp_path):
    base = {"train": s3_caps, "vocab": vocab_file, "validate_hash": "xxh64"}
    full = run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c_full"), epochs=2))
    # Each epoch: the union over ranks is the dataset, nothing twice, equal shares.
    for e in range(2):
        per_rank = [r["epochs"][e]["ids"] for r in full]
        assert all(len(ids) == N_CAPS // 2 for ids in per_rank)
        everything = per_rank[0] + per_rank[1]
        assert sorted(everything) == sorted(f"c{i}@{e}" for i in range(N_CAPS))
    # Epochs are reshuffled and re-masked (same seed, different epoch).
    order0 = [k.split("@")[0] for k in full[0]["epochs"][0]["ids"]]
    order1 = [k.split("@")[0] for k in full[0]["epochs"][1]["ids"]]
    assert order0 != order1
    assert sum(full[0]["sigs"][f"{k}@0"] != full[0]["sigs"].get(f"{k}@1", full[1]["sigs"].get(f"{k}@1"))
               for k in order0) > len(order0) // 2

    # Interrupted after 2 batches per rank, on a different cache folder.
    part = run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c_res"), stop_after=2))
    state = part[0]["state"]
    assert part[1]["state"] == state
    assert state["epoch"] == 0 and state["sample_in_epoch"] == 2 * BATCH * 2
    # Resumed: new processes, 2 DataLoader workers instead of 1, same cache folder.
    rest = run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c_res"), state=state, epochs=2, workers=2))
    for r in range(2):
        resumed = part[r]["epochs"][0]["ids"] + rest[r]["epochs"][0]["ids"]
        assert resumed == full[r]["epochs"][0]["ids"]            # exactly the same order
        assert rest[r]["epochs"][1]["ids"] == full[r]["epochs"][1]["ids"]
        # ... and every sample got exactly the same caption, mode and masks.
        for key in resumed + rest[r]["epochs"][1]["ids"]:
            got = part[r]["sigs"].get(key) or rest[r]["sigs"][key]
            assert got == full[r]["sigs"][key], key
    assert full[0]["cache_dirs"] == ["node0"]
    # rank 0 read the dataset's files, once, and broadcast what they say (streaming's own copy
    # of index.json: one a node)
    assert sorted(full[0]["reads"]) == ["caps/index.json", "caps/vltrain_meta.json"], full[0]["reads"]
    assert full[1]["reads"] == [], full[1]["reads"]
    # Resumed on 1 rank instead of 2 (same num_canonical_nodes, saved in the state): exactly
    # the samples not yet seen, none twice.
    solo = run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c_solo"), state=state), world=1, local_world=1)
    seen = part[0]["epochs"][0]["ids"] + part[1]["epochs"][0]["ids"] + solo[0]["epochs"][0]["ids"]
    assert sorted(seen) == sorted(f"c{i}@0" for i in range(N_CAPS))


def test_epochs_end_at_the_global_batch_on_any_world_size(vocab_file, tmp_path):
    """44 samples, global batch 8: 2 ranks x 4 and 1 rank x 4 x grad_accum 2 both read 5
    global batches an epoch, the same samples in each, also after a move from 2 nodes to 1 in
    mid-epoch. (Left to each rank's drop_last, 2 ranks read 2 x 5 batches and 1 rank 11: its
    6th step would mix two epochs and every step after it would differ from the 2-rank run's.)"""
    caps = write_captions(str(tmp_path / "caps"), 44, size_limit=1 << 12)
    base = {"train": caps, "vocab": vocab_file, "epochs": 2}

    def steps(res, accum):
        """The sample sets of the optimizer steps, as the trainer forms them: each rank's
        micro-batches in order, across epochs, ``accum`` at a time."""
        micro = [[ids[i:i + BATCH] for e in r["epochs"] for ids in [e["ids"]] for i in range(0, len(ids), BATCH)]
                 for r in res]
        return [sorted(sum((m[k] for m in micro for k in range(s * accum, (s + 1) * accum)), []))
                for s in range(len(micro[0]) // accum)]
    two = steps(run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c2"))), 1)
    one = steps(run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c1"), grad_accum=2), world=1, local_world=1), 2)
    assert len(two) == 10 and one == two
    assert all(len({k.split("@")[1] for k in step}) == 1 for step in two)     # one epoch per step
    # 2 nodes (1 rank each) -> 1: the saved data order (num_canonical_nodes 2) holds in the
    # resumed epoch and in the next, whose workers are made from the main process's dataset
    nodes = steps(run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c4")), local_world=1), 1)
    part = run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c3"), stop_after=2, epochs=1), local_world=1)
    assert part[0]["state"]["sample_in_epoch"] == 16 and part[0]["state"]["num_canonical_nodes"] == 2
    moved = run_ranks(tmp_path, dict(base, cache=str(tmp_path / "c3"), grad_accum=2, state=part[0]["state"]),
                      world=1, local_world=1)
    assert steps(moved, 2) == nodes[2:]


def test_text_mixing_on_two_emulated_nodes_one_host(s3_bucket, vocab_file, tmp_path):
    """LOCAL_WORLD_SIZE=1 x 2 ranks = 2 nodes on one host: own caches, own shared memory."""
    caps = write_captions(f"s3://{s3_bucket}/caps", N_CAPS, size_limit=1 << 13)
    text = write_text(f"s3://{s3_bucket}/text", 40, size_limit=1 << 12)
    spec = {"train": caps, "text": text, "text_proportion": 0.25, "vocab": vocab_file,
            "cache": str(tmp_path / "cache")}
    res = run_ranks(tmp_path, spec, local_world=1)
    ids = res[0]["epochs"][0]["ids"] + res[1]["epochs"][0]["ids"]
    # Epoch = every image-text sample once + 16 text samples (25% of 64), none twice.
    assert len(ids) == 64 and len(set(ids)) == 64
    assert {k for k in ids if k.startswith("c")} == {f"c{i}@0" for i in range(N_CAPS)}
    assert sum(k.startswith("t") for k in ids) == 16
    for r in res:
        for key in r["epochs"][0]["ids"]:
            mode, ids_row, types = r["sigs"][key][:3]
            if key.startswith("t"):   # text-only rows: [CLS] .. [SEP], bidirectional, segment 0
                assert mode == 0 and ids_row[0] == 101 and ids_row[-1] == 102 and not any(types)
    assert sorted(os.listdir(tmp_path / "cache")) == ["node0", "node1"]
    assert [len(r["cache_dirs"]) for r in res] == [2, 2]
    assert sorted(res[0]["reads"]) == [f"{d}/{f}" for d in ("caps", "text")
                                       for f in ("index.json", "vltrain_meta.json")]
    assert res[1]["reads"] == []


def test_a_dataset_rank_0_cannot_read_fails_every_rank_alike(tmp_path, vocab_file):
    """Rank 0 reads the index for all: its error is every rank's, not rank 0's alone while the
    other waits at the next collective."""
    ds = write_captions(str(tmp_path / "caps"), 8)
    with open(os.path.join(ds, "index.json"), "w") as f:
        f.write('{"version": 2, "shards": [{"samples": ')
    res = run_ranks(tmp_path, {"train": ds, "vocab": vocab_file, "cache": str(tmp_path / "cache"),
                               "expect_error": True})
    assert res[0]["error"] == res[1]["error"], res
    assert re.match(r"MetaError: data.train: dataset .*caps: index.json is unreadable", res[0]["error"]), res
    assert res[1]["reads"] == []


def test_small_text_corpus_repeats_get_their_own_masks(tmp_path, vocab_file):
    """A text corpus smaller than the mix asks for is read more than once an epoch; every read
    of a text sample gets its own masks (streaming's up-sampling would repeat the sample id)."""
    caps = write_captions(str(tmp_path / "caps"), 24, size_limit=1 << 12)
    text = write_text(str(tmp_path / "text"), 5)
    # 24 image-text samples at text_proportion 0.25 -> 8 text samples: 5 once + 3 again.
    loader = _single_loader(caps, tmp_path, vocab_file, text_train=text, text_proportion=0.25)
    for epoch in range(2):
        visits: dict[int, list] = {}
        n_caps = 0
        for batch in loader:
            for r, sid in enumerate(batch.sample_id.tolist()):
                if batch.region_mask is not None and bool(batch.region_mask[r].any()):
                    n_caps += 1
                else:
                    visits.setdefault(sid, []).append(_signature(batch, r))
        assert n_caps == 24 and sum(map(len, visits.values())) == 8, epoch
        assert sorted(map(len, visits.values())) == [1, 1, 2, 2, 2], epoch   # no sample 3 times
        for sid, sigs in visits.items():
            assert all(s[1][0] == 101 and s[1][-1] == 102 for s in sigs)   # [CLS] .. [SEP] text rows
            if len(sigs) == 2:
                assert sigs[0][1] != sigs[1][1] or sigs[0][3] != sigs[1][3], (epoch, sid)
    dirs = sorted(os.listdir(tmp_path / "cache" / "node0" / "debug"))
    assert [d.rsplit("-", 1)[-1] for d in dirs if "visit" in d] == ["visit1"] and len(dirs) == 3
    # A mix that would read each text sample more than MAX_TEXT_VISITS times is refused.
    with pytest.raises(ValueError, match=r"asks for 72 text samples .* holds 5: each would be read 14.4"):
        _single_loader(caps, tmp_path, vocab_file, text_train=text, text_proportion=0.75, run_name="x")


# ------------------------------------------------------------------ corruption (one process)

def _single_loader(remote, tmp_path, vocab_file, **data):
    """A loader in this process (no DataLoader worker unless ``num_workers`` is given)."""
    from vltrain.data import loader as L
    from vltrain.tokenization import Tokenizer
    spec = {"train": remote, "cache": str(tmp_path / "cache"), "workers": 0}
    cfg = _cfg(spec)
    cfg.run_name = data.pop("run_name", cfg.run_name)
    cfg.train.seed = data.pop("seed", cfg.train.seed)
    cfg.train.grad_accum = data.pop("grad_accum", cfg.train.grad_accum)
    for k, v in data.items():
        setattr(cfg.data, k, v)
    L._SHM_CLEANED = True   # leave other processes' streaming shared memory alone
    return L.build_train_loader(cfg, Tokenizer(vocab_file))[0]


def test_an_epoch_smaller_than_one_global_batch_is_refused(tmp_path, vocab_file):
    """An epoch ends after its last whole global batch; with none (20 samples, a global batch of
    32) each rank still took one micro-batch of every epoch: every step mixed two epochs, and
    what trained depended on the world size. Refused where the loader is built, naming why."""
    from vltrain.data.errors import DataError
    ds = write_captions(str(tmp_path / "ds"), 20)
    with pytest.raises(DataError, match=rf"data.train={re.escape(ds)}: an epoch holds 20 samples, fewer than one "
                                        r"global batch of 32 \(world size x train.micro_batch_size x "
                                        r"train.grad_accum\)"):
        _single_loader(ds, tmp_path, vocab_file, grad_accum=32 // BATCH)
    assert next(iter(_single_loader(ds, tmp_path / "b", vocab_file))).batch_size == BATCH   # 20 >= BATCH: trains


def _shards(folder):
    return sorted(f for f in os.listdir(folder) if f.startswith("shard."))


def _shards_of(remote):
    """The shard files an index lists (a folder's or an s3:// prefix's)."""
    from vltrain.data.datasets import _read_text
    return [s["raw_data"]["basename"] for s in json.loads(_read_text(remote, "index.json", 30))["shards"]]


def test_hash_mismatch_names_the_shard(tmp_path, vocab_file):
    from vltrain.data.errors import ShardError
    ds = write_captions(str(tmp_path / "ds"), 24, hashes=["xxh64"], size_limit=1 << 12)
    bad = _shards(ds)[1]
    path = os.path.join(ds, bad)
    data = bytearray(open(path, "rb").read())
    data[-5] ^= 0xFF                                  # same size, one flipped byte
    open(path, "wb").write(bytes(data))
    # data.validate_hash's default, auto: checked because the index records xxh64 (data_tools writes it)
    loader = _single_loader(ds, tmp_path, vocab_file, validate_hash="auto", shuffle=False)
    with pytest.raises(ShardError, match=rf"shard {bad} failed its hash check.*Checksum failure"):
        for _ in loader:
            pass
    (cache,) = (tmp_path / "cache" / "node0" / "debug").iterdir()
    assert _shards(ds)[0] in os.listdir(cache) and bad not in os.listdir(cache)  # bad copy dropped


def test_validate_hash_auto_checks_what_the_index_records(tmp_path):
    from vltrain.config import Config
    from vltrain.data.datasets import hash_to_validate
    assert Config().data.validate_hash == "auto"
    with_hash = write_captions(str(tmp_path / "h"), 8, hashes=["sha1", "xxh64"])
    without = write_captions(str(tmp_path / "n"), 8)
    index = {k: open(os.path.join(p, "index.json")).read() for k, p in (("h", with_hash), ("n", without))}
    assert hash_to_validate("auto", index["h"], with_hash) == "xxh64"
    assert hash_to_validate("auto", index["n"], without) is None            # nothing to check against
    assert hash_to_validate("", index["h"], with_hash) is None
    assert hash_to_validate("sha1", index["n"], without) == "sha1"          # explicit: required as given
    from vltrain.config import ConfigError
    from vltrain.data.datasets import build_dataset
    cfg = _cfg({"train": without, "cache": str(tmp_path / "c")})
    cfg.data.cache_limit = "10gib"            # streaming's own error named data.train's stream
    with pytest.raises(ConfigError, match=r"config key 'data.cache_limit': Unsupported value/suffix 10gib"):
        build_dataset(cfg, BATCH)


def test_a_storage_blip_is_retried(s3_bucket, tmp_path, vocab_file, monkeypatch):
    """Two failed downloads of a shard in a row (a connection reset by the storage): with the
    default data.download_retry the shard is fetched on the third attempt and the epoch is
    whole; with data.download_retry=1 (streaming's default lost jobs so) the run stops naming
    the shard."""
    from streaming.base.storage.download import S3Downloader
    from vltrain.config import Config, ConfigError, load_config
    from vltrain.data.errors import ShardError, StorageUnavailable
    assert Config().data.download_retry == 6
    with pytest.raises(ConfigError, match="data.download_retry"):
        load_config(None, ["data.download_retry=-1"])
    remote = write_captions(f"s3://{s3_bucket}/blip", 8, size_limit=1 << 12)
    real = S3Downloader._download_file_impl
    failed = collections.Counter()

    def blip(self, url, local, timeout):    # every shard's first two downloads are reset
        if ".mds" in url and failed[url] < 2:
            failed[url] += 1
            raise ConnectionResetError(f"{url}: connection reset by peer")
        return real(self, url, local, timeout)
    monkeypatch.setattr(S3Downloader, "_download_file_impl", blip)
    assert sum(b.batch_size for b in _single_loader(remote, tmp_path, vocab_file, run_name="r6")) == 8
    assert len(failed) == len(_shards_of(remote)) > 1 and set(failed.values()) == {2}, failed
    failed.clear()
    # A store that does not answer is its own error (run.py exits 69; the Slurm templates
    # requeue), naming the shard, the endpoint and the tries.
    endpoint = os.environ["S3_ENDPOINT_URL"]
    with pytest.raises(StorageUnavailable, match=rf"shard\.0000.* could not be downloaded: S3 endpoint "
                                                 rf"{re.escape(endpoint)} did not answer in 1 tries"):
        for _ in _single_loader(remote, tmp_path, vocab_file, run_name="r1", download_retry=1):
            pass
    assert not issubclass(StorageUnavailable, ShardError)     # not a shard's fault


def test_refused_credentials_mid_run_are_named(s3_bucket, tmp_path, vocab_file, monkeypatch):
    """A 403 on a shard (a session token that expired mid-run): streaming words it "not found";
    the error says the credentials were refused, and it is no outage (not requeued)."""
    from botocore.awsrequest import AWSResponse
    from streaming.base.storage.download import S3Downloader
    from vltrain.data.errors import ShardError, StorageUnavailable
    remote = write_captions(f"s3://{s3_bucket}/denied", 8, size_limit=1 << 12)
    real = S3Downloader._create_s3_client

    class Body:
        def __init__(self, method):
            self.text = b"" if method == "HEAD" else b"<Error><Code>AccessDenied</Code></Error>"

        def stream(self, **kw):
            yield self.text

    def refused(request, **kw):       # S3's answer to every shard request from now on
        return AWSResponse(request.url, 403, {}, Body(request.method)) if ".mds" in request.url else None

    def client_with_expired_token(self, *a, **kw):
        real(self, *a, **kw)
        self._s3_client.meta.events.register_first("before-send.s3", refused)
    monkeypatch.setattr(S3Downloader, "_create_s3_client", client_with_expired_token)
    with pytest.raises(ShardError) as e:
        for _ in _single_loader(remote, tmp_path, vocab_file, download_retry=1):
            pass
    assert not isinstance(e.value, StorageUnavailable)
    assert re.search(r"shard\.0000.*not found.*; the store refused these credentials \(HTTP 403", str(e.value)), e.value


def test_an_unreadable_cached_shard_is_dropped(tmp_path, vocab_file):
    """A shard of the right size that cannot be read (corrupt, no hash to catch it at download):
    the error names it and the cached copy goes, so the next run on this cache reads the
    repaired source instead of failing the same way forever."""
    from vltrain.data.errors import ShardError
    ds = write_captions(str(tmp_path / "ds"), 24, size_limit=1 << 12)
    bad = _shards(ds)[1]
    path = tmp_path / "ds" / bad
    good = path.read_bytes()
    data = bytearray(good)
    data[8:12] = data[12:16]                          # the second sample's start = its end: empty
    path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match=rf"shard {bad}: cannot read sample \d+ .*its cached copy was removed, "
                                         r"so a rerun downloads it again"):
        for _ in _single_loader(ds, tmp_path, vocab_file, validate_hash="", shuffle=False):
            pass
    (cache,) = (tmp_path / "cache" / "node0" / "debug").iterdir()
    assert bad not in os.listdir(cache) and _shards(ds)[0] in os.listdir(cache)
    path.write_bytes(good)                            # the source repaired; the same cache folder
    loader = _single_loader(ds, tmp_path, vocab_file, validate_hash="", shuffle=False)
    assert sum(b.batch_size for b in loader) == 24


def test_a_sample_whose_text_does_not_decode_is_a_bad_sample(tmp_path, vocab_file):
    """A captions column whose bytes are not UTF-8 (written so: right size, no hash): one bad
    sample named by shard and index, skipped and counted with data.skip_bad_samples (it ended
    the run, skipping on, and the cached copy was dropped for a rerun that reads the same)."""
    from tests.fixtures.mds import make_caption_samples
    from vltrain.data.errors import BadSampleError
    ds = write_captions(str(tmp_path / "ds"), 12)
    (shard,) = _shards(ds)
    path = tmp_path / "ds" / shard
    data = path.read_bytes()
    caption = make_caption_samples(12)[5]["captions"][0].encode()
    at = data.index(caption)
    path.write_bytes(data[:at] + b"\xff" + data[at + 1:])
    with pytest.raises(BadSampleError, match=rf"shard {shard}: sample 5: a text column does not decode "
                                             r"\(UnicodeDecodeError"):
        for _ in _single_loader(ds, tmp_path, vocab_file, validate_hash="", shuffle=False):
            pass
    loader = _single_loader(ds, tmp_path, vocab_file, validate_hash="", shuffle=False, skip_bad_samples=True,
                            run_name="skipping")
    assert sum(b.batch_size for b in loader) == 11 and loader.num_skipped == 1
    (cache,) = (tmp_path / "cache" / "node0" / "debug").iterdir()
    assert shard in os.listdir(cache)                 # kept: its bytes are the source's


def test_truncated_shard_names_the_shard(tmp_path, vocab_file):
    from vltrain.data.errors import ShardError
    ds = write_captions(str(tmp_path / "ds"), 24, size_limit=1 << 12)
    bad = _shards(ds)[0]
    path = os.path.join(ds, bad)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) - 100])
    loader = _single_loader(ds, tmp_path, vocab_file, shuffle=False)
    with pytest.raises(ShardError, match=rf"{bad}.*truncated"):
        for _ in loader:
            pass


def test_missing_meta_is_a_clear_error(tmp_path, vocab_file, s3_bucket):
    from vltrain.data.datasets import read_meta
    from vltrain.data.errors import MetaError
    ds = write_captions(str(tmp_path / "ds"), 8)
    os.remove(os.path.join(ds, "vltrain_meta.json"))
    with pytest.raises(MetaError, match=r"ds: no vltrain_meta.json"):
        read_meta(ds)
    with pytest.raises(MetaError, match=rf"ds/index.json: a file; give the dataset's folder .* e.g. {ds}$"):
        read_meta(os.path.join(ds, "index.json"))
    with pytest.raises(MetaError, match=rf"s3://{s3_bucket}/nothing: cannot read vltrain_meta.json .*; check "
                                        r"the bucket and the prefix \(a dataset's root holds vltrain_meta.json"):
        read_meta(f"s3://{s3_bucket}/nothing")
    with pytest.MonkeyPatch.context() as mp:       # a job started without the keys (sbatch --export=X)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        mp.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        with pytest.raises(MetaError, match=r"NoCredentialsError.*; no credentials in this process's environment: "
                                            r"export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
            read_meta(f"s3://{s3_bucket}/nothing")
    # through the loaders, the config key that named the folder comes first
    from vltrain.config import load_config
    from vltrain.data.loader import build_eval_loader
    from vltrain.tokenization import Tokenizer
    cfg = load_config("configs/debug.yaml", [f"data.val={ds}", f"data.vocab={vocab_file}"])
    with pytest.raises(MetaError, match=r"^data.val: dataset .*ds: no vltrain_meta.json"):
        build_eval_loader(cfg, Tokenizer(vocab_file), 2)


def test_bad_samples_fail_or_are_skipped_and_counted(tmp_path, vocab_file):
    from vltrain.data.errors import BadSampleError
    samples = make_caption_samples(16)
    samples[3]["features"][1, 2] = np.nan
    samples[9]["captions"] = [""]
    ds = write_mds(str(tmp_path / "ds"), "captions", samples, optional=("cls_prob",),
                   feature_dim=8, num_classes=5)
    loader = _single_loader(ds, tmp_path / "a", vocab_file, shuffle=False)
    with pytest.raises(BadSampleError, match=rf"dataset {ds}: sample_id 3: column 'features' has 1 NaN"):
        next(iter(loader))
    loader = _single_loader(ds, tmp_path / "b", vocab_file, shuffle=False, skip_bad_samples=True)
    seen = [i for b in loader for i in b.sample_id.tolist()]
    assert seen == [i for i in range(16) if i not in (3, 9)]
    assert loader.num_skipped == 2 and "sample_id 9: caption 0 is empty" in loader.skipped_examples[1]
    assert loader.state_dict()["sample_in_epoch"] == 16          # skipped ones were consumed


def test_an_all_bad_micro_batch_keeps_ranks_in_step(tmp_path, vocab_file):
    """Skipping a whole micro-batch would leave this rank a batch short of the others (a hang at
    the next collective or epoch barrier): the previous batch stands in, flagged for zero weight;
    with no batch before it (a rank's first, the first after a resume) the next good one stands
    in first. With no good batch in the whole epoch, the error names the samples."""
    from vltrain.data.errors import BadSampleError
    from vltrain.data.loader import STAND_IN_KEY
    samples = make_caption_samples(16)
    for i in range(4, 8):                                          # the second micro-batch of 4
        samples[i]["features"][0, 0] = np.nan
    ds = write_mds(str(tmp_path / "ds"), "captions", samples, optional=("cls_prob",),
                   feature_dim=8, num_classes=5)
    loader = _single_loader(ds, tmp_path / "a", vocab_file, shuffle=False, skip_bad_samples=True)
    batches = list(loader)
    assert [b.sample_id.tolist() for b in batches] == [[0, 1, 2, 3], [0, 1, 2, 3], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert [bool(b.task.get(STAND_IN_KEY)) for b in batches] == [False, True, False, False]
    assert loader.num_stand_ins == 1 and loader.num_skipped == 4
    assert loader.state_dict()["sample_in_epoch"] == 16
    for i in range(4):                                             # the first two micro-batches bad
        samples[i]["features"][0, 0] = np.nan
    ds = write_mds(str(tmp_path / "ds2"), "captions", samples, optional=("cls_prob",),
                   feature_dim=8, num_classes=5)
    loader = _single_loader(ds, tmp_path / "b", vocab_file, shuffle=False, skip_bad_samples=True)
    batches = list(loader)
    assert [b.sample_id.tolist() for b in batches] == [[8, 9, 10, 11]] * 3 + [[12, 13, 14, 15]]
    assert [bool(b.task.get(STAND_IN_KEY)) for b in batches] == [True, True, False, False]
    assert loader.num_stand_ins == 2 and loader.num_skipped == 8
    assert loader.state_dict()["sample_in_epoch"] == 16
    # A checkpoint taken with the latest batch held back resumes at it: each stand-in takes the
    # place of its all-bad micro-batch in the sample count.
    loader = _single_loader(ds, tmp_path / "b2", vocab_file, shuffle=False, skip_bad_samples=True)
    it = iter(loader)
    held = []
    for _ in range(4):
        next(it)
        held.append(loader.state_dict(held_back=1)["sample_in_epoch"])
    assert held == [0, 4, 8, 12], held
    for i in range(8, 16):                                         # nothing good in the epoch
        samples[i]["features"][0, 0] = np.nan
    ds = write_mds(str(tmp_path / "ds3"), "captions", samples, optional=("cls_prob",),
                   feature_dim=8, num_classes=5)
    loader = _single_loader(ds, tmp_path / "c", vocab_file, shuffle=False, skip_bad_samples=True)
    with pytest.raises(BadSampleError, match=r"micro-batches to the end of epoch 0 is bad.*sample_id 0"):
        list(loader)


def test_eval_loader_keeps_every_sample_and_fixed_masks(tmp_path, vocab_file):
    from vltrain.data import loader as L
    from vltrain.tokenization import Tokenizer
    cfg = _cfg({"train": "", "cache": str(tmp_path / "cache"), "workers": 0})
    cfg.data.val = write_captions(str(tmp_path / "val"), 18, size_limit=1 << 12)
    L._SHM_CLEANED = True
    loader, _ = L.build_eval_loader(cfg, Tokenizer(vocab_file), BATCH)
    runs = []
    for _ in range(2):
        batches = list(loader)
        assert [b.batch_size for b in batches] == [4, 4, 4, 4, 2]            # no drop_last
        assert [i for b in batches for i in b.sample_id.tolist()] == list(range(18))
        runs.append([_signature(b, r) for b in batches for r in range(b.batch_size)])
    assert runs[0] == runs[1]                                              # same masks every eval


def test_state_at_epoch_end_resumes_with_the_next_epoch(tmp_path, vocab_file):
    ds = write_captions(str(tmp_path / "ds"), 18, size_limit=1 << 12)
    loader = _single_loader(ds, tmp_path / "a", vocab_file)
    assert sum(b.batch_size for b in loader) == 16                  # drop_last: 2 left over
    state = loader.state_dict()
    assert (state["epoch"], state["sample_in_epoch"]) == (0, 18)
    nxt = [(b.sample_id.tolist(), _signature(b, 0)) for b in loader]
    assert loader.epoch == 1
    resumed = _single_loader(ds, tmp_path / "b", vocab_file)
    resumed.load_state_dict(state)
    assert resumed.state_dict() == state                              # saved again before a step
    assert list(resumed) == [] and resumed.epoch == 0                 # epoch 0 was complete
    assert [(b.sample_id.tolist(), _signature(b, 0)) for b in resumed] == nxt
    assert resumed.epoch == 1


def test_a_resume_keeps_the_checkpoints_shuffle_seed_in_every_epoch(tmp_path, vocab_file):
    """A resume with another train.seed keeps the saved data order in every later epoch, as it
    keeps the saved node count: the epochs after the resumed one are read by copies of the
    rank's dataset, which took the new seed (the order then depended on data.num_workers)."""
    ds = write_captions(str(tmp_path / "ds"), 18, size_limit=1 << 12)

    def ids(batches):
        return [b.sample_id.tolist() for b in batches]

    loader = _single_loader(ds, tmp_path / "a", vocab_file, num_workers=1)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = ids(it) + ids(loader) + ids(loader)                      # epochs 0 (the rest), 1 and 2
    resumed = _single_loader(ds, tmp_path / "b", vocab_file, num_workers=1, seed=8)
    resumed.load_state_dict(state)
    assert ids(resumed) + ids(resumed) + ids(resumed) == rest


def test_a_resume_on_other_data_mid_epoch_says_it_is_not_exact(tmp_path, vocab_file):
    """The saved position counts samples of the data it was reading: on data rewritten since
    (more samples, other shards) it cannot be exact, and the resume says so; on a copy of the
    same data elsewhere (re-staged to another bucket), or at an epoch boundary, it is exact."""
    import shutil
    ds = write_captions(str(tmp_path / "ds"), 18, size_limit=1 << 12)
    loader = _single_loader(ds, tmp_path / "a", vocab_file)
    it = iter(loader)
    next(it)
    mid = loader.state_dict()
    assert [d["samples"] for d in mid["datasets"]] == [18]
    shutil.copytree(ds, tmp_path / "moved")
    assert _single_loader(str(tmp_path / "moved"), tmp_path / "b", vocab_file).load_state_dict(mid) is None
    grown = write_captions(str(tmp_path / "grown"), 26, size_limit=1 << 12)
    note = _single_loader(grown, tmp_path / "c", vocab_file).load_state_dict(mid)
    assert note.startswith(f"the training data differs from the data the checkpoint was reading (then {ds} (18 "
                           f"samples, index ") and f"now {grown} (26 samples, index " in note, note
    assert "sample 4 of epoch 0, does not carry over to it, so the rest of epoch 0 repeats some samples" in note
    list(it)
    end = loader.state_dict()                                       # epoch 0 done: epoch 1 starts whole
    assert _single_loader(grown, tmp_path / "d", vocab_file).load_state_dict(end) is None


def test_state_with_a_held_back_batch_resumes_at_that_batch(tmp_path, vocab_file):
    """The trainer fetches one batch ahead; its checkpoint's loader state leaves that batch
    out (``state_dict(held_back=1)``), mid-epoch and when it is the next epoch's first; and
    the last batches of a finished epoch (a step's micro-batches the epoch's end cut short,
    pulled before they train), when the next has not started."""
    ds = write_captions(str(tmp_path / "ds"), 18, size_limit=1 << 12)

    def ids(batches):
        return [(b.sample_id.tolist(), _signature(b, 0)) for b in batches]

    loader = _single_loader(ds, tmp_path / "a", vocab_file)
    it = iter(loader)
    ids([next(it) for _ in range(2)])
    held = ids([next(it)])                                          # fetched ahead, not trained on
    state = loader.state_dict(held_back=1)
    assert (state["epoch"], state["sample_in_epoch"]) == (0, 8)
    rest = ids(list(it))                                            # the 4th batch (drop_last)
    resumed = _single_loader(ds, tmp_path / "b", vocab_file)
    resumed.load_state_dict(state)
    assert ids(resumed) == held + rest
    assert (loader.state_dict()["epoch"], loader.state_dict()["sample_in_epoch"]) == (0, 18)   # over: epoch 1 next
    state = loader.state_dict(held_back=2)                          # its last two, not trained on
    assert (state["epoch"], state["sample_in_epoch"]) == (0, 8)
    resumed = _single_loader(ds, tmp_path / "b2", vocab_file)
    resumed.load_state_dict(state)
    assert ids(resumed) == held + rest
    with pytest.raises(ValueError, match="held_back=5"):
        loader.state_dict(held_back=5)                              # more than the epoch yielded

    loader = _single_loader(ds, tmp_path / "c", vocab_file)
    epoch0 = ids(loader)
    it = iter(loader)                                               # epoch 1 starts
    held = ids([next(it)])
    state = loader.state_dict(held_back=1)
    assert (state["epoch"], state["sample_in_epoch"]) == (1, 0)
    resumed = _single_loader(ds, tmp_path / "d", vocab_file)
    resumed.load_state_dict(state)
    assert ids(resumed)[:1] == held and resumed.epoch == 1 and held != epoch0[:1]


def test_state_with_a_held_back_batch_leaves_out_its_skipped_samples(tmp_path, vocab_file):
    """A held-back batch is read again after a resume, its bad samples skipped and counted again:
    the saved ``num_skipped`` must leave them out, or every checkpoint taken right after a batch
    with a bad sample counts it twice (data/skipped drifts up with each resume)."""
    samples = make_caption_samples(16)
    for i in (5, 13):                                              # one bad sample in batches 2 and 4
        samples[i]["features"][0, 0] = np.nan
    ds = write_mds(str(tmp_path / "ds"), "captions", samples, optional=("cls_prob",),
                   feature_dim=8, num_classes=5)
    whole = _single_loader(ds, tmp_path / "a", vocab_file, shuffle=False, skip_bad_samples=True)
    assert [b.sample_id.tolist() for b in whole][1] == [4, 6, 7] and whole.num_skipped == 2
    loader = _single_loader(ds, tmp_path / "b", vocab_file, shuffle=False, skip_bad_samples=True)
    it = iter(loader)
    next(it)
    next(it)                                                       # fetched ahead (skipped 5), not trained on
    assert loader.num_skipped == 1 and loader.state_dict()["num_skipped"] == 1
    state = loader.state_dict(held_back=1)
    assert (state["sample_in_epoch"], state["num_skipped"]) == (4, 0)
    resumed = _single_loader(ds, tmp_path / "c", vocab_file, shuffle=False, skip_bad_samples=True)
    resumed.load_state_dict(state)
    assert [b.sample_id.tolist() for b in resumed] == [[4, 6, 7], [8, 9, 10, 11], [12, 14, 15]]
    assert resumed.num_skipped == whole.num_skipped == 2           # as the uninterrupted read


def test_stale_shm_sweep_keeps_live_and_starting_segments(tmp_path):
    """The sweep unlinks streaming segments no process maps (a crashed run's), but keeps one a
    live process maps (another job on the same node); streaming's own helper unlinked all of
    them. Young ones it waits for, then looks again: one a starting job maps meanwhile stays, one
    nobody maps (a run SIGKILLed a moment ago, restarted at once) goes."""
    import subprocess
    import sys
    import time
    from multiprocessing import shared_memory

    from vltrain.data.datasets import SHM_DIR, SHM_MIN_AGE_S, _clean_host_shm
    stale, live, starting, killed = "999990_locals", "999991_barrier", "999992_next_epoch", "999994_locals"
    old = time.time() - 3600
    with open(os.path.join(SHM_DIR, stale), "wb") as f:      # what a SIGKILLed run leaves
        f.write(b"\0" * 8)
    os.utime(os.path.join(SHM_DIR, stale), (old, old))
    # Another process maps `live` for as long as it runs (the other job), and `starting` 1.5 s
    # after it is told to (a job that created it and maps it next).
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\nfrom multiprocessing import shared_memory, resource_tracker\n"
        f"m = shared_memory.SharedMemory({live!r}, create=True, size=8)\n"
        "resource_tracker.unregister(m._name, 'shared_memory')\nprint('ready', flush=True)\n"
        f"sys.stdin.readline()\ntime.sleep(1.5)\ns = shared_memory.SharedMemory({starting!r})\n"
        "resource_tracker.unregister(s._name, 'shared_memory')\nprint('mapped', flush=True)\ntime.sleep(600)\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        os.utime(os.path.join(SHM_DIR, live), (old, old))
        for name in (starting, killed):
            with open(os.path.join(SHM_DIR, name), "wb") as f:
                f.write(b"\0" * 8)
        holder.stdin.write("go\n")
        holder.stdin.flush()
        t0 = time.time()
        removed = _clean_host_shm()
        assert time.time() - t0 >= SHM_MIN_AGE_S - 1            # it waited for the young ones
        assert holder.stdout.readline().strip() == "mapped"
        assert {stale, killed} <= set(removed) and live not in removed and starting not in removed
        assert [os.path.exists(os.path.join(SHM_DIR, n)) for n in (stale, live, starting, killed)] == \
            [False, True, True, False]
        shared_memory.SharedMemory(live).close()                # the other job can still attach
    finally:
        holder.kill()
        holder.wait()
        for name in (stale, live, starting, killed):
            try:
                os.unlink(os.path.join(SHM_DIR, name))
            except FileNotFoundError:
                pass


def test_stale_shm_sweep_keeps_a_prefix_whose_registration_a_live_rank_holds():
    """A job in another PID namespace sharing /dev/shm (Docker's --ipc=host) maps its
    segments where the sweep cannot see it: its ranks' shared lock on the prefix's LOCALS
    file keeps the whole prefix; once the holder is gone (SIGKILL), the prefix goes."""
    import subprocess
    import sys
    import time

    from vltrain.data.datasets import SHM_DIR, _clean_host_shm
    names = ["999993_locals", "999993_barrier", "999993_shard_states"]
    old = time.time() - 3600
    # The holder creates them (young: no sweep takes them before it holds them), then they age.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import time\nfrom vltrain.data.shm_prefix import hold_registration\n"
        f"for n in {names!r}:\n    open({SHM_DIR!r} + '/' + n, 'wb').write(bytes(8))\n"
        "hold_registration(999993)\nprint('ready', flush=True)\ntime.sleep(600)\n")],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "ready"
        for n in names:
            os.utime(os.path.join(SHM_DIR, n), (old, old))
        assert not set(names) & set(_clean_host_shm())
        assert all(os.path.exists(os.path.join(SHM_DIR, n)) for n in names)
        holder.kill()
        holder.wait()
        assert set(names) <= set(_clean_host_shm())
    finally:
        holder.kill()
        holder.wait()
        for n in names:
            try:
                os.unlink(os.path.join(SHM_DIR, n))
            except FileNotFoundError:
                pass


def _group_alive(pgid: int) -> bool:
    """Whether a process of process group ``pgid`` is still alive (not a zombie)."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def test_a_run_restarted_right_after_a_sigkill_starts(tmp_path, synthetic_corpus):
    """SIGKILL of a whole run (the OOM killer, `kill -9`, Slurm past its grace time) leaves its
    datasets' shared-memory registrations; the validation set's, never read, has no lock file,
    so streaming's scan refuses the restart's same local folder ("Reused local directory")
    until the sweep removes it. The restart, seconds later, starts."""
    import signal
    import subprocess
    import sys
    import time

    from tests.fixtures.corpus import rank_env
    args = ["vltrain/run.py", "--config", "configs/debug.yaml", f"output_root={tmp_path}", "train.log_every=1",
            f"data.train={synthetic_corpus}/captions/pretrain", f"data.val={synthetic_corpus}/captions/val",
            f"data.cache_dir={tmp_path / 'cache'}", "train.val_every=1000", "data.num_workers=1"]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, *args, "train.max_steps=100000"], cwd=REPO,
                                env=rank_env(0, 1, free_port()), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.time() + 240
        while "step 2/" not in log.read_text():
            assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    # ... and its loader workers and forkserver gone too (under load the kernel takes a moment to
    # tear a killed process down, and a segment it still maps is rightly not swept)
    deadline = time.time() + 60
    while _group_alive(proc.pid):
        assert time.time() < deadline, "the killed run's processes did not exit"
        time.sleep(0.1)
    r = subprocess.run([sys.executable, *args, "train.max_steps=5"], cwd=REPO, env=rank_env(0, 1, free_port()),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Reused local directory" not in r.stderr


def test_lock_files_of_prefixes_nobody_uses_are_removed():
    """Streaming leaves <tmp>/NNNNNN_{barrier,cache}_filelock behind and its prefix scan skips
    every prefix that has one (each run on a long-lived node started further up). The sweep
    removes those of prefixes with no segment left, and keeps a live prefix's and a young one."""
    import tempfile
    import time

    from vltrain.data.datasets import SHM_DIR, _clean_host_filelocks
    tmp, old = tempfile.gettempdir(), time.time() - 3600
    orphan, orphan2, live, young = ("999980_barrier_filelock", "999980_cache_filelock", "999981_barrier_filelock",
                                    "999982_cache_filelock")
    segment = os.path.join(SHM_DIR, "999981_locals")              # a running job's prefix
    try:
        with open(segment, "wb") as f:
            f.write(b"\0" * 8)
        for name in (orphan, orphan2, live, young):
            open(os.path.join(tmp, name), "w").close()
            if name != young:
                os.utime(os.path.join(tmp, name), (old, old))
        removed = _clean_host_filelocks()
        assert {orphan, orphan2} <= set(removed) and live not in removed and young not in removed
        assert [os.path.exists(os.path.join(tmp, n)) for n in (orphan, orphan2, live, young)] == \
            [False, False, True, True]
    finally:
        for path in [segment] + [os.path.join(tmp, n) for n in (orphan, orphan2, live, young)]:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


@pytest.mark.parametrize("workers", [1, 0])
def test_rank_gone_at_epoch_start_fails_the_peer_instead_of_hanging(tmp_path, vocab_file, workers):
    """Rank 1 builds its loader and dies before starting the epoch: rank 0's loader waits in
    streaming's shared barrier for it (forever, left alone). The fetch watchdog ends rank 0
    with exit 1 after train.dist_timeout_s, saying why, and takes its DataLoader worker with it."""
    ds = write_captions(str(tmp_path / "ds"), N_CAPS, size_limit=1 << 12)
    log = str(tmp_path / "wd")
    spec = {"train": ds, "cache": str(tmp_path / "cache"), "vocab": vocab_file, "workers": workers,
            "dist_timeout_s": 4.0, "gone_before_epoch": 1, "log": log, "port": free_port()}
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_rank_main, args=(r, 2, 2, spec, str(tmp_path / f"r{r}.json"))) for r in range(2)]
    t0 = time.time()
    for p in procs:
        p.start()
    for p in procs:
        p.join(90)
    alive = [p.is_alive() for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
    assert alive == [False, False], "rank 0 hung in the epoch-start barrier"
    assert [p.exitcode for p in procs] == [1, 0]
    assert time.time() - t0 < 60
    text = open(f"{log}.rank0").read()
    assert f"no batch from data.train={ds} for 4 s (train.dist_timeout_s)" in text, text
    assert "shared barrier" in text
    pids = json.loads(text.split("terminated DataLoader worker processes ", 1)[1].splitlines()[0])
    assert len(pids) == workers
    time.sleep(0.5)
    for pid in pids:                      # the worker that sat in the barrier is gone too
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_cache_folder_is_per_run_and_per_index(tmp_path, vocab_file):
    """Two jobs on one node reading one dataset each get a cache folder (streaming refuses a
    second live dataset on a folder: "Reused local directory"), and a dataset rewritten at the
    same path is read afresh, not through the old copy's cached index.json."""
    import gc
    import shutil
    ds = str(tmp_path / "ds")
    write_captions(ds, 16, size_limit=1 << 12)
    a = _single_loader(ds, tmp_path, vocab_file, run_name="a", shuffle=False)
    b = _single_loader(ds, tmp_path, vocab_file, run_name="b", shuffle=False)    # a is alive
    assert sum(x.batch_size for x in a) == 16 and sum(x.batch_size for x in b) == 16
    del a, b
    gc.collect()
    shutil.rmtree(ds)
    write_captions(ds, 24, size_limit=1 << 12, seed=3)
    c = _single_loader(ds, tmp_path, vocab_file, run_name="a", shuffle=False)    # run a, requeued
    assert sum(x.batch_size for x in c) == 24
    node = tmp_path / "cache" / "node0"
    assert sorted(os.listdir(node)) == ["a", "b"] and len(os.listdir(node / "a")) == 2


def test_default_cache_root_is_per_user_under_the_temp_dir(monkeypatch, tmp_path):
    """data.cache_dir left empty: one root per user (the first job on a node owns the folders it
    creates, so a root shared by all users failed the next user's job there), under $TMPDIR."""
    import tempfile
    from vltrain.config import DataConfig
    from vltrain.data.datasets import cache_dir_for, default_cache_root, index_digest
    assert DataConfig().cache_dir == ""
    monkeypatch.setattr(tempfile, "tempdir", None)          # re-read $TMPDIR
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    for user in ("alice", "bob"):
        monkeypatch.setenv("USER", user)
        monkeypatch.setenv("LOGNAME", user)
        assert default_cache_root() == str(tmp_path / f"vltrain_cache-{user}")
        got = cache_dir_for("", "run", "s3://b/ds", index_digest("{}"), "train")
        assert got.startswith(str(tmp_path / f"vltrain_cache-{user}" / "node"))
    assert cache_dir_for("/scratch/c", "run", "s3://b/ds", index_digest("{}")).startswith("/scratch/c/node")


def test_ranks_agree_on_the_shared_memory_prefix_beside_another_job():
    """mosaicml/streaming#901: each rank scans /dev/shm for the prefix on its own; a job that
    registers one between the leader's scan and a follower's makes them disagree, and streaming's
    follower dies ("was not registered by local leader"). Ours looks the leader's registration
    up by its local directories; a leader whose prefix was taken meanwhile scans again. The
    interleavings are played in one process (no barriers without torch.distributed)."""
    import types
    import uuid
    import streaming.base.dataset as sd
    from streaming.base.constant import LOCALS
    from streaming.base.shared import SharedMemory
    from streaming.base.shared import prefix as sp
    from vltrain.data import shm_prefix
    assert shm_prefix.install() and sd.get_shm_prefix is shm_prefix.get_shm_prefix   # streaming 0.13.0
    leader, follower = (types.SimpleNamespace(is_local_leader=b) for b in (True, False))
    mine, other = ([f"/tmp/vltrain-shm-test-{uuid.uuid4().hex}/{x}"] for x in ("mine", "other"))
    held = []
    try:
        p, shm = shm_prefix.get_shm_prefix(mine, [None], leader)
        held.append(shm)
        # the follower scans after the leader registered: it sees p taken and computes another
        with pytest.raises(RuntimeError, match="was not registered by local leader"):
            sp.get_shm_prefix(mine, [None], follower, retry=0)         # streaming's own
        q, shm_f = shm_prefix.get_shm_prefix(mine, [None], follower, retry=2)
        assert q == p and sp._unpack_locals(bytes(shm_f.buf)) == (mine, p)
        # another job took the prefix the leader's scan found: it scans again
        from streaming.base.constant import SHM_TO_CLEAN
        calls, real = [], sp._check_and_find_retrying

        def racing(*a, **k):           # the first scan, every name of it, still sees p free
            calls.append(1)
            return p if len(calls) <= len(SHM_TO_CLEAN) else real(*a, **k)
        sp._check_and_find_retrying = racing
        try:
            r, shm_o = shm_prefix.get_shm_prefix(other, [None], leader, retry=3)
        finally:
            sp._check_and_find_retrying = real
        held.append(shm_o)
        assert len(calls) == 2 * len(SHM_TO_CLEAN)             # it scanned again after FileExistsError
        assert r != p and sp._unpack_locals(bytes(SharedMemory(sp._get_path(r, LOCALS), False).buf)) == (other, r)
        with pytest.raises(RuntimeError, match="no shared-memory registration .* holds the local directories"):
            shm_prefix.find_leaders_prefix([f"/tmp/vltrain-shm-test-{uuid.uuid4().hex}"], p, retry=0)
    finally:
        for s in held:
            s.cleanup()


def test_a_worker_the_oom_killer_ends_is_named_as_such(tmp_path, vocab_file):
    """A DataLoader worker SIGKILLed mid-epoch (what the kernel's OOM killer does) was torch's
    "DataLoader worker (pid(s) N) exited unexpectedly"; the rank now says it was killed, most
    likely for host memory, and what to lower."""
    import signal
    from multiprocessing import forkserver
    from vltrain.data.host_limits import HostLimitError
    ds = write_captions(str(tmp_path / "ds"), 200, size_limit=1 << 14)
    it = iter(_single_loader(ds, tmp_path / "a", vocab_file, num_workers=1))
    next(it)
    server = forkserver._forkserver._forkserver_pid
    workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _ppid(p) == server]
    assert len(workers) == 1, workers
    os.kill(workers[0], signal.SIGKILL)
    with pytest.raises(HostLimitError, match=rf"data loader worker \(pid {workers[0]}\) was killed \(SIGKILL\), most "
                                             r"likely by the kernel's OOM killer: .* lower data.num_workers"):
        for _ in it:
            pass


def _ppid(pid: str):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def test_a_full_dev_shm_is_named_with_what_to_do(monkeypatch):
    """torch's words for a full /dev/shm, from a worker or from a semaphore, become one naming
    /dev/shm, its size, and the remedies; a small /dev/shm is warned of at the start."""
    import errno
    import shutil
    from collections import namedtuple
    from vltrain.data import host_limits
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(64 << 20, 63 << 20, 1 << 20))
    worker = RuntimeError("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback ...\nRuntimeError: "
                          "unable to allocate shared memory(shm) for file </torch_1_2>: No space left on device (28)")
    for e in (worker, OSError(errno.ENOSPC, "No space left on device")):
        msg = str(host_limits.explain(e))
        assert msg.startswith("the data loader ran out of shared memory (/dev/shm: 64 MiB, 1 MiB free): give the "
                              "job more shared memory (docker run --shm-size=16g or --ipc=host"), msg
    assert host_limits.explain(RuntimeError("CUDA error: out of memory")) is None
    assert host_limits.explain(RuntimeError("DataLoader worker (pid(s) 7) exited unexpectedly"), ()) is None
    assert "/dev/shm: 64 MiB" in host_limits.check_shm(8) and host_limits.check_shm(0) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(32 << 30, 0, 32 << 30))
    assert host_limits.check_shm(8) is None


def test_a_full_cache_disk_is_named_not_blamed_on_the_shard(tmp_path, vocab_file, monkeypatch):
    """The cache folder's filesystem full while a shard is written there was "shard ... could
    not be downloaded or decompressed", read as a bad dataset; now the folder, its free space
    and the keys to change."""
    import errno
    from streaming import StreamingDataset
    from vltrain.data.errors import CacheFull
    ds = write_captions(str(tmp_path / "ds"), 8, size_limit=1 << 12)

    def full(self, shard_id, blocking=True):       # the write of the shard's file into the cache
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(StreamingDataset, "prepare_shard", full)
    with pytest.raises(CacheFull, match=r"shard\.0000.* could not be written to the cache folder .*/cache/.*: its "
                                        r"filesystem is full \(\d+ MiB free; OSError: \[Errno 28\] No space left on "
                                        r"device\)\. Point data.cache_dir at a larger disk, .* data.cache_limit"):
        for _ in _single_loader(ds, tmp_path, vocab_file):
            pass
