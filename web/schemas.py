"""TGI's request and response types as marshmallow schemas.

Requests are parsed with them (JSON types only: a wrong type is a 422 validation error; the
value rules live in `web.validation`); responses use them for the OpenAPI document only.
Unknown fields are ignored, as TGI does.
"""
from __future__ import annotations

import numbers

import marshmallow as ma
from marshmallow import fields, validate

UINT64_MAX = 2**64 - 1
INT32_MAX = 2**31 - 1  # TGI's type for top_k
FINISH_REASONS = ("length", "eos_token", "stop_sequence")


class Schema(ma.Schema):
    class Meta:
        unknown = ma.EXCLUDE


# Strict JSON types: marshmallow alone would accept "0.5" for a number or 1 for a boolean.
class StrictInteger(fields.Integer):
    def __init__(self, **kwargs):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value):
        if isinstance(value, bool):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class StrictFloat(fields.Float):
    def _validated(self, value):
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise self.make_error("invalid", input=value)
        return super()._validated(value)


class StrictBoolean(fields.Boolean):
    def _deserialize(self, value, attr, data, **kwargs):
        if not isinstance(value, bool):  # 1 == True: a set lookup alone would accept 1 and 0
            raise self.make_error("invalid", input=value)
        return value


def optional(field_class, description: str, **kwargs):
    return field_class(allow_none=True, metadata={"description": description}, **kwargs)


class GrammarSchema(Schema):
    type = fields.String(required=True, validate=validate.OneOf(["json", "json_object", "regex", "json_schema"]),
                         metadata={"description": "`json` (alias `json_object`), `json_schema` or `regex`."})
    value = fields.Raw(required=True, metadata={
        "description": "A JSON schema (`{}`: any JSON), `{name, schema}` for `json_schema`, or a regex."})


class GenerateParametersSchema(Schema):
    best_of = optional(StrictInteger, "Generate best_of sequences; return the one with the best mean logprob.")
    temperature = optional(StrictFloat, "Sampling temperature (> 0).")
    repetition_penalty = optional(StrictFloat, "Repetition penalty (> 0; 1.0 means none).")
    frequency_penalty = optional(StrictFloat, "Frequency penalty in [-2.0, 2.0].")
    top_k = optional(StrictInteger, "Keep the k most likely tokens.", validate=validate.Range(max=INT32_MAX))
    top_p = optional(StrictFloat, "Nucleus sampling, in (0, 1).")
    typical_p = optional(StrictFloat, "Typical decoding mass, in (0, 1).")
    do_sample = StrictBoolean(metadata={"description": "Sample instead of greedy decoding."})
    max_new_tokens = optional(StrictInteger, "Tokens to generate at most (default 100).")
    return_full_text = optional(StrictBoolean, "Prepend the prompt to the generated text.")
    stop = fields.List(fields.String(), metadata={"description": "Stop sequences."})
    truncate = optional(StrictInteger, "Keep only the last `truncate` input tokens.")
    watermark = StrictBoolean(metadata={"description": "Watermarking (Kirchenbauer et al.)."})
    details = StrictBoolean(metadata={"description": "Return generation details."})
    decoder_input_details = StrictBoolean(metadata={"description": "Return prefill token details."})
    seed = optional(StrictInteger, "Sampling seed (uint64).", validate=validate.Range(0, UINT64_MAX))
    top_n_tokens = optional(StrictInteger, "Return the n most likely tokens at each step.")
    grammar = fields.Nested(GrammarSchema, allow_none=True, metadata={
        "description": "Constrain the output to a JSON schema or a regex (the whole output matches)."})
    adapter_id = optional(fields.String, "The LoRA adapter to generate with (one of --lora-adapters, listed in "
                                         "/info); absent: the base model.")
    cache_salt = optional(fields.String, "The prefix cache's namespace (vLLM's name): a cached prompt prefix is "
                                         "reused only by requests with the same salt (and tenant).")


