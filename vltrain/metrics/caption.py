"""Caption metrics through ``pycocoevalcap``, scored the way the COCO caption server does.

Both references and candidates go through pycocoevalcap's PTB tokenizer (Stanford
CoreNLP, Java), then BLEU-1..4, METEOR (Java), ROUGE-L and CIDEr-D (pycocoevalcap's
``Cider``: clipped n-gram counts and a Gaussian length penalty, idf from the references
of the images scored) are computed per image against all of that image's references.
SPICE runs only when its Stanford CoreNLP jars are present (pycocoevalcap would otherwise
try to download them); when it cannot run the result says ``"SPICE": None`` with a
``"SPICE_status"`` explaining why - it is never silently left out.

``CiderD`` / ``cider_rewards`` score many candidates per image (self-critical training)
with the document frequencies of a fixed reference corpus, reusing pycocoevalcap's
``CiderScorer`` arithmetic.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
import tempfile
from typing import Hashable, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "JavaNotFoundError",
    "require_java",
    "ptb_tokenize",
    "simple_tokenize",
    "spice_status",
    "caption_scores",
    "evaluate_captions",
    "CiderD",
    "cider_rewards",
    "CAPTION_METRICS",
]

CAPTION_METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
JAVA_HINT = ("java not found: install default-jre-headless (e.g. `apt-get install "
             "default-jre-headless`); pycocoevalcap's PTB tokenizer, METEOR and SPICE run on Java")

# Characters that end a line for Java's PTBTokenizer (-preserveLines) or for Python: one of
# these inside a caption would shift every following caption onto the wrong image.
_LINE_BREAKS = re.compile("[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


class JavaNotFoundError(RuntimeError):
    """Raised when a metric needs Java and no `java` is on PATH."""


def require_java() -> str:
    """Path of the `java` executable, or a clear error saying how to install it."""
    java = shutil.which("java")
    if java is None:
        raise JavaNotFoundError(JAVA_HINT)
    return java


def _coco_dir() -> str:
    import pycocoevalcap

    return list(pycocoevalcap.__path__)[0]


# --------------------------------------------------------------------------- tokenizers
def ptb_tokenize(captions: Mapping[Hashable, Sequence[str]]) -> dict[Hashable, list[str]]:
    """pycocoevalcap's PTB tokenization (lower-cased, PTB punctuation removed), key -> list.

    Runs the same command as ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer`` with the
    same post-processing, but keeps its temporary file in the system temp folder (the
    original writes into site-packages, which is read-only on many clusters) and checks
    that every caption comes back on its own line.
    """
    java = require_java()
    from pycocoevalcap.tokenizer import ptbtokenizer as ptb

    keys, sentences = [], []
    for key, caps in captions.items():
        if isinstance(caps, str):
            raise TypeError(f"captions for {key!r} must be a list of strings, not a string")
        for c in caps:
            keys.append(key)
            # A line break inside a caption would shift every later caption by one line.
            sentences.append(_LINE_BREAKS.sub(" ", str(c)))
    out: dict[Hashable, list[str]] = {k: [] for k in captions}
    if not sentences:
        return out
    jar = os.path.join(os.path.dirname(os.path.abspath(ptb.__file__)),
                       ptb.STANFORD_CORENLP_3_4_1_JAR)
    with tempfile.NamedTemporaryFile("wb", suffix=".txt", delete=False) as f:
        f.write("\n".join(sentences).encode())
        path = f.name
    try:
        proc = subprocess.run(
            [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines",
             "-lowerCase", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    except FileNotFoundError as e:  # java vanished between the check and the call
        raise JavaNotFoundError(JAVA_HINT) from e
    finally:
        os.remove(path)
    if proc.returncode != 0:
        raise RuntimeError(f"PTB tokenizer (Java) failed with exit code {proc.returncode}: "
                           f"{proc.stderr.decode(errors='replace')[-2000:]}")
    lines = proc.stdout.decode().split("\n")
    # The file has no trailing newline, so the output has one line per caption (+ maybe a
    # final empty line).
    if len(lines) < len(sentences) or any(lines[len(sentences):]):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} line(s) for "
                           f"{len(sentences)} caption(s)")
    for key, line in zip(keys, lines):
        out[key].append(" ".join(w for w in line.rstrip().split(" ") if w not in ptb.PUNCTUATIONS))
    return out


_PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
              ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_CLITIC = re.compile(r"(?<=[a-z])(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\w+(?:[-.']\w+)*|[^\w\s]")


def simple_tokenize(caption: str) -> str:
    """A Java-free approximation of the PTB tokenizer for training-time rewards:
    lower-case, split clitics ("is n't", "man 's"), drop punctuation tokens."""
    text = _CLITIC.sub(r" \1", _LINE_BREAKS.sub(" ", caption.lower()))
    return " ".join(t for t in _TOKEN.findall(text) if t not in _PTB_PUNCT and t.strip())


def _tokenize_many(captions: Mapping[Hashable, Sequence[str]], tokenize: str | None):
    if tokenize == "ptb":
        return ptb_tokenize(captions)
    if tokenize == "simple":
        return {k: [simple_tokenize(c) for c in v] for k, v in captions.items()}
    if tokenize is None:  # already tokenized: whitespace split only
        return {k: [" ".join(str(c).split()) for c in v] for k, v in captions.items()}
    raise ValueError(f"tokenize must be 'ptb', 'simple' or None, not {tokenize!r}")


# --------------------------------------------------------------------------------- SPICE
_SPICE_NEEDS = ("spice-1.0.jar", os.path.join("lib", "stanford-corenlp-3.6.0.jar"),
                os.path.join("lib", "stanford-corenlp-3.6.0-models.jar"))


def spice_status() -> tuple[bool, str]:
    """(can SPICE run here, why not). Never downloads anything."""
    if shutil.which("java") is None:
        return False, "unavailable: " + JAVA_HINT
    spice_dir = os.path.join(_coco_dir(), "spice")
    missing = [p for p in _SPICE_NEEDS if not os.path.exists(os.path.join(spice_dir, p))]
    if missing:
        return False, (
            f"unavailable: {', '.join(missing)} not found in {spice_dir} (SPICE needs Stanford "
            "CoreNLP 3.6.0 and its models, which pycocoevalcap downloads on first use; run "
            "`python -m pycocoevalcap.spice.get_stanford_models` with internet access)")
    return True, "ok"


# ------------------------------------------------------------------------------- scoring
def _check_inputs(references, candidates):
    if not candidates:
        raise ValueError("no candidate captions to score")
    no_ref = [k for k in candidates if k not in references]
    if no_ref:
        raise ValueError(f"{len(no_ref)} candidate image(s) have no references, e.g. {no_ref[:5]}")
    no_cand = [k for k in references if k not in candidates]
    if no_cand:
        raise ValueError(
            f"{len(no_cand)} image(s) have references but no candidate caption, e.g. {no_cand[:5]}")
    for k, c in candidates.items():
        if not isinstance(c, str):
            raise TypeError(f"candidate for image {k!r} must be one string, got {type(c).__name__}")
    for k in candidates:
        refs = references[k]
        if isinstance(refs, str) or len(refs) == 0:
            raise ValueError(f"image {k!r}: references must be a non-empty list of strings")


def evaluate_captions(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    spice: bool | None = None,
    *,
    meteor=None,
) -> tuple[dict, dict[Hashable, dict[str, float]]]:
    """Corpus scores and per-image scores (image id -> metric -> score).

    See :func:`caption_scores`; ``meteor`` may be a running
    ``pycocoevalcap.meteor.meteor.Meteor`` to reuse across evaluations (its JVM takes
    several seconds to load the paraphrase table); it is then left running."""
    _check_inputs(references, candidates)
    require_java()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge

    if spice is False:
        spice_ok, status = False, "disabled"
    else:
        spice_ok, status = spice_status()
        if spice is True and not spice_ok:
            raise RuntimeError("SPICE requested but " + status)

    ids = list(candidates)
    # METEOR's JVM takes seconds to load its paraphrase table: start it first, tokenize and
    # run the pure-Python scorers meanwhile.
    own_meteor = meteor is None
    if own_meteor:
        try:
            meteor = Meteor()
        except FileNotFoundError as e:
            raise JavaNotFoundError(JAVA_HINT) from e
    try:
        gts = ptb_tokenize({i: list(references[i]) for i in ids})
        res = ptb_tokenize({i: [candidates[i]] for i in ids})

        scores: dict = {}
        per_image: dict = {i: {} for i in ids}

        def put(name, corpus, per):
            scores[name] = float(corpus)
            for i, s in zip(ids, per):
                per_image[i][name] = float(s)

        bleu, bleu_per = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            put(f"BLEU-{n + 1}", bleu[n], bleu_per[n])
        rouge, rouge_per = Rouge().compute_score(gts, res)
        cider, cider_per = Cider().compute_score(gts, res)
        try:
            met, met_per = meteor.compute_score(gts, res)
        except (ValueError, BrokenPipeError, OSError) as e:
            if meteor.lock.locked():  # pycocoevalcap does not release it on error
                meteor.lock.release()
            err = meteor.meteor_p.stderr.read().decode(errors="replace")[-2000:] \
                if meteor.meteor_p.poll() is not None else ""
            raise RuntimeError(f"METEOR (Java) failed: {e}; stderr: {err}") from e
        put("METEOR", met, met_per)
        put("ROUGE-L", rouge, rouge_per)
        put("CIDEr", cider, cider_per)
    finally:
        if own_meteor:
            _close_meteor(meteor)

    scores["SPICE"] = None
    if spice_ok:
        try:
            from pycocoevalcap.spice.spice import Spice

            sp, sp_per = Spice().compute_score(gts, res)
            # Spice sorts the image ids; map back by id.
            for i, s in zip(sorted(gts), sp_per):
                per_image[i]["SPICE"] = float(s["All"]["f"])
            scores["SPICE"] = float(sp)
        except Exception as e:  # auto mode: report, never drop silently
            if spice is True:
                raise
            status = f"failed: {type(e).__name__}: {e}"
    scores["SPICE_status"] = status
    return scores, per_image


def caption_scores(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Mapping[Hashable, str],
    spice: bool | None = None,
    *,
    meteor=None,
) -> dict[str, float | None]:
    """COCO caption metrics of one candidate per image against all its references.

    ``references``: image id -> list of reference captions; ``candidates``: image id ->
    caption; both must cover the same images. ``spice``: ``None`` = run SPICE when it can
    (else ``None`` with the reason in ``SPICE_status``), ``True`` = required (error when it
    cannot run), ``False`` = skip (``SPICE_status == "disabled"``).

    Returns ``BLEU-1..BLEU-4, METEOR, ROUGE-L, CIDEr`` (fractions, as pycocoevalcap gives
    them; CIDEr is pycocoevalcap's CIDEr-D, x1 not x100), ``SPICE`` and ``SPICE_status``.
    ``meteor``: a running pycocoevalcap ``Meteor`` to reuse (see :func:`evaluate_captions`).
    """
    return evaluate_captions(references, candidates, spice=spice, meteor=meteor)[0]


def _close_meteor(meteor) -> None:
    """Stop METEOR's JVM now instead of whenever the object is collected."""
    p = getattr(meteor, "meteor_p", None)
    if p is None:
        return
    for stream in (p.stdin, p.stdout, p.stderr):
        try:
            stream.close()
        except Exception:
            pass
    if p.poll() is None:
        p.kill()
    p.wait()


# ------------------------------------------------------------------------------ CIDEr-D
class _DocFreq(dict):
    """Document frequencies that answer 0 for unseen n-grams without growing (pycocoevalcap
    uses a defaultdict, which would grow with every candidate scored during training)."""

    def __missing__(self, key):
        return 0.0


def _corpus_scorer_cls():
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    class _CorpusCiderScorer(CiderScorer):
        """pycocoevalcap's CiderScorer with idf fixed to a reference corpus.

        ``compute_cider`` sets ``ref_len = log(len(crefs))``; here the corpus size must be
        kept, so assignments to ``ref_len`` are ignored."""

        _corpus_ref_len = 0.0

        @property
        def ref_len(self):
            return self._corpus_ref_len

        @ref_len.setter
        def ref_len(self, value):
            pass

    return _CorpusCiderScorer


class CiderD:
    """CIDEr-D of many candidates against a fixed reference corpus.

    Document frequencies (idf) come from ``references``: each image's set of reference
    n-grams counts once, the log corpus size is ``log(#images)`` - exactly what
    pycocoevalcap's ``Cider`` computes when it scores one candidate per image of that
    corpus, so ``CiderD(refs)([(i, cand[i]) for i in refs])`` equals its per-image scores.
    Pass the whole training set's references for self-critical training (as the reference
    SCST code does with its precomputed corpus idf).

    ``tokenize``: ``"ptb"`` (pycocoevalcap's Java tokenizer, as evaluation does),
    ``"simple"`` (pure Python, no Java: for per-step rewards) or ``None`` (already
    tokenized). References are tokenized once here; candidates on every call.
    """

    def __init__(self, references: Mapping[Hashable, Sequence[str]], tokenize: str | None = "ptb",
                 n: int = 4, sigma: float = 6.0):
        from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs

        if not references:
            raise ValueError("CiderD needs a non-empty reference corpus")
        for k, refs in references.items():
            if isinstance(refs, str) or len(refs) == 0:
                raise ValueError(f"image {k!r}: references must be a non-empty list of strings")
        self.tokenize = tokenize
        self.n, self.sigma = n, sigma
        toks = _tokenize_many({k: list(v) for k, v in references.items()}, tokenize)
        corpus = CiderScorer(n=n, sigma=sigma)
        for refs in toks.values():
            corpus.cook_append(None, refs)
        corpus.compute_doc_freq()
        self.document_frequency = _DocFreq(corpus.document_frequency)
        self.ref_len = float(np.log(float(len(corpus.crefs))))
        self._cooked = {k: cook_refs(v, n) for k, v in toks.items()}
        self._scorer_cls = _corpus_scorer_cls()

    def unknown(self, image_ids: Iterable[Hashable]) -> list:
        """The ids (sorted, once each) that have no references here."""
        return sorted({i for i in image_ids if i not in self._cooked}, key=str)

    def __call__(self, candidates: Iterable[tuple[Hashable, str]]) -> np.ndarray:
        """CIDEr-D (x10 scale as pycocoevalcap) of each (image_id, caption), in order."""
        from pycocoevalcap.cider.cider_scorer import cook_test

        cands = list(candidates)
        if not cands:
            return np.zeros(0, dtype=np.float64)
        unknown = self.unknown(i for i, _ in cands)
        if unknown:
            raise KeyError(f"{len(unknown)} image(s) without references, "
                           f"e.g. {unknown[:5]}")
        keyed = {j: [c] for j, (_, c) in enumerate(cands)}
        toks = _tokenize_many(keyed, self.tokenize)
        scorer = self._scorer_cls(n=self.n, sigma=self.sigma)
        scorer._corpus_ref_len = self.ref_len
        scorer.document_frequency = self.document_frequency
        scorer.ctest = [cook_test(toks[j][0], self.n) for j in range(len(cands))]
        scorer.crefs = [self._cooked[i] for i, _ in cands]
        scores = np.asarray(scorer.compute_cider(), dtype=np.float64)
        assert not any(math.isnan(s) for s in scores)
        return scores


def cider_rewards(
    references: Mapping[Hashable, Sequence[str]],
    candidates: Iterable[tuple[Hashable, str]],
    tokenize: str | None = "ptb",
) -> np.ndarray:
    """Per-candidate CIDEr-D of (image_id, caption) pairs, idf from ``references``.

    One-shot form of :class:`CiderD`; build a ``CiderD`` once when scoring repeatedly.
    """
    return CiderD(references, tokenize=tokenize)(candidates)
