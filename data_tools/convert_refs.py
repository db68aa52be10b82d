"""RefCOCO / RefCOCO+ / RefCOCOg (the `refer` toolkit's files) + region features -> MDS
dataset of kind ``refs``.

Inputs: ``--refs`` (``refs(unc).p`` / ``refs(umd).p`` / ``refs(google).p`` from the refer
toolkit, or the same list as JSON: ``ref_id``, ``ann_id``, ``image_id``, ``split``,
``sentences[]{sent_id, sent, raw}``), ``--instances`` (its ``instances.json``, COCO format:
``images[]{id, width, height}``, ``annotations[]{id, image_id, bbox: [x, y, w, h]}``),
``--split`` (train, val, testA, testB for RefCOCO/RefCOCO+; train, val, test for RefCOCOg
umd) and the region features of the COCO images (``--tsv`` or ``--npz-dir``, see
data_tools/features.py; the same files VQA and captioning use, keyed by COCO image id).

One sample per sentence (VL-BERT trains and scores every expression of a referent):
``expression`` = the sentence's ``sent`` (refer's lower-cased, tokenised text; ``raw`` when
``sent`` is absent), ``target_box`` = the referent's annotation box as x1,y1,x2,y2 normalised
by the image size, ``target_region`` = the region whose box overlaps it most (IoU), and
``sample_id`` = ``sent_id``. Training labels (IoU >= 0.5 with the target box, VL-BERT's) and
the accuracy (the best-scored region's box has IoU >= 0.5) come from the box, so they work
with any detector's regions. How many expressions have a region with IoU >= 0.5 at all
(the detector's recall: an upper bound of the accuracy) is printed and stored in the meta as
``reachable``.

The refs pickle is read with an unpickler that refuses every class (the file holds only
lists, dicts, strings and numbers), so a tampered file cannot run code.

Example:
  python data_tools/convert_refs.py --refs refcoco+/refs\\(unc\\).p \\
      --instances refcoco+/instances.json --split train --tsv train2014_36.tsv \\
      --out s3://bucket/refcoco+/train
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: import `data_tools` as a package, and keep
    import os as _os, sys as _sys  # data_tools/inspect.py from shadowing the stdlib `inspect`
    _here = _os.path.dirname(_os.path.realpath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or ".") != _here]   # symlinks resolved
    _sys.path.insert(0, _os.path.dirname(_here))

import argparse
import contextlib
import json
import os
import pickle
import sys

import numpy as np

from data_tools.common import (BadInputError, SkipCounter, add_output_args, open_writer,
                               run_main, summarize)
from data_tools.features import RegionChecker, add_feature_args, feature_source, iter_image_regions, norm_id
from vltrain.data import schema
from vltrain.metrics.accuracy import box_iou
from vltrain.redact import RedactingArgumentParser

IOU_REACHABLE = 0.5     # the grounding accuracy's threshold


class _DataOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refuses to load {module}.{name}: a refs file holds only "
                                     f"lists, dicts, strings and numbers")


def load_refs(path: str) -> list:
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            f.seek(0)
            if head in (b"[", b"{") or path.endswith(".json"):
                data = json.load(f)
            else:   # refer's pickles were written by Python 2: its str are bytes, UTF-8 text
                try:
                    data = _DataOnlyUnpickler(f, encoding="utf-8").load()
                except UnicodeDecodeError as e:     # one Latin-1 byte would refuse the whole file
                    f.seek(0)
                    data = _DataOnlyUnpickler(f, encoding="latin1").load()
                    print(f"warning: {path} holds text that is not UTF-8 ({e.reason} at byte {e.start} of a "
                          f"string): read as Latin-1", file=sys.stderr)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read the refs file ({type(e).__name__}: {e})") from e
    if not isinstance(data, list):
        raise BadInputError(f"{path}: not a refer refs file (expected a list of refs, got "
                            f"{type(data).__name__})")
    return data


def load_instances(path: str) -> tuple[dict[str, tuple[int, int]], dict[int, tuple[str, list]]]:
    """(image id -> (w, h), annotation id -> (image id, bbox))."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read instances JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise BadInputError(f"{path}: not a COCO instances file (needs 'images' and 'annotations' lists)")
    try:
        sizes = {norm_id(im["id"]): (int(im["width"]), int(im["height"])) for im in data["images"]}
        anns = {int(a["id"]): (norm_id(a["image_id"]), a["bbox"]) for a in data["annotations"]}
    except (KeyError, TypeError, ValueError) as e:
        raise BadInputError(f"{path}: an image needs id/width/height and an annotation "
                            f"id/image_id/bbox ({type(e).__name__}: {e})") from e
    return sizes, anns


def normalised_box(bbox, size: tuple[int, int]) -> np.ndarray | None:
    """COCO [x, y, w, h] in pixels -> [x1, y1, x2, y2] in [0, 1]; None when not a box inside
    the image."""
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    W, H = size
    box = np.array([x / W, y / H, (x + w) / W, (y + h) / H], np.float64)
    if not np.isfinite(box).all() or w <= 0 or h <= 0 or box.min() < -0.01 or box.max() > 1.01:
        return None
    return np.clip(box, 0.0, 1.0).astype(np.float32)


