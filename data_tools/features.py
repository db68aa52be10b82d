"""Region-feature inputs shared by the converters: bottom-up-attention TSV files or per-image .npz.

TSV (Anderson et al.'s bottom-up-attention dumps and the readers of VLP / LXMERT / ViLBERT):
one row per image, tab separated, no header by default, fields named by ``--tsv-fields``
(default ``image_id,image_w,image_h,num_boxes,boxes,features``). Array fields are base64 of
raw little-endian arrays: ``boxes`` float32 (num_boxes, 4) in pixels x1,y1,x2,y2,
``features`` float32 (num_boxes, D), optional ``cls_prob`` float32 (num_boxes, C),
``objects_id`` int64 or int32 (num_boxes,), ``objects_conf`` float32 (num_boxes,),
``image_feature`` float32 (D,). LXMERT's names ``img_id, img_w, img_h`` are accepted as
aliases; other fields (``attrs_id``, ``attrs_conf``) are read past. A first row whose cells
are field names is taken as the header. Python-3 dumps that wrote ``b'...'`` are accepted.

Image ids match whichever way each side keys an image (:func:`norm_id`): leading zeros are
ignored, and a COCO file stem (LXMERT's ``COCO_train2014_000000000009``) is the integer id
(9) that VQA / COCO captions / refs annotations use.

NPZ: one ``<image_id>.npz`` per image (``9.npz``, ``000000000009.npz`` or
``COCO_train2014_000000000009.npz``) with ``features`` (N, D), ``boxes`` (N, 4) pixels,
optional ``num_boxes``, ``cls_prob`` (N, C), ``image_w``, ``image_h``,
``objects_id``/``obj_labels``, ``objects_conf``/``obj_conf``, ``image_feature`` (D,).
bottom-up-attention.pytorch's (MILVLG) names ``x``, ``bbox``, ``num_bbox`` are accepted for
features, boxes, num_boxes. Only these arrays are read, never with pickle: MILVLG's ``info``
(a pickled dict with its objects_id / objects_conf / cls_prob) is ignored, so class
distributions or labels need a TSV or an npz that stores them as plain arrays. Image sizes
missing from the file are taken from the caption/question source when it has them (COCO
``captions_*.json`` does).

Every record is validated before it becomes a sample: NaN/inf, wrong feature dimension,
zero regions, num_boxes disagreeing with the arrays, corrupt base64, boxes outside the image,
values beyond float16's range. Each problem is a :class:`BadInputError` naming the file, row
and image, or a counted skip with ``--skip-bad``.
"""
from __future__ import annotations

import argparse
import base64
import binascii
import csv
import os
import re
import sys
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import numpy as np

from data_tools.common import BadInputError, SkipCounter
from vltrain.data.schema import box_faults

DEFAULT_TSV_FIELDS = ("image_id", "image_w", "image_h", "num_boxes", "boxes", "features")
FIELD_ALIASES = {"img_id": "image_id", "img_w": "image_w", "img_h": "image_h"}
KNOWN_FIELDS = {"image_id", "image_w", "image_h", "num_boxes", "boxes", "features", "cls_prob",
                "objects_id", "objects_conf", "attrs_id", "attrs_conf", "image_feature",
                *FIELD_ALIASES}
FP16_MAX = float(np.finfo(np.float16).max)


# A COCO image file's stem (``COCO_train2014_000000000009``), how LXMERT's TSVs and extractors
# that name outputs by image file key COCO images; annotations (VQA, COCO captions, refs) key
# the same image by its integer id 9.
COCO_STEM = re.compile(r"COCO_[a-z]+\d{4}_(\d+)")


def norm_id(x) -> str:
    """Canonical image id, the same whichever way a file keys the image: decimal ids lose
    leading zeros (``000009`` == ``9``), a COCO file stem becomes its integer id
    (``COCO_val2014_000000000009`` == ``9``), other ids are kept as they are."""
    s = str(x).strip()
    m = COCO_STEM.fullmatch(s)
    if m:
        s = m.group(1)
    if s.isdigit():
        return str(int(s))
    return s


