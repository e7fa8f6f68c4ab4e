"""Completions prompts in OpenAI's four forms: a string, a list of strings, a list of token ids (one
prompt), a list of lists of token ids (one prompt each). Token ids go to the engine as they are
(evaluation harnesses send them so, to score exactly the tokens they chose); their text, for
`echo`, is what they decode to, special tokens included.

With `echo` and `logprobs` the prompt's tokens are listed too, each at its offset in the echoed
text: a string prompt's from the tokenizer's offsets into that string, a token prompt's from
decoding it token by token (a token that ends inside a UTF-8 character starts where that
character does; its text comes with the token that completes it).
"""
from __future__ import annotations

from dataclasses import dataclass

from tokenizers.decoders import DecodeStream

from web.errors import ValidationError
from web.openai.errors import OpenAIError
from web.tokenizer import TokenCounter

EMPTY_PROMPT_ARRAY = "Empty array detected. Do not use an empty array for the prompt."


@dataclass(frozen=True)
class Prompt:
    text: str  # as sent; token ids: what they decode to
    ids: tuple[int, ...] | None = None  # sent as token ids: what the engine gets, as they are
    offsets: tuple[int, ...] = ()  # where each of its tokens starts in `text` (text: with echo and logprobs)


def completion_prompts(prompt, tokens: TokenCounter, *, max_prompts: int, offsets: bool) -> list[Prompt]:
    """The request's prompts, whatever their form (already type-checked by the schema), at most
    `max_prompts` (--max-client-batch-size). `offsets`: find where each token starts."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt or any(isinstance(p, list) and not p for p in prompt):
        raise OpenAIError(EMPTY_PROMPT_ARRAY, param="prompt")
    texts = all(isinstance(p, str) for p in prompt)
    batches = prompt if texts or isinstance(prompt[0], list) else [prompt]
    if len(batches) > max_prompts:
        raise ValidationError(
            f"Number of prompts exceeds the maximum allowed batch size of {max_prompts}. Given: {len(batches)}",
            param="prompt")
    if texts:
        return [_text_prompt(p, tokens, offsets) for p in batches]
    return [_token_prompt(ids, tokens) for ids in batches]


def _text_prompt(text: str, tokens: TokenCounter, offsets: bool) -> Prompt:
    if not offsets:
        return Prompt(text)
    encoding = tokens.encoding(text)  # as the job's tokens are encoded (special tokens added)
    return Prompt(text, offsets=tuple(start for start, _ in encoding.offsets))


def _token_prompt(ids: list[int], tokens: TokenCounter) -> Prompt:
    vocab_size = tokens.vocab_size
    for token_id in ids:
        if not 0 <= token_id < vocab_size:
            raise ValidationError(f"`prompt` token ids must be from 0 to {vocab_size - 1}. Given: {token_id}",
                                  param="prompt")
    text, offsets = decode_with_offsets(tokens, ids)
    return Prompt(text, tuple(ids), offsets)


def decode_with_offsets(tokens: TokenCounter, ids: list[int]) -> tuple[str, tuple[int, ...]]:
    """(the text of `ids`, where each token's text starts in it), decoded token by token."""
    stream = DecodeStream(skip_special_tokens=False)
    parts, offsets, length = [], [], 0
    for token_id in ids:
        offsets.append(length)
        piece = stream.step(tokens.tokenizer, token_id)
        if piece:
            parts.append(piece)
            length += len(piece)
    return "".join(parts), tuple(offsets)
