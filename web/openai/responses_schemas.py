"""The Responses API's request and response types as marshmallow schemas: requests are parsed with
them (JSON types only; item and tool rules live in `web.openai.responses_input`), responses document
the OpenAPI spec. Unknown fields (`include`, `reasoning`, `truncation`, ...) are ignored."""
from __future__ import annotations

from marshmallow import fields, validate

from web.openai.schemas import StringOr
from web.schemas import Schema, StrictBoolean, StrictFloat, StrictInteger, optional

_ITEM = {"type": "object", "description": "A message ({role, content}), a function_call or a function_call_output",
         "properties": {"type": {"type": "string", "enum": ["message", "function_call", "function_call_output"]}}}


class ContentPartSchema(Schema):
    type = fields.String(required=True, metadata={"example": "input_text"})
    text = fields.String()


_PART = {"type": "object", "properties": {"type": {"type": "string"}, "text": {"type": "string"}}, "required": ["type"]}


class InputItemSchema(Schema):
    type = optional(fields.String, "message (the default), function_call or function_call_output")
    role = fields.String(validate=validate.OneOf(["user", "assistant", "system", "developer"]))
    content = StringOr(fields.Nested(ContentPartSchema), _PART, allow_none=True,
                       metadata={"description": "A message's text: a string or text parts"})
    id = optional(fields.String, "An output item's id (echoed back)")
    status = optional(fields.String, "An output item's status (echoed back)")
    call_id = fields.String(metadata={"description": "function_call, function_call_output: the call"})
    name = fields.String(metadata={"description": "function_call: the function"})
    arguments = fields.String(metadata={"description": "function_call: its arguments as JSON text"})
    output = StringOr(fields.Nested(ContentPartSchema), _PART, allow_none=True,
                      metadata={"description": "function_call_output: the result"})


class FunctionToolSchema(Schema):
    type = fields.String(required=True, metadata={"example": "function"})
    name = fields.String()
    description = optional(fields.String, "Shown to the model.")
    parameters = fields.Dict(allow_none=True, metadata={"description": "JSON schema of the arguments"})
    strict = optional(StrictBoolean, "Accepted: calls always match `parameters` (the tool grammar).")


class TextConfigSchema(Schema):
    format = fields.Dict(allow_none=True, metadata={"description": (
        "`{\"type\": \"text\"}`, `{\"type\": \"json_object\"}` or "
        "`{\"type\": \"json_schema\", \"name\", \"schema\", \"strict\"}`: the text matches it.")})


class ResponseRequestSchema(Schema):
    model = optional(fields.String, "Echoed in the response (the service serves one model, or a LoRA adapter).")
    input = StringOr(fields.Nested(InputItemSchema), _ITEM, required=True,
                     metadata={"example": "What is deep learning?"})
    instructions = optional(fields.String, "The system message (not carried to a next response).")
    max_output_tokens = optional(StrictInteger, "Tokens to generate at most.", validate=validate.Range(min=1))
    temperature = optional(StrictFloat, "0: greedy; absent: sampling at 1.0.", validate=validate.Range(0, 2))
    top_p = optional(StrictFloat, "Nucleus sampling, in [0, 1].")
    tools = fields.List(fields.Nested(FunctionToolSchema), allow_none=True)
    tool_choice = fields.Raw(allow_none=True, metadata={
        "description": "`none`, `auto`, `required`, or `{\"type\": \"function\", \"name\": ...}`."})
    parallel_tool_calls = optional(StrictBoolean, "Accepted: at most one call is made per response.")
    text = fields.Nested(TextConfigSchema, allow_none=True)
    metadata = fields.Dict(keys=fields.String(), values=fields.String(), allow_none=True)
    user = optional(fields.String, "Echoed.")
    store = optional(StrictBoolean, "Keep the response (default true) for GET and `previous_response_id`.")
    previous_response_id = optional(fields.String, "Continue the conversation of a stored response.")
    background = optional(StrictBoolean, "Not supported (true is a 400).")
    stream = optional(StrictBoolean, "Stream the Responses API's server-sent events.")


# Responses (documentation only).
class OutputItemSchema(Schema):
    type = fields.String(required=True, metadata={"description": "message or function_call"})
    id = fields.String(required=True)
    status = fields.String(required=True)
    role = fields.String()
    content = fields.List(fields.Dict(), metadata={"description": "`output_text` parts"})
    call_id = fields.String()
    name = fields.String()
    arguments = fields.String()


class ResponseUsageSchema(Schema):
    input_tokens = fields.Integer(required=True)
    input_tokens_details = fields.Dict(metadata={"description": "`cached_tokens`: read from the prefix cache"})
    output_tokens = fields.Integer(required=True)
    output_tokens_details = fields.Dict()
    total_tokens = fields.Integer(required=True)


class ResponseObjectSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True, metadata={"example": "response"})
    created_at = fields.Integer(required=True)
    status = fields.String(required=True, validate=validate.OneOf(["completed", "incomplete", "in_progress",
                                                                    "failed"]))
    incomplete_details = fields.Dict(allow_none=True)
    model = fields.String(required=True)
    output = fields.List(fields.Nested(OutputItemSchema), required=True)
    usage = fields.Nested(ResponseUsageSchema, allow_none=True)
    previous_response_id = fields.String(allow_none=True)
    store = fields.Boolean()


class ResponseEventSchema(Schema):
    """One server-sent event: `event: <type>` then `data: <JSON>` with `type` and `sequence_number`."""

    type = fields.String(required=True)
    sequence_number = fields.Integer(required=True)


class ResponseDeletedSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True)
    deleted = fields.Boolean(required=True)
