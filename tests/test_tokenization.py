"""WordPiece tokenizer and the deliberate special-token mapping."""
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
        def __init__(self, vocab=None, do_lower_case=True):
            given.append(vocab)
            path = tmp_path / "vocab.txt"
            path.write_text("".join(f"{w}\n" for w in sorted(vocab, key=vocab.get)))
            super().__init__(vocab_file=str(path), do_lower_case=do_lower_case)
    monkeypatch.setattr(T, "BertTokenizerFast", TakesVocab)
    tok = T.Tokenizer("bert-base-uncased")
    assert isinstance(given[0], dict) and len(given[0]) == 30522 and given[0]["[MASK]"] == 103
    assert len(tok) == 30522 and tok.encode("a man riding a horse") == [1037, 2158, 5559, 1037, 3586]


REFS = ["a man in a t-shirt holding a hot-dog.", "a close-up of a double-decker bus",
        "a black-and-white photo of a two-story house", "the dogs' toys on a couch", "a 2.5 inch screw at 7/11",
        "the man's hat isn't red, is it?", "a u.s. flag at 3:30 pm", "they're here and we'll go; i'd say",
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
