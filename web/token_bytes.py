"""A token's raw bytes, read off the tokenizer's vocabulary: what OpenAI's logprobs `bytes` hold for
a token that is only part of a UTF-8 character (its text alone would be empty or invalid).

Two vocabularies can split characters: byte-level BPE (GPT-2's table maps each byte to a printable
character) and SentencePiece's byte fallback (`<0xE2>`). Other tokens are whole text, and their
bytes are their text's.
"""
from __future__ import annotations

import json
import re

from tokenizers import Tokenizer

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_table() -> dict[str, int]:
    """GPT-2's bytes_to_unicode, inverted: printable bytes stand for themselves, the others are
    shifted past 255 in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {chr(b): b for b in printable}, 0
    for byte in range(256):
        if byte not in printable:
            table[chr(256 + shifted)] = byte
            shifted += 1
    return table


_BYTE_LEVEL = _byte_level_table()


def _decodes_byte_level(tokenizer: Tokenizer) -> bool:
    decoder = tokenizer.decoder
    if decoder is None:
        return False
    if type(decoder).__name__ == "ByteLevel":
        return True
    if type(decoder).__name__ != "Sequence":
        return False
    return "ByteLevel" in json.dumps(json.loads(tokenizer.to_str()).get("decoder"))  # once per tokenizer


class TokenBytes:
    """`token_bytes(id)`: the token's raw bytes, or None where the vocabulary does not say."""

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._byte_level = _decodes_byte_level(tokenizer)

    def __call__(self, token_id: int) -> bytes | None:
        piece = self._tokenizer.id_to_token(token_id)
        if piece is None:
            return None
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback:
            return bytes([int(fallback.group(1), 16)])
        if self._byte_level:
            try:
                return bytes(_BYTE_LEVEL[ch] for ch in piece)
            except KeyError:  # an added token, written as plain text
                return piece.encode("utf-8")
        return None
