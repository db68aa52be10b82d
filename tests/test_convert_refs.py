"""data_tools/convert_refs.py: the refer toolkit's RefCOCO / RefCOCO+ / RefCOCOg files (refs
pickle or JSON + COCO instances) and bottom-up TSV features -> a ``refs`` dataset that the
grounding task's collator reads."""
from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from data_tools import convert_refs
from tests.test_data_tools import (TSV_FIELDS_FULL, check_image_columns, make_image, read_meta,
                                   read_mds, run_tool, tsv_row, write_json, write_tsv)

# image id -> (w, h); annotation id -> (image, COCO [x, y, w, h])
SIZES = {1: (640, 480), 2: (500, 400)}
ANNS = {100: (1, [64.0, 48.0, 192.0, 144.0]), 101: (1, [320.0, 240.0, 100.0, 100.0]),
        200: (2, [450.0, 350.0, 40.0, 40.0])}
PLANTED = 2          # image 1's region 2 is exactly annotation 100's box


def _refs() -> list[dict]:
    def ref(ref_id, ann, split, sents):
        return {"ref_id": ref_id, "ann_id": ann, "image_id": ANNS[ann][0], "split": split, "category_id": 1,
                "file_name": f"COCO_train2014_{ANNS[ann][0]:012d}_{ann}.jpg",
                "sent_ids": [s for s, _ in sents],
                "sentences": [{"sent_id": s, "sent": t, "raw": t.capitalize() + ".", "tokens": t.split()}
                              for s, t in sents]}
    return [ref(0, 100, "train", [(10, "man on the left"), (11, "left guy in red")]),
            ref(1, 200, "train", [(12, "tiny thing bottom right")]),
            ref(2, 101, "testA", [(13, "the other one")])]


def _instances() -> dict:
    return {"images": [{"id": i, "width": w, "height": h, "file_name": f"{i}.jpg"} for i, (w, h) in SIZES.items()],
            "annotations": [{"id": a, "image_id": i, "bbox": b, "category_id": 1, "area": b[2] * b[3]}
                            for a, (i, b) in ANNS.items()],
            "categories": [{"id": 1, "name": "person"}]}


@pytest.fixture
def inputs(tmp_path):
    rng = np.random.default_rng(5)
    imgs = {i: make_image(rng, 5, 64, w=w, h=h, classes=17) for i, (w, h) in SIZES.items()}
    x, y, bw, bh = ANNS[100][1]
    imgs[1]["boxes"][PLANTED] = [x, y, x + bw, y + bh]
    imgs[2]["boxes"][:] = [10, 10, 60, 60]          # nothing near annotation 200's box
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(i, img, full=True) for i, img in imgs.items()])
    refs = tmp_path / "refs(unc).p"
    with open(refs, "wb") as f:
        pickle.dump(_refs(), f, protocol=2)
    inst = write_json(tmp_path / "instances.json", _instances())
    return {"imgs": imgs, "tsv": tsv, "refs": str(refs), "instances": inst}


def _args(inp, out, *extra, split="train"):
    return ["--refs", inp["refs"], "--instances", inp["instances"], "--split", split, "--tsv", inp["tsv"],
            "--tsv-fields", TSV_FIELDS_FULL, "--out", str(out), *extra]


