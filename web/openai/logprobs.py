"""Log probabilities in OpenAI's two shapes: chat's `logprobs.content` entries (`token`, `logprob`,
`bytes`, `top_logprobs`) and completions' legacy lists (`tokens`, `token_logprobs`,
`top_logprobs`, `text_offset`).

A token that is part of a UTF-8 character has no text of its own (the engine gives the whole
character with the token that completes it), so `bytes` are each token's raw bytes from the
tokenizer's vocabulary, and `token` those bytes as text, or OpenAI's `bytes:\\xe2\\x82` form when
they are not whole UTF-8: joined and decoded, a choice's `bytes` rebuild its text.
"""
from __future__ import annotations

from collections.abc import Callable

from web.openai.choice_text import ReceivedToken

TokenBytes = Callable[[int], "bytes | None"]  # a token id's raw bytes; None when the tokenizer cannot say


def token_and_bytes(token: dict, raw_bytes: TokenBytes) -> tuple[str, bytes]:
    """The token's raw bytes where the vocabulary gives them (else its text's), and its text:
    those bytes decoded, or OpenAI's `bytes:\\xNN` form when they are not whole UTF-8."""
    raw = raw_bytes(token["id"]) if isinstance(token.get("id"), int) else None
    if raw is None:
        text = token.get("text") or ""
        return text, text.encode("utf-8")
    try:
        return raw.decode("utf-8"), raw
    except UnicodeDecodeError:  # part of a character
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in raw), raw


def _chat_alternative(token: dict, raw_bytes: TokenBytes) -> dict:
    text, raw = token_and_bytes(token, raw_bytes)
    return {"token": text, "logprob": token.get("logprob"), "bytes": list(raw)}


def chat_logprobs(tokens: list[ReceivedToken], raw_bytes: TokenBytes) -> dict:
    entries = []
    for received in tokens:
        entry = _chat_alternative(received.token, raw_bytes)
        entry["top_logprobs"] = [_chat_alternative(t, raw_bytes) for t in received.top]
        entries.append(entry)
    return {"content": entries}


def completion_logprobs(tokens: list[ReceivedToken], offset: int, raw_bytes: TokenBytes,
                        prompt: dict | None = None) -> dict:
    """`offset`: where the choice's generated text starts in its `text` (after an echoed prompt);
    `prompt`: the echoed prompt's entries (`prompt_logprobs`), which come first."""
    out = {key: list(values) for key, values in (prompt or _EMPTY).items()}
    for received in tokens:
        out["tokens"].append(token_and_bytes(received.token, raw_bytes)[0])
        out["token_logprobs"].append(received.token.get("logprob"))
        out["top_logprobs"].append(_alternatives(received.top, raw_bytes))
        out["text_offset"].append(offset + received.start)
    return out


def prompt_logprobs(offsets: tuple[int, ...], prefill: list[dict], prefill_top: list[list[dict]] | None,
                    raw_bytes: TokenBytes) -> dict:
    """An echoed prompt's entries: its tokens (TGI's `prefill`: the first without a logprob) at
    `offsets` in its text, each with its alternatives (the first's are null, as OpenAI's)."""
    out = {key: [] for key in _EMPTY}
    tops = prefill_top or [[] for _ in prefill]
    for position, (token, top, offset) in enumerate(zip(prefill, tops, offsets)):
        out["tokens"].append(token_and_bytes(token, raw_bytes)[0])
        out["token_logprobs"].append(token.get("logprob"))
        out["top_logprobs"].append(None if position == 0 else _alternatives(top, raw_bytes))
        out["text_offset"].append(offset)
    return out


def _alternatives(top: list[dict], raw_bytes: TokenBytes) -> dict:
    return {token_and_bytes(t, raw_bytes)[0]: t.get("logprob") for t in top}


_EMPTY = {"tokens": (), "token_logprobs": (), "top_logprobs": (), "text_offset": ()}
