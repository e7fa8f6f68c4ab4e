"""vLLM's tokenizer request and response types (vllm/entrypoints/serve/tokenize/protocol.py), as
marshmallow schemas: requests are parsed with them (JSON types only), responses document the
OpenAPI spec. Unknown fields are ignored, as vLLM does.

/tokenize takes TGI's body or vLLM's two: `TokenizeBodySchema` tells them apart by their keys
(`inputs`: TGI's, `messages`: vLLM's chat, `prompt`: vLLM's text) and the document shows the
three as a `oneOf`.
"""
from __future__ import annotations

from marshmallow import fields, validate

from web.openai.schemas import MessageSchema, SimpleTokenSchema, TokenizeRequestSchema
from web.schemas import Schema, StrictBoolean, StrictInteger, optional


class VllmTokenizeRequestSchema(Schema):
    model = optional(fields.String, "With several models, the one it is for (docs/models.md); else ignored.")
    prompt = fields.String(required=True, metadata={"example": "The capital of France is"})
    add_special_tokens = optional(StrictBoolean, "Add the tokenizer's special tokens (BOS...); default true.")
    return_token_strs = optional(StrictBoolean, "Also return each token's vocabulary string; default false.")


class VllmChatTokenizeRequestSchema(Schema):
    model = optional(fields.String, "With several models, the one it is for (docs/models.md); else ignored.")
    messages = fields.List(fields.Nested(MessageSchema), required=True,
                           metadata={"example": [{"role": "user", "content": "What is deep learning?"}]})
    add_generation_prompt = optional(StrictBoolean, "End with the assistant's turn opening; default true.")
    continue_final_message = optional(StrictBoolean, "Leave the last message open (not with add_generation_prompt).")
    add_special_tokens = optional(StrictBoolean, "Add special tokens beyond the template's; default false.")
    return_token_strs = optional(StrictBoolean, "Also return each token's vocabulary string; default false.")
    tools = fields.List(fields.Dict(), allow_none=True, metadata={"description": "Passed to the chat template."})


def vllm_kind(body) -> str | None:
    """`chat` or `prompt` for vLLM's bodies (no `inputs`; `messages` or `prompt`), None for TGI's."""
    if not isinstance(body, dict) or "inputs" in body:
        return None
    if "messages" in body:
        return "chat"
    return "prompt" if "prompt" in body else None


_BODY_SCHEMAS = {None: TokenizeRequestSchema, "chat": VllmChatTokenizeRequestSchema,
                 "prompt": VllmTokenizeRequestSchema}


class TokenizeBodySchema(Schema):
    """Parses /tokenize's body with the schema its keys name (documented as their `oneOf`)."""

    def load(self, data, **kwargs):
        return _BODY_SCHEMAS[vllm_kind(data)]().load(data, **kwargs)


TOKENIZE_BODY_DOC = {"required": True, "content": {"application/json": {"schema": {"oneOf": [
    TokenizeRequestSchema, VllmTokenizeRequestSchema, VllmChatTokenizeRequestSchema]}}}}


class VllmTokenizeResponseSchema(Schema):
    count = fields.Integer(required=True)
    max_model_len = fields.Integer(required=True, metadata={"description": "--max-total-tokens"})
    tokens = fields.List(fields.Integer(), required=True)
    token_strs = fields.List(fields.String(), allow_none=True, metadata={"description": "With return_token_strs."})


TOKENIZE_RESPONSE_DOC = {"200": {
    "description": "TGI's body: its tokens (id, text, byte offsets); vLLM's: `{tokens, count, max_model_len}`",
    "content": {"application/json": {"schema": {"oneOf": [
        {"type": "array", "items": SimpleTokenSchema}, VllmTokenizeResponseSchema]}}}}}


class DetokenizeRequestSchema(Schema):
    model = optional(fields.String, "With several models, the one it is for (docs/models.md); else ignored.")
    tokens = fields.List(StrictInteger(validate=validate.Range(min=0)), required=True,
                         metadata={"example": [504, 3575, 282, 4649, 314]})


class DetokenizeResponseSchema(Schema):
    prompt = fields.String(required=True)


class TokenizerInfoSchema(Schema):
    """The tokenizer's configuration (its tokenizer_config.json, file paths left out), as vLLM
    answers; any other key may appear."""

    tokenizer_class = fields.String(required=True)
    chat_template = fields.String(metadata={"description": "The model's chat template, when it has one."})
