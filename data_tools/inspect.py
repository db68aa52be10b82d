"""Describe an MDS dataset (local folder or s3://...): counts, shards, columns, meta, histograms.

Prints: sample count and shards (with the hash check of every shard it reads), the columns
and their encodings, ``vltrain_meta.json``, the region feature dimension and dtype, a
histogram of text lengths in words (captions / questions / expressions / documents, by kind)
and of regions per image, and one decoded sample (arrays summarised by shape, dtype, min, max).

It reads through streaming's own pieces: files come through streaming's downloaders (so
``S3_ENDPOINT_URL`` and the usual credential variables apply), every shard's xxh64/size is
checked against ``index.json``, shards are decompressed with streaming's codecs and decoded
with its MDS reader. A missing, truncated or corrupt shard is an error naming the shard (exit
code 2). ``--max-shards`` limits how many shards are read for the histograms.

Example:
  python data_tools/inspect.py s3://bucket/synthetic/vqa/train --sample 3
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: import `data_tools` as a package, and keep
    import os as _os, sys as _sys  # this very file from shadowing the stdlib `inspect`
    _here = _os.path.dirname(_os.path.realpath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or ".") != _here]   # symlinks resolved
    _sys.path.insert(0, _os.path.dirname(_here))

import argparse
import glob
import json
import os
import sys
import tempfile
from collections import Counter
from typing import Any

import numpy as np

from data_tools.common import BadInputError, download_file, is_remote, join_location, run_main
from vltrain.data import schema
from vltrain.data.datasets import remote_hint
from vltrain.redact import RedactingArgumentParser

TEXT_FIELDS = {"captions": "captions", "vqa": "question", "mc": "question", "refs": "expression",
               "text": "text"}


def _fetch(dataset: str, name: str, tmp: str, required: bool = True) -> str | None:
    """Local path of ``dataset/name`` (downloaded into ``tmp`` when remote)."""
    src = join_location(dataset, name)
    if not is_remote(dataset):
        if os.path.exists(src):
            return src
        if required:
            below = sorted(os.path.relpath(os.path.dirname(p), dataset)
                           for p in glob.glob(os.path.join(glob.escape(dataset), "**", name), recursive=True))
            raise BadInputError(f"{src} does not exist" + (f"; datasets below {dataset}: {', '.join(below[:12])}"
                                                           + (f" and {len(below) - 12} more" if len(below) > 12 else "")
                                                           if below else ""))
        return None
    dst = os.path.join(tmp, name)
    try:
        download_file(src, dst)
    except Exception as e:  # noqa: BLE001 - any downloader error (missing key, auth, network)
        if required:
            raise BadInputError(f"cannot download {src}: {type(e).__name__}: {e}; {remote_hint(e, name)}") from e
        return None
    return dst


def _check_hashes(data: bytes, info: dict, what: str) -> None:
    from streaming.base.hashing import get_hash
    if info.get("bytes") is not None and len(data) != info["bytes"]:
        raise BadInputError(f"shard {what}: {len(data)} bytes but index.json says {info['bytes']} "
                            f"(truncated or replaced shard)")
    for algo, want in (info.get("hashes") or {}).items():
        got = get_hash(algo, data)
        if got != want:
            raise BadInputError(f"shard {what}: {algo} mismatch (index.json {want}, file {got}): "
                                f"corrupt shard")


def read_shard(dataset: str, shard: dict, tmp: str):
    """Fetch, verify, decompress one shard; return a streaming MDS reader over it."""
    from streaming.base.compression import decompress
    from streaming.base.format.mds import MDSReader
    if shard.get("format") != "mds":
        raise BadInputError(f"shard {shard.get('raw_data', {}).get('basename')}: format "
                            f"{shard.get('format')!r} is not mds")
    raw_info, zip_info = shard["raw_data"], shard.get("zip_data")
    stored = zip_info or raw_info
    name = stored["basename"]
    path = _fetch(dataset, name, tmp)
    with open(path, "rb") as f:
        data = f.read()
    _check_hashes(data, stored, name)
    if zip_info:
        try:
            data = decompress(shard["compression"], data)
        except Exception as e:  # noqa: BLE001 - codec errors have many types
            raise BadInputError(f"shard {name}: cannot decompress ({shard['compression']}): {e}") from e
        _check_hashes(data, raw_info, f"{name} (decompressed {raw_info['basename']})")
    os.makedirs(os.path.join(tmp, "raw"), exist_ok=True)
    with open(os.path.join(tmp, "raw", raw_info["basename"]), "wb") as f:
        f.write(data)
    reader = MDSReader.from_json(os.path.join(tmp, "raw"), "", shard)
    reader.validate(allow_unsafe_types=False)
    return reader


def _summarise(v: Any) -> str:
    if isinstance(v, np.ndarray):
        if v.size and np.issubdtype(v.dtype, np.number):
            return (f"ndarray shape {tuple(v.shape)} {v.dtype} min {v.min():.4g} max {v.max():.4g}")
        return f"ndarray shape {tuple(v.shape)} {v.dtype}"
    if isinstance(v, np.generic):
        return repr(v.item())
    s = json.dumps(v) if isinstance(v, (list, dict)) else repr(v)
    return s if len(s) <= 300 else s[:300] + " ..."


def _hist_lines(c: Counter, max_rows: int = 24) -> list[str]:
    if not c:
        return ["  (none)"]
    total = sum(c.values())
    keys = sorted(c)
    vals = np.repeat(np.array(keys, dtype=np.float64), [c[k] for k in keys])
    head = f"  n={total} min={keys[0]} mean={vals.mean():.2f} max={keys[-1]}"
    if len(keys) <= max_rows:
        bins = [(k, k, c[k]) for k in keys]
    else:
        width = int(np.ceil((keys[-1] - keys[0] + 1) / max_rows))
        bins = []
        for lo in range(keys[0], keys[-1] + 1, width):
            hi = lo + width - 1
            bins.append((lo, hi, sum(v for k, v in c.items() if lo <= k <= hi)))
    peak = max(b[2] for b in bins)
    lines = [head]
    for lo, hi, n in bins:
        label = f"{lo}" if lo == hi else f"{lo}-{hi}"
        lines.append(f"  {label:>9}: {n:7d} {'#' * max(1 if n else 0, round(40 * n / peak))}")
    return lines


def inspect_dataset(dataset: str, sample_index: int = 0, max_shards: int | None = None) -> dict:
    """Everything the report shows, as a dict (``--json`` prints it)."""
    with tempfile.TemporaryDirectory(prefix="vltrain-inspect-") as tmp:
        index_path = _fetch(dataset, "index.json", tmp)
        try:
            with open(index_path, encoding="utf-8") as f:
                index = json.load(f)
            shards = index["shards"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise BadInputError(f"{join_location(dataset, 'index.json')}: not a streaming index ({e})") from e
        meta_path = _fetch(dataset, schema.META_FILE, tmp, required=False)
        meta = None
        if meta_path:
            with open(meta_path, encoding="utf-8") as f:
                meta = json.load(f)
        kind = (meta or {}).get("kind")
        total = sum(int(s["samples"]) for s in shards)
        columns = {}
        if shards:
            columns = dict(zip(shards[0]["column_names"], shards[0]["column_encodings"]))
        report: dict[str, Any] = {
            "dataset": dataset, "kind": kind, "num_samples": total, "num_shards": len(shards),
            "columns": columns, "meta": meta, "warnings": [],
            "shards": [{"name": (s.get("zip_data") or s["raw_data"])["basename"], "samples": s["samples"],
                        "raw_bytes": s["raw_data"]["bytes"],
                        "zip_bytes": (s.get("zip_data") or {}).get("bytes"),
                        "compression": s.get("compression"), "hashes": s.get("hashes")} for s in shards],
        }
        if meta is None:
            report["warnings"].append(f"no {schema.META_FILE}: not written by vltrain's data_tools")
        elif kind in schema.KIND_COLUMNS and columns:
            want = schema.columns_for(kind, tuple(meta.get("optional_columns", ())))
            if want != columns:
                report["warnings"].append(f"columns differ from the {kind} schema: expected {want}")
        if any(enc == "pkl" for enc in columns.values()):
            report["warnings"].append("pkl columns present: unsafe, vltrain refuses to read them")
        if meta and meta.get("num_samples") not in (None, total):
            report["warnings"].append(f"meta says {meta['num_samples']} samples, index.json {total}")

        text_field = TEXT_FIELDS.get(kind or "", None)
        lengths: Counter[int] = Counter()
        regions: Counter[int] = Counter()
        images: set[str] = set()
        dims: Counter[str] = Counter()
        sample = None
        seen = 0
        read_samples = 0
        for si, shard in enumerate(shards):
            if max_shards is not None and si >= max_shards and sample is not None:
                break   # enough shards for the histograms, and the requested sample is decoded
            reader = read_shard(dataset, shard, tmp)
            report["shards"][si]["verified"] = True
            name = report["shards"][si]["name"]
            for j in range(reader.samples):
                try:
                    s = reader.get_item(j)
                except Exception as e:  # noqa: BLE001 - decoding garbage raises anything
                    raise BadInputError(f"shard {name} sample {j}: cannot decode ({type(e).__name__}: {e})") \
                        from e
                if seen + j == sample_index:
                    sample = s
                read_samples += 1
                if text_field and text_field in s:
                    texts = s[text_field] if isinstance(s[text_field], list) else [s[text_field]]
                    lengths.update(len(str(t).split()) for t in texts)
                if "features" in s:
                    iid = str(s.get("image_id", f"{si}/{j}"))
                    if iid not in images:
                        images.add(iid)
                        regions[int(s["features"].shape[0])] += 1
                    dims[f"{s['features'].shape[1]} {s['features'].dtype}"] += 1
            seen += reader.samples
        report["samples_read"] = read_samples
        if dims:
            (dim_dtype, _), = dims.most_common(1)
            d, dt = dim_dtype.split()
            report["feature_dim"], report["feature_dtype"] = int(d), dt
            if len(dims) > 1:
                report["warnings"].append(f"mixed feature shapes/dtypes: {dict(dims)}")
        report["text_field"] = text_field
        report["text_length_hist"] = dict(sorted(lengths.items()))
        report["regions_hist"] = dict(sorted(regions.items()))
        report["num_images"] = len(images)
        if sample is not None:
            report["sample_index"] = sample_index
            report["sample"] = {k: _summarise(v) for k, v in sample.items()}
        elif total:
            report["warnings"].append(f"--sample {sample_index} is beyond the samples read ({read_samples})")
        return report


def format_report(r: dict) -> str:
    out = [f"dataset: {r['dataset']}",
           f"kind: {r['kind'] or 'unknown'}",
           f"samples: {r['num_samples']} in {r['num_shards']} shard(s)"]
    for s in r["shards"]:
        zb = f", {s['zip_bytes']} bytes {s['compression']}" if s["zip_bytes"] else ""
        ok = "verified" if s.get("verified") else "not read"
        out.append(f"  {s['name']}: {s['samples']} samples, {s['raw_bytes']} bytes raw{zb}, "
                   f"hashes {s['hashes']} ({ok})")
    out.append("columns:")
    out += [f"  {k}: {v}" for k, v in r["columns"].items()]
    out.append("meta: " + (json.dumps(r["meta"], sort_keys=True) if r["meta"] is not None else "(none)"))
    if "feature_dim" in r:
        out.append(f"features: dim {r['feature_dim']}, dtype {r['feature_dtype']}")
        out.append(f"images: {r['num_images']}")
        out.append("regions per image:")
        out += _hist_lines(Counter(r["regions_hist"]))
    if r["text_field"]:
        out.append(f"{r['text_field']} length (words):")
        out += _hist_lines(Counter(r["text_length_hist"]))
    if "sample" in r:
        out.append(f"sample {r['sample_index']}:")
        out += [f"  {k}: {v}" for k, v in r["sample"].items()]
    for w in r["warnings"]:
        out.append(f"warning: {w}")
    return "\n".join(out)


def run(args: argparse.Namespace) -> None:
    report = inspect_dataset(args.dataset, args.sample, args.max_shards)
    print(json.dumps(report, indent=1, default=str) if args.json else format_report(report))


def build_parser() -> argparse.ArgumentParser:
    p = RedactingArgumentParser(prog="inspect.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset", help="MDS dataset: local folder or s3://bucket/prefix")
    p.add_argument("--sample", type=int, default=0, help="index of the sample to decode (default %(default)s)")
    p.add_argument("--max-shards", type=int, default=None,
                   help="read at most this many shards for the histograms (default: all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
