"""BERT WordPiece tokenisation with the special tokens VLP and VL-BERT need.

Mapping (deliberate, so the vocabulary size and the tied MLM decoder stay BERT's):
  [CLS] [SEP] [MASK] [PAD] [UNK]  BERT's own tokens.
  [STOP]  = [SEP]        VLP's end-of-caption token; the reference code ends captions with [SEP],
                         so decoding stops when [SEP] is predicted.
  [IMG]   = [unused0]    VL-BERT's region token, taken from BERT's reserved slots.
  [END]   = [unused1]    VL-BERT's end token.
A vocab.txt without [unusedK] slots gets [IMG]/[END] appended as new tokens (the model's
``vocab_size`` must then be set to ``len(tokenizer)``).
"""
from __future__ import annotations

import inspect
import json
import os
import re
from functools import cached_property
from typing import Optional

import transformers
from transformers import BertTokenizerFast
from transformers.models.bert.tokenization_bert import load_vocab

ALIASES = {"[STOP]": "[SEP]", "[IMG]": "[unused0]", "[END]": "[unused1]"}

# Vocabularies shipped with the package (no hub access needed): BERT-base uncased WordPiece,
# the vocabulary of bert-base-uncased and of MiniLM (all-MiniLM-L6-v2).
BUILTIN_VOCABS = {"bert-base-uncased": os.path.join(os.path.dirname(__file__), "assets",
                                                    "bert-base-uncased-vocab.txt")}


def vocab_casing(vocab_file: str, words) -> tuple[bool, Optional[bool], str]:
    """``(lowercase, strip_accents, why)`` for a vocabulary: its folder's tokenizer_config.json
    (``do_lower_case``, ``strip_accents``) as transformers' ``from_pretrained`` reads it; without
    one, cased exactly where the vocabulary has words with capitals A-Z (an uncased BERT
    vocabulary has none). Lowercasing a cased vocabulary's text would feed its model ids it was
    never trained on (every capitalised word a lowercase one or [UNK]), without an error."""
    path = os.path.join(os.path.dirname(vocab_file), "tokenizer_config.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                conf = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a readable tokenizer config ({e})") from None
        if isinstance(conf, dict) and "do_lower_case" in conf:
            lower, strip = bool(conf["do_lower_case"]), conf.get("strip_accents")
            return lower, (None if strip is None else bool(strip)), f"{path}: do_lower_case={lower}"
    capitals = next((w for w in words if not (w.startswith("[") and w.endswith("]")) and _CAPITAL.search(w)), None)
    if capitals is not None:
        return False, None, f"{vocab_file} has words with capitals (e.g. {capitals!r}) and no tokenizer_config.json"
    return True, None, f"{vocab_file} has no word with capitals A-Z"


_CAPITAL = re.compile("[A-Z]")


def _bert_tokenizer(vocab_file: str, words, lowercase: bool, strip_accents: Optional[bool]) -> BertTokenizerFast:
    """BERT's WordPiece tokenizer over ``vocab_file``. transformers 4 reads ``vocab_file=``;
    transformers 5 takes ``vocab=`` and silently ignores ``vocab_file=`` (a 5-token
    vocabulary: every word [UNK]), so the keyword is chosen by the constructor's signature
    and the result is checked against the file."""
    case = {"do_lower_case": lowercase, "strip_accents": strip_accents}
    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:
        hf = BertTokenizerFast(vocab_file=vocab_file, **case)
    else:
        hf = BertTokenizerFast(vocab=dict(words), **case)
    if len(hf.get_vocab()) < len(words):
        raise RuntimeError(f"tokenizer vocab file {vocab_file}: transformers {transformers.__version__} "
                           f"loaded {len(hf.get_vocab())} of its {len(words)} tokens")
    return hf


