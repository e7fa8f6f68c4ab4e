"""Incremental detokenization: the text each new token adds, as TGI's `decode_token` computes it.

Decoding one token alone is wrong for most tokenizers: byte-level BPE splits a character such as
'é' or '中' over several tokens, and SentencePiece drops the leading space of a text's first
token. So we decode a short window of tokens twice, without and with the new ones, and emit the
difference. Two offsets into the token list mark the window: `prefix_offset` (context start)
and `read_offset` (end of the text already emitted). Text that ends in an incomplete UTF-8
character ('\ufffd') is held back, offsets unchanged, until a later token completes it.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

PROMPT_CONTEXT_TOKENS = 5  # as TGI: enough context for the tokenizer to place the first space
REPLACEMENT_CHAR = "\ufffd"


def text_decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    """ids -> text without special tokens: the fast tokenizer's own decode when transformers'
    wrapper would add nothing (no clean-up of spaces), which saves most of a call's host time."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and not getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return lambda ids: backend.decode(list(ids), skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


def decode_incremental(
    tokenizer, ids: Sequence[int], prefix_offset: int, read_offset: int,
    decode: Callable[[Sequence[int]], str] | None = None,
) -> tuple[str, int, int]:
    """(new text, new prefix_offset, new read_offset) for the tokens after `read_offset`.

    Returns ("", prefix_offset, read_offset) while the new tokens add no complete character.
    """
    decode = decode or text_decoder(tokenizer)
    prefix_text = decode(ids[prefix_offset:read_offset])
    text = decode(ids[prefix_offset:])
    if len(text) > len(prefix_text) and not text.endswith(REPLACEMENT_CHAR):
        return text[len(prefix_text) :], read_offset, len(ids)
    return "", prefix_offset, read_offset


class IncrementalDetokenizer:
    """One request's detokenization state: the token list (prompt tail + generated) and offsets."""

    def __init__(self, tokenizer, prompt_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self._decode = text_decoder(tokenizer)
        self.ids = list(prompt_ids[-PROMPT_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, token_id: int) -> str:
        """The text `token_id` completes; '' while a character is still partial."""
        self.ids.append(token_id)
        text, self.prefix_offset, self.read_offset = decode_incremental(
            self.tokenizer, self.ids, self.prefix_offset, self.read_offset, self._decode
        )
        return text

    def flush(self) -> str:
        """Whatever is still held back at the end of the generation (may hold '\ufffd')."""
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix_text) :]
