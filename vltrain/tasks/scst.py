"""Self-critical sequence training (Rennie et al. 2017), as VLP's ``--scst``.

Per batch: one caption per image is *sampled* from the model (with gradient, dropout as in
training), one is decoded *greedily* (no gradient, eval mode) as the baseline; the reward of
each is its CIDEr-D against the image's references with document frequencies from a fixed
corpus (the training references), the standard self-critical recipe. VLP's own SCST code
differs: it scores each sample against its one paired training caption, with document
frequencies from the batch's captions (README, "Where vltrain departs from the reference code").
Loss = - (r(sample) - r(greedy)) * log p(sample), averaged over the sampled tokens
(the [STOP] step included), so captions that beat the greedy one become more likely.

The reward tokeniser is ``simple_tokenize`` (pure Python; no Java in the training loop);
evaluation still uses the PTB tokenizer through ``vltrain.metrics.caption``.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Optional

import torch

from vltrain.decoding import DecodeOptions, DecodeTokens, greedy_decode, sample_captions

log = logging.getLogger(__name__)


def iter_mds_samples(location: str, timeout: float = 60.0):
    """Every sample (decoded dict) of an MDS dataset, in shard order: a local folder or a
    remote prefix, read once through streaming's own downloader, codecs and MDS reader
    (no ``StreamingDataset``, so no shared memory and no cache folder to collide with)."""
    from streaming.base.compression import decompress
    from streaming.base.format.mds import MDSReader
    from streaming.base.storage import CloudDownloader

    from vltrain.data.datasets import _read_text, is_remote
    from vltrain.data.errors import MetaError
    try:
        shards = json.loads(_read_text(location, "index.json", timeout))["shards"]
    except (ValueError, KeyError) as e:
        raise MetaError(f"dataset {location}: index.json is unreadable ({e})") from e
    with tempfile.TemporaryDirectory(prefix="vltrain_mds_") as tmp:
        os.makedirs(os.path.join(tmp, "raw"))
        for shard in shards:
            raw, zipped = shard["raw_data"], shard.get("zip_data")
            name = (zipped or raw)["basename"]
            if is_remote(location):
                src = os.path.join(tmp, name)
                CloudDownloader.direct_download(location.rstrip("/") + "/" + name, src, timeout)
            else:
                src = os.path.join(location, name)
            with open(src, "rb") as f:
                data = f.read()
            if zipped:
                data = decompress(shard["compression"], data)
            dst = os.path.join(tmp, "raw", raw["basename"])
            with open(dst, "wb") as f:
                f.write(data)
            reader = MDSReader.from_json(os.path.join(tmp, "raw"), "", shard)
            for i in range(reader.samples):
                yield reader.get_item(i)
            os.remove(dst)
            if src.startswith(tmp):
                os.remove(src)


def read_caption_references(location: str, timeout: float = 60.0) -> dict[str, list[str]]:
    """``{image_id: [reference captions]}`` of a captions dataset.

    ``location``: a JSON file mapping image id -> list of captions, or an MDS captions
    dataset (local folder or remote prefix): its ``references.jsonl`` (schema.REFERENCES_FILE,
    written by the converters), else (a dataset converted before that file, or one copied
    without it) every sample of its shards (``iter_mds_samples``: region features included).
    Training reads it on rank 0 and broadcasts it (``build_caption``)."""
    from vltrain.data import schema
    from vltrain.data.datasets import _read_text, read_meta
    from vltrain.data.errors import MetaError
    if location.endswith(".json"):
        with open(location) as f:
            return _references(json.load(f), location)
    meta = read_meta(location, timeout)
    if meta["kind"] != "captions":
        raise MetaError(f"dataset {location} is a {meta['kind']!r} dataset, not a captions one")
    name = meta.get("references_file")
    try:
        text = _read_text(location, name, timeout) if name else None
    except MetaError as e:           # named but not there (a copy without it): the shards say the same
        log.warning("%s; reading the references from the shards instead", e)
        text = None
    if text is not None:
        where = f"dataset {location}: {name}"
        try:
            return _references(dict(json.loads(line) for line in text.splitlines() if line.strip()), where)
        except (ValueError, TypeError) as e:
            raise MetaError(f"{where} is not one JSON [image_id, [captions]] a line: {e}") from e
    log.warning("dataset %s: reading its references from every shard, region features included (a dataset "
                "without %s: convert it again, or pass task.scst_references=<a JSON file>)",
                location, schema.REFERENCES_FILE)
    refs = {schema.references_key(s): [str(c) for c in s["captions"]] for s in iter_mds_samples(location, timeout)}
    if not refs:
        raise MetaError(f"dataset {location} holds no captions")
    return refs


def _references(refs, where: str) -> dict[str, list[str]]:
    from vltrain.data.errors import MetaError
    if not isinstance(refs, dict) or not refs:
        raise MetaError(f"{where}: expected a JSON object image_id -> [captions]")
    bad = next((k for k, v in refs.items() if not isinstance(v, list)), None)
    if bad is not None:   # a bare string would be read as a list of one-character captions
        raise MetaError(f"{where}: image {bad}: expected a list of captions, got {type(refs[bad]).__name__}")
    return {str(k): [str(c) for c in v] for k, v in refs.items()}


def sampled_captions(words: torch.Tensor, mask: torch.Tensor, pad_id: int) -> list[list[int]]:
    """Word ids of each sampled caption (``sample_captions`` output), [STOP] left out."""
    out = []
    for row, n in zip(words.tolist(), mask.sum(1).long().tolist()):
        cap = row[:n]                                   # the caption's steps
        if cap and cap[-1] == pad_id:                   # ended by [STOP] (written as [PAD])
            cap = cap[:-1]
        out.append(cap)
    return out


def self_critical_loss(r_sample: torch.Tensor, r_greedy: torch.Tensor, logps: torch.Tensor,
                       mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, advantage) of samples whose rewards ``r_sample`` (B*n,) are grouped by image, n per
    image in a row (``sample_captions``' order), against their image's greedy reward ``r_greedy``
    (B,): - (r_sample - r_greedy of its image) * log p, averaged over the sampled tokens
    (``logps``, ``mask``: (B*n, T))."""
    n = r_sample.shape[0] // max(1, r_greedy.shape[0])
    adv = r_sample - r_greedy.repeat_interleave(n)
    return -(adv[:, None] * logps * mask).sum() / mask.sum().clamp(min=1.0), adv


