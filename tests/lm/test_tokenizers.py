"""Tokenizers: exact round-trips, unknown symbols, streaming across BPE piece boundaries, exact save/load."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lm.errors import ConfigError, CorpusError
from lm.tokenizers import (
    KINDS,
    UNK_TEXT,
    UNK_TOKEN,
    StreamDecoder,
    Tokenizer,
    fit_tokenizer,
    load_tokenizer,
    tokenizer_from_dict,
)

CHINESE_BPE_VOCAB = 300  # small enough that many learned pieces end in the middle of a character


def _streamed(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    stream = StreamDecoder(tokenizer)
    return [stream.push(i) for i in ids] + [stream.flush()]


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_english(kind: str, tiny_corpus: str) -> None:
    tokenizer = fit_tokenizer(kind, tiny_corpus)
    ids = tokenizer.encode(tiny_corpus)
    assert tokenizer.decode(ids) == tiny_corpus
    assert UNK_TOKEN not in tokenizer.decode(ids)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_chinese(kind: str, chinese_corpus: str) -> None:
    tokenizer = fit_tokenizer(kind, chinese_corpus, CHINESE_BPE_VOCAB if kind == "bpe" else None)
    sentence = "上善若水。水善利万物而不争。"
    assert tokenizer.decode(tokenizer.encode(chinese_corpus)) == chinese_corpus
    assert tokenizer.decode(tokenizer.encode(sentence)) == sentence


def test_char_vocabulary_is_unk_plus_sorted_corpus_characters(chinese_corpus: str) -> None:
    tokenizer = fit_tokenizer("char", chinese_corpus)
    assert tokenizer.kind == "char"
    assert tokenizer.unk_id == 0
    assert tokenizer.vocab_size == len(set(chinese_corpus)) + 1
    assert tokenizer.to_dict()["tokens"] == [UNK_TOKEN, *sorted(set(chinese_corpus))]
    assert len(tokenizer.encode("道可道")) == 3


def test_char_vocab_size_keeps_the_most_frequent() -> None:
    tokenizer = fit_tokenizer("char", "aaaa bbb cc d", vocab_size=4)
    assert tokenizer.vocab_size == 4
    assert tokenizer.decode(tokenizer.encode("abcd")) == f"ab{UNK_TEXT}{UNK_TEXT}"
    assert tokenizer.decode(tokenizer.encode("a b")) == "a b"


@pytest.mark.parametrize("kind", ["char", "word"])
def test_unknown_symbols_become_unk_without_error(kind: str, tiny_corpus: str) -> None:
    tokenizer = fit_tokenizer(kind, tiny_corpus)
    ids = tokenizer.encode("thee 🙂 猫")
    assert tokenizer.unk_id in ids
    assert tokenizer.decode(ids) == f"thee {UNK_TEXT} {UNK_TEXT}"


def test_bpe_encodes_any_text_exactly(tiny_corpus: str) -> None:
    tokenizer = fit_tokenizer("bpe", tiny_corpus)
    text = "Unseen: 🙂 猫 ß \x00 <unk>"
    ids = tokenizer.encode(text)
    assert tokenizer.unk_id not in ids  # every byte is in a byte-level vocabulary
    assert tokenizer.decode(ids) == text  # and a literal "<unk>" in a prompt stays text


@pytest.mark.parametrize("kind", KINDS)
def test_unk_token_decodes_to_the_replacement_character(kind: str, tiny_corpus: str) -> None:
    tokenizer = fit_tokenizer(kind, tiny_corpus)
    the = tokenizer.encode("the")
    ids = [*the, tokenizer.unk_id, *the]
    assert tokenizer.decode(ids) == f"the{UNK_TEXT}the"
    assert "".join(_streamed(tokenizer, ids)) == f"the{UNK_TEXT}the"


def test_word_tokens_are_words_punctuation_and_whitespace_runs(tiny_corpus: str) -> None:
    tokenizer = fit_tokenizer("word", tiny_corpus)
    text = "Shall I compare thee to a summer's day?\n\nThou art"
    ids = tokenizer.encode(text)
    pieces = [tokenizer.decode([i]) for i in ids]
    assert pieces[:8] == ["Shall", " ", "I", " ", "compare", " ", "thee", " "]
    assert "'" in pieces and "?" in pieces and "\n\n" in pieces
    assert tokenizer.decode(ids) == text


def test_word_tokenizer_splits_chinese_into_characters(chinese_corpus: str) -> None:
    tokenizer = fit_tokenizer("word", chinese_corpus)
    assert [tokenizer.decode([i]) for i in tokenizer.encode("上善若水。")] == ["上", "善", "若", "水", "。"]


def test_word_vocab_size_caps_and_rare_words_become_unk(tiny_corpus: str) -> None:
    tokenizer = fit_tokenizer("word", tiny_corpus, vocab_size=20)
    assert tokenizer.vocab_size == 20
    decoded = tokenizer.decode(tokenizer.encode("the impediments of the"))
    assert decoded == f"the {UNK_TEXT} of the"  # "the" and "of" are frequent, "impediments" is not


def test_bpe_vocab_size_is_respected(tiny_corpus: str) -> None:
    assert fit_tokenizer("bpe", tiny_corpus, vocab_size=300).vocab_size == 300


def test_bpe_pieces_ending_mid_character_stream_as_whole_characters(chinese_corpus: str) -> None:
    tokenizer = fit_tokenizer("bpe", chinese_corpus, CHINESE_BPE_VOCAB)
    ids = tokenizer.encode(chinese_corpus)
    # The learned pieces split characters: some tokens alone are not valid UTF-8.
    assert any(not _is_utf8(tokenizer.token_bytes(i)) for i in ids)
    pieces = _streamed(tokenizer, ids)
    assert all(UNK_TEXT not in p for p in pieces)  # never a broken character on the wire
    assert "".join(pieces) == tokenizer.decode(ids) == chinese_corpus


def test_bpe_unseen_character_is_held_back_until_complete(chinese_corpus: str) -> None:
    tokenizer = fit_tokenizer("bpe", chinese_corpus, CHINESE_BPE_VOCAB)
    ids = tokenizer.encode("猫")  # not in the corpus: three single-byte tokens
    assert [tokenizer.token_bytes(i) for i in ids] == [b"\xe7", b"\x8c", b"\xab"]
    assert _streamed(tokenizer, ids) == ["", "", "猫", ""]


def test_dangling_partial_character_flushes_as_replacement(chinese_corpus: str) -> None:
    tokenizer = fit_tokenizer("bpe", chinese_corpus, CHINESE_BPE_VOCAB)
    ids = tokenizer.encode("水猫")[:-1]  # cut after the 2nd byte of 猫
    assert _streamed(tokenizer, ids) == ["水", "", "", UNK_TEXT]
    assert tokenizer.decode(ids) == f"水{UNK_TEXT}"


def test_decode_equals_streamed_concatenation_for_any_ids(chinese_corpus: str) -> None:
    tokenizer = fit_tokenizer("bpe", chinese_corpus, CHINESE_BPE_VOCAB)
    rng = random.Random(0)
    for _ in range(200):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randrange(12))]
        assert "".join(_streamed(tokenizer, ids)) == tokenizer.decode(ids)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_is_exact(kind: str, tiny_corpus: str, chinese_corpus: str, tmp_path: Path) -> None:
    corpus = tiny_corpus + chinese_corpus
    tokenizer = fit_tokenizer(kind, corpus, 400 if kind == "bpe" else None)
    tokenizer.save(tmp_path)  # a folder: writes tokenizer.json into it
    loaded = load_tokenizer(tmp_path / "tokenizer.json")
    assert type(loaded) is type(tokenizer)
    assert loaded.to_dict() == tokenizer.to_dict()
    assert (loaded.vocab_size, loaded.unk_id) == (tokenizer.vocab_size, tokenizer.unk_id)
    probe = corpus + "unseen 🙂 猫 <unk>"
    assert loaded.encode(probe) == tokenizer.encode(probe)
    assert [loaded.token_bytes(i) for i in range(loaded.vocab_size)] == [
        tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)
    ]
    again = tokenizer_from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert again.encode(probe) == tokenizer.encode(probe)


def test_tokenizer_json_keeps_chinese_readable(chinese_corpus: str, tmp_path: Path) -> None:
    fit_tokenizer("char", chinese_corpus).save(tmp_path / "tokenizer.json")
    assert "道" in (tmp_path / "tokenizer.json").read_text(encoding="utf-8")


def test_fit_rejects_unknown_kind_and_empty_corpus() -> None:
    with pytest.raises(ConfigError) as info:
        fit_tokenizer("sentencepiece", "abc")
    assert info.value.param == "tokenizer"
    with pytest.raises(CorpusError, match="empty"):
        fit_tokenizer("char", "")


def test_fit_rejects_a_bpe_vocabulary_smaller_than_the_byte_alphabet(tiny_corpus: str) -> None:
    with pytest.raises(ConfigError, match="at least 257") as info:
        fit_tokenizer("bpe", tiny_corpus, vocab_size=100)
    assert info.value.param == "vocab_size"


def test_decode_rejects_ids_outside_the_vocabulary(char_tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="outside the vocabulary"):
        char_tokenizer.decode([char_tokenizer.vocab_size])


def test_tokenizer_from_dict_rejects_unknown_kinds() -> None:
    with pytest.raises(ValueError, match="unknown tokenizer kind 'morse'"):
        tokenizer_from_dict({"kind": "morse"})