class GenerateRequestSchema(Schema):
    inputs = fields.String(required=True, metadata={"example": "My name is Olivier and I"})
    parameters = fields.Nested(GenerateParametersSchema)


class CompatGenerateRequestSchema(GenerateRequestSchema):
    stream = StrictBoolean(metadata={"description": "Stream tokens as server-sent events."})


class TokenSchema(Schema):
    id = fields.Integer(required=True)
    text = fields.String(required=True)
    logprob = fields.Float(allow_none=True)
    special = fields.Boolean(required=True)


class PrefillTokenSchema(Schema):
    id = fields.Integer(required=True)
    text = fields.String(required=True)
    logprob = fields.Float(allow_none=True)


class BestOfSequenceSchema(Schema):
    generated_text = fields.String(required=True)
    finish_reason = fields.String(required=True, validate=validate.OneOf(FINISH_REASONS))
    generated_tokens = fields.Integer(required=True)
    seed = fields.Integer(allow_none=True)
    prefill = fields.List(fields.Nested(PrefillTokenSchema))
    tokens = fields.List(fields.Nested(TokenSchema))
    top_tokens = fields.List(fields.List(fields.Nested(TokenSchema)))


class DetailsSchema(Schema):
    finish_reason = fields.String(required=True, validate=validate.OneOf(FINISH_REASONS))
    generated_tokens = fields.Integer(required=True)
    seed = fields.Integer(allow_none=True, metadata={"description": "null for greedy decoding"})
    prefill = fields.List(fields.Nested(PrefillTokenSchema))
    tokens = fields.List(fields.Nested(TokenSchema))
    top_tokens = fields.List(fields.List(fields.Nested(TokenSchema)))
    best_of_sequences = fields.List(fields.Nested(BestOfSequenceSchema))


class GenerateResponseSchema(Schema):
    generated_text = fields.String(required=True)
    details = fields.Nested(DetailsSchema)


class StreamDetailsSchema(Schema):
    finish_reason = fields.String(required=True, validate=validate.OneOf(FINISH_REASONS))
    generated_tokens = fields.Integer(required=True)
    seed = fields.Integer(allow_none=True)
    input_length = fields.Integer(required=True)


class StreamResponseSchema(Schema):
    """One server-sent event: `data: <StreamResponse JSON>`."""

    index = fields.Integer(required=True)
    token = fields.Nested(TokenSchema, required=True)
    top_tokens = fields.List(fields.Nested(TokenSchema))
    generated_text = fields.String(allow_none=True, metadata={"description": "Only on the last event."})
    details = fields.Nested(StreamDetailsSchema, allow_none=True, metadata={"description": "Only on the last event."})


class InfoSchema(Schema):
    model_id = fields.String(required=True)
    model_sha = fields.String(allow_none=True)
    model_dtype = fields.String(allow_none=True)
    model_device_type = fields.String(allow_none=True)
    model_pipeline_tag = fields.String(allow_none=True)
    max_concurrent_requests = fields.Integer()
    max_best_of = fields.Integer()
    max_stop_sequences = fields.Integer()
    max_input_tokens = fields.Integer()
    max_total_tokens = fields.Integer()
    waiting_served_ratio = fields.Float()
    max_batch_total_tokens = fields.Integer(allow_none=True)
    max_waiting_tokens = fields.Integer()
    max_batch_size = fields.Integer(allow_none=True)
    validation_workers = fields.Integer()
    max_client_batch_size = fields.Integer()
    router = fields.String()
    version = fields.String()
    sha = fields.String(allow_none=True)
    docker_label = fields.String(allow_none=True)
    lora_adapters = fields.List(fields.String(), metadata={
        "description": "The LoRA adapters a request may name in `adapter_id` (--lora-adapters)."})


class ErrorResponseSchema(Schema):
    error = fields.String(required=True)
    error_type = fields.String(required=True)
