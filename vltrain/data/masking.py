"""Per-sample randomness and the masking rules (MLM, masked region classification).

Every random decision about a sample (which caption, which attention mode, which tokens and
regions are masked) comes from one generator keyed on ``(seed, epoch, stream, sample_id)`` and
consumed in a fixed order. A sample therefore gets identical masks whatever batch it lands in,
whatever the worker count, world size or resume point.
"""
from __future__ import annotations

import numpy as np

_KEY_TAG = 0x564C5452  # "VLTR": separates our key space from other SeedSequence users


def sample_rng(seed: int, epoch: int, sample_id: int, stream: int = 0) -> np.random.Generator:
    """The generator for one visit of one sample (Philox keyed by a SeedSequence hash)."""
    mask64 = (1 << 64) - 1
    entropy = [_KEY_TAG, int(seed) & mask64, int(epoch) & mask64, int(stream) & mask64,
               int(sample_id) & mask64]
    return np.random.Generator(np.random.Philox(np.random.SeedSequence(entropy)))


def num_to_mask(n_tokens: int, prob: float, max_pred: int) -> int:
    """VLP/UniLM rule: ``min(max_pred, max(1, round(prob * n_tokens)))``.

    ``round`` is Python's (half to even), exactly as the reference code's ``int(round(..))``.
    """
    return min(max_pred, max(1, int(round(n_tokens * prob))))


def choose_mlm_positions(rng: np.random.Generator, candidates: np.ndarray, n_mask: int,
                         word_start: np.ndarray | None = None) -> np.ndarray:
    """Sorted positions to mask among ``candidates`` (sequence positions).

    Token level: ``min(n_mask, len(candidates))`` positions drawn without replacement.
    Whole-word (``word_start`` given, one bool per candidate): candidates are grouped into
    words (a word starts where ``word_start`` is True); words are visited in random order and
    taken whole while the total stays <= ``n_mask`` (Google BERT's
    ``create_masked_lm_predictions``): where no word fits, nothing is masked. (Masking part of
    a word instead let its other pieces give the answer away, which whole-word masking exists
    to prevent. A VLP caption always has a word that fits: its [STOP].)
    """
    candidates = np.asarray(candidates, dtype=np.int64)
    if len(candidates) == 0 or n_mask <= 0:
        return np.zeros(0, np.int64)
    if word_start is None:
        k = min(n_mask, len(candidates))
        return np.sort(rng.choice(candidates, size=k, replace=False))
    starts = np.flatnonzero(np.asarray(word_start, bool))
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts]).astype(np.int64)
    bounds = np.append(starts, len(candidates))
    words = [candidates[bounds[i]:bounds[i + 1]] for i in range(len(starts))]
    chosen: list[np.ndarray] = []
    total = 0
    order = rng.permutation(len(words))
    for w in order:
        if total + len(words[w]) > n_mask:
            continue
        chosen.append(words[w])
        total += len(words[w])
        if total == n_mask:
            break
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


def bernoulli_mlm_positions(rng: np.random.Generator, candidates: np.ndarray, prob: float,
                            word_start: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """VL-BERT's rule (its ``random_word_wwm``): each word (``word_start`` given, as in
    ``choose_mlm_positions``) or else each piece is picked with probability ``prob``, on its
    own: no cap, and possibly none. Returns the sorted positions and, per position, the index
    of its word, so that ``apply_mlm`` corrupts a word's pieces alike, as that code does."""
    candidates = np.asarray(candidates, dtype=np.int64)
    if word_start is None:
        word = np.arange(len(candidates), dtype=np.int64)
    else:
        starts = np.asarray(word_start, bool).copy()
        starts[:1] = True                                # the first piece opens a word
        word = np.cumsum(starts) - 1
    picked = rng.random(int(word[-1]) + 1 if len(word) else 0) < prob
    keep = picked[word]
    return candidates[keep], word[keep]


def apply_mlm(rng: np.random.Generator, ids: np.ndarray, positions: np.ndarray, mask_id: int,
              random_pool: np.ndarray, mask_prob: float = 0.8, random_prob: float = 0.1,
              groups: np.ndarray | None = None) -> None:
    """BERT corruption in place: each position -> [MASK] (p=0.8), random token (0.1), kept (0.1).
    ``groups`` (a group index per position): the choice is drawn once per group and applies
    to all its positions (VL-BERT's words); each random position still gets its own token."""
    if len(positions) == 0:
        return
    if groups is None:
        u = rng.random(len(positions))
    else:
        _, group = np.unique(groups, return_inverse=True)
        u = rng.random(int(group.max()) + 1)[group]
    rand_tok = random_pool[rng.integers(0, len(random_pool), size=len(positions))]
    to_mask = u < mask_prob
    to_rand = (u >= mask_prob) & (u < mask_prob + random_prob)
    ids[positions[to_mask]] = mask_id
    ids[positions[to_rand]] = rand_tok[to_rand]


def choose_regions(rng: np.random.Generator, n_regions: int, prob: float, sampling: str = "count") -> np.ndarray:
    """Sorted region indices to mask: ``round(prob * n)`` of them, at least one if any exist
    (``count``); or each with probability ``prob``, possibly none (``bernoulli``, VL-BERT's
    ``random_mask_region``)."""
    if n_regions <= 0:
        return np.zeros(0, np.int64)
    if sampling == "bernoulli":
        return np.flatnonzero(rng.random(n_regions) < prob).astype(np.int64)
    k = min(n_regions, max(1, int(round(prob * n_regions))))
    return np.sort(rng.choice(n_regions, size=k, replace=False)).astype(np.int64)
