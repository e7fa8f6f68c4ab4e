"""What the engine emits for a request, one event per generated token."""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FinishReason(str, Enum):
    """TGI's finish_reason strings: the single mapping from why a request stopped."""

    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"


@dataclass(frozen=True)
class Token:
    id: int
    text: str
    logprob: float | None
    special: bool = False

    def to_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "logprob": self.logprob, "special": self.special}


@dataclass(frozen=True)
class Finish:
    reason: FinishReason
    generated_text: str  # the whole output, special tokens skipped
    generated_tokens: int
    cached_tokens: int = 0  # prompt positions whose KV came from the prefix cache (not prefilled)
    skipped_tokens: int = 0  # tokens that came from accepted drafts, beyond one per step (engine/speculative.py)


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `index` counts from 1, as TGI's stream does."""

    request_id: str
    index: int
    token: Token
    top_tokens: tuple[Token, ...] = ()
    prefill: tuple[Token, ...] | None = None  # only on index 1, when prefill logprobs were asked
    # With prefill_top_n_tokens: each prompt token's most likely alternatives (the first's: none).
    prefill_top_tokens: tuple[tuple[Token, ...], ...] | None = None
    finish: Finish | None = None  # set on the request's last event


class EngineError(RuntimeError):
    """Generation failed inside the engine (the request gets TGI's `generation` error)."""


class RequestCancelled(EngineError):
    pass
