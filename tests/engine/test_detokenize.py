"""Incremental detokenization with a byte-level BPE tokenizer that splits multi-byte characters."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from engine.detokenize import IncrementalDetokenizer, decode_incremental
from tests.tiny_model import build_tokenizer

TEXTS = [
    "The capital of France is Paris.",
    "café au lait, s'il vous plaît",
    "中文 text and 日本語",
    "emoji 🎉🚀 and 👍🏽 ok",
    "  two  spaces,\nnew line\tand tab é中🎉",
]
PROMPT = "Once upon a time there was"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tokenizer")
    build_tokenizer(directory)
    return AutoTokenizer.from_pretrained(directory)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def pieces_of(tokenizer, ids: list[int], prompt: str = PROMPT) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, encode(tokenizer, prompt))
    return [detokenizer.step(token_id) for token_id in ids] + [detokenizer.flush()]


def test_the_tokenizer_splits_characters_across_tokens(tokenizer):
    for char in "é中🎉":
        ids = encode(tokenizer, char)
        assert len(ids) >= 2
        assert all("\ufffd" in tokenizer.decode([i]) for i in ids)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_concatenate_to_the_full_decode_without_replacement_chars(tokenizer, text):
    ids = encode(tokenizer, text)
    pieces = pieces_of(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert not any("\ufffd" in piece for piece in pieces)
    assert pieces[-1] == ""  # nothing held back after complete text


@pytest.mark.parametrize("text", TEXTS)
def test_a_split_character_appears_whole_in_exactly_one_piece(tokenizer, text):
    pieces = pieces_of(tokenizer, encode(tokenizer, text))
    for char in {c for c in text if len(c.encode()) > 1}:
        assert sum(piece.count(char) for piece in pieces) == text.count(char)
        if text.count(char) == 1:
            assert sum(char in piece for piece in pieces) == 1


def test_partial_character_is_held_back_without_advancing(tokenizer):
    prompt, char = encode(tokenizer, "Hello"), encode(tokenizer, "中")
    ids = prompt + char[:1]
    assert decode_incremental(tokenizer, ids, 0, len(prompt)) == ("", 0, len(prompt))
    ids = prompt + char
    assert decode_incremental(tokenizer, ids, 0, len(prompt)) == ("中", len(prompt), len(ids))


def test_leading_space_of_the_first_token_is_kept(tokenizer):
    ids = encode(tokenizer, " world")
    pieces = pieces_of(tokenizer, ids, prompt="Hello,")
    assert pieces[0] == " world"


def test_prompt_context_keeps_the_space_sentencepiece_drops(tmp_path):
    """A Metaspace decoder (as SentencePiece's) strips the space of a text's first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"], show_progress=False)
    backend.train_from_iterator(["Hello world, hello there world"] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    prompt, ids = encode(tokenizer, "Hello"), encode(tokenizer, " world")
    assert tokenizer.decode(ids) == "world"  # alone, the space is lost
    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    assert "".join(detokenizer.step(i) for i in ids) + detokenizer.flush() == " world"


def test_special_tokens_add_no_text(tokenizer):
    eos = tokenizer.eos_token_id
    assert eos in tokenizer.all_special_ids
    ids = encode(tokenizer, "Paris é") + [eos] + encode(tokenizer, " Rome")
    pieces = pieces_of(tokenizer, ids)
    assert pieces[len(encode(tokenizer, "Paris é"))] == ""
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True) == "Paris é Rome"


def test_flush_returns_a_trailing_partial_character(tokenizer):
    ids = encode(tokenizer, "ok 中")[:-1]
    pieces = pieces_of(tokenizer, ids)
    assert pieces[-1].endswith("\ufffd")
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)


def test_works_without_prompt_context(tokenizer):
    ids = encode(tokenizer, "é 中文")
    pieces = pieces_of(tokenizer, ids, prompt="")
    assert "".join(pieces) == "é 中文"


def test_the_fast_decoder_equals_the_tokenizers_decode(tokenizer):
    from engine.detokenize import text_decoder

    decode = text_decoder(tokenizer)
    special = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for text in TEXTS:
        ids = encode(tokenizer, text)
        for window in (ids, ids[1:4], ids[:1], [special] + ids[2:] + [special]):
            assert decode(window) == tokenizer.decode(window, skip_special_tokens=True)
