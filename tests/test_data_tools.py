"""data_tools/: converters on small files in the real formats, the synthetic corpus, inspect, S3, bad input.

Inputs are written here in the formats people actually have (Karpathy / COCO caption JSON,
bottom-up-attention TSV with base64 float32 arrays, per-image .npz, VQA v2 questions and
annotations JSON, blank-line separated text) and read back through ``StreamingDataset``.
Each tool runs once as a real subprocess (``python data_tools/<tool>.py``); everything else
calls ``main(argv)`` in-process, because importing streaming costs ~5 s per process.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest

from data_tools import convert_captions, convert_text, convert_vqa, make_synthetic
from data_tools import inspect as dt_inspect
from vltrain.data import schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F16 = dict(rtol=1e-3, atol=1e-3)   # float16 keeps ~3 significant digits


# ---------------------------------------------------------------- helpers

def run_tool(tool: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python data_tools/<tool>.py args`` as a real subprocess."""
    return subprocess.run([sys.executable, os.path.join(ROOT, "data_tools", f"{tool}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, **(env or {})},
                          timeout=300)


def read_mds(local: str, remote: str | None = None) -> list[dict]:
    """All samples of an MDS dataset, in order, through StreamingDataset (hashes verified)."""
    from streaming import StreamingDataset
    ds = StreamingDataset(local=str(local), remote=remote, shuffle=False, batch_size=1,
                          validate_hash="xxh64")
    try:
        return [ds[i] for i in range(len(ds))]
    finally:
        del ds


def read_meta(out) -> dict:
    with open(os.path.join(out, schema.META_FILE)) as f:
        return json.load(f)


def b64(a: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()


def make_image(rng, n: int, dim: int, w: int = 640, h: int = 480, classes: int = 0) -> dict:
    x1 = rng.uniform(0, w / 2, n)
    y1 = rng.uniform(0, h / 2, n)
    boxes = np.stack([x1, y1, x1 + rng.uniform(5, w / 2, n), y1 + rng.uniform(5, h / 2, n)], 1)
    img = {"w": w, "h": h, "boxes": boxes.astype(np.float32),
           "features": rng.normal(0, 2, (n, dim)).astype(np.float32)}
    if classes:
        p = rng.random((n, classes)).astype(np.float32)
        img["cls_prob"] = p / p.sum(1, keepdims=True)
        # as bottom-up attention writes them: over the non-background classes (column 0)
        img["objects_id"] = p[:, 1:].argmax(1).astype(np.int64)
        img["objects_conf"] = p[:, 1:].max(1).astype(np.float32)
    return img


TSV_FIELDS_FULL = "image_id,image_w,image_h,num_boxes,boxes,features,cls_prob,objects_id,objects_conf"


def tsv_row(image_id, img: dict, full: bool = False, **override) -> str:
    cells = {"image_id": str(image_id), "image_w": str(img["w"]), "image_h": str(img["h"]),
             "num_boxes": str(len(img["boxes"])), "boxes": b64(img["boxes"]), "features": b64(img["features"])}
    if full:
        cells.update(cls_prob=b64(img["cls_prob"]), objects_id=b64(img["objects_id"]),
                     objects_conf=b64(img["objects_conf"]))
    cells.update(override)
    return "\t".join(cells.values())


def write_tsv(path, rows: list[str]) -> str:
    with open(path, "w") as f:
        f.write("\n".join(rows) + "\n")
    return str(path)


def karpathy(images: list[tuple[int, str, list[str]]]) -> dict:
    return {"dataset": "coco", "images": [
        {"cocoid": cid, "imgid": k, "filepath": "train2014", "filename": f"COCO_train2014_{cid:012d}.jpg",
         "split": split, "sentids": list(range(len(caps))),
         "sentences": [{"raw": c, "tokens": c.lower().split(), "imgid": k, "sentid": j} for j, c in enumerate(caps)]}
        for k, (cid, split, caps) in enumerate(images)]}


def write_json(path, obj) -> str:
    with open(path, "w") as f:
        json.dump(obj, f)
    return str(path)


def check_image_columns(s: dict, img: dict):
    np.testing.assert_allclose(s["features"].astype(np.float32), img["features"], **F16)
    assert s["features"].dtype == np.float16
    np.testing.assert_array_equal(s["features"], img["features"].astype(np.float16))
    scale = np.array([img["w"], img["h"], img["w"], img["h"]], np.float32)
    np.testing.assert_allclose(s["boxes"], np.clip(img["boxes"] / scale, 0, 1), rtol=1e-6, atol=1e-7)
    assert (int(s["image_w"]), int(s["image_h"])) == (img["w"], img["h"])


# ---------------------------------------------------------------- captions

def test_convert_captions_karpathy_tsv(tmp_path):
    """Karpathy JSON + header-less bottom-up TSV with cls_prob/objects: subprocess, train+restval."""
    rng = np.random.default_rng(0)
    ids = [9, 25, 30, 42, 77]
    splits = ["train", "restval", "train", "val", "test"]
    imgs = {i: make_image(rng, n, 16, classes=5) for i, n in zip(ids, [3, 10, 1, 4, 2])}
    caps = {i: [f"  A man riding wave {i}. ", "two dogs on a couch"] for i in ids}
    kp = write_json(tmp_path / "dataset_coco.json", karpathy([(i, s, caps[i]) for i, s in zip(ids, splits)]))
    rows = [tsv_row(i, imgs[i], full=True) for i in ids if i != 42]
    # The val image's row is corrupt: never decoded, because --split train does not need it.
    rows.append(tsv_row(42, imgs[42], full=True, features="!!!not base64!!!"))
    tsv = write_tsv(tmp_path / "feats.tsv", rows)
    out = tmp_path / "out"
    r = run_tool("convert_captions", "--captions", kp, "--split", "train", "--include-restval",
                 "--tsv", tsv, "--tsv-fields", TSV_FIELDS_FULL, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "wrote 3 captions samples" in r.stdout
    samples = read_mds(out)
    assert [s["image_id"] for s in samples] == ["9", "25", "30"]          # TSV order
    for s in samples:
        img = imgs[int(s["image_id"])]
        check_image_columns(s, img)
        assert s["sample_id"] == int(s["image_id"])
        assert s["captions"] == [c.strip() for c in caps[int(s["image_id"])]]
        np.testing.assert_allclose(s["cls_prob"].astype(np.float32), img["cls_prob"], **F16)
        np.testing.assert_array_equal(s["obj_labels"], img["objects_id"])
        np.testing.assert_array_equal(s["obj_conf"], img["objects_conf"])
    meta = read_meta(out)
    assert meta["kind"] == "captions" and meta["feature_dim"] == 16 and meta["num_classes"] == 5
    assert meta["has_cls_prob"] and meta["has_obj_labels"] and not meta["has_image_feature"]
    assert meta["num_samples"] == 3 and meta["skipped_total"] == 0
    assert set(meta["optional_columns"]) == {"cls_prob", "obj_labels", "obj_conf"}
    # the references self-critical training reads instead of the shards
    assert meta["references_file"] == "references.jsonl"
    lines = (out / "references.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [[s["image_id"], s["captions"]] for s in samples]


def test_convert_captions_coco_json_npz(tmp_path, capsys):
    """COCO captions_*.json + per-image npz (zero-padded names, sizes from the JSON, no cls_prob)."""
    rng = np.random.default_rng(1)
    imgs = {i: make_image(rng, 5, 8, w=500 + i, h=300 + i) for i in (3, 11)}
    npz = tmp_path / "npz"
    npz.mkdir()
    for i, img in imgs.items():
        np.savez(npz / f"{i:012d}.npz", features=img["features"], boxes=img["boxes"])
    coco = {"images": [{"id": i, "file_name": f"{i}.jpg", "width": imgs[i]["w"], "height": imgs[i]["h"]}
                       for i in (11, 3)],
            "annotations": [{"id": 1, "image_id": 3, "caption": "a red bus"},
                            {"id": 2, "image_id": 11, "caption": "a cat. "},
                            {"id": 3, "image_id": 3, "caption": "a bus on a street"}]}
    cap = write_json(tmp_path / "captions_val2014.json", coco)
    out = tmp_path / "out"
    assert convert_captions.main(["--captions", cap, "--npz-dir", str(npz), "--out", str(out)]) == 0
    samples = read_mds(out)
    assert [s["image_id"] for s in samples] == ["11", "3"]                   # COCO images order
    assert samples[0]["captions"] == ["a cat."]
    assert samples[1]["captions"] == ["a red bus", "a bus on a street"]
    for s in samples:
        check_image_columns(s, imgs[int(s["image_id"])])
        assert "cls_prob" not in s
    meta = read_meta(out)
    assert not meta["has_cls_prob"] and meta["num_classes"] is None and meta["source"]["format"] == "coco"


def test_convert_conceptual_captions_both_formats(tmp_path, capsys):
    """VLP's dataset_cc.json (Karpathy layout, ids from file names, its own split names) and
    Conceptual Captions' caption<TAB>url TSV (ids = 0-based line index)."""
    rng = np.random.default_rng(4)
    imgs = {i: make_image(rng, 3, 8) for i in (0, 1, 2)}
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(i, img) for i, img in imgs.items()])
    cc = write_json(tmp_path / "dataset_cc.json", {"dataset": "cc", "images": [
        {"filename": f"{i}.jpg", "filepath": "trainval", "imgid": i, "split": split,
         "sentences": [{"raw": f"caption {i}", "tokens": ["caption", str(i)]}]}
        for i, split in ((0, "train"), (1, "trainval"), (2, "val"))]})
    out = tmp_path / "cc_all"
    assert convert_captions.main(["--captions", cc, "--tsv", tsv, "--out", str(out)]) == 0
    assert [s["captions"] for s in read_mds(out)] == [["caption 0"], ["caption 1"], ["caption 2"]]
    assert convert_captions.main(["--captions", cc, "--split", "trainval", "--tsv", tsv,
                                  "--out", str(tmp_path / "cc_tv")]) == 0
    assert [s["image_id"] for s in read_mds(tmp_path / "cc_tv")] == ["1"]
    assert convert_captions.main(["--captions", cc, "--split", "test", "--tsv", tsv,
                                  "--out", str(tmp_path / "cc_test")]) == 2
    assert "no image has split 'test' (the file's splits: ['train', 'trainval', 'val'])" in capsys.readouterr().err

    gcc = tmp_path / "Train_GCC-training.tsv"
    gcc.write_text("a dog on a beach\thttp://x/0.jpg\n  actor at the premiere \thttp://x/1.jpg\n"
                   "no url here\n\thttp://x/3.jpg\n")
    assert convert_captions.main(["--captions", str(gcc), "--tsv", tsv, "--out", str(tmp_path / "g1")]) == 2
    assert "Train_GCC-training.tsv line 3: not 'caption<TAB>url'" in capsys.readouterr().err
    out = tmp_path / "gcc"
    assert convert_captions.main(["--captions", str(gcc), "--tsv", tsv, "--out", str(out), "--skip-bad"]) == 0
    got = read_mds(out)
    assert [(s["image_id"], s["captions"]) for s in got] == [("0", ["a dog on a beach"]),
                                                            ("1", ["actor at the premiere"])]
    check_image_columns(got[1], imgs[1])
    meta = read_meta(out)
    assert meta["source"]["format"] == "gcc_tsv"
    assert meta["skipped"] == {"empty_caption": 1, "malformed_line": 1}
    assert convert_captions.main(["--captions", str(gcc), "--split", "train", "--tsv", tsv,
                                  "--out", str(tmp_path / "g2")]) == 2
    assert "Conceptual Captions TSV, which has no splits" in capsys.readouterr().err


def test_tsv_header_aliases_and_py3_bytes_literals(tmp_path):
    """An LXMERT-style TSV: header row, img_id/img_h/img_w names, attrs columns, b'...' cells."""
    rng = np.random.default_rng(7)
    img = make_image(rng, 4, 10, w=320, h=200, classes=3)
    head = "img_id\timg_h\timg_w\tobjects_id\tobjects_conf\tattrs_id\tattrs_conf\tnum_boxes\tboxes\tfeatures"
    cells = ["COCO_val2014_000000000042", "200", "320", f"b'{b64(img['objects_id'])}'", b64(img["objects_conf"]),
             b64(np.zeros(4, np.int64)), b64(np.zeros(4, np.float32)), "4", f"b'{b64(img['boxes'])}'",
             b64(img["features"])]
    tsv = write_tsv(tmp_path / "lx.tsv", [head, "\t".join(cells)])
    kp = write_json(tmp_path / "k.json", {"images": [{"filename": "COCO_val2014_000000000042.jpg", "split": "val",
                                                      "sentences": [{"raw": "a plane"}]}]})
    out = tmp_path / "out"
    assert convert_captions.main(["--captions", kp, "--split", "val", "--tsv", tsv, "--out", str(out)]) == 0
    (s,) = read_mds(out)
    check_image_columns(s, img)
    # Both sides key the image by its COCO file stem, which is image 42: the integer id.
    assert s["image_id"] == "42" and s["sample_id"] == 42 and s["captions"] == ["a plane"]
    np.testing.assert_array_equal(s["obj_labels"], img["objects_id"])
    assert "cls_prob" not in s and read_meta(out)["has_obj_labels"]


def test_conceptual_captions_tsv_header_is_not_an_image(tmp_path, capsys):
    """img2dataset's CC3M recipe adds a `caption<TAB>url` header and numbers the data rows
    000000000, ...: the first data row is image 0, not the header."""
    rng = np.random.default_rng(8)
    imgs = [make_image(rng, 3, 8) for _ in range(3)]
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(f"{i:09d}", img) for i, img in enumerate(imgs)])
    gcc = tmp_path / "cc3m.tsv"
    gcc.write_text("caption\turl\nfirst caption\thttp://x/a.jpg\nsecond caption\thttp://x/b.jpg\n"
                   "third caption\thttp://x/c.jpg\n")
    out = tmp_path / "out"
    assert convert_captions.main(["--captions", str(gcc), "--tsv", tsv, "--out", str(out)]) == 0
    got = read_mds(out)
    assert [(s["image_id"], s["captions"]) for s in got] == [
        ("0", ["first caption"]), ("1", ["second caption"]), ("2", ["third caption"])]
    for s in got:
        check_image_columns(s, imgs[int(s["image_id"])])
    assert read_meta(out)["skipped_total"] == 0
    # the same file saved with a UTF-8 BOM (spreadsheet tools write one): still a header
    gcc.write_bytes(b"\xef\xbb\xbf" + gcc.read_bytes())
    assert convert_captions.main(["--captions", str(gcc), "--tsv", tsv, "--out", str(tmp_path / "bom")]) == 0
    assert [(s["image_id"], s["captions"]) for s in read_mds(tmp_path / "bom")] == \
        [(s["image_id"], s["captions"]) for s in got]


def test_coco_file_stem_ids_match_integer_ids(tmp_path, capsys):
    """LXMERT keys COCO images by file stem (COCO_train2014_000000000009), as do npz files named
    by image file; VQA / COCO captions key them by the integer id 9. Both sides meet."""
    rng = np.random.default_rng(9)
    imgs = {i: make_image(rng, 3, 8) for i in (9, 25)}
    head = "img_id\timg_h\timg_w\tnum_boxes\tboxes\tfeatures"
    tsv = write_tsv(tmp_path / "lx.tsv", [head] + [
        "\t".join([f"COCO_train2014_{i:012d}", str(img["h"]), str(img["w"]), "3", b64(img["boxes"]),
                   b64(img["features"])]) for i, img in imgs.items()])
    qs = write_json(tmp_path / "q.json", {"questions": [{"question_id": 90, "image_id": 9, "question": "what?"},
                                                        {"question_id": 250, "image_id": 25, "question": "who?"}]})
    an = write_json(tmp_path / "a.json", {"annotations": [_ann(90, 9, ["cat"] * 10, "cat"),
                                                          _ann(250, 25, ["dog"] * 10, "dog")]})
    out = tmp_path / "vqa"
    assert convert_vqa.main(["--questions", qs, "--annotations", an, "--tsv", tsv, "--out", str(out)]) == 0
    samples = read_mds(out)
    assert [(s["image_id"], int(s["question_id"])) for s in samples] == [("9", 90), ("25", 250)]
    for s in samples:
        check_image_columns(s, imgs[int(s["image_id"])])

    npz = tmp_path / "npz"
    npz.mkdir()
    img = make_image(rng, 4, 8, w=500, h=400)
    np.savez(npz / "COCO_val2014_000000000042.npz", features=img["features"], boxes=img["boxes"])
    coco = write_json(tmp_path / "captions_val2014.json", {
        "images": [{"id": 42, "width": 500, "height": 400}],
        "annotations": [{"id": 1, "image_id": 42, "caption": "a kite"}]})
    out = tmp_path / "caps"
    assert convert_captions.main(["--captions", coco, "--npz-dir", str(npz), "--out", str(out)]) == 0
    (s,) = read_mds(out)
    assert s["image_id"] == "42" and s["sample_id"] == 42 and s["captions"] == ["a kite"]
    check_image_columns(s, img)
    # Two files for one image: which to use cannot be told.
    np.savez(npz / "42.npz", features=img["features"], boxes=img["boxes"])
    assert convert_captions.main(["--captions", coco, "--npz-dir", str(npz), "--out", str(tmp_path / "c2")]) == 2
    assert "42.npz and COCO_val2014_000000000042.npz are both image 42" in capsys.readouterr().err


def test_milvlg_npz_layout(tmp_path):
    """bottom-up-attention.pytorch (MILVLG) writes x, bbox, num_bbox, image_h, image_w and a pickled
    `info` dict: read without the pickle (never unpickled), the rest converts."""
    rng = np.random.default_rng(10)
    imgs = {i: make_image(rng, n, 8, w=300 + i, h=200 + i, classes=4) for i, n in ((1, 3), (2, 5))}
    npz = tmp_path / "npz"
    npz.mkdir()
    for i, img in imgs.items():
        info = {"objects_id": img["objects_id"], "objects_conf": img["objects_conf"], "cls_prob": img["cls_prob"]}
        np.savez_compressed(npz / f"{i}.npz", x=img["features"], bbox=img["boxes"], num_bbox=len(img["boxes"]),
                            image_h=img["h"], image_w=img["w"], info=info)
    with np.load(npz / "1.npz", allow_pickle=False) as z, pytest.raises(ValueError, match="allow_pickle"):
        z["info"]                                  # the file does hold an object array
    kp = write_json(tmp_path / "k.json", karpathy([(i, "train", [f"c{i}"]) for i in imgs]))
    out = tmp_path / "out"
    assert convert_captions.main(["--captions", kp, "--npz-dir", str(npz), "--out", str(out)]) == 0
    samples = read_mds(out)
    assert [s["image_id"] for s in samples] == ["1", "2"]
    for s in samples:
        check_image_columns(s, imgs[int(s["image_id"])])
        assert "cls_prob" not in s and "obj_labels" not in s       # only inside the pickled info


def test_npz_dir_of_another_format_says_which(tmp_path, capsys):
    """A folder of VLP's per-image .npy files or VL-BERT's JSON files (formats --npz-dir does not
    read) fails up front saying what it holds and what to write, not "1.npz does not exist"."""
    kp = write_json(tmp_path / "k.json", karpathy([(i, "train", [f"c{i}"]) for i in (1, 2)]))
    feats = tmp_path / "feats"
    feats.mkdir()
    for i in (1, 2):
        np.save(feats / f"{i}.npy", np.zeros((3, 8), np.float32))
        np.save(feats / f"{i}_cls_prob.npy", np.zeros((3, 5), np.float32))
    (feats / "3.json").write_text("{}")
    assert convert_captions.main(["--captions", kp, "--npz-dir", str(feats), "--skip-bad",
                                  "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"--npz-dir {feats} holds no .npz file; it has 4 .npy (VLP's" in err
    assert "1 .json (VL-BERT's" in err and "one <image_id>.npz per image with arrays features" in err


# ---------------------------------------------------------------- VQA

def _ann(qid, iid, answers, mc, answer_type="other"):
    """An official-format annotation; ``answer_type=None`` leaves the field out."""
    ann = {"question_id": qid, "image_id": iid, "multiple_choice_answer": mc,
           "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": k + 1} for k, a in enumerate(answers)]}
    return ann if answer_type is None else {**ann, "answer_type": answer_type}


def test_convert_vqa_scores_vocab_and_splits(tmp_path):
    rng = np.random.default_rng(2)
    imgs = {i: make_image(rng, 4, 12) for i in (1, 2, 3)}
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(i, img) for i, img in imgs.items()])
    qa = [  # (qid, image, question, 10 answers, multiple_choice_answer)
        (10, 1, "How many dogs?", ["Two", "2", "two"] + ["3"] * 7, "3"),
        (11, 1, "What animal is it?", ["a dog.", "dog"] + ["cat"] * 8, "cat"),
        (12, 2, "Is it sunny?", ["yes"] + ["no"] * 9, "no"),
        (13, 2, "What animal?", ["cat"] * 10, "cat"),
        (14, 3, "How many?", ["two"] * 10, "Two"),
        (15, 3, "Color?", ["blue"] * 5 + ["Red"] * 5, "blue"),
        (16, 3, "What is it?", ["cat"], "cat"),            # not VQA's 10 answers: warned, no target
    ]
    answer_types = {10: "number", 11: "other", 12: "yes/no", 13: "other", 14: "number", 16: "other"}  # 15: none
    qs = write_json(tmp_path / "q.json", {"questions": [{"question_id": q, "image_id": i, "question": t}
                                                        for q, i, t, _, _ in qa]})
    an = write_json(tmp_path / "a.json", {"annotations": [_ann(q, i, a, mc, answer_types.get(q))
                                                          for q, i, _, a, mc in qa]})
    out = tmp_path / "train"
    r = run_tool("convert_vqa", "--questions", qs, "--annotations", an, "--tsv", tsv,
                 "--num-answers", "3", "--out", out)
    assert r.returncode == 0, r.stderr
    assert "1 question(s) have other than 10 annotator answers (e.g. question_id 16 has 1)" in r.stderr
    # multiple_choice_answer counts after normalisation: cat 3, 3 1, no 1, 2 1 ("Two"), blue 1;
    # top-3 by frequency, ties alphabetical: cat, then "2" < "3".
    with open(out / schema.ANSWER_VOCAB_FILE) as f:
        vocab = json.load(f)
    assert vocab == ["cat", "2", "3"]
    samples = {int(s["question_id"]): s for s in read_mds(out)}
    assert sorted(samples) == [10, 11, 12, 13, 14, 15, 16]

    def targets(q):
        s = samples[q]
        return {vocab[i]: float(v) for i, v in zip(s["target_ids"], s["target_scores"]) if v > 0}

    # Hand-computed official VQA accuracies (mean over 10 leave-one-out subsets of min(1, m/3)):
    # 3 annotators say 2 ("Two", "2", "two"): (3*2/3 + 7*1)/10 = 0.9; 7 say 3 -> 1.0.
    assert targets(10) == pytest.approx({"2": 0.9, "3": 1.0})
    # "a dog." and "dog" both normalise to "dog" (2 matches): (2*1/3 + 8*2/3)/10 = 0.6, but "dog" is
    # not in the top-3 vocabulary so only cat (8 matches) -> 1.0 remains.
    assert targets(11) == pytest.approx({"cat": 1.0})
    assert targets(13) == {"cat": 1.0} and targets(16) == {}     # one answer: leave-one-out leaves none
    assert targets(14) == {"2": 1.0}                         # "two" x10 -> "2"
    # yes (1 match -> 9*(1/3)/10 = 0.3) and no are out of vocabulary: placeholder (0, 0.0).
    assert samples[12]["target_ids"].tolist() == [0] and samples[12]["target_scores"].tolist() == [0.0]
    assert samples[10]["answers"] == ["Two", "2", "two"] + ["3"] * 7
    assert samples[11]["question"] == "What animal is it?"
    # the official answer type, kept for per-type accuracies; "" for an annotation without one
    assert {q: s["answer_type"] for q, s in samples.items()} == {**answer_types, 15: ""}
    for s in samples.values():
        check_image_columns(s, imgs[int(s["image_id"])])
        assert s["sample_id"] == s["question_id"]
    meta = read_meta(out)
    assert meta["kind"] == "vqa" and meta["answer_vocab_size"] == 3 and "answer_type" in meta["optional_columns"]
    assert meta["questions_without_target"] == 3             # 12 and 15 (blue/red not in vocab), 16

    # The full vocabulary (default K) reproduces the 0.6 / 0.3 scores of the hand example.
    full = tmp_path / "full"
    assert convert_vqa.main(["--questions", qs, "--annotations", an, "--tsv", tsv, "--out", str(full),
                             "--vocab-count", "all"]) == 0
    with open(full / schema.ANSWER_VOCAB_FILE) as f:
        vocab_all = json.load(f)
    # all-answers counts: 3: 7, 2: 13 (3 + 10), cat 19, no 9, dog 2, yes 1, blue 5, red 5
    assert vocab_all == ["cat", "2", "no", "3", "blue", "red", "dog", "yes"]
    by_q = {int(s["question_id"]): s for s in read_mds(full)}
    sc = {vocab_all[i]: float(v) for i, v in zip(by_q[11]["target_ids"], by_q[11]["target_scores"])}
    assert sc == pytest.approx({"dog": 0.6, "cat": 1.0})
    sc = {vocab_all[i]: float(v) for i, v in zip(by_q[12]["target_ids"], by_q[12]["target_scores"])}
    assert sc == pytest.approx({"yes": 0.3, "no": 1.0})
    assert list(by_q[11]["target_ids"]) == sorted(by_q[11]["target_ids"])

    # A test split: questions only, ids from train's vocabulary file.
    test_q = write_json(tmp_path / "tq.json", {"questions": [{"question_id": 99, "image_id": 2,
                                                               "question": "What is it?"}]})
    test_out = tmp_path / "test"
    assert convert_vqa.main(["--questions", test_q, "--tsv", tsv, "--answer-vocab",
                             str(out / schema.ANSWER_VOCAB_FILE), "--out", str(test_out)]) == 0
    (t,) = read_mds(test_out)
    assert t["answers"] == [] and t["target_ids"].tolist() == [0] and t["target_scores"].tolist() == [0.0]
    assert t["answer_type"] == ""                            # no annotations: no type
    with open(test_out / schema.ANSWER_VOCAB_FILE) as f:
        assert json.load(f) == vocab
    assert read_meta(test_out)["has_answers"] is False


