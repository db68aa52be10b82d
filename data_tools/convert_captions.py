"""Captions + region features -> MDS dataset of kind ``captions`` (one sample per image).

Caption sources (detected from the file):
  * Karpathy split file (``dataset_coco.json`` / ``dataset_flickr30k.json``, and VLP's
    Conceptual Captions ``dataset_cc.json``, same layout): ``images[].sentences[].raw``,
    ``split``, ``filename``, ``cocoid``/``imgid``; ``--split`` picks the images whose
    ``split`` is that value (``train`` adds ``restval`` with ``--include-restval``; ``all``
    takes every image whatever its split).
  * COCO ``captions_*.json``: ``images[]`` (id, width, height) + ``annotations[]``
    (image_id, caption); it has no splits, so ``--split`` must be ``all`` (the default).
  * Conceptual Captions' own TSV (``Train_GCC-training.tsv``, ``Validation_GCC-1.1.0-
    Validation.tsv``: ``caption<TAB>url`` per line, no ids): the image id is the data row's
    0-based index, so the feature files must be keyed by it (what downloaders that name
    images by row, e.g. img2dataset with its default 10,000 samples per shard, give). A
    first line ``caption<TAB>url`` (the header img2dataset's CC3M instructions add) is
    skipped and not counted, as img2dataset counts data rows only: the first data row is
    image 0 either way. No splits (``--split all``).

Region features: ``--tsv`` (bottom-up-attention TSV, base64 float32) or ``--npz-dir`` (one
``<image_id>.npz`` per image); see data_tools/features.py. Each sample holds ALL captions
of its image (training draws one per visit, evaluation scores against all references),
region features as float16 and boxes normalised by the image size.

Example:
  python data_tools/convert_captions.py --captions dataset_coco.json --split train \\
      --include-restval --tsv trainval_36.tsv --out s3://bucket/coco/captions/train
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
import sys

from data_tools.common import (BadInputError, SkipCounter, add_output_args, open_writer, run_main,
                               summarize)
from data_tools.features import RegionChecker, add_feature_args, feature_source, iter_image_regions, norm_id
from vltrain.data import schema
from vltrain.redact import RedactingArgumentParser


def _empty(text: str) -> str:
    """What is wrong with a caption that makes no token: blank, or only characters BERT's
    tokenizer drops (which the collator would refuse, in whichever epoch drew it). Judged with
    accent stripping (the converter knows no vocabulary): a caption of combining marks alone,
    which a cased tokenizer would keep as [UNK], is refused too."""
    if not text.strip():
        return "empty caption"
    return f"empty caption (only characters BERT's tokenizer drops: {ascii(text)})"


def _is_gcc_header(line: str) -> bool:
    """img2dataset's CC3M recipe prepends ``caption<TAB>url`` (its column names) to the TSV."""
    return [c.strip().lower() for c in line.split("\t")] == ["caption", "url"]


