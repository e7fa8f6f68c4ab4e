"""OpenAI's request and response types (chat, completions, models) and TGI's /tokenize, as
marshmallow schemas: requests are parsed with them (JSON types only; value rules live in
`web.openai.params`), responses document the OpenAPI spec. Unknown fields are ignored."""
from __future__ import annotations

from marshmallow import ValidationError as SchemaError
from marshmallow import fields, validate

from web.schemas import UINT64_MAX, Schema, StrictBoolean, StrictFloat, StrictInteger, optional

OPENAI_FINISH_REASONS = ("stop", "length", "tool_calls", "function_call")
# The statuses of OpenAI's error object on /v1 (400 is documented with the body's schema).
OPENAI_ERRORS = {
    401: "Missing or wrong API key (when the service has one: `--api-key`)",
    404: "No such model or route",
    413: "Request body over 2 MB",
    415: "The body is not `application/json`",
    429: "Over --max-concurrent-requests (`code`: `rate_limit_exceeded`)",
    500: "The replica failed the request",
    503: "No replica, queue or tokenizer available yet",
}
_STRING_LIST = {"type": "array", "items": {"type": "string"}}
_TEXT_PART = {
    "type": "object",
    "properties": {"type": {"type": "string", "enum": ["text"]}, "text": {"type": "string"}},
    "required": ["type", "text"],
}


class StringOr(fields.Field):
    """A JSON string, or a list of `item` values (OpenAI's `stop`, `prompt`, message `content`)."""

    def __init__(self, item: fields.Field, item_doc: dict, **kwargs):
        metadata = kwargs.pop("metadata", {})
        super().__init__(metadata={**metadata, "oneOf": [{"type": "string"}, {"type": "array", "items": item_doc}]},
                         **kwargs)
        self.item = item

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise self.make_error("invalid")
        items, errors = [], {}
        for i, element in enumerate(value):
            try:
                items.append(self.item.deserialize(element))
            except SchemaError as error:
                errors[i] = error.messages
        if errors:
            raise SchemaError(errors)
        return items

    default_error_messages = {"invalid": "Not a valid string or list."}


def _token_id(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class PromptField(fields.Field):
    """OpenAI's four prompt forms: a string, a list of strings, a list of token ids (one prompt),
    or a list of lists of token ids. Their values are checked by `web.openai.prompts`."""

    _TOKENS = {"type": "array", "items": {"type": "integer", "minimum": 0}}
    default_error_messages = {"invalid": "Not a string, a list of strings, a list of token ids or a list of lists "
                                         "of token ids."}

    def __init__(self, **kwargs):
        metadata = kwargs.pop("metadata", {})
        forms = [{"type": "string"}, _STRING_LIST, self._TOKENS, {"type": "array", "items": self._TOKENS}]
        super().__init__(metadata={**metadata, "oneOf": forms}, **kwargs)

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, str):
            return value
        if isinstance(value, list) and (
            all(isinstance(v, str) for v in value) or all(_token_id(v) for v in value)
            or all(isinstance(v, list) and all(_token_id(i) for i in v) for v in value)
        ):
            return value
        raise self.make_error("invalid")


class TextPartSchema(Schema):
    type = fields.String(required=True, metadata={"example": "text"})
    text = fields.String(metadata={"description": "The text (parts are joined with no separator)."})
    image_url = fields.Raw(metadata={"description": "Not supported."})


class MessageSchema(Schema):
    role = fields.String(required=True, metadata={
        "example": "user", "description": "`developer` is rendered as `system`, legacy `function` as `tool`."})
    content = StringOr(fields.Nested(TextPartSchema), _TEXT_PART, allow_none=True,
                       metadata={"description": "A string, or a list of text parts."})
    name = optional(fields.String, "The author's name (passed to the template).")
    tool_calls = fields.List(fields.Dict(), allow_none=True, metadata={
        "description": "The calls an assistant made: passed to the template (as text when it does not render them)."})
    tool_call_id = optional(fields.String, "Passed to the template.")
    function_call = fields.Dict(allow_none=True, metadata={"description": "Legacy: one call, as `tool_calls`."})


class StreamOptionsSchema(Schema):
    include_usage = optional(StrictBoolean, "Send one more chunk with the usage before `[DONE]`.")