def _vqa_inputs(tmp_path, mcs: list[str]) -> tuple[str, str, str]:
    """(questions, annotations, TSV): one question per multiple_choice_answer, all on image 1."""
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(1, _good(np.random.default_rng(11)))])
    qs = write_json(tmp_path / "q.json", {"questions": [{"question_id": k, "image_id": 1, "question": "q?"}
                                                        for k in range(len(mcs))]})
    an = write_json(tmp_path / "a.json", {"annotations": [_ann(k, 1, [mc] * 10, mc) for k, mc in enumerate(mcs)]})
    return qs, an, tsv


def _vocab_of(tmp_path, name: str, *args: str) -> list[str]:
    out = tmp_path / name
    assert convert_vqa.main([*args, "--out", str(out)]) == 0
    with open(out / schema.ANSWER_VOCAB_FILE) as f:
        return json.load(f)


def test_vqa_vocab_min_count_over_several_files(tmp_path):
    """The standard recipe: multiple_choice_answers counted over train+val, kept at >= N."""
    qs, train, tsv = _vqa_inputs(tmp_path, ["yes", "yes", "Yes.", "No", "no", "two", "cat"])
    val = write_json(tmp_path / "val.json", {"annotations": [
        _ann(100 + k, 5, [mc] * 10, mc) for k, mc in enumerate(["no", "2", "cat", "dog", "a dog"])]})
    base = ["--questions", qs, "--annotations", train, "--tsv", tsv]
    both = ["--vocab-annotations", train, "--vocab-annotations", val]
    # counts after normalisation: yes 3, no 3, 2 2 ("two", "2"), cat 2, dog 2, ties alphabetical
    assert _vocab_of(tmp_path, "v2", *base, *both, "--min-answer-count", "2") == ["no", "yes", "2", "cat", "dog"]
    assert _vocab_of(tmp_path, "v3", *base, *both, "--min-answer-count", "3") == ["no", "yes"]
    assert _vocab_of(tmp_path, "v2cap", *base, *both, "--min-answer-count", "2", "--num-answers", "4") == \
        ["no", "yes", "2", "cat"]
    # default: counted in --annotations only (train: yes 3, no 2, 2 1, cat 1)
    assert _vocab_of(tmp_path, "train", *base, "--min-answer-count", "2") == ["yes", "no"]
    meta = read_meta(tmp_path / "v2")["answer_vocab_source"]
    assert meta == {"built_from": ["a.json", "val.json"], "count": "mc", "num_answers": None,
                    "min_answer_count": 2}