def test_refs_round_trip_and_the_grounding_collator(inputs, tmp_path):
    out = tmp_path / "train"
    r = run_tool("convert_refs", *_args(inputs, out))
    assert r.returncode == 0, r.stderr
    assert "2 of 3 expressions (66.7%) have a region with IoU >= 0.5" in r.stdout
    samples = {int(s["sample_id"]): s for s in read_mds(out)}
    assert sorted(samples) == [10, 11, 12]                 # one per sentence, testA's left out
    assert [samples[k]["expression"] for k in (10, 11, 12)] == \
        ["man on the left", "left guy in red", "tiny thing bottom right"]
    np.testing.assert_allclose(samples[10]["target_box"], [0.1, 0.1, 0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(samples[12]["target_box"], [0.9, 0.875, 0.98, 0.975], rtol=1e-6)
    assert int(samples[10]["target_region"]) == int(samples[11]["target_region"]) == PLANTED
    for k, image in ((10, 1), (11, 1), (12, 2)):
        check_image_columns(samples[k], inputs["imgs"][image])
    meta = read_meta(out)
    assert meta["kind"] == "refs" and meta["reachable"] == 2 and meta["skipped_total"] == 0
    assert meta["source"]["split"] == "train" and meta["num_classes"] == 17

    from tests.fixtures.tasks import collator, read_rows
    from vltrain.config import load_config
    cfg = load_config("configs/refs_debug.yaml", [f"data.train={out}", f"data.val={out}"])
    col = collator(cfg, "val")
    rows = read_rows(out)
    b = col(rows)
    for i, row in enumerate(rows):
        labels = b.task["region_labels"][i].tolist()
        assert labels == ([1.0 if j == PLANTED else 0.0 for j in range(5)] if row["image_id"] == "1"
                          else [0.0] * 5)                 # IoU >= 0.5 with the referent only
        assert b.input_ids[i, :int(b.attention_mask[i].sum())].tolist() == \
            [col.tok.cls_id, *col.tok.encode(row["expression"]), col.tok.sep_id]


def test_refs_json_other_split_and_python2_pickles(inputs, tmp_path, capsys):
    js = write_json(tmp_path / "refs.json", _refs())
    out = tmp_path / "testA"
    assert convert_refs.main(_args({**inputs, "refs": js}, out, split="testA")) == 0
    (s,) = read_mds(out)
    assert (int(s["sample_id"]), s["expression"]) == (13, "the other one")
    np.testing.assert_allclose(s["target_box"], [0.5, 0.5, 420 / 640, 340 / 480], rtol=1e-6)

    # refer's pickles come from Python 2, whose str is bytes (opcode U, SHORT_BINSTRING):
    # [{"sent": "café"}] as Python 2 writes it, read as UTF-8 text.
    py2 = tmp_path / "py2.p"
    py2.write_bytes(b"\x80\x02]}U\x04sentU\x05caf\xc3\xa9sa.")
    assert convert_refs.load_refs(str(py2)) == [{"sent": "café"}]
    # one Latin-1 string refused the whole file (a UnicodeDecodeError): read as Latin-1, said
    latin = tmp_path / "latin1.p"
    latin.write_bytes(b"\x80\x02]}U\x04sentU\x04caf\xe9sa.")
    assert convert_refs.load_refs(str(latin)) == [{"sent": "café"}]
    assert "latin1.p holds text that is not UTF-8" in capsys.readouterr().err


def test_refs_bad_inputs_are_named(inputs, tmp_path, capsys):
    def fails(argv, *needles):
        assert convert_refs.main(argv) == 2
        err = capsys.readouterr().err
        for n in needles:
            assert n in err, err

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps([Evil()], protocol=2))
    fails(_args({**inputs, "refs": str(evil)}, tmp_path / "o1"), "evil.p", "refuses to load")
    fails(_args(inputs, tmp_path / "o2", split="testB"), "no refs in split 'testB'", "testA", "train")

    refs = _refs()
    refs[0]["ann_id"] = 999
    fails(_args({**inputs, "refs": write_json(tmp_path / "r3.json", refs)}, tmp_path / "o3"),
          "ref 0 (ref_id 0, image 1)", "ann_id 999")
    inst = _instances()
    inst["annotations"][2]["bbox"] = [450.0, 350.0, 400.0, 40.0]        # past the 500-wide image
    fails(_args({**inputs, "instances": write_json(tmp_path / "i4.json", inst)}, tmp_path / "o4"),
          "ref 1 (ref_id 1, image 2)", "bbox", "500x400")
    inst = _instances()
    inst["images"][0]["width"] = 800                                     # disagrees with the features
    fails(_args({**inputs, "instances": write_json(tmp_path / "i5.json", inst)}, tmp_path / "o5"),
          "row 1", "640x480", "800x480")
    refs = _refs()
    refs[1]["sentences"][0]["sent_id"] = 10                             # used by ref 0 already
    fails(_args({**inputs, "refs": write_json(tmp_path / "r6.json", refs)}, tmp_path / "o6"),
          "sent_id 10 already used")
    no_feats = write_tsv(tmp_path / "one.tsv", [tsv_row(1, inputs["imgs"][1], full=True)])
    fails(_args({**inputs, "tsv": no_feats}, tmp_path / "o7"), "image 2 has expressions but no row")

    # --skip-bad: the same problems counted, the good expressions written
    refs = _refs()
    refs[0]["ann_id"] = 999
    out = tmp_path / "skip"
    assert convert_refs.main(_args({**inputs, "refs": write_json(tmp_path / "r8.json", refs), "tsv": no_feats},
                                   out, "--skip-bad")) == 2          # nothing left to write
    refs[1]["image_id"] = 1                                              # annotation 200 is on image 2
    assert convert_refs.main(_args({**inputs, "refs": write_json(tmp_path / "r9.json", refs)},
                                   out, "--skip-bad")) == 2
    assert "no usable expressions" in capsys.readouterr().err
    refs = _refs() + [["not", "a", "ref"]]                              # a non-object entry
    fails(_args({**inputs, "refs": write_json(tmp_path / "r11.json", refs)}, tmp_path / "o11"),
          f"r11.json ref {len(refs) - 1}: ['not', 'a', 'ref'] is not an object")
    refs[1]["ann_id"] = 999
    assert convert_refs.main(_args({**inputs, "refs": write_json(tmp_path / "r10.json", refs)},
                                   out, "--skip-bad")) == 0
    meta = read_meta(out)
    assert meta["skipped"] == {"malformed_ref": 1, "missing_annotation": 1}
    assert sorted(int(s["sample_id"]) for s in read_mds(out)) == [10, 11]
    # the split's 3 expressions, as RefCOCO+'s scorer counts them (the non-object entry has no split)
    assert (meta["input_unit"], meta["input_samples"], meta["samples_left_out"]) == ("expressions", 3, 1)
