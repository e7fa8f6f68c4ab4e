"""Anthropic's Messages request and response types as marshmallow schemas: requests are parsed
with them (JSON types only; block rules live in `web.anthropic.chat_request`), responses document
the OpenAPI spec. Unknown fields (`thinking`, `service_tier`, ...) are ignored."""
from __future__ import annotations

from marshmallow import fields, validate

from web.openai.schemas import StringOr
from web.schemas import Schema, StrictBoolean, StrictFloat, StrictInteger, optional

BLOCK_TYPES = ("text", "tool_use", "tool_result")
STOP_REASONS = ("end_turn", "max_tokens", "stop_sequence", "tool_use")
ANTHROPIC_ERRORS = {
    401: "Missing or wrong API key (`x-api-key` or `Authorization: Bearer`, when the service has one)",
    413: "Request body over 2 MB",
    415: "The body is not `application/json`",
    429: "Over --max-concurrent-requests (`rate_limit_error`)",
    500: "The replica failed the request (`api_error`)",
    503: "No replica, queue or tokenizer available yet (`overloaded_error`)",
}
_TEXT_BLOCK = {"type": "object", "properties": {"type": {"type": "string", "enum": ["text"]},
                                                 "text": {"type": "string"}}, "required": ["type", "text"]}
_BLOCK = {"type": "object", "properties": {"type": {"type": "string", "enum": list(BLOCK_TYPES)}},
          "required": ["type"]}


class ContentBlockSchema(Schema):
    type = fields.String(required=True, metadata={"description": "text, tool_use (assistant), tool_result (user)"})
    text = fields.String()
    id = fields.String(metadata={"description": "tool_use: the call's id"})
    name = fields.String(metadata={"description": "tool_use: the tool called"})
    input = fields.Dict(metadata={"description": "tool_use: the call's arguments"})
    tool_use_id = fields.String(metadata={"description": "tool_result: the call it answers"})
    content = StringOr(fields.Nested(lambda: TextBlockSchema()), _TEXT_BLOCK, allow_none=True,
                       metadata={"description": "tool_result: the result, a string or text blocks"})
    is_error = optional(StrictBoolean, "tool_result: the call failed")


class TextBlockSchema(Schema):
    type = fields.String(required=True)
    text = fields.String()


class MessageParamSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(["user", "assistant"]))
    content = StringOr(fields.Nested(ContentBlockSchema), _BLOCK, required=True,
                       metadata={"description": "A string, or a list of blocks."})


class ToolSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=128))
    description = optional(fields.String, "What the tool does (shown to the model).")
    input_schema = fields.Dict(required=True, metadata={"description": "JSON schema of the tool's input."})
    type = optional(fields.String, "`custom` (or absent): server tools are refused.")


class ToolChoiceSchema(Schema):
    type = fields.String(required=True, metadata={"description": "auto, any, tool (with `name`), none"})
    name = fields.String()
    disable_parallel_tool_use = optional(StrictBoolean, "Accepted: at most one call is made per turn anyway.")


class OutputConfigSchema(Schema):
    format = fields.Dict(allow_none=True, metadata={
        "description": "`{\"type\": \"json_schema\", \"schema\": <JSON schema>}`: the text matches it."})
    effort = optional(fields.String, "Accepted, not used.")


class MessagesRequestSchema(Schema):
    model = optional(fields.String, "Echoed in the response (the service serves one model, or a LoRA adapter).")
    messages = fields.List(fields.Nested(MessageParamSchema), required=True,
                           metadata={"example": [{"role": "user", "content": "What is deep learning?"}]})
    system = StringOr(fields.Nested(TextBlockSchema), _TEXT_BLOCK, allow_none=True,
                      metadata={"description": "A string, or text blocks."})
    max_tokens = StrictInteger(required=True, validate=validate.Range(min=1), metadata={"example": 64})
    stop_sequences = fields.List(fields.String(), allow_none=True)
    temperature = optional(StrictFloat, "In [0, 1]; 0: greedy; absent: 1.0.", validate=validate.Range(0, 1))
    top_p = optional(StrictFloat, "Nucleus sampling, in [0, 1].", validate=validate.Range(0, 1))
    top_k = optional(StrictInteger, "Sample from the k most likely tokens only.", validate=validate.Range(min=1))
    tools = fields.List(fields.Nested(ToolSchema), allow_none=True)
    tool_choice = fields.Nested(ToolChoiceSchema, allow_none=True)
    metadata = fields.Dict(allow_none=True, metadata={"description": "`user_id`: accepted, not used."})
    output_config = fields.Nested(OutputConfigSchema, allow_none=True)
    stream = optional(StrictBoolean, "Stream Anthropic's server-sent events.")


class CountTokensRequestSchema(Schema):
    model = optional(fields.String, "Accepted.")
    messages = fields.List(fields.Nested(MessageParamSchema), required=True)
    system = MessagesRequestSchema._declared_fields["system"]
    tools = fields.List(fields.Nested(ToolSchema), allow_none=True)
    tool_choice = fields.Nested(ToolChoiceSchema, allow_none=True)


# Responses (documentation only).
class OutputBlockSchema(Schema):
    type = fields.String(required=True, metadata={"example": "text"})
    text = fields.String()
    id = fields.String(metadata={"example": "toolu_3f2a9c..."})
    name = fields.String()
    input = fields.Dict()


class MessageUsageSchema(Schema):
    input_tokens = fields.Integer(required=True, metadata={"description": "Prompt tokens not read from the cache"})
    output_tokens = fields.Integer(required=True)
    cache_read_input_tokens = fields.Integer(metadata={"description": "Prompt tokens read from a replica's "
                                                                      "prefix cache"})
    cache_creation_input_tokens = fields.Integer()


class AnthropicMessageSchema(Schema):
    id = fields.String(required=True)
    type = fields.String(required=True, metadata={"example": "message"})
    role = fields.String(required=True, metadata={"example": "assistant"})
    model = fields.String(required=True)
    content = fields.List(fields.Nested(OutputBlockSchema), required=True)
    stop_reason = fields.String(required=True, validate=validate.OneOf(STOP_REASONS))
    stop_sequence = fields.String(allow_none=True)
    usage = fields.Nested(MessageUsageSchema, required=True)


class MessageEventSchema(Schema):
    """One server-sent event: `event: <type>` then `data: <JSON>` (message_start,
    content_block_start/delta/stop, message_delta, message_stop, ping, error)."""

    type = fields.String(required=True)


class CountTokensSchema(Schema):
    input_tokens = fields.Integer(required=True)


class AnthropicErrorDetailSchema(Schema):
    type = fields.String(required=True, metadata={"example": "invalid_request_error"})
    message = fields.String(required=True)


class AnthropicErrorSchema(Schema):
    type = fields.String(required=True, metadata={"example": "error"})
    error = fields.Nested(AnthropicErrorDetailSchema, required=True)
