"""TGI's /tokenize answer: each token with the part of the input it covers, as byte offsets
[start, stop) into the UTF-8 input (TGI's router counts bytes); added special tokens cover
nothing (`""`, 0..0)."""
from __future__ import annotations

from web.tokenizer import TokenCounter


def tokenize(tokens: TokenCounter, text: str, *, add_special_tokens: bool = True,
             truncate: int | None = None) -> list[dict]:
    encoding = tokens.encoding(text, add_special_tokens=add_special_tokens)
    byte_at = _byte_offsets(text)
    out = []
    for token_id, (start, stop), added in zip(encoding.ids, encoding.offsets, encoding.special_tokens_mask):
        if added and add_special_tokens and start == stop:
            out.append({"id": token_id, "text": "", "start": 0, "stop": 0})
        else:
            out.append({"id": token_id, "text": text[start:stop], "start": byte_at[start], "stop": byte_at[stop]})
    return out[-truncate:] if truncate else out


def _byte_offsets(text: str) -> list[int]:
    """byte_at[i]: where character i starts in the UTF-8 encoding (one more entry for the end)."""
    offsets = [0]
    for character in text:
        offsets.append(offsets[-1] + len(character.encode("utf-8")))
    return offsets
