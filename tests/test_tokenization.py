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
