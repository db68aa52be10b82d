"""Plain-text corpus -> MDS dataset of kind ``text`` (VL-BERT's text-only <Text, None> samples).

Input: one or more UTF-8 text files; documents are separated by one or more blank lines
(the BooksCorpus / Wikipedia dumps' usual layout). Each document becomes one sample whose
``text`` keeps its lines (joined by newlines, each stripped). With ``--max-words N`` a long
document is cut into consecutive chunks of at most N whitespace-separated words (each chunk
one sample, its words joined by single spaces: WordPiece reads any whitespace alike), so no
sample is longer than the model's text budget. ``--min-words`` drops
shorter documents/chunks (counted in the meta). ``sample_id`` is the running sample number.

Example:
  python data_tools/convert_text.py --input wiki.txt books.txt --max-words 200 \\
      --out s3://bucket/text/train
"""
from __future__ import annotations

if __package__ in (None, ""):  # run as a script: import `data_tools` as a package, and keep
    import os as _os, sys as _sys  # data_tools/inspect.py from shadowing the stdlib `inspect`
    _here = _os.path.dirname(_os.path.realpath(__file__))
    _sys.path[:] = [p for p in _sys.path if _os.path.realpath(p or ".") != _here]   # symlinks resolved
    _sys.path.insert(0, _os.path.dirname(_here))

import argparse
import os
import sys
from typing import Iterator

from data_tools.common import (BadInputError, SkipCounter, add_output_args, open_writer, run_main,
                               summarize)
from vltrain.data import schema
from vltrain.redact import RedactingArgumentParser

TEXT_SIZE_LIMIT = "1mb"


def iter_documents(path: str, skips: SkipCounter) -> Iterator[tuple[int, str]]:
    """Yield (first line number, document text) for each blank-line separated document.

    A line that is not valid UTF-8 is bad input: an error naming file and line, or with
    ``--skip-bad`` its whole document is skipped (counted).
    """
    lines: list[str] = []
    start = 0
    broken = False
    if not os.path.isfile(path):
        raise BadInputError(f"--input {path} does not exist")
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            try:
                # utf-8-sig on the first line: a byte-order mark would start the first document
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").strip()
            except UnicodeDecodeError as e:
                if not lines and not broken:
                    start = lineno
                skips.bad("invalid_utf8", f"{path} line {lineno}: not valid UTF-8 ({e.reason} at byte "
                                          f"{e.start}), in the document starting at line {start}")
                broken = True
                continue
            if not line:
                if lines and not broken:
                    yield start, "\n".join(lines)
                lines, broken = [], False
                continue
            if not lines and not broken:
                start = lineno
            lines.append(line)
    if lines and not broken:
        yield start, "\n".join(lines)


def chunk_words(text: str, max_words: int | None) -> list[str]:
    if not max_words:
        return [text]
    words = text.split()
    return [" ".join(words[i:i + max_words]) for i in range(0, len(words), max_words)]


def convert(args: argparse.Namespace) -> None:
    if args.max_words is not None and args.max_words <= 0:
        raise BadInputError("--max-words must be positive")
    skips = SkipCounter.from_args(args)
    meta = schema.make_meta("text", None, None, (),
                            source={"tool": "convert_text",
                                    "inputs": [os.path.basename(p) for p in args.input],
                                    "max_words": args.max_words, "min_words": args.min_words})
    docs = short = 0
    with open_writer(args.out, "text", (), meta, size_limit=args.size_limit,
                     overwrite=args.overwrite) as writer:
        for path in args.input:
            for lineno, doc in iter_documents(path, skips):
                docs += 1
                for chunk in chunk_words(doc, args.max_words):
                    n = len(chunk.split())
                    if n < args.min_words:
                        short += 1      # a filter the user asked for, not bad input
                        continue
                    writer.write({"sample_id": writer.count, "text": chunk})
        if writer.count == 0:
            raise BadInputError(f"no documents in {', '.join(args.input)}")
        writer.meta["num_documents"] = docs
        writer.meta["dropped_short"] = short
        skips.finish(writer, None)
    summarize(writer, skips)
    if short:
        print(f"dropped {short} document(s)/chunk(s) shorter than --min-words {args.min_words}")


def build_parser() -> argparse.ArgumentParser:
    p = RedactingArgumentParser(prog="convert_text.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True, help="UTF-8 text file(s)")
    p.add_argument("--max-words", type=int, default=None,
                   help="split documents into chunks of at most this many words (default: no split)")
    p.add_argument("--min-words", type=int, default=1,
                   help="drop documents/chunks with fewer words (default %(default)s)")
    # Small shards: streaming shuffles shards within blocks of 262,144 samples, and a 64 MB shard
    # holds ~250k short text samples, so a text corpus mixed with captions came in long runs of
    # one kind (per-step text share sd 0.094 where random mixing gives 0.031; ~4k samples a
    # shard gives 0.033: a simulation of streaming's py1e shuffle at VL-BERT's scale).
    add_output_args(p, size_limit=TEXT_SIZE_LIMIT,
                    size_why=": text shards stay small so that a mix with captions shuffles evenly")
    return p


def main(argv: list[str] | None = None) -> int:
    return run_main(convert, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
