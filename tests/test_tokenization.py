"""WordPiece tokenizer and the deliberate special-token mapping."""
import json

import pytest

from vltrain.tokenization import Tokenizer


def test_special_tokens_map_to_bert_slots(vocab_file):
    tok = Tokenizer(vocab_file)
    assert (tok.pad_id, tok.unk_id, tok.cls_id, tok.sep_id, tok.mask_id) == (0, 100, 101, 102, 103)
    assert tok.stop_id == tok.sep_id            # VLP ends captions with [SEP]
    assert tok.img_id == 1 and tok.end_id == 2  # [unused0], [unused1]
    assert len(tok) == 30522


def test_encode_decode_and_word_starts(vocab_file):
    tok = Tokenizer(vocab_file)
    ids = tok.encode("A small Red circle, unbelievably bright")
    assert tok.cls_id not in ids
    assert tok.decode(ids) == "a small red circle, unbelievably bright"
    starts = tok.word_starts(ids)
    assert starts[0] and not all(starts)        # "unbelievably" splits into word pieces


def test_vocab_without_reserved_slots_adds_tokens(tmp_path):
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "dog"]) + "\n")
    tok = Tokenizer(str(vocab))
    assert tok.img_id >= 7 and tok.end_id >= 7 and tok.img_id != tok.end_id
    assert len(tok) == 9


def test_missing_vocab_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope/vocab.txt"):
        Tokenizer(str(tmp_path / "nope" / "vocab.txt"))


def test_builtin_vocab_is_bert_uncased(vocab_file):
    assert open(Tokenizer("bert-base-uncased").vocab_file).read() == open(vocab_file).read()


def test_a_vocab_file_not_loaded_whole_is_refused(monkeypatch, tmp_path):
    """transformers 5 ignores ``vocab_file=`` and builds BERT's 5 special tokens alone (every
    word [UNK]); whatever the cause, fewer tokens than the file holds stops the run."""
    import vltrain.tokenization as T
    specials = tmp_path / "specials.txt"
    specials.write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")

    class IgnoresTheFile(T.BertTokenizerFast):
        def __init__(self, vocab_file=None, **kw):
            super().__init__(vocab_file=str(specials), **kw)
    monkeypatch.setattr(T, "BertTokenizerFast", IgnoresTheFile)
    with pytest.raises(RuntimeError, match=r"bert-base-uncased-vocab\.txt: transformers \S+ loaded 5 of its "
                                           r"30522 tokens"):
        T.Tokenizer("bert-base-uncased")


def test_a_constructor_without_vocab_file_gets_the_vocabulary_as_vocab(monkeypatch, tmp_path):
    """transformers 5's BertTokenizer takes ``vocab=`` (a dict) and has no ``vocab_file=``: the
    keyword is chosen by the signature. A stand-in with that signature over transformers 4."""
    import vltrain.tokenization as T
    given = []

    class TakesVocab(T.BertTokenizerFast):
        def __init__(self, vocab=None, do_lower_case=True, strip_accents=None):
            given.append(vocab)
            path = tmp_path / "vocab.txt"
            path.write_text("".join(f"{w}\n" for w in sorted(vocab, key=vocab.get)))
            super().__init__(vocab_file=str(path), do_lower_case=do_lower_case, strip_accents=strip_accents)
    monkeypatch.setattr(T, "BertTokenizerFast", TakesVocab)
    tok = T.Tokenizer("bert-base-uncased")
    assert isinstance(given[0], dict) and len(given[0]) == 30522 and given[0]["[MASK]"] == 103
    assert len(tok) == 30522 and tok.encode("a man riding a horse") == [1037, 2158, 5559, 1037, 3586]


REFS = ["a man in a t-shirt holding a hot-dog.", "a close-up of a double-decker bus",
        "a black-and-white photo of a two-story house", "the dogs' toys on a couch", "a 2.5 inch screw at 7/11",
        "the man's hat isn't red, is it?", "a u.s. flag at 3:30 pm", "at 3 p.m. u.s. time", "a u.s.a. flag",
        "they're here and we'll go; i'd say",
        "a clock that reads 10 o'clock", "1,000 birds", "the letter 't' on a sign"]