@dataclass
class Regions:
    """One image's regions as read from a feature file (boxes still in pixels)."""
    image_id: str
    where: str                        # "file.tsv row 7" / "dir/123.npz": for error messages
    image_w: int | None
    image_h: int | None
    features: np.ndarray              # (N, D)
    boxes: np.ndarray                 # (N, 4) pixels
    optional: dict[str, np.ndarray] = field(default_factory=dict)  # schema optional columns


def feature_source(args: argparse.Namespace):
    """How the meta names the features read: the TSV file names, or the npz folder's name."""
    if args.tsv:
        return [os.path.basename(t) for t in args.tsv]
    return os.path.basename(os.path.normpath(args.npz_dir))


def add_feature_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("region features (one of --tsv / --npz-dir)")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--tsv", nargs="+", metavar="FILE",
                     help="bottom-up-attention TSV file(s), base64 float32 arrays")
    src.add_argument("--npz-dir", metavar="DIR", help="folder with one <image_id>.npz per image")
    g.add_argument("--tsv-fields", default=",".join(DEFAULT_TSV_FIELDS),
                   help="comma-separated field names of a header-less TSV (default %(default)s); "
                        "add cls_prob, objects_id, objects_conf, attrs_id, attrs_conf, image_feature "
                        "in file order where present")
    g.add_argument("--feature-dim", type=int, default=None,
                   help="expected region feature dimension (default: the first image's)")
    g.add_argument("--skip-missing-features", action="store_true",
                   help="leave out images that have no features (counted as no_features, reported and "
                        "stored in the meta) and stop only on other bad input; without it, or --skip-bad, a "
                        "missing image stops the tool (with --tsv only once every row has been read)")


# ---------------------------------------------------------------- TSV

def _set_csv_field_limit() -> None:
    limit = sys.maxsize
    while True:  # the C long may be 32 bit
        try:
            csv.field_size_limit(limit)
            return
        except OverflowError:
            limit //= 2


def _b64_bytes(text: str, where: str, name: str, skips: SkipCounter) -> bytes | None:
    s = text.strip()
    if len(s) >= 3 and s[:2] in ("b'", 'b"') and s[-1] == s[1]:
        s = s[2:-1]
    try:
        return base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        skips.bad("corrupt_base64", f"{where}: field '{name}' is not valid base64 ({e}); "
                                    f"the row is truncated or corrupt")
        return None


def _b64_array(text: str, dtype, where: str, name: str, skips: SkipCounter,
               count: int | None = None) -> np.ndarray | None:
    """Decode a base64 field; ``count`` picks int64 vs int32 for integer fields by byte length."""
    raw = _b64_bytes(text, where, name, skips)
    if raw is None:
        return None
    if count and np.dtype(dtype).kind == "i":
        dtype = np.int64 if len(raw) == 8 * count else np.int32
    itemsize = np.dtype(dtype).itemsize
    if len(raw) % itemsize:
        skips.bad("corrupt_base64", f"{where}: field '{name}' decodes to {len(raw)} bytes, not a whole "
                                    f"number of {np.dtype(dtype).name} values (truncated?)")
        return None
    return np.frombuffer(raw, dtype=dtype)


def parse_tsv_fields(spec: str) -> list[str]:
    fields = [FIELD_ALIASES.get(f.strip(), f.strip()) for f in spec.split(",") if f.strip()]
    for need in ("image_id", "num_boxes", "boxes", "features"):
        if need not in fields:
            raise BadInputError(f"--tsv-fields {spec!r} lacks the required field '{need}'")
    return fields


def iter_tsv_rows(paths: Iterable[str], fields: list[str]) -> Iterator[tuple[str, int, list[str], dict]]:
    """Yield (path, row_number, field_names, cells) for every row; detects a header row."""
    _set_csv_field_limit()
    for path in paths:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            names = list(fields)
            for rowno, cells in enumerate(reader, start=1):
                if not cells or (len(cells) == 1 and not cells[0].strip()):
                    continue
                if rowno == 1 and all(c.strip() in KNOWN_FIELDS for c in cells):
                    names = [FIELD_ALIASES.get(c.strip(), c.strip()) for c in cells]
                    continue
                yield path, rowno, names, cells