def test_vqa_answer_vocab_files_and_bad_ids(tmp_path, capsys):
    qs, an, tsv = _vqa_inputs(tmp_path, ["yes", "no", "2"])
    base = ["--questions", qs, "--annotations", an, "--tsv", tsv]
    txt = tmp_path / "answers_vqa.txt"                  # VL-BERT's: one answer per line
    txt.write_text("no\n\nyes\n  2  \n")
    assert _vocab_of(tmp_path, "txt", *base, "--answer-vocab", str(txt)) == ["no", "yes", "2"]
    assert "warning" not in capsys.readouterr().err
    # entries the normalised annotator answers can never equal: kept (class ids stay), but named
    odd = tmp_path / "odd.txt"
    odd.write_text("yes\nt-shirt\n<unk>\ntwo\n")
    assert _vocab_of(tmp_path, "odd", *base, "--answer-vocab", str(odd)) == ["yes", "t-shirt", "<unk>", "two"]
    err = capsys.readouterr().err
    assert "warning: 3 of the 4 answers in --answer-vocab" in err and "'t-shirt' (reads 't shirt')" in err, err
    assert "'two' (reads '2')" in err
    bad = {"missing.json": None, "dict.json": '{"yes": 0}', "broken.json": '["yes", ',
           "dup.txt": "yes\nno\n\nyes\n", "empty.txt": "\n\n"}
    expect = {"missing.json": "missing.json: cannot read it (FileNotFoundError",
              "dict.json": "dict.json: an answer vocabulary must be a JSON list of strings (index = class id), got dict",
              "broken.json": "broken.json: not valid JSON",
              "dup.txt": "dup.txt line 4: answer 'yes' is already at line 1",
              "empty.txt": "empty.txt: the answer vocabulary holds no answers"}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        assert convert_vqa.main([*base, "--answer-vocab", str(tmp_path / name), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert expect[name] in err, err
    # options that build a vocabulary would be ignored beside a given one: refused
    assert convert_vqa.main([*base, "--answer-vocab", str(txt), "--min-answer-count", "9",
                             "--out", str(tmp_path / "o")]) == 2
    assert "is used as it is: pass one or the other" in capsys.readouterr().err
    # an annotation whose question_id is not an integer: named, not a ValueError
    with open(an) as f:
        anns = json.load(f)
    anns["annotations"][1]["question_id"] = "q1"
    write_json(an, anns)
    assert convert_vqa.main([*base, "--out", str(tmp_path / "o")]) == 2
    assert "a.json annotation 1: question_id 'q1'; every annotation needs the integer question_id" in \
        capsys.readouterr().err


# ---------------------------------------------------------------- text

def test_convert_text(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("The first document.\nIt has two lines.\n\n\n  \nSecond doc: one line.  \n\n"
                      "w1 w2 w3 w4 w5 w6 w7\n", encoding="utf-8")
    out = tmp_path / "docs"
    r = run_tool("convert_text", "--input", corpus, "--out", out)
    assert r.returncode == 0, r.stderr
    texts = [s["text"] for s in read_mds(out)]
    assert texts == ["The first document.\nIt has two lines.", "Second doc: one line.", "w1 w2 w3 w4 w5 w6 w7"]
    assert read_meta(out)["kind"] == "text" and read_meta(out)["num_documents"] == 3
    chunks = tmp_path / "chunks"
    assert convert_text.main(["--input", str(corpus), "--max-words", "3", "--out", str(chunks)]) == 0
    samples = read_mds(chunks)
    assert [s["text"] for s in samples] == ["The first document.", "It has two", "lines.", "Second doc: one",
                                            "line.", "w1 w2 w3", "w4 w5 w6", "w7"]
    assert [int(s["sample_id"]) for s in samples] == list(range(8))


def test_text_shards_are_small_by_default(tmp_path):
    """A text corpus is written in ~1 MB shards (not the 64 MB of the image datasets, ~250k short
    samples each): streaming shuffles whole shards within 262,144-sample blocks, so a mix with
    captions came in long runs of one kind."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(f"document {i} says something about a picture of a dog on a sofa\n\n"
                              for i in range(40000)), encoding="utf-8")       # ~2.6 MB of text
    assert convert_text.main(["--input", str(corpus), "--out", str(tmp_path / "t")]) == 0
    shards = json.load(open(tmp_path / "t" / "index.json"))["shards"]
    assert len(shards) >= 3 and all(s["raw_data"]["bytes"] <= 1 << 20 for s in shards), len(shards)


# ---------------------------------------------------------------- synthetic corpus

SYN_ARGS = ["--images-pretrain", "12", "--images-train", "16", "--images-val", "6", "--images-test", "6",
            "--text-docs", "8"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("syn") / "a"
    assert make_synthetic.main([*SYN_ARGS, "--seed", "5", "--out", str(out)]) == 0
    return out


def _files(root) -> dict[str, bytes]:
    out = {}
    for d, _, names in os.walk(root):
        for n in names:
            p = os.path.join(d, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


def test_make_synthetic_deterministic_and_disjoint(synthetic, tmp_path):
    again = tmp_path / "b"
    assert make_synthetic.main([*SYN_ARGS, "--seed", "5", "--out", str(again)]) == 0
    a, b = _files(synthetic), _files(again)
    assert sorted(a) == sorted(b) and all(a[k] == b[k] for k in a)          # byte-identical
    other = tmp_path / "c"
    assert make_synthetic.main([*SYN_ARGS, "--seed", "6", "--out", str(other)]) == 0
    shard = os.path.join("captions", "train", "shard.00000.mds.zstd")
    assert _files(other)[shard] != a[shard]

    layout = {f"{k}/{s}" for k in ("captions", "vqa", "refs", "mc") for s in make_synthetic.SPLITS} | {"text/train"}
    for ds in layout:
        assert (synthetic / ds / "index.json").exists() and (synthetic / ds / schema.META_FILE).exists()
    ids, feats = {}, {}
    for split in make_synthetic.SPLITS:
        caps = read_mds(synthetic / "captions" / split)
        ids[split] = {s["image_id"] for s in caps}
        feats[split] = {s["image_feature"].tobytes() for s in caps}
        assert len(ids[split]) == len(caps) == int(SYN_ARGS[SYN_ARGS.index(f"--images-{split}") + 1])
        for kind in ("vqa", "refs", "mc"):
            samples = read_mds(synthetic / kind / split)
            assert {s["image_id"] for s in samples} <= ids[split]
            assert len({int(s["sample_id"]) for s in samples}) == len(samples)
    for i, s1 in enumerate(make_synthetic.SPLITS):
        for s2 in make_synthetic.SPLITS[i + 1:]:
            assert not ids[s1] & ids[s2] and not feats[s1] & feats[s2], (s1, s2)
    with open(synthetic / "synthetic_corpus.json") as f:
        info = json.load(f)
    assert info["datasets"]["captions/train"] == 16 and info["num_classes"] == 17


def test_make_synthetic_content(synthetic):
    from vltrain.metrics.vqa import answer_scores, normalize_answer
    meta = read_meta(synthetic / "vqa/train")
    assert meta["num_classes"] == 17 and meta["feature_dim"] == 64 and meta["has_cls_prob"]
    with open(synthetic / "vqa/train" / schema.ANSWER_VOCAB_FILE) as f:
        vocab = json.load(f)
    caps = read_mds(synthetic / "captions/train")
    for s in caps:
        n = s["features"].shape[0]
        assert 3 <= n <= 6 and s["features"].shape[1] == 64 and s["features"].dtype == np.float16
        assert s["cls_prob"].shape == (n, 17) and s["obj_labels"].shape == (n,)
        assert ((s["boxes"] >= 0) & (s["boxes"] <= 1)).all()
        assert (s["boxes"][:, 2] > s["boxes"][:, 0]).all() and (s["boxes"][:, 3] > s["boxes"][:, 1]).all()
        assert s["image_feature"].shape == (64,) and len(s["captions"]) == 5
    for s in read_mds(synthetic / "vqa/train"):
        assert len(s["answers"]) == 10
        want = {vocab.index(a): v for a, v in answer_scores(s["answers"]).items()}
        assert dict(zip(s["target_ids"].tolist(), s["target_scores"].tolist())) == pytest.approx(want)
        assert s["question"].endswith("?")
        normed = {normalize_answer(a) for a in s["answers"]}        # the official answer type
        assert s["answer_type"] == ("yes/no" if normed <= {"yes", "no"} else
                                    "number" if all(a.isdigit() for a in normed) else "other"), s
    for s in read_mds(synthetic / "refs/train"):
        b, t = s["boxes"][s["target_region"]], s["target_box"]
        inter = max(0, min(b[2], t[2]) - max(b[0], t[0])) * max(0, min(b[3], t[3]) - max(b[1], t[1]))
        union = (b[2] - b[0]) * (b[3] - b[1]) + (t[2] - t[0]) * (t[3] - t[1]) - inter
        assert inter / union > 0.5 and s["expression"].startswith("the ")
    for s in read_mds(synthetic / "mc/train"):
        assert len(s["choices"]) == 4 == len(set(s["choices"])) and 0 <= s["label"] < 4
    texts = read_mds(synthetic / "text/train")
    assert len(texts) == 8 and all(t["text"] for t in texts)

    # Features come from the pixels: a nearest-centroid classifier on region features, fit on the
    # pretrain split, predicts the detector's class (background included) of val regions far
    # above chance (17 classes). obj_labels is bottom-up's objects_id: argmax after background.
    def xy(split):
        ss = read_mds(synthetic / "captions" / split)
        for s in ss:
            np.testing.assert_array_equal(s["obj_labels"], s["cls_prob"][:, 1:].argmax(1))
        return (np.concatenate([s["features"].astype(np.float32) for s in ss]),
                np.concatenate([s["cls_prob"].argmax(1) for s in ss]))
    x, y = xy("pretrain")
    x = np.concatenate([x, xy("train")[0]])
    y = np.concatenate([y, xy("train")[1]])
    xv, yv = xy("val")
    cents = {c: x[y == c].mean(0) for c in np.unique(y)}
    cls = np.array(list(cents))
    pred = cls[np.argmin([[np.sum((v - cents[c]) ** 2) for c in cls] for v in xv], 1)]
    assert (pred == yv).mean() > 0.5, (pred == yv).mean()


def test_synthetic_to_s3_and_inspect(s3_bucket, tmp_path, capsys):
    """make_synthetic writes straight to s3:// (subprocess); streaming and inspect.py read it back."""
    import boto3
    from tests.fixtures.s3 import S3_SECRET_SENTINEL
    url = f"s3://{s3_bucket}/corpus"
    r = run_tool("make_synthetic", "--images-pretrain", "0", "--images-train", "8", "--images-val", "4",
                 "--images-test", "0", "--text-docs", "3", "--seed", "1", "--out", url)
    assert r.returncode == 0, r.stderr
    samples = read_mds(tmp_path / "cache", remote=f"{url}/vqa/train")
    assert len(samples) == 8 * 4 and all(len(s["answers"]) == 10 for s in samples)
    captions = read_mds(tmp_path / "cache2", remote=f"{url}/captions/val")
    assert len(captions) == 4
    from vltrain.tasks.scst import read_caption_references     # uploaded beside the shards
    assert read_caption_references(f"{url}/captions/val") == {s["image_id"]: list(s["captions"]) for s in captions}

    s3 = boto3.client("s3", endpoint_url=os.environ["S3_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket)["Contents"]]
    assert f"corpus/vqa/train/{schema.META_FILE}" in keys and f"corpus/vqa/train/{schema.ANSWER_VOCAB_FILE}" in keys
    assert "corpus/synthetic_corpus.json" in keys
    for k in keys:                                  # no credential anywhere in what was written
        if not k.endswith(".zstd"):
            body = s3.get_object(Bucket=s3_bucket, Key=k)["Body"].read().decode()
            assert S3_SECRET_SENTINEL not in body and os.environ["AWS_ACCESS_KEY_ID"] not in body, k
    meta = json.loads(s3.get_object(Bucket=s3_bucket, Key=f"corpus/vqa/train/{schema.META_FILE}")["Body"].read())
    assert meta["kind"] == "vqa" and meta["num_samples"] == 32

    # An existing s3 dataset is not overwritten by accident; --overwrite replaces it.
    corpus = tmp_path / "c.txt"
    corpus.write_text("one doc\n\nanother doc\n")
    assert convert_text.main(["--input", str(corpus), "--out", f"{url}/vqa/train"]) == 2
    assert "already holds a dataset" in capsys.readouterr().err
    assert convert_text.main(["--input", str(corpus), "--out", f"{url}/text/new"]) == 0
    assert [x["text"] for x in read_mds(tmp_path / "cache3", remote=f"{url}/text/new")] == ["one doc", "another doc"]
    # An --overwrite cut short leaves no index: not the old one over a mix of old and new shards.
    from data_tools.common import open_writer, remote_has_index
    with pytest.raises(RuntimeError, match="cut short"):
        with open_writer(f"{url}/text/new", "text", (), schema.make_meta("text", None, None, ()),
                         overwrite=True):
            raise RuntimeError("cut short")
    assert not remote_has_index(f"{url}/text/new")

    r = run_tool("inspect", f"{url}/vqa/train", "--sample", "3")
    assert r.returncode == 0, r.stderr
    assert "samples: 32 in 1 shard(s)" in r.stdout and "kind: vqa" in r.stdout
    assert "features: dim 64, dtype float16" in r.stdout and "images: 8" in r.stdout
    assert "question length (words):" in r.stdout and "regions per image:" in r.stdout
    assert "sample 3:" in r.stdout and "features: ndarray shape (" in r.stdout
    assert S3_SECRET_SENTINEL not in r.stdout + r.stderr


@pytest.mark.parametrize("delay,docs", [(1.0, 12), (0.0, 200)], ids=["after_writing", "while_writing"])
def test_a_failed_shard_upload_leaves_no_index(s3_bucket, tmp_path, monkeypatch, capsys, delay, docs):
    """Every shard upload but the first fails (a dropped connection), after a second (noticed
    once the samples are written, on a quiet machine) or at once (noticed while they are still
    being written): the converter fails, saying so, and the prefix has no index.json.
    streaming's own writer uploaded the index as soon as the last shard's upload had started,
    so the index named shards never written."""
    import time
    from streaming.base.storage.upload import S3Uploader
    from data_tools.common import remote_has_index
    real = S3Uploader.upload_file

    def flaky(self, filename):
        if filename.startswith("shard.") and not filename.startswith("shard.00000."):
            time.sleep(delay)
            raise ConnectionResetError(f"upload of {filename} cut")
        return real(self, filename)
    monkeypatch.setattr(S3Uploader, "upload_file", flaky)
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(f"document number {i} " + "word " * 40 for i in range(docs)) + "\n")
    url = f"s3://{s3_bucket}/flaky"
    assert convert_text.main(["--input", str(corpus), "--out", url, "--size-limit", "600"]) == 1
    assert not remote_has_index(url)
    assert "index.json not written" in capsys.readouterr().err      # the traceback, on stderr
    monkeypatch.setattr(S3Uploader, "upload_file", real)         # the same run, uploads working
    assert convert_text.main(["--input", str(corpus), "--out", url, "--size-limit", "600"]) == 0
    assert remote_has_index(url) and len(read_mds(tmp_path / "cache", remote=url)) == docs


def test_a_missing_bucket_is_an_error_not_a_traceback(s3_endpoint, tmp_path, capsys):
    from tests.fixtures.s3 import S3_SECRET_SENTINEL
    corpus = tmp_path / "c.txt"
    corpus.write_text("a document\n")
    assert convert_text.main(["--input", str(corpus), "--out", "s3://vlt-no-such-bucket/x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the object store answered ClientError") and "HeadBucket" in err
    assert "(--out s3://vlt-no-such-bucket/x: does the bucket exist" in err, err
    assert "Traceback" not in err and S3_SECRET_SENTINEL not in err
    with pytest.MonkeyPatch.context() as mp:       # inspect started without the keys: says which are missing
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
            mp.delenv(key, raising=False)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        mp.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        assert dt_inspect.main(["s3://vlt-no-such-bucket/x"]) == 2
    err = capsys.readouterr().err
    assert "NoCredentialsError" in err and "export AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in err, err


def test_inspect_local_counts(synthetic, capsys):
    assert dt_inspect.main([str(synthetic / "captions/train")]) == 0
    out = capsys.readouterr().out
    assert "samples: 16 in 1 shard(s)" in out and "captions length (words):" in out
    rep = dt_inspect.inspect_dataset(str(synthetic / "captions/train"), sample_index=2)
    caps = read_mds(synthetic / "captions/train")
    assert sum(rep["text_length_hist"].values()) == 16 * 5
    assert rep["regions_hist"] == dict(Counter(s["features"].shape[0] for s in caps))
    assert rep["sample"]["image_id"] == repr(caps[2]["image_id"]) and rep["feature_dim"] == 64
    rep = dt_inspect.inspect_dataset(str(synthetic / "text/train"))
    assert rep["num_samples"] == 8 and rep["kind"] == "text" and "feature_dim" not in rep
    # the corpus root (the tour's data/synthetic): the datasets below it are listed
    assert dt_inspect.main([str(synthetic)]) == 2
    err = capsys.readouterr().err
    assert f"{synthetic}/index.json does not exist; datasets below {synthetic}: captions/pretrain, " in err, err


def test_inspect_corrupt_and_truncated_shard(synthetic, tmp_path, capsys):
    import shutil
    for how in ("flip", "truncate", "missing"):
        ds = tmp_path / how
        shutil.copytree(synthetic / "refs/val", ds)
        shard = ds / "shard.00000.mds.zstd"
        data = bytearray(shard.read_bytes())
        if how == "flip":
            data[len(data) // 2] ^= 0xFF
            shard.write_bytes(bytes(data))
        elif how == "truncate":
            shard.write_bytes(bytes(data[: len(data) // 2]))
        else:
            shard.unlink()
        assert dt_inspect.main([str(ds)]) == 2
        err = capsys.readouterr().err
        assert "shard.00000.mds.zstd" in err, err
        assert {"flip": "xxh64 mismatch", "truncate": "truncated", "missing": "does not exist"}[how] in err


# ---------------------------------------------------------------- bad input

def test_skip_missing_features_leaves_out_only_images_without_features(tmp_path, capsys):
    """Conceptual Captions: many URLs no longer download, so their lines get no features.
    Without a flag the whole TSV is read, then the tool stops naming how many are missing and
    the flag; --skip-missing-features drops and counts them (only them: a NaN still stops)."""
    rng = np.random.default_rng(8)
    imgs = {i: make_image(rng, 3, 8) for i in (0, 2, 4)}
    gcc = tmp_path / "Train_GCC-training.tsv"
    gcc.write_text("".join(f"caption {i}\thttp://x/{i}.jpg\n" for i in range(6)))
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(i, img) for i, img in imgs.items()])
    base = ["--captions", str(gcc), "--tsv", tsv]
    assert convert_captions.main([*base, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "image 1 has captions but no row in the feature TSV(s)" in err and "(nor have 2 more: 3, 5)" in err
    assert "--skip-missing-features" in err and not (tmp_path / "strict" / "index.json").exists()
    out = tmp_path / "out"
    assert convert_captions.main([*base, "--skip-missing-features", "--out", str(out)]) == 0
    assert [s["image_id"] for s in read_mds(out)] == ["0", "2", "4"]
    meta = read_meta(out)
    assert meta["skipped"] == {"no_features": 3} and meta["num_captions"] == 3
    bad = write_tsv(tmp_path / "bad.tsv", [tsv_row(0, imgs[0]), tsv_row(2, _nan(imgs[2]))])
    assert convert_captions.main(["--captions", str(gcc), "--tsv", bad, "--skip-missing-features",
                                  "--out", str(tmp_path / "nan")]) == 2
    assert "bad.tsv row 2 (image 2)" in capsys.readouterr().err


def test_every_kind_of_skip_is_named_and_every_skip_listed(tmp_path, capsys):
    """30 Conceptual Captions lines whose images did not download used up the 20 skip messages,
    so the NaN file after them was only counted: the messages are per kind now, and every skip
    is listed in the dataset's vltrain_skipped.json."""
    rng = np.random.default_rng(9)
    gcc = tmp_path / "cc.tsv"
    gcc.write_text("".join(f"caption {i}\thttp://x/{i}.jpg\n" for i in range(32)))
    npz = tmp_path / "npz"
    npz.mkdir()
    for i in (30, 31):
        img = make_image(rng, 3, 8) if i == 30 else _nan(make_image(rng, 3, 8))
        np.savez(npz / f"{i}.npz", features=img["features"], boxes=img["boxes"], image_w=640, image_h=480)
    out = tmp_path / "out"
    assert convert_captions.main(["--captions", str(gcc), "--npz-dir", str(npz), "--skip-bad", "--out", str(out)]) == 0
    o = capsys.readouterr()
    assert o.err.count("skipping: image ") == 20 and "further no_features messages suppressed" in o.err
    assert "31.npz (image 31): 'features' contains NaN values" in o.err
    meta = read_meta(out)
    assert meta["skipped"] == {"no_features": 30, "nonfinite": 1}
    assert (meta["input_unit"], meta["input_samples"], meta["samples_left_out"]) == ("images", 32, 31)
    with open(out / "vltrain_skipped.json") as f:
        listed = json.load(f)
    assert len(listed) == 31 and listed[-1]["reason"] == "nonfinite" and "31.npz" in listed[-1]["input"]
    assert "image 29 has captions but no features" in listed[29]["input"]


def test_karpathy_duplicates_name_both_entries_and_restval_is_mentioned(tmp_path, capsys):
    rng = np.random.default_rng(10)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(i, _good(rng)) for i in (1, 2)])
    kp = write_json(tmp_path / "k.json", karpathy([(1, "train", ["a"]), (2, "restval", ["b"]), (1, "train", ["c"])]))
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--split", "train",
                                  "--out", str(tmp_path / "o")]) == 2
    o = capsys.readouterr()
    assert "k.json image 2: image id 1 appears again (first as image 0)" in o.err, o.err
    # VLP trains on train + restval: a --split train without it says what it leaves out
    assert "also has 1 'restval' images, which --split train leaves out" in o.out and "--include-restval" in o.out


def _caption_inputs(tmp_path, rows: list[str], n_images: int = 3, **extra_caps) -> tuple[str, str]:
    images = [(i, "train", [f"caption {i}"]) for i in range(1, n_images + 1)]
    for i, caps in extra_caps.items():
        images.append((int(i[1:]), "train", caps))
    kp = write_json(tmp_path / "k.json", karpathy(images))
    return kp, write_tsv(tmp_path / "f.tsv", rows)


def _good(rng, dim=6):
    return make_image(rng, 3, dim)


def _nan(img):
    img = dict(img, features=img["features"].copy())
    img["features"][1, 2] = np.nan
    return img


def _inf(img):
    img = dict(img, features=img["features"].copy())
    img["features"][0, 0] = np.inf
    return img


def _case_rows(case: str, rng):
    """Rows of a 3-image TSV where image 2 is bad in the given way, and the expected message."""
    g1, g2, g3 = _good(rng), _good(rng), _good(rng)
    bad = {
        "nan": (tsv_row(2, _nan(g2)), "row 2 (image 2): 'features' contains NaN"),
        "inf": (tsv_row(2, _inf(g2)), "row 2 (image 2): 'features' contains inf"),
        "dim_first": (tsv_row(2, make_image(rng, 3, 7)), "row 2 (image 2): features have dimension 7, expected 6"),
        "num_boxes": (tsv_row(2, g2, num_boxes="4"), "row 2 (image 2): num_boxes=4 but 'boxes' holds 12 values"),
        "zero_regions": (tsv_row(2, g2, num_boxes="0", boxes="", features=""),
                         "row 2 (image 2): image has zero regions"),
        "corrupt_b64": (tsv_row(2, g2, features="AAAA*&^%" + b64(g2["features"])[8:]),
                        "row 2 (image 2): field 'features' is not valid base64"),
        "truncated_b64": (tsv_row(2, g2, features=b64(g2["features"])[:-7]),
                          "row 2 (image 2): field 'features' is not valid base64"),
        "truncated_row": (tsv_row(2, g2)[: len(tsv_row(2, g2)) // 2].rsplit("\t", 1)[0],
                          "row 2 (image 2): 5 fields, expected 6"),
    }[case]
    return [tsv_row(1, g1), bad[0], tsv_row(3, g3)], bad[1]


BAD_TSV_CASES = ["nan", "inf", "dim_first", "num_boxes", "zero_regions", "corrupt_b64", "truncated_b64",
                 "truncated_row"]


@pytest.mark.parametrize("case", BAD_TSV_CASES)
def test_bad_tsv_rows_fail_with_named_row(case, tmp_path, capsys):
    rows, msg = _case_rows(case, np.random.default_rng(3))
    kp, tsv = _caption_inputs(tmp_path, rows)
    out = tmp_path / "out"
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert msg in err and "f.tsv" in err, err
    assert not (out / "index.json").exists()                      # nothing that looks like a dataset


def test_objects_id_outside_the_non_background_classes_is_refused(tmp_path, capsys):
    """bottom-up's objects_id counts the classes after background: with C cls_prob columns, C-1
    (an id that includes background) is out of range, and so is a negative id; the row is named."""
    rng = np.random.default_rng(5)
    g1, g2 = make_image(rng, 3, 6, classes=5), make_image(rng, 3, 6, classes=5)
    g2 = dict(g2, objects_id=np.array([0, 4, 1], np.int64))
    kp, tsv = _caption_inputs(tmp_path, [tsv_row(1, g1, full=True), tsv_row(2, g2, full=True)], n_images=2)
    out = tmp_path / "out"
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--tsv-fields", TSV_FIELDS_FULL,
                                  "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "row 2 (image 2): objects_id 4 is beyond cls_prob's 4 non-background classes" in err, err
    g2 = dict(g2, objects_id=np.array([0, -1, 1], np.int64))
    kp, tsv = _caption_inputs(tmp_path, [tsv_row(1, g1, full=True), tsv_row(2, g2, full=True)], n_images=2)
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--tsv-fields", TSV_FIELDS_FULL,
                                  "--out", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert "row 2 (image 2): objects_id has negative labels (-1)" in err, err


def test_bad_captions_and_missing_features(tmp_path, capsys):
    rng = np.random.default_rng(4)
    g = [_good(rng) for _ in range(3)]
    # --feature-dim disagrees with the data
    kp, tsv = _caption_inputs(tmp_path, [tsv_row(i + 1, g[i]) for i in range(3)])
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--feature-dim", "5",
                                  "--out", str(tmp_path / "o1")]) == 2
    assert "row 1 (image 1): features have dimension 6, expected 5 (from --feature-dim)" in capsys.readouterr().err
    # an empty caption
    kp, tsv = _caption_inputs(tmp_path, [tsv_row(i + 1, g[i]) for i in range(3)], i4=["ok", "   "])
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--out", str(tmp_path / "o2")]) == 2
    assert "(COCO_train2014_000000000004.jpg, id 4) sentence 1: empty caption" in capsys.readouterr().err
    # a caption of characters BERT's tokenizer drops (mojibake): empty too
    kp, tsv = _caption_inputs(tmp_path, [tsv_row(i + 1, g[i]) for i in range(3)], i4=["ok", "\ufffd\ufffd\u200b"])
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--out", str(tmp_path / "o2b")]) == 2
    assert (r"sentence 1: empty caption (only characters BERT's tokenizer drops: '\ufffd\ufffd\u200b')"
            in capsys.readouterr().err)
    # a caption whose image has no features
    kp, tsv = _caption_inputs(tmp_path, [tsv_row(i + 1, g[i]) for i in range(3)], i8=["a lonely caption"])
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--out", str(tmp_path / "o3")]) == 2
    assert "image 8 has captions but no row in the feature TSV(s)" in capsys.readouterr().err
    assert not (tmp_path / "o3" / "index.json").exists()
    # npz: image without a file, file without 'features', corrupt file, zero regions
    npz = tmp_path / "npz"
    npz.mkdir()
    np.savez(npz / "1.npz", features=g[0]["features"], boxes=g[0]["boxes"], image_w=640, image_h=480)
    np.savez(npz / "2.npz", boxes=g[1]["boxes"], image_w=640, image_h=480)
    (npz / "3.npz").write_bytes(b"PK\x03\x04 definitely not a zip")
    np.savez(npz / "4.npz", features=np.zeros((0, 6), np.float32), boxes=np.zeros((0, 4), np.float32),
             image_w=640, image_h=480)
    kp = write_json(tmp_path / "k2.json", karpathy([(i, "train", [f"c{i}"]) for i in (1, 2, 3, 4, 5)]))
    assert convert_captions.main(["--captions", kp, "--npz-dir", str(npz), "--out", str(tmp_path / "o4")]) == 2
    assert "2.npz (image 2): missing array 'features'" in capsys.readouterr().err
    out = tmp_path / "o5"
    assert convert_captions.main(["--captions", kp, "--npz-dir", str(npz), "--skip-bad", "--out", str(out)]) == 0
    o = capsys.readouterr()
    assert "3.npz (image 3): cannot read npz" in o.err and "4.npz (image 4): image has zero regions" in o.err
    assert "5.npz does not exist" in o.err
    assert "skipped 4 bad input(s) (corrupt_file: 1, missing_column: 1, no_features: 1, zero_regions: 1;" in o.out
    assert [s["image_id"] for s in read_mds(out)] == ["1"]


def test_coco_captions_image_without_id(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(1, _good(np.random.default_rng(12)))])
    coco = write_json(tmp_path / "captions_train2014.json", {
        "images": [{"id": 1, "width": 640, "height": 480}, {"file_name": "x.jpg", "width": 640, "height": 480}],
        "annotations": [{"id": 1, "image_id": 1, "caption": "a cat"}]})
    assert convert_captions.main(["--captions", coco, "--tsv", tsv, "--out", str(tmp_path / "o")]) == 2
    assert "captions_train2014.json images[1]: no 'id'" in capsys.readouterr().err


def test_skip_bad_counts_every_case(tmp_path, capsys):
    """All bad TSV rows in one file + an empty caption + a caption without features, --skip-bad."""
    rng = np.random.default_rng(5)
    rows, n = [], 0
    for case in BAD_TSV_CASES:
        case_rows, _ = _case_rows(case, rng)
        bad = case_rows[1].split("\t", 1)
        rows.append(f"{100 + n}\t{bad[1]}" if len(bad) > 1 else f"{100 + n}")
        n += 1
    good = [_good(rng) for _ in range(2)]
    rows = [tsv_row(1, good[0])] + rows + [tsv_row(2, good[1])]
    images = [(1, "train", ["one", ""]), (2, "train", ["two"])] + \
             [(100 + k, "train", [f"bad {k}"]) for k in range(n)] + [(500, "train", ["no features"])]
    kp = write_json(tmp_path / "k.json", karpathy(images))
    tsv = write_tsv(tmp_path / "f.tsv", rows)
    out = tmp_path / "out"
    assert convert_captions.main(["--captions", kp, "--tsv", tsv, "--skip-bad", "--out", str(out)]) == 0
    o = capsys.readouterr()
    expect = {"corrupt_base64": 2, "empty_caption": 1, "malformed_row": 1, "no_features": 1,
              "nonfinite": 2, "num_boxes_mismatch": 1, "wrong_feature_dim": 1, "zero_regions": 1}
    assert f"skipped {sum(expect.values())} bad input(s)" in o.out
    assert "skipping: " in o.err and "image 500 has captions but no row" in o.err
    assert "f.tsv row 5 (image 103): num_boxes=4" in o.err
    samples = read_mds(out)
    assert [s["image_id"] for s in samples] == ["1", "2"] and samples[0]["captions"] == ["one"]
    meta = read_meta(out)
    assert meta["skipped"] == expect and meta["skipped_total"] == sum(expect.values())
    assert meta["num_captions"] == 2          # of the images written, not of the skipped ones
    # without --skip-bad the same input stops at the first problem: a real process exits non-zero
    r = run_tool("convert_captions", "--captions", kp, "--tsv", tsv, "--out", tmp_path / "strict")
    assert r.returncode != 0 and "error: " in r.stderr and "empty caption" in r.stderr
    assert not (tmp_path / "strict" / "index.json").exists()


def test_bad_vqa_and_text_inputs(tmp_path, capsys):
    rng = np.random.default_rng(6)
    g = _good(rng)
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(1, g)])
    qs = write_json(tmp_path / "q.json", {"questions": [
        {"question_id": 1, "image_id": 1, "question": "what?"},
        {"question_id": 2, "image_id": 1, "question": "  "},
        {"question_id": 3, "image_id": 7, "question": "where?"},
        {"question_id": 4, "image_id": 7, "question": "who?"}]})
    an = write_json(tmp_path / "a.json", {"annotations": [_ann(q, i, ["x"] * 10, "x")
                                                          for q, i in ((1, 1), (2, 1), (3, 7), (4, 7))]})
    assert convert_vqa.main(["--questions", qs, "--annotations", an, "--tsv", tsv, "--out", str(tmp_path / "v")]) == 2
    assert "question 1 (question_id 2, image 1): empty question" in capsys.readouterr().err
    out = tmp_path / "v2"
    assert convert_vqa.main(["--questions", qs, "--annotations", an, "--tsv", tsv, "--skip-bad",
                             "--out", str(out)]) == 0
    o = capsys.readouterr()
    assert "image 7 has questions but no row in the feature TSV(s)" in o.err
    meta = read_meta(out)
    assert meta["skipped"] == {"empty_question": 1, "no_features": 1}
    # the image without features held two questions: 3 of the 4 the scorer counts are missing
    assert (meta["input_unit"], meta["input_samples"], meta["samples_left_out"]) == ("questions", 4, 3)
    assert "left out 3 of the input's 4 questions (75.0%)" in o.out
    with open(out / "vltrain_skipped.json") as f:
        listed = json.load(f)
    assert [e["reason"] for e in listed] == ["empty_question", "no_features"] and "question_id 2" in listed[0]["input"]
    # test questions need a vocabulary from somewhere
    assert convert_vqa.main(["--questions", qs, "--tsv", tsv, "--out", str(tmp_path / "v3")]) == 2
    assert "--answer-vocab" in capsys.readouterr().err
    # text: invalid UTF-8 names file and line
    bad = tmp_path / "bad.txt"
    bad.write_bytes("\ufeff".encode() + b"good doc\n\nbroken \xff\xfe line\nmore\n\nlast doc\n")   # a BOM first
    assert convert_text.main(["--input", str(bad), "--out", str(tmp_path / "t")]) == 2
    assert "bad.txt line 3: not valid UTF-8" in capsys.readouterr().err
    out = tmp_path / "t2"
    assert convert_text.main(["--input", str(bad), "--skip-bad", "--out", str(out)]) == 0
    assert [s["text"] for s in read_mds(out)] == ["good doc", "last doc"]
    assert read_meta(out)["skipped"] == {"invalid_utf8": 1}


def test_tools_run_from_a_symlinked_checkout(tmp_path):
    """`python <link>/data_tools/inspect.py`: the guard that keeps inspect.py from shadowing the
    stdlib's `inspect` compares resolved paths (sys.path[0] is the resolved folder)."""
    link = tmp_path / "checkout"
    link.symlink_to(ROOT, target_is_directory=True)
    for tool in ("inspect", "make_synthetic"):
        p = subprocess.run([sys.executable, str(link / "data_tools" / f"{tool}.py"), "--help"], capture_output=True,
                           text=True, cwd=tmp_path, timeout=300)
        assert p.returncode == 0 and "usage:" in p.stdout, p.stderr[-2000:]
