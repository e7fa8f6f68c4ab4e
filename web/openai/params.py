"""OpenAI requests (already type-checked by `web.openai.schemas`) turned into our generation
parameters: the prompt texts, TGI's `GenerateParameters` (validated next by `web.validation`,
with TGI's messages) and the OpenAI-only settings the engine honours (presence and frequency
penalties over the generated tokens, logit bias).

Where OpenAI and TGI differ we follow OpenAI: `stop` as a string, `top_p` in [0, 1] (1.0:
none, 0: only the most likely token), `n` independent choices (completions: the best `n` of
`best_of`), `presence_penalty`/`frequency_penalty` as OpenAI defines them, `logit_bias` as its
map. `chat_plan` is the one place a chat request becomes parameters; `response_format` and
`tools` (or the legacy `functions`) become its grammar there (`web.openai.tools`), and the
messages what the template renders (`web.openai.messages`).
"""
from __future__ import annotations

from dataclasses import dataclass

from common.settings import Settings
from web.chat_template import ChatTemplate
from web.errors import ValidationError
from web.openai.errors import OpenAIError
from web.openai.messages import template_messages
from web.openai.models import adapter_for
from web.openai.prompts import Prompt, completion_prompts
from web.openai.tools import structured_output, template_tools
from web.tokenizer import TokenCounter

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SUFFIX_UNSUPPORTED = "Suffix is not supported and can be achieved by preprocessing the prompt."


@dataclass(frozen=True)
class ResponseOptions:
    """How the answer is shaped (what the engine does not need to know)."""

    model: str
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    echo: bool = False  # completions: the prompt before the text (with `logprobs`: its tokens too)
    prompt_only: bool = False  # completions: `max_tokens` 0 with `echo`: the scored prompt alone
    stops: tuple[str, ...] = ()  # cut from the text, with what follows
    best_of: int = 1  # completions: candidates sampled per prompt, the best `n` returned
    tool_calls: bool = False  # chat: the output is a tool call under the tool grammar
    tool_names: tuple[str, ...] = ()  # the functions that call may name
    legacy_functions: bool = False  # chat: the request sent `functions`: answer `function_call`

    @property
    def samples(self) -> int:
        """Jobs per prompt."""
        return max(self.n, self.best_of)

    @property
    def token_logprobs(self) -> bool:
        """Whether the generated tokens' logprobs are shown, or rank `best_of`'s candidates."""
        return self.logprobs or self.samples > self.n

    @property
    def prompt_logprobs(self) -> bool:
        """Completions' `echo` with `logprobs`: the engine scores the prompt's tokens too."""
        return self.echo and self.logprobs


@dataclass(frozen=True)
class GenerationPlan:
    prompts: list[Prompt]  # chat: the templated conversation
    parameters: dict  # TGI GenerateParameters, for web.validation
    openai: dict  # OpenAI-only sampling fields of the job (common.protocol.SamplingParameters)
    options: ResponseOptions
    add_special_tokens: bool  # False for templated text, which holds its special tokens


def chat_plan(body: dict, settings: Settings, template: ChatTemplate, vocab_size: int) -> GenerationPlan:
    messages = body["messages"]
    if not messages:
        raise ValidationError("`messages` cannot be empty", param="messages")
    structured = structured_output(body)
    max_tokens = body.get("max_completion_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_tokens")
    parameters, openai = _sampling(body, settings, vocab_size, max_tokens)
    options = ResponseOptions(
        model=body.get("model") or settings.served_model,
        n=_choices(body, settings),
        stream=bool(body.get("stream")),
        include_usage=_include_usage(body),
        logprobs=bool(body.get("logprobs")),
        top_logprobs=_top_logprobs(body.get("top_logprobs") if body.get("logprobs") else None, "top_logprobs", settings),
        stops=tuple(parameters["stop"]),
        tool_calls=structured.tool_calls,
        tool_names=structured.names,
        legacy_functions=structured.tool_calls and not body.get("tools") and bool(body.get("functions")),
    )
    parameters["top_n_tokens"] = options.top_logprobs
    parameters["grammar"] = structured.grammar  # checked by web.validation, as TGI's grammar is
    shown = template_tools(structured.listed, body.get("tool_prompt"),
                           template_messages(messages, template.renders_tool_calls),
                           accepts_tools=template.accepts_tools)
    text = template.render(shown, tools=structured.tools or None)
    return GenerationPlan([Prompt(text)], parameters, openai, options, add_special_tokens=False)