def row_image_id(cells: list[str], names: list[str]) -> str | None:
    i = names.index("image_id")
    return norm_id(cells[i]) if i < len(cells) else None


def decode_tsv_row(path: str, rowno: int, names: list[str], cells: list[str],
                   skips: SkipCounter) -> Regions | None:
    """Decode one TSV row into :class:`Regions`, or report it bad (None = skipped)."""
    where = f"{path} row {rowno}"
    if len(cells) != len(names):
        image = cells[names.index("image_id")] if names.index("image_id") < len(cells) else "?"
        skips.bad("malformed_row", f"{where} (image {image}): {len(cells)} fields, expected "
                                   f"{len(names)} ({','.join(names)}); truncated row or wrong --tsv-fields")
        return None
    row = dict(zip(names, cells))
    image_id = norm_id(row["image_id"])
    where = f"{where} (image {image_id})"
    try:
        num_boxes = int(row["num_boxes"])
        image_w = int(float(row["image_w"])) if "image_w" in row else None
        image_h = int(float(row["image_h"])) if "image_h" in row else None
    except ValueError as e:
        skips.bad("malformed_row", f"{where}: bad number in num_boxes/image_w/image_h ({e})")
        return None
    if num_boxes <= 0:
        skips.bad("zero_regions", f"{where}: image has zero regions (num_boxes={num_boxes})")
        return None
    boxes = _b64_array(row["boxes"], np.float32, where, "boxes", skips)
    if boxes is None:
        return None
    if boxes.size != num_boxes * 4:
        skips.bad("num_boxes_mismatch", f"{where}: num_boxes={num_boxes} but 'boxes' holds {boxes.size} "
                                        f"values ({boxes.size / 4:g} boxes)")
        return None
    feats = _b64_array(row["features"], np.float32, where, "features", skips)
    if feats is None:
        return None
    if feats.size % num_boxes:
        skips.bad("num_boxes_mismatch", f"{where}: num_boxes={num_boxes} but 'features' holds {feats.size} "
                                        f"values, not a multiple of {num_boxes}")
        return None
    opt: dict[str, np.ndarray] = {}
    if "cls_prob" in row:
        cp = _b64_array(row["cls_prob"], np.float32, where, "cls_prob", skips)
        if cp is None:
            return None
        if cp.size % num_boxes:
            skips.bad("num_boxes_mismatch", f"{where}: num_boxes={num_boxes} but 'cls_prob' holds {cp.size} "
                                            f"values, not a multiple of {num_boxes}")
            return None
        opt["cls_prob"] = cp.reshape(num_boxes, -1)
    if "objects_id" in row:
        ids = _b64_array(row["objects_id"], np.int64, where, "objects_id", skips, count=num_boxes)
        if ids is None:
            return None
        if ids.size != num_boxes:
            skips.bad("num_boxes_mismatch", f"{where}: num_boxes={num_boxes} but 'objects_id' holds "
                                            f"{ids.size} labels")
            return None
        opt["obj_labels"] = ids.astype(np.int32)
    if "objects_conf" in row:
        conf = _b64_array(row["objects_conf"], np.float32, where, "objects_conf", skips)
        if conf is None:
            return None
        if conf.size != num_boxes:
            skips.bad("num_boxes_mismatch", f"{where}: num_boxes={num_boxes} but 'objects_conf' holds "
                                            f"{conf.size} values")
            return None
        opt["obj_conf"] = conf
    if "image_feature" in row:
        imf = _b64_array(row["image_feature"], np.float32, where, "image_feature", skips)
        if imf is None:
            return None
        opt["image_feature"] = imf
    return Regions(image_id, where, image_w, image_h, feats.reshape(num_boxes, -1),
                   boxes.reshape(num_boxes, 4), opt)


# ---------------------------------------------------------------- NPZ

# Each array the reader uses (by its column/field name here), under the names feature extractors
# give it, the first name preferred. bottom-up-attention.pytorch (MILVLG) writes x, bbox,
# num_bbox, image_h, image_w and a pickled `info` dict, which is never read (see _read_npz).
NPZ_ARRAYS = {"features": ("features", "x"), "boxes": ("boxes", "bbox"),
              "num_boxes": ("num_boxes", "num_bbox"), "image_w": ("image_w",), "image_h": ("image_h",),
              "cls_prob": ("cls_prob",), "obj_labels": ("objects_id", "obj_labels"),
              "obj_conf": ("objects_conf", "obj_conf"), "image_feature": ("image_feature",)}
