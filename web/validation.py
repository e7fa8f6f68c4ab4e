"""TGI's request validation, in TGI's order and with its messages (TGI router's validation.rs), ending in
the Job that goes on the queue.

The request body has already been type-checked by `web.schemas`; here are the value rules,
then tokenization (empty inputs, truncation, lengths), then grammar.
"""
from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.protocol import GrammarParameters, Job, SamplingParameters, StoppingParameters
from common.settings import Settings
from web.errors import ContextLengthError, ValidationError
from web.grammar import check_grammar

DEFAULT_MAX_NEW_TOKENS = 100  # ours, when the request gives none
MAX_CACHE_SALT = 256
SAMPLING_KEYS = ("temperature", "top_k", "top_p", "typical_p")


@dataclass(frozen=True)
class ValidRequest:
    job: Job  # what goes on the queue: typed, every default and the seed resolved
    inputs: str  # the prompt as sent (prepended to the output when return_full_text)
    input_length: int  # prompt tokens after truncation (x-prompt-tokens, StreamDetails.input_length)
    parameters: dict  # every TGI parameter resolved, for shaping the answer (details, full text, ...)

    @property
    def wants_details(self) -> bool:
        return self.parameters["details"] or self.parameters["decoder_input_details"]

    def full_text(self, generated: str) -> str:
        return self.inputs + generated if self.parameters["return_full_text"] else generated


def validate_request(
    body: dict,
    *,
    settings: Settings,
    encode: Callable[[str], list[int]],
    stream: bool,
    full_text_default: bool,
    cap_new_tokens: bool = False,
    input_ids: Sequence[int] | None = None,
) -> ValidRequest:
    """Raise `ValidationError` at the first broken rule, else return the job to enqueue.
    `cap_new_tokens` (OpenAI's routes): max_new_tokens absent or past `max_total_tokens` means
    what is left of it, instead of TGI's default and error. `input_ids`: the prompt already as
    token ids (OpenAI's token prompts), used as they are; `inputs` is then their text."""
    p = body.get("parameters") or {}
    if stream:
        _check_streaming(p)
    parameters = _check_parameters(p, settings)
    inputs = body["inputs"]
    if not inputs and input_ids is None:
        _fail("`inputs` cannot be empty")
    truncate = check_truncate(p.get("truncate"), settings)
    input_ids = encode(inputs) if input_ids is None else list(input_ids)
    if truncate is not None:
        input_ids = input_ids[-truncate:]
    if not input_ids:
        _fail("`inputs` cannot be empty")
    max_new_tokens = p.get("max_new_tokens")
    if cap_new_tokens:
        max_new_tokens = _capped(len(input_ids), max_new_tokens, settings)
    parameters["max_new_tokens"] = _check_lengths(len(input_ids), max_new_tokens, settings)
    parameters["grammar"] = check_grammar(p.get("grammar"))
    parameters["cache_salt"] = _check_cache_salt(p.get("cache_salt"))
    full_text = p.get("return_full_text")
    parameters["return_full_text"] = full_text_default if full_text is None else full_text
    # The tokens' logprobs are shown in a stream's tokens and in the details (which
    # decoder_input_details also returns, as TGI's do), and rank best_of's candidates.
    shown = stream or parameters["details"] or parameters["decoder_input_details"] or parameters["best_of"] > 1
    job = Job(request_id=uuid.uuid4().hex, input_ids=input_ids, stream=stream, token_logprobs=shown,
              **wire_parameters(parameters))
    return ValidRequest(job=job, inputs=inputs, input_length=len(input_ids), parameters=parameters)


def wire_parameters(parameters: dict) -> dict:
    """The job's typed fields from the resolved parameters: what the replica maps 1:1 onto the
    engine. The seed goes only with sampling (a greedy answer reports none, as TGI's does)."""
    grammar = parameters["grammar"]
    return {
        "sampling": SamplingParameters(
            do_sample=parameters["do_sample"],
            temperature=parameters["temperature"],
            top_k=parameters["top_k"],
            top_p=parameters["top_p"],
            typical_p=parameters["typical_p"],
            repetition_penalty=parameters["repetition_penalty"],
            frequency_penalty=parameters["frequency_penalty"],
            seed=parameters["seed"] if parameters["do_sample"] else None,
            watermark=parameters["watermark"],
        ),
        "stopping": StoppingParameters(max_new_tokens=parameters["max_new_tokens"], stop_sequences=parameters["stop"]),
        "best_of": parameters["best_of"],
        "top_n_tokens": parameters["top_n_tokens"],
        "decoder_input_details": parameters["decoder_input_details"],
        "grammar": GrammarParameters(grammar["type"], grammar["value"]) if grammar else None,
        "adapter_id": parameters.get("adapter_id"),
    }


def _check_cache_salt(salt) -> str:
    if salt is None:
        return ""
    if not isinstance(salt, str) or not salt or len(salt) > MAX_CACHE_SALT:
        _fail(f"`cache_salt` must be a non-empty string of at most {MAX_CACHE_SALT} characters")
    return salt


def _fail(message: str):
    """Every message names its field first, in backquotes: that is the error's `param`."""
    field = re.search(r"`(\w+)`", message)
    raise ValidationError(message, param=field.group(1) if field else None)


def _check_streaming(p: dict) -> None:
    best_of = p.get("best_of")
    if best_of is not None and best_of != 1:
        _fail("`best_of` != 1 is not supported when streaming tokens")
    if p.get("decoder_input_details"):
        _fail("`decoder_input_details` == true is not supported when streaming tokens")


