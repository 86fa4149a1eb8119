"""BPE tokenizer: round trip, special tokens, truncation that keeps end-of-text, save/load."""

from __future__ import annotations

import pytest

from vitrina.models.text import (
    EOT,
    PAD,
    SOT,
    byte_level_tokenizer,
    decode,
    load_tokenizer,
    normalize_text,
    tokenize,
    train_bpe,
)

CAPTIONS = [
    "a photo of a red apple",
    "a photo of a green apple on a table",
    "an emoji of a smiling face with sunglasses",
    "a black and white photo of an ankle boot",
    "Ünïcödé café — naïve résumé 🙂",
] * 20


@pytest.mark.parametrize(
    "make", [lambda: byte_level_tokenizer(64), lambda: train_bpe(CAPTIONS, 400, context_length=64)]
)
def test_round_trip_gives_normalised_text_back(make) -> None:
    tokenizer = make()
    texts = ["A Photo of a  RED apple ", "Ünïcödé café — naïve résumé 🙂", "tabs\tand\nnewlines", "x"]
    batch = tokenize(tokenizer, texts)
    for text, ids in zip(texts, batch["input_ids"], strict=True):
        assert decode(tokenizer, ids) == normalize_text(tokenizer, text)
    # The documented normalisation: lower case, whitespace collapsed, ends stripped.
    assert normalize_text(tokenizer, texts[0]) == "a photo of a red apple"
    assert normalize_text(tokenizer, texts[2]) == "tabs and newlines"


def test_layout_special_tokens_and_padding() -> None:
    tokenizer = byte_level_tokenizer(16)
    sot, eot, pad = (tokenizer.token_to_id(t) for t in (SOT, EOT, PAD))
    assert tokenizer.get_vocab_size() == 259  # 3 specials + 256 bytes, no merges
    batch = tokenize(tokenizer, ["hi", "hello"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape == (2, 16)
    assert ids[0, :4].tolist() == [sot, tokenizer.token_to_id("h"), tokenizer.token_to_id("i"), eot]
    assert ids[0, 4:].eq(pad).all() and mask[0].tolist() == [1] * 4 + [0] * 12
    assert ids[1, mask[1].sum() - 1] == eot


def test_truncation_keeps_end_of_text() -> None:
    tokenizer = byte_level_tokenizer(8)
    batch = tokenize(tokenizer, ["a rather long caption that cannot fit"])
    ids = batch["input_ids"][0].tolist()
    assert len(ids) == 8 and batch["attention_mask"].sum() == 8
    assert ids[0] == tokenizer.token_to_id(SOT) and ids[-1] == tokenizer.token_to_id(EOT)
    assert decode(tokenizer, ids) == "a rath"


def test_trained_bpe_merges_frequent_words_and_saves(tmp_path) -> None:
    tokenizer = train_bpe(CAPTIONS, 400, context_length=32)
    assert 259 < tokenizer.get_vocab_size() <= 400
    trained = tokenize(tokenizer, ["a photo of a red apple"])["attention_mask"].sum()
    untrained = tokenize(byte_level_tokenizer(32), ["a photo of a red apple"])["attention_mask"].sum()
    assert trained < untrained  # merges learned from the captions shorten them
    path = tmp_path / "tokenizer.json"
    tokenizer.save(str(path))
    again = load_tokenizer(str(path))
    assert tokenize(again, CAPTIONS[:5])["input_ids"].equal(tokenize(tokenizer, CAPTIONS[:5])["input_ids"])
    assert tokenize(load_tokenizer(str(path), context_length=12), ["x"])["input_ids"].shape == (1, 12)


def test_train_bpe_rejects_a_vocab_below_the_byte_alphabet() -> None:
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe(CAPTIONS, 100)