def _gcc_tsv(path: str, skips: SkipCounter) -> dict[str, list[str]]:
    """Conceptual Captions' caption<TAB>url lines -> {data row index: [caption]}.

    A ``caption<TAB>url`` header line is skipped and not counted: img2dataset numbers the data
    rows only, so counting the header would pair every caption with the next row's image."""
    caps: dict[str, list[str]] = {}
    header = 0
    try:
        with open(path, encoding="utf-8-sig") as f:     # -sig: a BOM would hide the header
            for lineno, line in enumerate(f, start=1):
                line = line.rstrip("\n")
                if lineno == 1 and _is_gcc_header(line):
                    header = 1
                    continue
                row = lineno - 1 - header
                skips.read += 1                      # one image per line
                text, sep, url = line.partition("\t")
                if not sep or not url.strip():
                    skips.bad("malformed_line", f"{path} line {lineno}: not 'caption<TAB>url' "
                                                f"(a Conceptual Captions TSV)")
                    continue
                if not schema.yields_tokens(text):
                    skips.bad("empty_caption", f"{path} line {lineno} (image {row}): {_empty(text)}")
                    continue
                caps[str(row)] = [text.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read captions TSV ({e})") from e
    return caps


def _coco_images(path: str, images: list) -> tuple[dict[str, int], dict[str, tuple[int, int]]]:
    """COCO ``images[]`` -> ({image id: position}, {image id: (w, h)} where given)."""
    order: dict[str, int] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for k, im in enumerate(images):
        # Not skippable: annotations name images by this id, so a broken entry is a broken file.
        if not isinstance(im, dict) or "id" not in im:
            raise BadInputError(f"{path} images[{k}]: no 'id' (a COCO captions image needs id, width, "
                                f"height); is this a COCO captions_*.json?")
        iid = norm_id(im["id"])
        order[iid] = k
        if "width" in im and "height" in im:
            try:
                sizes[iid] = (int(im["width"]), int(im["height"]))
            except (TypeError, ValueError) as e:
                raise BadInputError(f"{path} images[{k}] (id {iid}): width/height are not integers "
                                    f"({e})") from e
    return order, sizes


def load_captions(path: str, split: str, include_restval: bool, image_key: str,
                  skips: SkipCounter) -> tuple[dict[str, list[str]], dict[str, tuple[int, int]], str]:
    """Return ({image_id: [captions]} in file order, {image_id: (w, h)} where known, format)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError as e:
        raise BadInputError(f"{path}: cannot read captions ({e})") from e
    if head and not head.startswith(b"{"):
        if split != "all":
            raise BadInputError(f"{path} is a Conceptual Captions TSV, which has no splits; use --split all "
                                f"(got {split!r})")
        return _gcc_tsv(path, skips), {}, "gcc_tsv"
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadInputError(f"{path}: cannot read caption JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise BadInputError(f"{path}: neither a Karpathy split file nor a COCO captions file "
                            f"(no 'images' list)")
    caps: dict[str, list[str]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    if "annotations" in data:                                   # COCO captions_*.json
        fmt = "coco"
        if split != "all":
            raise BadInputError(f"{path} is a COCO captions file, which has no splits; "
                                f"use --split all (got {split!r})")
        order, sizes = _coco_images(path, data["images"])
        skips.read = len(order)
        for k, ann in enumerate(data["annotations"]):
            if not isinstance(ann, dict):
                skips.bad("malformed_annotation", f"{path} annotation {k}: {ann!r:.80} is not an object "
                                                  f"with image_id and caption")
                continue
            iid = norm_id(ann.get("image_id", ""))
            text = str(ann.get("caption") or "").strip()
            if iid not in order:
                skips.bad("unknown_image", f"{path} annotation {k} (id {ann.get('id')}): image_id "
                                           f"{ann.get('image_id')!r} is not in 'images'")
                continue
            if not schema.yields_tokens(text):
                skips.bad("empty_caption", f"{path} annotation {k} (id {ann.get('id')}, image {iid}): "
                                           f"{_empty(text)}")
                continue
            caps.setdefault(iid, []).append(text)
        caps = dict(sorted(caps.items(), key=lambda kv: order[kv[0]]))
        return caps, sizes, fmt
    fmt = "karpathy"
    keep = {split} | ({"restval"} if include_restval and split == "train" else set())
    first: dict[str, int] = {}                      # image id -> its entry's index
    present = sorted({str(im.get("split")) for im in data["images"]})
    if split != "all" and not keep & set(present):
        raise BadInputError(f"{path}: no image has split {split!r} (the file's splits: {present})")
    if split == "train" and not include_restval and "restval" in present:
        restval = sum(im.get("split") == "restval" for im in data["images"])
        print(f"note: {path} also has {restval} 'restval' images, which --split train leaves out (VLP's "
              f"caption recipe trains on train + restval: --include-restval)")
    for k, im in enumerate(data["images"]):
        if split != "all" and im.get("split") not in keep:
            continue
        skips.read += 1
        if image_key == "auto":
            key = "cocoid" if "cocoid" in im else "filename"
        else:
            key = image_key
        if key not in im:
            raise BadInputError(f"{path} image {k}: no '{key}' field for --image-key")
        raw_id = os.path.splitext(str(im[key]))[0] if key == "filename" else im[key]
        iid = norm_id(raw_id)
        texts = []
        for j, sent in enumerate(im.get("sentences", [])):
            text = str(sent.get("raw") or "").strip()
            if not schema.yields_tokens(text):
                skips.bad("empty_caption", f"{path} image {k} ({im.get('filename', iid)}, id {iid}) "
                                           f"sentence {j}: {_empty(text)}")
                continue
            texts.append(text)
        if not texts:
            if im.get("sentences"):
                continue  # every caption was bad and already counted
            skips.bad("no_captions", f"{path} image {k} ({im.get('filename', iid)}, id {iid}): no captions")
            continue
        if iid in caps:
            skips.bad("duplicate_image", f"{path} image {k}: image id {iid} appears again (first as image "
                                         f"{first[iid]})")
            continue
        caps[iid] = texts
        first[iid] = k
    return caps, sizes, fmt


def convert(args: argparse.Namespace) -> None:
    skips = SkipCounter.from_args(args)
    caps, sizes, fmt = load_captions(args.captions, args.split, args.include_restval,
                                     args.image_key, skips)
    if not caps:
        raise BadInputError(f"{args.captions}: no captions for split {args.split!r}")
    checker = RegionChecker(skips, args.feature_dim)
    writer = None
    written = 0                                  # captions of the images written (not skipped)
    with contextlib.ExitStack() as stack:
        for r in iter_image_regions(args, list(caps), skips, "captions"):
            cols = checker.to_columns(r, sizes.get(r.image_id))
            if cols is None:
                continue
            if writer is None:
                meta = schema.make_meta(
                    "captions", checker.feature_dim, checker.num_classes, checker.optional,
                    source={"tool": "convert_captions", "captions": os.path.basename(args.captions),
                            "format": fmt, "split": args.split, "include_restval": args.include_restval,
                            "features": feature_source(args)})
                writer = stack.enter_context(open_writer(args.out, "captions", checker.optional, meta,
                                                         size_limit=args.size_limit,
                                                         overwrite=args.overwrite))
            writer.write({"sample_id": schema.stable_sample_id(r.image_id), **cols, "captions": caps[r.image_id]})
            written += len(caps[r.image_id])
        if writer is None:
            raise BadInputError("no samples to write: no image with captions had valid features")
        writer.meta["num_captions"] = written
        skips.finish(writer, "images")
    summarize(writer, skips)


def build_parser() -> argparse.ArgumentParser:
    p = RedactingArgumentParser(prog="convert_captions.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--captions", required=True,
                   help="Karpathy split JSON (dataset_coco.json, dataset_cc.json), COCO captions_*.json "
                        "or Conceptual Captions' caption<TAB>url TSV (image id = 0-based data row; a "
                        "caption<TAB>url header line is skipped)")
    p.add_argument("--split", default="all",
                   help="Karpathy split to convert: train, val, test, ... or all (default %(default)s)")
    p.add_argument("--include-restval", action="store_true",
                   help="with --split train: also take the 'restval' images (the usual 113k train set)")
    p.add_argument("--image-key", default="auto", choices=("auto", "cocoid", "filename", "imgid"),
                   help="Karpathy field that matches the feature files' image ids "
                        "(auto: cocoid if present, else the filename without extension)")
    add_feature_args(p)
    add_output_args(p)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(convert, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