class Tokenizer:
    """Thin wrapper over ``transformers.BertTokenizerFast`` exposing the ids we use."""

    def __init__(self, vocab_file: str, casing: str = "auto"):
        vocab_file = BUILTIN_VOCABS.get(vocab_file, vocab_file)
        if os.path.isdir(vocab_file):
            vocab_file = os.path.join(vocab_file, "vocab.txt")
        if not os.path.isfile(vocab_file):
            raise FileNotFoundError(f"tokenizer vocab file not found: {vocab_file}")
        self.vocab_file = vocab_file
        words = load_vocab(vocab_file)
        if casing == "auto":
            self.lowercase, strip, self.casing_source = vocab_casing(vocab_file, words)
        else:                                   # data.casing: BERT's accent stripping goes with lowercasing
            self.lowercase, strip, self.casing_source = casing == "uncased", None, f"data.casing={casing}"
        self.strip_accents = self.lowercase if strip is None else strip     # BERT's default: with lowercasing
        self.hf = _bert_tokenizer(vocab_file, words, self.lowercase, strip)
        vocab = self.hf.get_vocab()
        extra = [tok for alias, tok in ALIASES.items() if tok not in vocab and alias != "[STOP]"]
        if extra:  # no reserved slots: add the VL tokens under their own names
            names = [a for a, t in ALIASES.items() if t in extra]
            self.hf.add_special_tokens({"additional_special_tokens": names})
            self._alias = {a: (a if a in names else t) for a, t in ALIASES.items()}
        else:
            self._alias = dict(ALIASES)

    def __len__(self) -> int:
        return len(self.hf)

    def token_id(self, token: str) -> int:
        """Id of a special token, resolving our aliases ([STOP], [IMG], [END])."""
        tid = self.hf.convert_tokens_to_ids(self._alias.get(token, token))
        if tid is None or (tid == self.hf.unk_token_id and token not in ("[UNK]",)):
            raise KeyError(f"token {token!r} is not in {self.vocab_file}")
        return tid

    @cached_property
    def cls_id(self) -> int: return self.token_id("[CLS]")
    @cached_property
    def sep_id(self) -> int: return self.token_id("[SEP]")
    @cached_property
    def stop_id(self) -> int: return self.token_id("[STOP]")
    @cached_property
    def mask_id(self) -> int: return self.token_id("[MASK]")
    @cached_property
    def pad_id(self) -> int: return self.token_id("[PAD]")
    @cached_property
    def unk_id(self) -> int: return self.token_id("[UNK]")
    @cached_property
    def img_id(self) -> int: return self.token_id("[IMG]")
    @cached_property
    def end_id(self) -> int: return self.token_id("[END]")

    @cached_property
    def special_ids(self) -> frozenset[int]:
        return frozenset(self.hf.all_special_ids) | {self.img_id, self.end_id}

    def text(self, text, **kwargs):
        """The tokenizer's encoding of ``text`` (a str or a list of them) as plain words: no
        special tokens added and none read from it. A scraped caption holding the string
        "[SEP]" gets ``[ sep ]``: read as the token, it would end a VLP caption early ([STOP] is
        [SEP]) and make [CLS]/[PAD]/[MASK] masked-LM targets."""
        return self.hf(text, add_special_tokens=False, split_special_tokens=True, **kwargs)

    def encode(self, text: str) -> list[int]:
        """WordPiece ids of ``text`` without any special tokens (see :meth:`text`)."""
        return self.text(text)["input_ids"]

    def word_starts(self, ids: list[int]) -> list[bool]:
        """True where a token starts a word (not a ``##`` continuation): for whole-word masking."""
        toks = self.hf.convert_ids_to_tokens(ids)
        return [not t.startswith("##") for t in toks]

    def decode(self, ids) -> str:
        """Text of ``ids`` with special tokens dropped, WordPieces joined and BERT's split at
        punctuation undone (``rejoin``): the caption that is scored."""
        return rejoin(self.hf.decode([int(i) for i in ids], skip_special_tokens=True,
                                     clean_up_tokenization_spaces=False))


# BERT's tokenizer splits every word at punctuation ("t-shirt" -> t - shirt); joined only by its
# WordPieces, a caption keeps the split, and the COCO scorer's PTB tokenizer then reads "t shirt"
# where the references have one token "t-shirt": a model that predicts a reference's exact
# pieces lost its n-grams. transformers' clean-up does not undo it, and turns "dogs ' toys"
# into "dogs'toys" (one word that no reference has). (tokenizers' decoder already attaches
# . , ? ! to the word before.) The ids cannot tell "t-shirt" from a dash between words
# ("rain - some"): joined, as compounds are far more common in captions.
_REJOIN = [
    (re.compile(r"(?<=\w) ([-/]) (?=\w)"), r"\1"),                   # t-shirt, black-and-white, and/or, 7/11
    (re.compile(r"(?<=\d)\. (?=\d)"), "."),                           # 2.5 (decoded "2. 5")
    (re.compile(r"(?<=\d) : (?=\d)"), ":"),                           # 3:30 ("3 : 30")
    (re.compile(r"\b(\w)\. (\w)\."), r"\1.\2."),                    # u.s. ("u. s."), pairwise: "p.m. u.s."
    #                                                                  stays two words (a chain made one)
    (re.compile(r"\b(\w\.\w\.) (\w)\.(?=\s|$)"), r"\1\2."),         # u.s.a., a.k.a. (a third letter)
    (re.compile(r"(?<=\d), (?=\d{3}\b)"), ","),                       # 1,000 ("1, 000")
    (re.compile(r"(?<=\w) ' (s|m|d|re|ve|ll|clock)\b"), r"'\1"),      # man's, it's, they're, o'clock
    (re.compile(r"(?<=\wn) ' t\b"), "'t"),                            # isn't, don't (not the letter 't')
]


def rejoin(text: str) -> str:
    """Undo BERT's split at punctuation inside words, numbers and clitics (see ``_REJOIN``)."""
    for pattern, repl in _REJOIN:
        text = pattern.sub(repl, text)
    return text