class SelfCritical:
    """The SCST loss of a batch (image ids and regions) for a ``VLModel``.

    ``samples`` captions are sampled per image, each scored against the image's greedy
    caption (the baseline), which lowers the variance of the gradient for the same images."""

    def __init__(self, references: dict, tokenizer, opts: DecodeOptions, samples: int = 1,
                 sync_steps: bool = False, source: str = "the references"):
        from vltrain.metrics.caption import CiderD
        if samples < 1:
            raise ValueError(f"task.scst_samples must be >= 1, got {samples}")
        self.cider = CiderD(references, tokenize="simple")
        self.source = source             # names the references in the error below
        self.tokenizer = tokenizer
        self.tokens = DecodeTokens.from_tokenizer(tokenizer)
        self.opts = opts
        self.samples = samples
        # Fixed step counts on every rank (ZeRO-3 gathers parameters collectively per call).
        self.sync_steps = sync_steps

    def rewards(self, image_ids, token_lists) -> torch.Tensor:
        """CIDEr-D of each caption (word ids) against its image's references."""
        missing = self.cider.unknown(image_ids)
        if missing:    # known only per batch: reading data.train's ids up front is a pass over the dataset
            raise ValueError(f"self-critical training: {self.source} has no reference captions for {len(missing)} "
                             f"image(s) of this batch, e.g. {missing[:5]}: its image ids must be data.train's "
                             "image_id column")
        caps = [self.tokenizer.decode(t) for t in token_lists]
        return torch.from_numpy(self.cider(list(zip(image_ids, caps)))).float()

    def loss(self, model, batch, generator: Optional[torch.Generator] = None):
        o, n = self.opts, self.samples
        image_ids = [str(i) for i in batch.task["image_id"]]
        greedy = greedy_decode(model, batch, self.tokens, max_len=o.max_len, min_len=o.min_len,
                               no_repeat_ngram=o.no_repeat_ngram, early_exit=not self.sync_steps)
        words, logps, mask = sample_captions(model, batch, self.tokens, samples=n, max_len=o.max_len,
                                             min_len=o.min_len, no_repeat_ngram=o.no_repeat_ngram,
                                             generator=generator, early_exit=not self.sync_steps)
        sample_ids = [i for i in image_ids for _ in range(n)]
        r_sample = self.rewards(sample_ids, sampled_captions(words, mask, self.tokens.pad_id)).to(logps.device)
        r_greedy = self.rewards(image_ids, greedy.tokens).to(logps.device)
        loss, adv = self_critical_loss(r_sample, r_greedy, logps, mask)
        metrics = {"loss": loss.detach(), "reward_sample": r_sample.mean(), "reward_greedy": r_greedy.mean(),
                   "advantage": adv.mean()}
        return loss, metrics