def collect(args: argparse.Namespace, skips: SkipCounter) -> tuple[dict[str, list[dict]], dict]:
    """The split's sentences grouped by image, in file order, each with its target box."""
    refs = load_refs(args.refs)
    sizes, anns = load_instances(args.instances)
    splits = sorted({str(r.get("split")) for r in refs if isinstance(r, dict)})
    if args.split not in splits:
        raise BadInputError(f"{args.refs}: no refs in split {args.split!r} (it has {splits})")
    by_image: dict[str, list[dict]] = {}
    seen: dict[int, str] = {}
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict):      # of no known split: counted, whichever is converted
            skips.bad("malformed_ref", f"{args.refs} ref {k}: {ref!r:.80} is not an object")
            continue
        if ref.get("split") != args.split:
            continue
        where = f"{args.refs} ref {k} (ref_id {ref.get('ref_id')}, image {ref.get('image_id')})"
        sents = ref.get("sentences")
        skips.read += len(sents) if isinstance(sents, list) and sents else 1    # each expression is scored
        ann = anns.get(int(ref["ann_id"])) if str(ref.get("ann_id", "")).isdigit() else None
        if ann is None:
            skips.bad("missing_annotation", f"{where}: ann_id {ref.get('ann_id')!r} is not in {args.instances}")
            continue
        image_id = norm_id(ref.get("image_id"))
        if ann[0] != image_id:
            skips.bad("annotation_mismatch", f"{where}: its annotation {ref['ann_id']} is on image {ann[0]}")
            continue
        if image_id not in sizes:
            skips.bad("missing_image", f"{where}: image {image_id} is not in {args.instances}")
            continue
        box = normalised_box(ann[1], sizes[image_id])
        if box is None:
            skips.bad("bad_box", f"{where}: annotation {ref['ann_id']} bbox {ann[1]!r} is not an "
                                 f"[x, y, w, h] box inside the {sizes[image_id][0]}x{sizes[image_id][1]} image")
            continue
        if not isinstance(sents, list) or not sents:
            skips.bad("no_sentences", f"{where}: no sentences")
            continue
        for s in sents:
            sid, text = (s.get("sent_id"), str(s.get("sent") or s.get("raw") or "").strip()) \
                if isinstance(s, dict) else (None, "")
            if not isinstance(sid, int) or not text:
                skips.bad("bad_sentence", f"{where}: sentence {s!r} needs an integer sent_id and text")
                continue
            if sid in seen:
                skips.bad("duplicate_sentence", f"{where}: sent_id {sid} already used by {seen[sid]}")
                continue
            seen[sid] = where
            by_image.setdefault(image_id, []).append({"sent_id": sid, "text": text, "box": box})
    if not by_image:
        raise BadInputError(f"{args.refs}: no usable expressions in split {args.split!r}")
    return by_image, sizes


def convert(args: argparse.Namespace) -> None:
    skips = SkipCounter.from_args(args)
    by_image, sizes = collect(args, skips)
    checker = RegionChecker(skips, args.feature_dim)
    writer = None
    reachable = 0
    with contextlib.ExitStack() as stack:
        for r in iter_image_regions(args, list(by_image), skips, "expressions"):
            size = sizes[r.image_id]
            if r.image_w is not None and r.image_h is not None and (r.image_w, r.image_h) != size:
                skips.bad("image_size_mismatch", f"{r.where}: the features say {r.image_w}x{r.image_h}, "
                                                 f"{args.instances} says {size[0]}x{size[1]}")
                continue
            cols = checker.to_columns(r, fallback_size=size)
            if cols is None:
                continue
            if writer is None:
                meta = schema.make_meta(
                    "refs", checker.feature_dim, checker.num_classes, checker.optional,
                    source={"tool": "convert_refs", "refs": os.path.basename(args.refs),
                            "instances": os.path.basename(args.instances), "split": args.split,
                            "features": feature_source(args)})
                writer = stack.enter_context(open_writer(args.out, "refs", checker.optional, meta,
                                                         size_limit=args.size_limit,
                                                         overwrite=args.overwrite))
            for e in by_image[r.image_id]:
                iou = box_iou(cols["boxes"], e["box"][None])[:, 0]
                best = int(np.argmax(iou))
                reachable += int(iou[best] >= IOU_REACHABLE)
                writer.write({"sample_id": e["sent_id"], **cols, "expression": e["text"],
                              "target_region": best, "target_box": e["box"]})
        if writer is None:
            raise BadInputError("no samples to write: no image with expressions had valid features")
        writer.meta["reachable"] = reachable
        skips.finish(writer, "expressions")
    summarize(writer, skips)
    print(f"{reachable} of {writer.count} expressions ({100 * reachable / writer.count:.1f}%) have a region "
          f"with IoU >= {IOU_REACHABLE} with their referent: the best accuracy these regions allow")


def build_parser() -> argparse.ArgumentParser:
    p = RedactingArgumentParser(prog="convert_refs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--refs", required=True, help="refer's refs(unc).p / refs(umd).p, or the same as JSON")
    p.add_argument("--instances", required=True, help="refer's instances.json (COCO format)")
    p.add_argument("--split", required=True, help="train, val, testA, testB (RefCOCO, RefCOCO+) or test (RefCOCOg)")
    add_feature_args(p)
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(convert, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
