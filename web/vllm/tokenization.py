"""vLLM's tokenizer routes, answered from the web's own tokenizer (no replica involved):
/tokenize with a prompt or chat messages, /detokenize, /tokenizer_info. What vLLM does, with
its defaults: special tokens added to a prompt but not to templated chat (the template writes
them), the generation prompt added to chat, `max_model_len` our `--max-total-tokens`."""
from __future__ import annotations

from flask import request

from common.settings import Settings
from web.chat_template import ChatTemplate
from web.errors import ApiError, ValidationError
from web.openai.errors import write_error
from web.openai.messages import template_messages
from web.tokenizer import TokenCounter
from web.vllm.schemas import vllm_kind

# Paths on this host, not configuration a client can use (the model's id is never a local path).
_PRIVATE_KEYS = ("vocab_file", "merges_file", "tokenizer_file", "name_or_path")


def tokenize(body: dict, tokens: TokenCounter, template: ChatTemplate, settings: Settings) -> dict:
    """vLLM's TokenizeResponse for a parsed vLLM body (a prompt, or chat messages)."""
    if vllm_kind(body) == "prompt":
        ids = tokens.encode(body["prompt"], add_special_tokens=_flag(body, "add_special_tokens", True))
    else:
        ids = tokens.encode(_templated(body, template), add_special_tokens=_flag(body, "add_special_tokens", False))
    answer = {"count": len(ids), "max_model_len": settings.max_total_tokens, "tokens": ids, "token_strs": None}
    if _flag(body, "return_token_strs", False):
        answer["token_strs"] = [tokens.tokenizer.id_to_token(i) for i in ids]
    return answer


def _templated(body: dict, template: ChatTemplate) -> str:
    if not body["messages"]:
        raise ValidationError("`messages` cannot be empty", param="messages")
    generation_prompt = _flag(body, "add_generation_prompt", True)
    continue_final = _flag(body, "continue_final_message", False)
    if generation_prompt and continue_final and body.get("add_generation_prompt") is not None:
        raise ValidationError("`continue_final_message` and `add_generation_prompt` cannot both be true",
                              param="continue_final_message")
    return template.render(template_messages(body["messages"], template.renders_tool_calls),
                           tools=body.get("tools") or None, add_generation_prompt=generation_prompt and not continue_final,
                           continue_final_message=continue_final)


def detokenize(ids: list[int], tokens: TokenCounter) -> str:
    vocab_size = tokens.vocab_size
    for token_id in ids:
        if token_id >= vocab_size:
            raise ValidationError(f"`tokens` must be token ids from 0 to {vocab_size - 1}. Given: {token_id}",
                                  param="tokens")
    return tokens.tokenizer.decode(ids, skip_special_tokens=False)


def tokenizer_info(template: ChatTemplate) -> dict:
    """vLLM's: the tokenizer's configuration (added tokens as their text), its class, the template."""
    tokenizer = template.tokenizer
    config = {k: _plain(v) for k, v in (tokenizer.init_kwargs or {}).items() if k not in _PRIVATE_KEYS}
    config["tokenizer_class"] = type(tokenizer).__name__
    if isinstance(tokenizer.chat_template, str):
        config["chat_template"] = tokenizer.chat_template
    return config


def write_tokenize_error(error: ApiError, route: str) -> tuple[dict, int]:
    """/tokenize answers a vLLM body's errors as vLLM does (OpenAI's error object), TGI's as TGI."""
    if vllm_kind(request.get_json(silent=True)) is not None:
        return write_error(error, route)
    return error.to_dict(), error.status


def _flag(body: dict, name: str, default: bool) -> bool:
    value = body.get(name)
    return default if value is None else value


def _plain(value):
    """JSON of a tokenizer setting: an AddedToken as its text (as vLLM writes it)."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
