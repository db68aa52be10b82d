"""data_tools/convert_vcr.py on small VCR jsonl files in the real format (object references as
index lists into ``objects``, "person" and other classes) with TSV / npz region features, the
object reference -> region columns (question_refs / choice_refs: object order, or metadata box
IoU), and the converted dataset through the real multiple-choice collator."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from data_tools import convert_vcr
from tests.fixtures.tasks import collator, read_rows
from tests.test_data_tools import (ROOT, TSV_FIELDS_FULL, check_image_columns, make_image, read_mds, read_meta,
                                   run_tool, tsv_row, write_tsv)

# Indices 0, 1 and 4..16 are persons, the 1st to 15th: 15 (the 14th) -> Casey again, 16 -> Riley again.
OBJECTS = ["person", "person", "tie", "chair"] + ["person"] * 13
FN_A = "lsmdc_3036_IN_TIME/3036_IN_TIME_00.37.33.594-00.37.54.485@0.jpg"
FN_B = "movieclips_A_Walk_in_the_Clouds/abc_walk@3.jpg"
ID_A, ID_B = "3036_IN_TIME_00.37.33.594-00.37.54.485@0", "abc_walk@3"


def vcr_line(annot_id, img_fn, question, answers, rationales, answer_label=None, rationale_label=None, **extra):
    d = {"movie": "3036_IN_TIME", "objects": OBJECTS, "interesting_scores": [0], "answer_likelihood": "likely",
         "img_fn": img_fn, "metadata_fn": img_fn[:-4] + ".json", "question_orig": "orig", "question": question,
         "answer_choices": answers, "rationale_choices": rationales, "annot_id": annot_id}
    if answer_label is not None:
        d.update(answer_label=answer_label, rationale_label=rationale_label)
    d.update(extra)
    return json.dumps(d)


TRAIN = [
    vcr_line("train-0", FN_A, ["What", "is", [0], "thinking", "?"],
             [[[0, 1], "are", "friends", "."], [[2], "is", "red", "."],
              ["He", "does", "n't", "like", [1], "'s", [2], "."], [[16], "sits", "on", "the", [3], "!"]],
             [[[1], "is", "frowning", "at", [2], "."], ["It", "is", "(", "very", ")", "late", "."],
              [[15], "says", "so", "."], ["No", "reason", "."]], 2, 0),
    vcr_line("train-1", FN_A, ["Why", "is", [1, 2], "here", "?"],
             [["To", "work", "."], ["To", "eat", "."], [[3], "."], ["Because", [0, 15], "asked", "."]],
             [["A", "."], ["B", "."], ["C", "."], ["D", "."]], 3, 2),
    vcr_line("train-7", FN_B, ["Where", "is", [15], "going", "?"],
             [["Home", "."], ["Out", "."], ["Up", "."], ["Down", "."]],
             [["W", "."], ["X", "."], ["Y", "."], ["Z", "."]], 0, 3),
]
# (question, answer texts, rationale texts, answer_label, rationale_label), by sample id.
EXPECTED = {
    0: ("What is Casey thinking?",
        ["Casey and Riley are friends.", "tie is red.", "He doesn't like Riley's tie.", "Riley sits on the chair!"],
        ["Riley is frowning at tie.", "It is (very) late.", "Casey says so.", "No reason."], 2, 0),
    1: ("Why is Riley and tie here?", ["To work.", "To eat.", "chair.", "Because Casey and Casey asked."],
        ["A.", "B.", "C.", "D."], 3, 2),
    7: ("Where is Casey going?", ["Home.", "Out.", "Up.", "Down."], ["W.", "X.", "Y.", "Z."], 0, 3),
}


RAW = {int(json.loads(line)["annot_id"].split("-")[1]): json.loads(line) for line in TRAIN}


def name_of(i: int, objects=OBJECTS) -> str:
    return convert_vcr.object_name(objects, i)


def test_the_people_of_one_line_get_different_names():
    """R2C's name list has Peyton twice, so objects 6 and 10 were both "Peyton"; and naming by
    object index skipped names for the non-person objects. Persons are named in order now."""
    objects = ["tie"] + ["person"] * 13 + ["person"]
    names = [convert_vcr.object_name(objects, i) for i in range(len(objects))]
    assert names[0] == "tie" and names[1:3] == ["Casey", "Riley"]
    assert len(set(names[1:14])) == 13 and names[14] == "Casey"          # the 14th person: the list again
    text, spans = convert_vcr.render(["Is", [7], "talking", "to", [11], "?"], objects, "question")
    assert text == "Is Peyton talking to Frankie?" and spans == [[3, 9, 7], [21, 28, 11]]


def object_indices(tokens) -> list[int]:
    return [i for t in tokens if isinstance(t, list) for i in t]


def check_refs(text: str, refs, tokens, region_of=lambda i: i, objects=OBJECTS):
    """One triple per object index of ``tokens``, in order, spanning exactly that object's name,
    with region ``region_of(index)``."""
    idx = object_indices(tokens)
    assert len(refs) == len(idx), (text, refs)
    for (start, end, region), i in zip(refs, idx):
        assert text[start:end] == name_of(i, objects), (text, refs)
        assert region == region_of(i)


def write_lines(path, lines) -> str:
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return str(path)


@pytest.fixture
def images():
    rng = np.random.default_rng(3)
    # len(OBJECTS) = 17 regions: without --metadata-dir region i is object i's.
    return {ID_A: make_image(rng, 17, 8, w=1000, h=560), ID_B: make_image(rng, 17, 8, w=640, h=360)}


@pytest.fixture
def tsv(tmp_path, images):
    # B's row first: samples follow the feature file's order, then the annotation file's.
    return write_tsv(tmp_path / "feats.tsv", [tsv_row(i, images[i]) for i in (ID_B, ID_A)])


def test_qa_round_trip_tsv(tmp_path, images, tsv):
    ann = write_lines(tmp_path / "train.jsonl", TRAIN)
    out = tmp_path / "qa"
    r = run_tool("convert_vcr", "--annotations", ann, "--tsv", tsv, "--out", out)
    assert r.returncode == 0, r.stderr
    assert "wrote 3 mc samples" in r.stdout
    samples = read_mds(out)
    assert [int(s["sample_id"]) for s in samples] == [7, 0, 1]
    assert [s["image_id"] for s in samples] == [ID_B, ID_A, ID_A]        # two questions share image A
    for s in samples:
        q, answers, _, a_label, _ = EXPECTED[int(s["sample_id"])]
        assert s["question"] == q and s["choices"] == answers and int(s["label"]) == a_label
        check_image_columns(s, images[s["image_id"]])
    meta = read_meta(out)
    assert meta["kind"] == "mc" and meta["task"] == "qa" and meta["num_choices"] == 4 and meta["has_labels"]
    assert {"question_refs", "choice_refs"} <= set(meta["optional_columns"]) and meta["refs"] == "object_order"
    assert meta["num_samples"] == 3 and meta["num_images"] == 2 and meta["num_unlabeled"] == 0
    assert meta["skipped_total"] == 0 and meta["feature_dim"] == 8
    assert meta["source"] == {"tool": "convert_vcr", "annotations": "train.jsonl", "features": ["feats.tsv"]}


def test_refs_object_order(tmp_path, tsv):
    """question_refs / choice_refs: [start, end, region] per object (several per multi-object
    token, " and " not covered), region = object index when there is no --metadata-dir."""
    ann = write_lines(tmp_path / "train.jsonl", TRAIN)
    out = tmp_path / "qa"
    assert convert_vcr.main(["--annotations", ann, "--tsv", tsv, "--out", str(out)]) == 0
    rows = {int(s["sample_id"]): s for s in read_rows(out)}
    total = 0
    for sid, s in rows.items():
        raw = RAW[sid]
        check_refs(s["question"], s["question_refs"], raw["question"])
        assert len(s["choice_refs"]) == len(s["choices"]) == 4
        for text, refs, tokens in zip(s["choices"], s["choice_refs"], raw["answer_choices"]):
            check_refs(text, refs, tokens)
        total += len(s["question_refs"]) + sum(map(len, s["choice_refs"]))
    # spelled out once: "What is Casey thinking?", "Casey and Riley are friends.", "He doesn't like Riley's tie."
    assert rows[0]["question_refs"] == [[8, 13, 0]]
    assert rows[0]["choice_refs"][0] == [[0, 5, 0], [10, 15, 1]]
    assert rows[0]["choice_refs"][2] == [[16, 21, 1], [24, 27, 2]]
    assert rows[0]["choice_refs"][3] == [[0, 5, 16], [18, 23, 3]]         # index 16 -> "Riley" again
    assert rows[1]["question_refs"] == [[7, 12, 1], [17, 20, 2]]          # "Why is Riley and tie here?"
    assert rows[7]["choice_refs"][0] == []
    meta = read_meta(out)
    assert total == 14 and meta["refs_total"] == total and meta["refs_unmatched"] == 0


def test_qar_refs_shifted(tmp_path, tsv):
    """QA -> R: the correct answer's references follow the question's, shifted into the
    combined text; the choices' are the rationales'."""
    ann = write_lines(tmp_path / "train.jsonl", TRAIN)
    out = tmp_path / "qar"
    assert convert_vcr.main(["--annotations", ann, "--task", "qar", "--tsv", tsv, "--out", str(out)]) == 0
    rows = {int(s["sample_id"]): s for s in read_rows(out)}
    for sid, s in rows.items():
        raw = RAW[sid]
        check_refs(s["question"], s["question_refs"],
                   raw["question"] + raw["answer_choices"][raw["answer_label"]])
        for text, refs, tokens in zip(s["choices"], s["choice_refs"], raw["rationale_choices"]):
            check_refs(text, refs, tokens)
    # "What is Casey thinking? He doesn't like Riley's tie.": the answer starts at 24
    assert rows[0]["question_refs"] == [[8, 13, 0], [24 + 16, 24 + 21, 1], [24 + 24, 24 + 27, 2]]
    # "Why is Riley and tie here? Because Casey and Casey asked." (answer 3 at 27)
    assert rows[1]["question_refs"] == [[7, 12, 1], [17, 20, 2], [35, 40, 0], [45, 50, 15]]
    assert rows[0]["choice_refs"][0] == [[0, 5, 1], [21, 24, 2]]           # "Riley is frowning at tie."
    assert read_meta(out)["refs_total"] == 3 + 4 + 1 + 3                   # questions + rationales


def test_qar_and_test_split(tmp_path, tsv, capsys):
    ann = write_lines(tmp_path / "train.jsonl", TRAIN)
    out = tmp_path / "qar"
    assert convert_vcr.main(["--annotations", ann, "--task", "qar", "--tsv", tsv, "--out", str(out)]) == 0
    rows = read_rows(out)
    assert len(rows) == 3
    for s in rows:
        q, answers, rationales, a_label, r_label = EXPECTED[int(s["sample_id"])]
        assert s["question"] == f"{q} {answers[a_label]}"
        assert s["choices"] == rationales and int(s["label"]) == r_label
    assert rows[1]["question"] == "What is Casey thinking? He doesn't like Riley's tie."
    assert read_meta(out)["task"] == "qar"

    test = [vcr_line("test-0", FN_A, ["Who", "is", [1], "?"], [["A"], ["B"], ["C"], ["D"]], [["E"], ["F"]]),
            vcr_line("test-3", FN_B, ["Why", "?"], [["A"], ["B"], ["C"], ["D"]], [["E"], ["F"]])]
    test_ann = write_lines(tmp_path / "test.jsonl", test)
    test_out = tmp_path / "test_qa"
    assert convert_vcr.main(["--annotations", test_ann, "--tsv", tsv, "--out", str(test_out)]) == 0
    rows = read_rows(test_out)
    assert [(int(s["sample_id"]), int(s["label"])) for s in rows] == [(3, -1), (0, -1)]
    assert rows[1]["question"] == "Who is Riley?"
    meta = read_meta(test_out)
    assert meta["has_labels"] is False and meta["num_unlabeled"] == 2

    capsys.readouterr()
    assert convert_vcr.main(["--annotations", test_ann, "--task", "qar", "--tsv", tsv,
                             "--out", str(tmp_path / "test_qar")]) == 2
    err = capsys.readouterr().err
    assert f"{test_ann} line 1 (annot_id test-0)" in err and "no answer_label" in err and "--given-answer" in err
    assert not os.path.exists(tmp_path / "test_qar" / "index.json")

    # The leaderboard's QA->R: each candidate answer in turn, same sample ids as Q->A, no labels.
    for n, answer in enumerate("ABCD"):
        out_n = tmp_path / f"test_qar_a{n}"
        assert convert_vcr.main(["--annotations", test_ann, "--task", "qar", "--given-answer", str(n),
                                 "--tsv", tsv, "--out", str(out_n)]) == 0
        rows = read_rows(out_n)
        assert [(int(s["sample_id"]), int(s["label"])) for s in rows] == [(3, -1), (0, -1)]
        assert rows[1]["question"] == f"Who is Riley? {answer}" and rows[1]["choices"] == ["E", "F"]
        meta = read_meta(out_n)
        assert meta["given_answer"] == n and meta["task"] == "qar" and meta["has_labels"] is False
    # On a labelled split the given answer replaces the correct one, and the labels go.
    assert convert_vcr.main(["--annotations", ann, "--task", "qar", "--given-answer", "1", "--tsv", tsv,
                             "--out", str(tmp_path / "train_qar_a1")]) == 0
    for s in read_rows(tmp_path / "train_qar_a1"):
        q, answers, rationales, _, _ = EXPECTED[int(s["sample_id"])]
        assert s["question"] == f"{q} {answers[1]}" and s["choices"] == rationales and int(s["label"]) == -1
    capsys.readouterr()
    assert convert_vcr.main(["--annotations", test_ann, "--given-answer", "1", "--tsv", tsv,
                             "--out", str(tmp_path / "qa_given")]) == 2
    assert "--given-answer goes with --task qar" in capsys.readouterr().err


def metadata_boxes(boxes) -> list:
    """VCR metadata ``boxes``: [x1, y1, x2, y2, score] in pixels."""
    return [[*map(float, b), 0.9] for b in boxes]


def test_npz_sizes_from_metadata(tmp_path, images, capsys):
    npz = tmp_path / "npz"
    npz.mkdir()
    for i, img in images.items():
        np.savez(npz / f"{i}.npz", features=img["features"], boxes=img["boxes"])
    ann = write_lines(tmp_path / "val.jsonl", TRAIN)
    meta_dir = tmp_path / "vcr1images"
    (meta_dir / os.path.dirname(FN_A)).mkdir(parents=True)
    with open(meta_dir / (FN_A[:-4] + ".json"), "w") as f:   # the objects' boxes: A's first 17 regions
        json.dump({"boxes": metadata_boxes(images[ID_A]["boxes"][:17]), "segms": [], "names": OBJECTS,
                   "width": 1000, "height": 560}, f)
    base = ["--annotations", ann, "--npz-dir", str(npz)]

    # B's metadata json is missing: an error naming the path, or a counted skip.
    assert convert_vcr.main([*base, "--metadata-dir", str(meta_dir), "--out", str(tmp_path / "o1")]) == 2
    assert os.path.join(str(meta_dir), FN_B[:-4] + ".json") in capsys.readouterr().err
    out = tmp_path / "o2"
    assert convert_vcr.main([*base, "--metadata-dir", str(meta_dir), "--skip-bad", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [int(s["sample_id"]) for s in rows] == [0, 1]
    for s in rows:
        check_image_columns(s, images[ID_A])                # boxes normalised by 1000 x 560
        raw = RAW[int(s["sample_id"])]                    # region i has IoU 1 with object i's box
        check_refs(s["question"], s["question_refs"], raw["question"])
        for text, refs, tokens in zip(s["choices"], s["choice_refs"], raw["answer_choices"]):
            check_refs(text, refs, tokens)
    meta = read_meta(out)
    assert meta["skipped"] == {"missing_image_size": 1} and meta["refs"] == "metadata_iou"
    assert meta["refs_total"] == 13 and meta["refs_unmatched"] == 0

    # B's metadata has a size but no boxes: fine for the size, a bad line for the references.
    (meta_dir / os.path.dirname(FN_B)).mkdir()
    with open(meta_dir / (FN_B[:-4] + ".json"), "w") as f:
        json.dump({"width": 640, "height": 360}, f)
    capsys.readouterr()
    assert convert_vcr.main([*base, "--metadata-dir", str(meta_dir), "--out", str(tmp_path / "o3")]) == 2
    err = capsys.readouterr().err
    assert "(annot_id train-7)" in err and os.path.join(str(meta_dir), FN_B[:-4] + ".json") in err, err
    assert "no object boxes" in err
    out = tmp_path / "o3b"
    assert convert_vcr.main([*base, "--metadata-dir", str(meta_dir), "--no-refs", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert len(rows) == 3
    for s in rows:
        check_image_columns(s, images[s["image_id"]])
        assert "question_refs" not in s

    capsys.readouterr()
    assert convert_vcr.main([*base, "--out", str(tmp_path / "o4")]) == 2
    assert "no image_w/image_h" in capsys.readouterr().err


def test_refs_metadata_iou(tmp_path, capsys):
    """--metadata-dir: each object -> the region of best IoU with its metadata box (compared
    normalised: these features come from a half-size copy of the 640x480 image), -1 below 0.5;
    a metadata file whose box count is not the line's object count is a bad line."""
    rng = np.random.default_rng(5)
    region_px = np.array([[0, 0, 100, 100], [200, 0, 300, 100], [0, 200, 100, 300], [200, 200, 300, 300]],
                         np.float32)
    img = {"w": 320, "h": 240, "boxes": region_px / 2, "features": rng.normal(0, 1, (4, 8)).astype(np.float32)}
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(ID_A, img)])
    objects = ["person", "person", "dog", "chair"]
    # object 0 ~ region 2 (IoU 0.91), 1 = region 0, 2 ~ region 3, 3 (the chair) far from every region
    boxes = [region_px[2] + [3, -2, 4, 1], region_px[0], region_px[3] + 2, [500, 380, 620, 470]]
    region_of = {0: 2, 1: 0, 2: 3, 3: -1}.__getitem__
    meta_dir = tmp_path / "vcr1images"
    (meta_dir / os.path.dirname(FN_A)).mkdir(parents=True)
    meta_path = meta_dir / (FN_A[:-4] + ".json")
    with open(meta_path, "w") as f:
        json.dump({"boxes": metadata_boxes(boxes), "names": objects, "width": 640, "height": 480}, f)
    question = ["Is", [0, 1], "near", "the", [2], "?"]
    answers = [["Yes", "."], [[3], "is", "."], [[1, 3, 0], "!"]]
    good = vcr_line("val-0", FN_A, question, answers, [["R"], ["S"]], 1, 0, objects=objects)
    short = vcr_line("val-1", FN_A, ["Why", "?"], [["A"], ["B"]], [["R"], ["S"]], 0, 0, objects=objects[:3])
    ann = write_lines(tmp_path / "val.jsonl", [good, short])
    base = ["--annotations", ann, "--tsv", tsv, "--metadata-dir", str(meta_dir)]

    assert convert_vcr.main([*base, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert f"{ann} line 2 (annot_id val-1)" in err and str(meta_path) in err, err
    assert "4 boxes but the line has 3 objects" in err

    out = tmp_path / "o2"
    assert convert_vcr.main([*base, "--skip-bad", "--out", str(out)]) == 0
    [s] = read_rows(out)
    assert s["question"] == "Is Casey and Riley near the dog?"
    assert s["question_refs"] == [[3, 8, 2], [13, 18, 0], [28, 31, 3]]
    assert s["choice_refs"] == [[], [[0, 5, -1]], [[0, 5, 0], [10, 15, -1], [20, 25, 2]]]
    check_refs(s["question"], s["question_refs"], question, region_of, objects)
    for text, refs, tokens in zip(s["choices"], s["choice_refs"], answers):
        check_refs(text, refs, tokens, region_of, objects)
    meta = read_meta(out)
    assert meta["refs"] == "metadata_iou" and meta["refs_total"] == 7 and meta["refs_unmatched"] == 2
    assert meta["skipped"] == {"bad_metadata": 1}


@pytest.mark.parametrize("n_regions", [5, 18])   # too few; one more (a whole-image box first)
def test_region_count_other_than_objects_and_no_refs(tmp_path, images, capsys, n_regions):
    """Without --metadata-dir an image needs exactly a region per object (features on VCR's
    boxes): fewer, or more (another detector's boxes, or a whole-image box first, which would
    shift every reference by one row), is a bad line; --no-refs writes text only."""
    few = {ID_A: images[ID_A], ID_B: make_image(np.random.default_rng(6), n_regions, 8, w=640, h=360)}
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(i, few[i]) for i in (ID_B, ID_A)])
    ann = write_lines(tmp_path / "train.jsonl", TRAIN)
    base = ["--annotations", ann, "--tsv", tsv]
    assert convert_vcr.main([*base, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert f"{ann} line 3 (annot_id train-7)" in err and f"image {ID_B} has {n_regions} regions" in err, err
    assert "the line has 17 objects" in err and "--metadata-dir" in err

    out = tmp_path / "o2"
    assert convert_vcr.main([*base, "--skip-bad", "--out", str(out)]) == 0
    assert [int(s["sample_id"]) for s in read_rows(out)] == [0, 1]
    meta = read_meta(out)
    assert meta["skipped"] == {"region_count": 1} and meta["num_images"] == 1 and meta["num_samples"] == 2

    out = tmp_path / "o3"
    assert convert_vcr.main([*base, "--no-refs", "--out", str(out)]) == 0
    rows = read_rows(out)
    assert [int(s["sample_id"]) for s in rows] == [7, 0, 1]
    assert all("question_refs" not in s and "choice_refs" not in s for s in rows)
    meta = read_meta(out)
    assert meta["optional_columns"] == [] and meta["refs"] is None
    assert meta["refs_total"] == 0 and meta["refs_unmatched"] == 0 and meta["skipped_total"] == 0


def _bad(annot_id, **change):
    """A line of image A with one field changed (labels 0/0 unless changed)."""
    d = json.loads(vcr_line(annot_id, FN_A, ["Is", [0], "ok", "?"], [["A"], ["B"], ["C"], ["D"]],
                            [["E"], ["F"], ["G"], ["H"]], 0, 0))
    d.update(change)
    return json.dumps(d)


BAD = {  # case: (category, line 4 of the file, annot_id named, text in the message)
    "object_index": ("bad_object_ref", _bad("train-9", question=["Is", [0, 17], "ok", "?"]), "train-9",
                     "object index 17"),
    "label": ("bad_label", _bad("train-9", answer_label=4), "train-9", "answer_label 4"),
    "json": ("malformed_line", '{"annot_id": "train-9", "objects": ["person"], "img_fn": ', "train-9",
             "invalid JSON"),
    "choices": ("bad_choices", _bad("train-9", answer_choices=[["A"]]), "train-9", "at least 2 choices"),
    "token": ("bad_token", _bad("train-9", question=["Is", {"x": 1}, "?"]), "train-9", "token 1"),
    "annot_id": ("duplicate_annotation", _bad("train-0"), "train-0", "already on line 1"),
    "sample_id": ("duplicate_annotation", _bad("val-7"), "val-7", "sample id 7 already taken by line 3"),
    "labels": ("mixed_labels", json.dumps({k: v for k, v in json.loads(_bad("train-9")).items()
                                           if not k.endswith("_label")}), "train-9", "lacks labels"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_line_is_an_error(tmp_path, tsv, capsys, case):
    _, line, annot_id, needle = BAD[case]
    ann = write_lines(tmp_path / "train.jsonl", [*TRAIN, line])
    assert convert_vcr.main(["--annotations", ann, "--tsv", tsv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert f"{ann} line 4 (annot_id {annot_id})" in err and needle in err, err


def test_missing_features_and_skip_bad(tmp_path, tsv, capsys):
    no_feat = vcr_line("train-8", "movieclips_X/nofeat@1.jpg", ["Why", "?"], [["A"], ["B"]], [["C"], ["D"]], 1, 0)
    ann = write_lines(tmp_path / "train.jsonl", [*TRAIN, no_feat])
    assert convert_vcr.main(["--annotations", ann, "--tsv", tsv, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert "image nofeat@1 has annotations but no row" in err and tsv in err

    bad = [BAD[c][1] for c in sorted(BAD)]
    bad += ["", "[1, 2]", _bad("train-10", img_fn=None), no_feat]    # blank lines are passed over
    ann = write_lines(tmp_path / "all.jsonl", [*TRAIN, *bad])
    out = tmp_path / "o2"
    assert convert_vcr.main(["--annotations", ann, "--tsv", tsv, "--skip-bad", "--out", str(out)]) == 0
    assert sorted(int(s["sample_id"]) for s in read_rows(out)) == [0, 1, 7]
    meta = read_meta(out)
    assert meta["skipped"] == {"bad_choices": 1, "bad_label": 1, "bad_object_ref": 1, "bad_token": 1,
                               "duplicate_annotation": 2, "malformed_line": 3, "mixed_labels": 1, "no_features": 1}
    assert meta["skipped_total"] == 11


def test_through_mc_collator(tmp_path):
    from vltrain.config import load_config
    from vltrain.tokenization import Tokenizer
    rng = np.random.default_rng(4)
    # configs/mc_debug.yaml: 64-dim features, 17 detector classes (cls_prob for VLP's class term).
    imgs = {i: make_image(rng, 17, 64, classes=17) for i in (ID_A, ID_B)}
    tsv = write_tsv(tmp_path / "f.tsv", [tsv_row(i, imgs[i], full=True) for i in (ID_B, ID_A)])
    ann = write_lines(tmp_path / "train.jsonl", TRAIN)
    out = str(tmp_path / "qa")
    assert convert_vcr.main(["--annotations", ann, "--tsv", tsv, "--tsv-fields", TSV_FIELDS_FULL,
                             "--out", out]) == 0
    cfg = load_config(os.path.join(ROOT, "configs", "mc_debug.yaml"), [f"data.train={out}", f"data.val={out}"])
    batch = collator(cfg, "val")(read_rows(out))
    assert batch.sample_id.tolist() == [7, 0, 1]
    assert batch.task["label"].tolist() == [EXPECTED[i][3] for i in (7, 0, 1)]
    assert batch.task["choice_valid"].shape == (3, 4) and bool(batch.task["choice_valid"].all())
    assert batch.task["image_id"] == [ID_B, ID_A, ID_A]
    tok = Tokenizer(cfg.data.vocab)
    text = tok.decode(batch.task["choice_ids"][1, 2])               # train-0, choice 2
    assert "casey" in text and "riley" in text and "tie" in text, text
    assert "[SEP]" not in text and tok.sep_id in batch.task["choice_ids"][1, 2].tolist()
    assert "choice_regions" not in batch.task                       # a VLP model has no use for them

    # A VL-BERT model's collator links each reference's word-pieces to its object's region
    # (object order here: region k = object k), through the converter's character spans.
    cfg = load_config(os.path.join(ROOT, "configs", "mc_debug.yaml"),
                      [f"data.train={out}", f"data.val={out}", "model.region_embedding=vlbert",
                       "model.type_vocab_size=3", "model.image_token_type=2", "data.max_regions=17"])
    batch = collator(cfg, "val")(read_rows(out))
    ids, regions = batch.task["choice_ids"][1, 2].tolist(), batch.task["choice_regions"][1, 2].tolist()
    words = tok.hf.convert_ids_to_tokens(ids)
    # train-0: "What is Casey thinking?" / "He doesn't like Riley's tie."
    assert [(w, r) for w, r in zip(words, regions) if r >= 0] == [("casey", 0), ("riley", 1), ("tie", 2)]


def test_given_answer_beyond_a_lines_choices_is_a_bad_line(tmp_path, tsv, capsys):
    """--given-answer 3 on a line with only 2 answer choices: named, or counted with --skip-bad."""
    short = vcr_line("test-9", FN_A, ["Why", "?"], [["A"], ["B"]], [["E"], ["F"]])
    ok = vcr_line("test-3", FN_B, ["Why", "?"], [["A"], ["B"], ["C"], ["D"]], [["E"], ["F"]])
    ann = write_lines(tmp_path / "test.jsonl", [ok, short])
    args = ["--annotations", ann, "--task", "qar", "--given-answer", "3", "--tsv", tsv]
    assert convert_vcr.main([*args, "--out", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err
    assert f"{ann} line 2 (annot_id test-9)" in err and "--given-answer 3 but only 2 answer choices" in err, err
    assert convert_vcr.main([*args, "--skip-bad", "--out", str(tmp_path / "o2")]) == 0
    rows = read_rows(tmp_path / "o2")
    assert [(int(s["sample_id"]), s["question"]) for s in rows] == [(3, "Why? D")]
    assert read_meta(tmp_path / "o2")["skipped"] == {"bad_label": 1}