def completion_plan(body: dict, settings: Settings, tokens: TokenCounter) -> GenerationPlan:
    logprobs, echo = body.get("logprobs"), bool(body.get("echo"))
    prompts = completion_prompts(body["prompt"], tokens, max_prompts=settings.max_client_batch_size,
                                 offsets=echo and logprobs is not None)
    if body.get("suffix") is not None:
        raise OpenAIError(SUFFIX_UNSUPPORTED, param="suffix")
    max_tokens = body.get("max_tokens")
    prompt_only = echo and max_tokens == 0  # one token is generated, and dropped (as vLLM does)
    parameters, openai = _sampling(body, settings, tokens.vocab_size, COMPLETION_DEFAULT_MAX_TOKENS
                                   if max_tokens is None else 1 if prompt_only else max_tokens)
    n, stream = _choices(body, settings), bool(body.get("stream"))
    options = ResponseOptions(
        model=body.get("model") or settings.served_model,
        n=n,
        stream=stream,
        include_usage=_include_usage(body),
        logprobs=logprobs is not None,
        top_logprobs=_top_logprobs(logprobs, "logprobs", settings),
        echo=echo,
        prompt_only=prompt_only,
        stops=tuple(parameters["stop"]),
        best_of=_best_of(body.get("best_of"), n, stream, parameters["do_sample"], settings),
    )
    parameters["top_n_tokens"] = options.top_logprobs
    if body.get("repetition_penalty") is not None:
        parameters["repetition_penalty"] = body["repetition_penalty"]
    return GenerationPlan(prompts, parameters, openai, options, add_special_tokens=True)


def _sampling(body: dict, settings: Settings, vocab_size: int, max_tokens: int | None) -> tuple[dict, dict]:
    """(TGI parameters, OpenAI-only parameters) shared by chat and completions."""
    temperature, top_p = body.get("temperature"), body.get("top_p")
    if top_p is not None and not 0.0 <= top_p <= 1.0:
        raise ValidationError("`top_p` must be >= 0.0 and <= 1.0", param="top_p")
    greedy = temperature == 0
    parameters = {
        "adapter_id": adapter_for(body.get("model"), settings),  # `model` names a LoRA adapter, or the base
        "do_sample": not greedy,  # OpenAI samples unless temperature is 0
        "temperature": None if greedy else temperature,
        "top_p": None if greedy or top_p in (0.0, 1.0) else top_p,
        "top_k": 1 if top_p == 0.0 and not greedy else None,  # top_p 0: the most likely token only
        "max_new_tokens": max_tokens,
        "stop": _stop_list(body.get("stop")),
        "seed": body.get("seed"),
        "cache_salt": body.get("cache_salt"),
    }
    openai = {
        "presence_penalty": _penalty(body, "presence_penalty"),
        "generated_frequency_penalty": _penalty(body, "frequency_penalty"),
        "logit_bias": _logit_bias(body.get("logit_bias") or {}, vocab_size),
    }
    return parameters, openai


def _choices(body: dict, settings: Settings) -> int:
    n = body.get("n")
    n = 1 if n is None else n
    if not 0 < n <= settings.max_best_of:
        raise ValidationError(f"`n` must be > 0 and <= {settings.max_best_of}. Given: {n}", param="n")
    return n


def _best_of(best_of: int | None, n: int, stream: bool, sampled: bool, settings: Settings) -> int:
    """Candidates per prompt. Greedy candidates would all be the same text: only `n` are made."""
    if best_of is None or best_of == n:
        return n
    if not n <= best_of <= settings.max_best_of:
        raise ValidationError(f"`best_of` must be >= `n` ({n}) and <= {settings.max_best_of}. Given: {best_of}",
                              param="best_of")
    if stream:
        raise ValidationError("`best_of` > `n` cannot be streamed: the best are known only at the end",
                              param="best_of")
    return best_of if sampled else n


def _include_usage(body: dict) -> bool:
    return bool((body.get("stream_options") or {}).get("include_usage"))


def _top_logprobs(value: int | None, name: str, settings: Settings) -> int:
    if value is None:
        return 0
    if not 0 <= value <= settings.max_top_n_tokens:
        raise ValidationError(f"`{name}` must be >= 0 and <= {settings.max_top_n_tokens}. Given: {value}",
                              param=name)
    return value


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    return [stop] if isinstance(stop, str) else list(stop)


def _penalty(body: dict, name: str) -> float:
    value = body.get(name)
    if value is None:
        return 0.0
    if not -2.0 <= value <= 2.0:
        raise ValidationError(f"`{name}` must be >= -2.0 and <= 2.0", param=name)
    return float(value)


def _logit_bias(bias: dict, vocab_size: int) -> list[tuple[int, float]]:
    """OpenAI's map {"token id": bias} as [(id, bias), ...]."""
    pairs = []
    for key, value in bias.items():
        token_id = int(key) if key.isascii() and key.isdigit() else -1
        if not 0 <= token_id < vocab_size:
            raise ValidationError(
                f"`logit_bias` keys must be token ids from 0 to {vocab_size - 1}. Given: {key[:32]!r}",
                param="logit_bias")
        if not -100.0 <= value <= 100.0:
            raise ValidationError(f"`logit_bias` values must be >= -100 and <= 100. Given: {value}",
                                  param="logit_bias")
        pairs.append((token_id, float(value)))
    return pairs