def test_decoded_captions_read_as_their_references(vocab_file):
    """A model that predicts a reference's exact WordPieces is scored on that reference's words:
    BERT's split at punctuation is undone (it left "t - shirt", which the scorers read as two
    words where the reference has one: a perfect caption's BLEU-4 was 0.0 on such references),
    by the pure-Python tokenizer of the self-critical reward and, with Java, the COCO
    scorer's PTB tokenizer."""
    import shutil

    from vltrain.metrics.caption import ptb_tokenize, simple_tokenize
    tok = Tokenizer(vocab_file)
    decoded = [tok.decode(tok.encode(r)) for r in REFS]
    assert decoded[0] == "a man in a t-shirt holding a hot-dog." and decoded[3] == "the dogs ' toys on a couch"
    assert [simple_tokenize(d) for d in decoded] == [simple_tokenize(r) for r in REFS]
    if shutil.which("java"):            # CI installs it (.ci/run); the caption tests need it too
        got = ptb_tokenize({i: [d] for i, d in enumerate(decoded)})
        assert got == ptb_tokenize({i: [r.lower()] for i, r in enumerate(REFS)})


CASED = ["[PAD]", "[unused0]", "[unused1]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "The", "the", "Dog", "dog", "in",
         "Paris", "paris", "Café", "cafe", "at", "a", "##s", ".", "é"]
SENTENCES = ["The Dog in Paris at a Café.", "the dogs in paris at a cafe", "THE DOG", "Café café CAFÉ"]


def _folder(root, words, config=None):
    root.mkdir()
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    if config is not None:
        (root / "tokenizer_config.json").write_text(config)
    return str(root)


def test_a_cased_vocabulary_is_read_cased(tmp_path):
    """A cased vocabulary's text keeps its capitals and accents, as transformers'
    ``from_pretrained`` reads it (every caller passed only the vocabulary: a cased model was
    fed lowercase ids, "Paris" as "paris", without a word). Its tokenizer_config.json decides
    (``do_lower_case``, ``strip_accents``); without one, capitals A-Z in the words mean cased."""
    from transformers import BertTokenizerFast
    bare = Tokenizer(_folder(tmp_path / "bare", CASED))
    assert not bare.lowercase and not bare.strip_accents
    assert "has words with capitals (e.g. 'The')" in bare.casing_source
    told = _folder(tmp_path / "told", CASED, '{"do_lower_case": false}')
    said_lower = _folder(tmp_path / "lower", CASED, '{"do_lower_case": true}')
    for folder, tok in ((told, Tokenizer(told)), (said_lower, Tokenizer(said_lower))):
        hf = BertTokenizerFast.from_pretrained(folder)
        assert [tok.encode(s) for s in SENTENCES] == [hf(s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    assert Tokenizer(told).encode("The Dog in Paris") == bare.encode("The Dog in Paris") == [7, 9, 11, 12]
    assert Tokenizer(said_lower).encode("The Dog in Paris") == [8, 10, 11, 13]
    # an export writes the casing it trained with
    bare.hf.save_pretrained(str(tmp_path / "export"))
    assert not json.load(open(tmp_path / "export" / "tokenizer_config.json"))["do_lower_case"]
    uncased = Tokenizer("bert-base-uncased")
    assert uncased.lowercase and uncased.strip_accents and "no word with capitals" in uncased.casing_source
    # data.casing overrides what auto reads
    assert Tokenizer(told, "uncased").encode("The Dog in Paris") == [8, 10, 11, 13]
    assert not Tokenizer("bert-base-uncased", "cased").lowercase
    broken = _folder(tmp_path / "broken", CASED, "{not json")
    with pytest.raises(ValueError, match=r"broken/tokenizer_config.json: not a readable tokenizer config"):
        Tokenizer(broken)


def test_yields_tokens_agrees_with_the_tokenizer(tmp_path):
    """schema.yields_tokens (the collators' and converters' "empty after tokenisation" test,
    vocabulary-free) says exactly when the tokenizer makes no token, uncased and cased, on
    random strings over the scripts, controls, marks and private-use ranges that BERT's
    normalizer treats apart."""
    import random

    from vltrain.data.schema import yields_tokens
    toks = {True: Tokenizer("bert-base-uncased"), False: Tokenizer(_folder(tmp_path / "cased", CASED))}
    rng = random.Random(0)
    ranges = [(0, 0x7f), (0x80, 0x24f), (0x300, 0x36f), (0x2000, 0x206f), (0xfff0, 0xffff), (0x4e00, 0x4e20),
              (0x1f300, 0x1f320), (0xe000, 0xe010), (0x600, 0x6ff), (0xe0000, 0xe007f), (0x900, 0x97f)]
    checked = 0
    for _ in range(3000):
        s = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(1, 4)))
        if any(0xd800 <= ord(c) <= 0xdfff for c in s):
            continue
        for strip, tok in toks.items():
            assert yields_tokens(s, strip) == bool(tok.encode(s)), (s, strip)
            checked += 1
    assert checked > 5000
    assert not yields_tokens("\ufffd\ufffd\u200b") and not yields_tokens(" \t\x7f")
    assert not yields_tokens("\u0301") and yields_tokens("\u0301", strip_accents=False)   # a lone accent