NPZ_OPTIONAL = ("cls_prob", "obj_labels", "obj_conf", "image_feature")


def index_npz_dir(folder: str) -> dict[str, str]:
    """{canonical image id: path} of the folder's .npz files (``9.npz``, ``000000000009.npz`` and
    ``COCO_val2014_000000000009.npz`` are all image 9, so two of them is an error)."""
    if not os.path.isdir(folder):
        raise BadInputError(f"--npz-dir {folder} is not a folder")
    out: dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".npz"):
            image_id = norm_id(name[:-4])
            if image_id in out:
                raise BadInputError(f"--npz-dir {folder}: {os.path.basename(out[image_id])} and {name} are "
                                    f"both image {image_id}; keep one of them")
            out[image_id] = os.path.join(folder, name)
    if not out:
        raise BadInputError(f"--npz-dir {folder} holds no .npz file{_other_formats(folder)}")
    return out


# Feature layouts of the reference code that --npz-dir does not read, by file extension.
OTHER_FEATURE_FORMATS = {
    ".npy": "VLP's per-image <id>.npy / <id>_cls_prob.npy (their boxes are in a separate h5)",
    ".h5": "VLP's chunked h5 files", ".hdf5": "h5 files",
    ".json": "VL-BERT's per-image JSON (base64 boxes/features/classes)",
}


def _other_formats(folder: str) -> str:
    """What the folder holds instead of .npz files, and what to do about it ('' if nothing known)."""
    counts = Counter(os.path.splitext(n)[1].lower() for n in os.listdir(folder))
    found = [f"{counts[ext]} {ext} ({what})" for ext, what in OTHER_FEATURE_FORMATS.items() if counts[ext]]
    if not found:
        return ""
    return (f"; it has {', '.join(found)}, which are not read: write one <image_id>.npz per image with "
            f"arrays features (N, D), boxes (N, 4, pixels), image_w, image_h (and cls_prob where the "
            f"model uses it), or a bottom-up-attention TSV")


def _read_npz(path: str) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """(arrays of NPZ_ARRAYS found, by our name; the file's name for each; all the file's keys).

    Only these keys are read: np.load reads an npz lazily, key by key, so an array we do not
    need, such as MILVLG's pickled ``info``, is never unpickled (allow_pickle stays False:
    unpickling runs code from the file)."""
    with np.load(path, allow_pickle=False) as z:
        files = list(z.files)
        data, names = {}, {}
        for col, keys in NPZ_ARRAYS.items():
            key = next((k for k in keys if k in files), None)
            if key is None:
                continue
            try:
                data[col] = z[key]
            except ValueError as e:      # e.g. an object array, refused without allow_pickle
                raise ValueError(f"array '{key}': {e}") from e
            names[col] = key
    return data, names, sorted(files)


def load_npz(path: str, image_id: str, skips: SkipCounter) -> Regions | None:
    where = f"{path} (image {image_id})"
    try:
        data, names, files = _read_npz(path)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        skips.bad("corrupt_file", f"{where}: cannot read npz ({type(e).__name__}: {e})")
        return None
    for need in ("features", "boxes"):
        if need not in data:
            alias = " or ".join(f"'{k}'" for k in NPZ_ARRAYS[need])
            skips.bad("missing_column", f"{where}: missing array {alias} (has {files})")
            return None
    feats, boxes = data["features"], data["boxes"]
    if feats.ndim != 2:
        skips.bad("bad_shape", f"{where}: '{names['features']}' has shape {feats.shape}, "
                               f"expected (num_boxes, dim)")
        return None
    n = feats.shape[0]
    if n == 0:
        skips.bad("zero_regions", f"{where}: image has zero regions")
        return None
    if boxes.shape != (n, 4):
        skips.bad("num_boxes_mismatch", f"{where}: '{names['features']}' has {n} regions but "
                                        f"'{names['boxes']}' has shape {boxes.shape}")
        return None
    if "num_boxes" in data and int(data["num_boxes"]) != n:
        skips.bad("num_boxes_mismatch", f"{where}: {names['num_boxes']}={int(data['num_boxes'])} but "
                                        f"'{names['features']}' has {n} rows")
        return None
    opt = {}
    for col in NPZ_OPTIONAL:
        if col not in data:
            continue
        if col != "image_feature" and data[col].shape[0] != n:
            skips.bad("num_boxes_mismatch", f"{where}: '{names[col]}' has {data[col].shape[0]} rows, "
                                            f"'{names['features']}' has {n}")
            return None
        opt[col] = data[col]
    size = lambda k: int(data[k]) if k in data else None  # noqa: E731
    return Regions(image_id, where, size("image_w"), size("image_h"), feats, boxes, opt)