class SamplingRequestSchema(Schema):
    """The fields chat and completions share."""

    model = optional(fields.String, "Echoed in the response (the service serves one model).")
    temperature = optional(StrictFloat, "0: greedy; absent: sampling at 1.0.")
    top_p = optional(StrictFloat, "Nucleus sampling, in [0, 1]; 1.0 means none, 0 the most likely token only.")
    stop = StringOr(fields.String(), {"type": "string"}, allow_none=True,
                    metadata={"description": "A stop sequence or a list of them."})
    seed = optional(StrictInteger, "Sampling seed (uint64).", validate=validate.Range(0, UINT64_MAX))
    stream = optional(StrictBoolean, "Stream chunks as server-sent events, ending with `data: [DONE]`.")
    stream_options = fields.Nested(StreamOptionsSchema, allow_none=True)
    frequency_penalty = optional(StrictFloat, "OpenAI's: minus penalty × times generated, in [-2, 2].")
    presence_penalty = optional(StrictFloat, "OpenAI's: minus penalty once per token generated, in [-2, 2].")
    logit_bias = fields.Dict(keys=fields.String(), values=StrictFloat(), allow_none=True,
                             metadata={"description": "Token id (as a string) -> bias in [-100, 100]."})
    n = optional(StrictInteger, "Independent choices to return (at most --max-best-of).")
    user = optional(fields.String, "Ignored.")
    cache_salt = optional(fields.String, "vLLM's: a cached prompt prefix is reused only by requests with the "
                                         "same salt (and tenant).")


class ChatRequestSchema(SamplingRequestSchema):
    messages = fields.List(fields.Nested(MessageSchema), required=True,
                           metadata={"example": [{"role": "user", "content": "What is deep learning?"}]})
    max_tokens = optional(StrictInteger, "Tokens to generate at most (default: up to --max-total-tokens).")
    max_completion_tokens = optional(StrictInteger, "Same as `max_tokens` (OpenAI's newer name).")
    logprobs = optional(StrictBoolean, "Return the log probability of each generated token.")
    top_logprobs = optional(StrictInteger, "Most likely alternatives per token (with `logprobs`).")
    response_format = fields.Dict(allow_none=True, metadata={"description": (
        "`{\"type\": \"text\"}`, `{\"type\": \"json_object\"}`, "
        "`{\"type\": \"json_schema\", \"json_schema\": {\"name\", \"schema\", \"strict\"}}`, "
        "or TGI's `{\"type\": \"json\" | \"regex\", \"value\": ...}`: the answer matches it.")})
    tools = fields.List(fields.Dict(), allow_none=True, metadata={
        "description": "`[{\"type\": \"function\", \"function\": {\"name\", \"description\", \"parameters\"}}]`: "
                       "calls are generated under each function's parameters schema."})
    tool_choice = fields.Raw(allow_none=True, metadata={
        "description": "`none`, `auto` (default with tools: call one, or answer in text), `required`, or "
                       "`{\"type\": \"function\", \"function\": {\"name\": ...}}`."})
    tool_prompt = optional(fields.String, "TGI's: put before the tools when the template does not render them.")
    functions = fields.List(fields.Dict(), allow_none=True, metadata={
        "description": "Legacy `tools`: `[{\"name\", \"description\", \"parameters\"}]`; the answer's call is "
                       "`message.function_call`."})
    function_call = fields.Raw(allow_none=True, metadata={
        "description": "Legacy `tool_choice`: `none`, `auto` or `{\"name\": ...}`."})


class CompletionRequestSchema(SamplingRequestSchema):
    prompt = PromptField(required=True, metadata={
        "description": "A prompt or a list of prompts (at most --max-client-batch-size), as text or as token ids.",
        "example": "The capital of France is"})
    max_tokens = optional(StrictInteger, "Tokens to generate at most (default 16; 0 with `echo`: only score the "
                                         "prompt).")
    repetition_penalty = optional(StrictFloat, "TGI's repetition penalty (> 0).")
    logprobs = optional(StrictInteger, "Return this many most likely alternatives per token, with its logprob "
                                       "(with `echo`: the prompt's tokens too).")
    echo = optional(StrictBoolean, "Prepend the prompt to the text.")
    best_of = optional(StrictInteger, "Candidates sampled per prompt (>= n, at most --max-best-of); the n with the "
                                      "highest cumulative logprob are returned. Not with `stream`.")
    suffix = optional(fields.String, "Not supported (must be null).")


class TokenizeParametersSchema(Schema):
    truncate = optional(StrictInteger, "Keep only the last `truncate` tokens.")


class TokenizeRequestSchema(Schema):
    inputs = fields.String(required=True, metadata={"example": "My name is Olivier and I"})
    parameters = fields.Nested(TokenizeParametersSchema, allow_none=True)


# Responses (documentation only).
class OpenAIErrorDetailSchema(Schema):
    message = fields.String(required=True)
    type = fields.String(required=True, metadata={"example": "invalid_request_error"})
    param = fields.String(allow_none=True, metadata={"description": "The request field at fault, when known."})
    code = fields.String(allow_none=True, metadata={"example": "context_length_exceeded"})


