"""Plain request types handed to the engine (validated here, at the engine's edge)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

GRAMMAR_KINDS = ("json", "regex")


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Greedy unless `do_sample`."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # TGI's: times each token occurs in the prompt and the output
    # OpenAI's penalties count the generated tokens only: presence once per token, frequency
    # once per occurrence (https://platform.openai.com/docs/advanced-usage, "frequency and presence").
    presence_penalty: float = 0.0
    generated_frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's logit_bias: (token id, added logit)
    seed: int | None = None  # the sampler's seed; set by the caller for sampled requests
    watermark: bool = False  # TGI's: bias the green list of each step (engine.watermark)

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be strictly positive")
        if self.repetition_penalty <= 0:
            raise ValueError("repetition_penalty must be strictly positive")
        for name in ("frequency_penalty", "presence_penalty", "generated_frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ValueError(f"{name} must be in [-2, 2]")
        for token_id, bias in self.logit_bias:
            if token_id < 0 or not -100.0 <= bias <= 100.0:
                raise ValueError("logit_bias needs token ids >= 0 and biases in [-100, 100]")
        if self.top_k is not None and self.top_k <= 0:
            raise ValueError("top_k must be strictly positive")
        for name in ("top_p", "typical_p"):
            value = getattr(self, name)
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be in (0, 1)")
        if self.do_sample and self.seed is None:
            raise ValueError("a sampled request needs a seed")

    @property
    def is_greedy(self) -> bool:
        return not self.do_sample


@dataclass(frozen=True)
class StoppingParams:
    max_new_tokens: int
    stop_sequences: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens <= 0:
            raise ValueError("max_new_tokens must be strictly positive")


@dataclass(frozen=True)
class Grammar:
    """What the output must match, whole: `json` with a JSON schema (`{}`: any JSON value), or
    `regex` with a pattern. Compiled by `engine.grammar`."""

    kind: str
    value: Any

    def __post_init__(self):
        if self.kind not in GRAMMAR_KINDS:
            raise ValueError(f"grammar type must be one of {', '.join(GRAMMAR_KINDS)}, not {self.kind!r}")
        if self.kind == "json" and not isinstance(self.value, dict):
            raise ValueError("a json grammar's value must be a JSON schema object")
        if self.kind == "regex" and not isinstance(self.value, str):
            raise ValueError("a regex grammar's value must be a string")

    @property
    def key(self) -> str:
        """The compile cache's key: a hash of the kind and the value's canonical JSON."""
        text = json.dumps([self.kind, self.value], sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True)
class GenerationRequest:
    request_id: str
    input_ids: tuple[int, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingParams = field(default_factory=lambda: StoppingParams(max_new_tokens=20))
    top_n_tokens: int = 0
    # Each generated token's logprob (its Token.logprob; None when False: a greedy batch whose
    # rows all say so skips the pass over the vocabulary that computes it).
    token_logprobs: bool = True
    # TGI's decoder_input_details: every prompt token's logprob. A request with it needs the
    # logits of every prompt position, so none of its prompt may be skipped (say, by a prefix cache).
    prefill_logprobs: bool = False
    prefill_top_n_tokens: int = 0  # with prefill_logprobs: each prompt token's most likely alternatives
    grammar: Grammar | None = None  # constrained decoding: the output must match it
    # The prefix cache's namespace: KV is reused only between requests with the same salt (what
    # changes the KV of the same tokens, e.g. a LoRA adapter, belongs here).
    cache_salt: str = ""
    adapter: str | None = None  # the LoRA adapter it runs under (by name; None: the base model)

    def __post_init__(self):
        if not self.input_ids:
            raise ValueError("input_ids cannot be empty")
        if self.top_n_tokens < 0 or self.prefill_top_n_tokens < 0:
            raise ValueError("top_n_tokens and prefill_top_n_tokens must be >= 0")

    @property
    def cache_namespace(self) -> str:
        """The prefix cache's key besides the tokens: the salt, and the adapter (an adapter
        changes every projection, so its KV is never another adapter's or the base model's)."""
        return self.cache_salt if self.adapter is None else f"{self.cache_salt}\0lora:{self.adapter}"

    @property
    def max_total_tokens(self) -> int:
        """The most KV-cache positions this request can ever hold."""
        return len(self.input_ids) + self.stopping.max_new_tokens