# ---------------------------------------------------------------- validation -> sample columns

class RegionChecker:
    """Validates records against each other and turns them into the schema's image columns.

    The first valid record fixes the feature dimension (unless ``--feature-dim``), the class
    count and which optional columns the dataset has (present in every sample or in none).
    """

    def __init__(self, skips: SkipCounter, feature_dim: int | None = None):
        self.skips = skips
        self.feature_dim = feature_dim
        self.num_classes: int | None = None
        self.optional: tuple[str, ...] | None = None
        self.first_where: str | None = None

    def to_columns(self, r: Regions, fallback_size: tuple[int, int] | None = None) -> dict | None:
        bad = self.skips.bad
        w, h = r.image_w, r.image_h
        if (w is None or h is None) and fallback_size:
            w, h = fallback_size
        if w is None or h is None:
            bad("missing_image_size", f"{r.where}: no image_w/image_h to normalise the boxes with "
                                      f"(not in the feature file nor the caption/question source)")
            return None
        if w <= 0 or h <= 0:
            bad("bad_image_size", f"{r.where}: image size {w}x{h} is not positive")
            return None
        n, d = r.features.shape
        dim_src = "--feature-dim" if self.first_where is None else f"the first image ({self.first_where})"
        if self.feature_dim is not None and d != self.feature_dim:
            bad("wrong_feature_dim", f"{r.where}: features have dimension {d}, expected {self.feature_dim} "
                                     f"(from {dim_src})")
            return None
        for name, arr in [("features", r.features), ("boxes", r.boxes), *r.optional.items()]:
            if np.issubdtype(arr.dtype, np.floating) and not np.isfinite(arr).all():
                bad_idx = np.argwhere(~np.isfinite(arr))[0]
                kind = "NaN" if np.isnan(arr).any() else "inf"
                bad("nonfinite", f"{r.where}: '{name}' contains {kind} values "
                                 f"(first at index {tuple(int(i) for i in bad_idx)})")
                return None
        if np.abs(r.features).max() > FP16_MAX or ("image_feature" in r.optional and
                                                   np.abs(r.optional["image_feature"]).max() > FP16_MAX):
            bad("fp16_overflow", f"{r.where}: feature values beyond float16's range (|x| > {FP16_MAX:g})")
            return None
        if "image_feature" in r.optional and r.optional["image_feature"].shape != (d,):
            bad("wrong_feature_dim", f"{r.where}: 'image_feature' has shape "
                                     f"{r.optional['image_feature'].shape}, expected ({d},)")
            return None
        boxes = r.boxes.astype(np.float64) / np.array([w, h, w, h], dtype=np.float64)
        outside, swapped = box_faults(boxes)
        if outside.any():
            i = int(outside.argmax())
            bad("box_outside_image", f"{r.where}: box {i} {r.boxes[i].tolist()} lies outside the "
                                     f"{w}x{h} image (wrong image size or box format?)")
            return None
        if swapped.any():
            i = int(swapped.argmax())
            bad("bad_box", f"{r.where}: box {i} {r.boxes[i].tolist()} has x2<x1 or y2<y1 "
                           f"(expected x1,y1,x2,y2)")
            return None
        boxes = np.clip(boxes, 0.0, 1.0).astype(np.float32)
        if "cls_prob" in r.optional:
            c = r.optional["cls_prob"].shape[1]
            if self.num_classes is not None and c != self.num_classes:
                bad("wrong_num_classes", f"{r.where}: cls_prob has {c} classes, expected {self.num_classes} "
                                         f"(from {self.first_where})")
                return None
        labels = r.optional.get("obj_labels")
        if labels is not None and labels.size and labels.min() < 0:
            bad("bad_label", f"{r.where}: objects_id has negative labels ({int(labels.min())})")
            return None
        if labels is not None and "cls_prob" in r.optional and labels.size \
                and labels.max() >= r.optional["cls_prob"].shape[1] - 1:
            # bottom-up's objects_id indexes the non-background classes: column = label + 1
            bad("bad_label", f"{r.where}: objects_id {int(labels.max())} is beyond cls_prob's "
                             f"{r.optional['cls_prob'].shape[1] - 1} non-background classes")
            return None
        present = tuple(sorted(r.optional))
        if self.optional is not None:
            missing = set(self.optional) - set(present)
            if missing:
                bad("missing_column", f"{r.where}: missing {sorted(missing)}, which earlier images "
                                      f"({self.first_where}) have; optional columns must be in every sample")
                return None
        cols = {
            "image_id": r.image_id,
            "image_w": int(w),
            "image_h": int(h),
            "features": np.ascontiguousarray(r.features, dtype=np.float16),
            "boxes": np.ascontiguousarray(boxes),
        }
        opt_dtypes = {"cls_prob": np.float16, "obj_labels": np.int32, "obj_conf": np.float32,
                      "image_feature": np.float16}
        keep = self.optional if self.optional is not None else present
        for k in keep:
            cols[k] = np.ascontiguousarray(r.optional[k], dtype=opt_dtypes[k])
        if self.optional is None:       # the first valid record fixes the dataset's shape
            self.optional = present
            self.feature_dim = d
            self.first_where = r.where
            if "cls_prob" in r.optional:
                self.num_classes = r.optional["cls_prob"].shape[1]
        return cols