def _check_parameters(p: dict, settings: Settings) -> dict:
    """Every rule that needs no tokenizer, in TGI's order; returns the resolved values."""
    best_of = _default(p, "best_of", 1)
    if not 0 < best_of <= settings.max_best_of:
        _fail(f"`best_of` must be > 0 and <= {settings.max_best_of}. Given: {best_of}")
    sampling = bool(p.get("do_sample")) or any(p.get(key) is not None for key in SAMPLING_KEYS)
    if best_of > 1 and not sampling:
        _fail("you must use sampling when `best_of` is > 1")
    temperature = _default(p, "temperature", 1.0)
    if temperature <= 0:
        _fail("`temperature` must be strictly positive")
    repetition_penalty = _default(p, "repetition_penalty", 1.0)
    if repetition_penalty <= 0:
        _fail("`repetition_penalty` must be strictly positive")
    frequency_penalty = _default(p, "frequency_penalty", 0.0)
    if not -2.0 <= frequency_penalty <= 2.0:
        _fail("`frequency_penalty` must be >= -2.0 and <= 2.0")
    for name in ("top_p", "typical_p"):
        value = p.get(name)
        if value is not None and not 0.0 < value < 1.0:
            _fail(f"`{name}` must be > 0.0 and < 1.0")
    top_k = p.get("top_k")
    if top_k is not None and top_k <= 0:
        _fail("`top_k` must be strictly positive")
    max_new_tokens = p.get("max_new_tokens")
    if max_new_tokens is not None and max_new_tokens <= 0:
        _fail("`max_new_tokens` must be strictly positive")
    stop = list(p.get("stop") or [])
    if len(stop) > settings.max_stop_sequences:
        _fail(f"`stop` supports up to {settings.max_stop_sequences} stop sequences. Given: {len(stop)}")
    seed = p.get("seed")
    if seed is not None and best_of > 1:
        _fail("`seed` must not be set when `best_of` > 1")
    if seed is None and sampling:
        seed = secrets.randbits(64)  # returned in details, so a sampled answer can be replayed
    top_n_tokens = _default(p, "top_n_tokens", 0)
    if not 0 <= top_n_tokens <= settings.max_top_n_tokens:
        _fail(f"`top_n_tokens` must be >= 0 and <= {settings.max_top_n_tokens}. Given: {top_n_tokens}")
    adapter_id = check_adapter(p.get("adapter_id"), settings)
    return {
        "do_sample": sampling,
        "temperature": float(temperature),
        "top_k": top_k,
        "top_p": p.get("top_p"),
        "typical_p": p.get("typical_p"),
        "repetition_penalty": float(repetition_penalty),
        "frequency_penalty": float(frequency_penalty),
        "seed": seed,
        "max_new_tokens": max_new_tokens,
        "stop": stop,
        "best_of": best_of,
        "details": bool(p.get("details")),
        "decoder_input_details": bool(p.get("decoder_input_details")),
        "top_n_tokens": top_n_tokens,
        "return_full_text": None,  # resolved by the caller, which knows the route's default
        "watermark": bool(p.get("watermark")),
        "adapter_id": adapter_id,
    }


def check_adapter(adapter_id: str | None, settings: Settings) -> str | None:
    """TGI's `adapter_id`: one of `--lora-adapters`, or none (absent, empty, or the base model's
    name). Anything else is refused: silently answering with the base model would look right."""
    if adapter_id in (None, "", settings.served_model, settings.model_id):
        return None
    names = settings.adapter_names
    if adapter_id not in names:
        served = ", ".join(names) if names else "none (the service was started without --lora-adapters)"
        _fail(f"`adapter_id` {adapter_id!r} is not a LoRA adapter of this service; its adapters: {served}")
    return adapter_id


def check_truncate(truncate: int | None, settings: Settings) -> int | None:
    if truncate is not None and not 0 < truncate <= settings.max_input_tokens:
        _fail(
            f"`truncate` must be strictly positive and less than {settings.max_input_tokens}. "
            f"Given: {truncate}"
        )
    return truncate


def _check_lengths(input_length: int, max_new_tokens: int | None, settings: Settings) -> int:
    """TGI's order: total tokens, then input tokens. Returns max_new_tokens, its default
    (100, or what is left of max_total_tokens) resolved."""
    if max_new_tokens is None:
        remaining = max(settings.max_total_tokens - input_length, 0)
        max_new_tokens, total = min(DEFAULT_MAX_NEW_TOKENS, remaining), input_length + remaining
    else:
        total = input_length + max_new_tokens
    if total > settings.max_total_tokens:
        raise ContextLengthError(
            f"`inputs` tokens + `max_new_tokens` must be <= {settings.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`",
            input_length=input_length, max_new_tokens=max_new_tokens, limit=settings.max_total_tokens)
    if input_length > settings.max_input_tokens:
        raise ContextLengthError(
            f"`inputs` must have less than {settings.max_input_tokens} tokens. Given: {input_length}",
            input_length=input_length, max_new_tokens=max_new_tokens, limit=settings.max_input_tokens)
    return max_new_tokens


def _capped(input_length: int, max_new_tokens: int | None, settings: Settings) -> int | None:
    remaining = settings.max_total_tokens - input_length
    if remaining <= 0:  # the prompt alone is too long: the length checks say so
        return max_new_tokens
    return remaining if max_new_tokens is None else min(max_new_tokens, remaining)


def _default(p: dict, name: str, default):
    value = p.get(name)
    return default if value is None else value