class OpenAIErrorSchema(Schema):
    error = fields.Nested(OpenAIErrorDetailSchema, required=True)



class SimpleTokenSchema(Schema):
    id = fields.Integer(required=True)
    text = fields.String(required=True, metadata={"description": "The input's bytes [start, stop)."})
    start = fields.Integer(required=True)
    stop = fields.Integer(required=True)


class ChatTokenizeResponseSchema(Schema):
    tokenize_response = fields.List(fields.Nested(SimpleTokenSchema), required=True)
    templated_text = fields.String(required=True)


class UsageSchema(Schema):
    prompt_tokens = fields.Integer(required=True)
    completion_tokens = fields.Integer(required=True)
    total_tokens = fields.Integer(required=True)


class TopLogprobSchema(Schema):
    token = fields.String(required=True)
    logprob = fields.Float(required=True)
    bytes = fields.List(fields.Integer())


class LogprobSchema(TopLogprobSchema):
    top_logprobs = fields.List(fields.Nested(TopLogprobSchema))


class ChatLogprobsSchema(Schema):
    content = fields.List(fields.Nested(LogprobSchema))


class FunctionCallSchema(Schema):
    name = fields.String()
    arguments = fields.String(metadata={"description": "The arguments as a JSON string (streamed in fragments)."})


class ToolCallSchema(Schema):
    index = fields.Integer(metadata={"description": "Stream chunks only."})
    id = fields.String(metadata={"example": "call_3f2a9c..."})
    type = fields.String(metadata={"example": "function"})
    function = fields.Nested(FunctionCallSchema)


class ChatMessageSchema(Schema):
    role = fields.String(metadata={"description": "In a stream: the first chunk of each choice only."})
    content = fields.String(allow_none=True, metadata={"description": "null when the message calls a tool."})
    tool_calls = fields.List(fields.Nested(ToolCallSchema))
    function_call = fields.Nested(FunctionCallSchema, metadata={"description": "When the request sent `functions`."})


class ChatChoiceSchema(Schema):
    index = fields.Integer(required=True)
    message = fields.Nested(ChatMessageSchema, required=True)
    logprobs = fields.Nested(ChatLogprobsSchema, allow_none=True)
    finish_reason = fields.String(required=True, validate=validate.OneOf(OPENAI_FINISH_REASONS))


class _ResponseSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True)
    created = fields.Integer(required=True)
    model = fields.String(required=True)
    system_fingerprint = fields.String()


class ChatCompletionSchema(_ResponseSchema):
    choices = fields.List(fields.Nested(ChatChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema)


class ChatChunkChoiceSchema(Schema):
    index = fields.Integer(required=True)
    delta = fields.Nested(ChatMessageSchema, required=True)
    logprobs = fields.Nested(ChatLogprobsSchema, allow_none=True)
    finish_reason = fields.String(allow_none=True)


class ChatCompletionChunkSchema(_ResponseSchema):
    """One server-sent event: `data: <chunk JSON>`; the stream ends with `data: [DONE]`."""

    choices = fields.List(fields.Nested(ChatChunkChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema, allow_none=True)


class CompletionLogprobsSchema(Schema):
    tokens = fields.List(fields.String())
    token_logprobs = fields.List(fields.Float(allow_none=True), metadata={
        "description": "null for an echoed prompt's first token"})
    top_logprobs = fields.List(fields.Dict(keys=fields.String(), values=fields.Float(), allow_none=True))
    text_offset = fields.List(fields.Integer())


class CompletionChoiceSchema(Schema):
    index = fields.Integer(required=True)
    text = fields.String(required=True)
    logprobs = fields.Nested(CompletionLogprobsSchema, allow_none=True)
    finish_reason = fields.String(allow_none=True, metadata={"description": "null until a stream's last chunk"})


class CompletionSchema(_ResponseSchema):
    """The response, and (with partial `text`) each chunk of a stream."""

    choices = fields.List(fields.Nested(CompletionChoiceSchema), required=True)
    usage = fields.Nested(UsageSchema, allow_none=True)


class ModelSchema(Schema):
    id = fields.String(required=True)
    object = fields.String(required=True)
    created = fields.Integer(required=True)
    owned_by = fields.String(required=True)
    max_model_len = fields.Integer()
    parent = fields.String(allow_none=True, metadata={"description": "A LoRA adapter's base model"})


class ModelListSchema(Schema):
    object = fields.String(required=True)
    data = fields.List(fields.Nested(ModelSchema), required=True)