# ---------------------------------------------------------------- the join

def iter_image_regions(args: argparse.Namespace, wanted: list[str], skips: SkipCounter,
                       what: str = "captions") -> Iterator[Regions]:
    """Yield the raw :class:`Regions` of every wanted image id (canonical ids, in a stable order).

    TSV: file order (rows of other images are passed over without decoding). NPZ: ``wanted``
    order. Wanted images with no features are reported at the end (TSV) or when reached (NPZ).
    """
    wanted_set = set(wanted)
    if args.npz_dir:
        index = index_npz_dir(args.npz_dir)
        for image_id in wanted:
            path = index.get(image_id)
            if path is None:
                skips.bad("no_features", f"image {image_id} has {what} but no features: "
                                         f"{os.path.join(args.npz_dir, image_id + '.npz')} does not exist "
                                         f"(--skip-missing-features leaves such images out, counted)")
                continue
            r = load_npz(path, image_id, skips)
            if r is not None:
                yield r
        return
    fields = parse_tsv_fields(args.tsv_fields)
    seen: dict[str, str] = {}
    for path in args.tsv:
        if not os.path.isfile(path):
            raise BadInputError(f"--tsv {path} does not exist")
    for path, rowno, names, cells in iter_tsv_rows(args.tsv, fields):
        image_id = row_image_id(cells, names)
        if image_id not in wanted_set:
            continue
        if image_id in seen:
            skips.bad("duplicate_image", f"{path} row {rowno}: image {image_id} appears again "
                                         f"(first at {seen[image_id]})")
            continue
        seen[image_id] = f"{path} row {rowno}"
        r = decode_tsv_row(path, rowno, names, cells, skips)
        if r is not None:
            yield r
    missing = [i for i in wanted if i not in seen]
    for k, image_id in enumerate(missing):
        msg = f"image {image_id} has {what} but no row in the feature TSV(s) {', '.join(args.tsv)}"
        if k == 0:   # the whole file is read by now: say how many, and how to go on without them
            more = missing[1:6]
            if more:
                msg += (f" (nor have {len(missing) - 1} more: {', '.join(more)}"
                        f"{', ...' if len(missing) > 6 else ''})")
            msg += "; --skip-missing-features leaves such images out, counted"
        skips.bad("no_features", msg)
