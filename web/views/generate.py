"""Generation routes: /generate, /generate_stream, and the compatible `/` and /invocations."""
from __future__ import annotations

from flask import abort, request

from web.auth import require_api_key
from web.errors import GENERATION_ERRORS, ValidationError
from web.generation import generate_json, generate_stream
from web.json_body import StrictBlueprint
from web.schemas import (
    CompatGenerateRequestSchema,
    ErrorResponseSchema,
    GenerateRequestSchema,
    GenerateResponseSchema,
    StreamResponseSchema,
)
from web.sse import MIMETYPE as EVENT_STREAM

blp = StrictBlueprint("generation", __name__, description="Text generation (TGI-compatible)")

TIMING_HEADERS = {
    name: {"description": description, "schema": {"type": "string"}}
    for name, description in {
        "x-compute-type": "Device type of the replica that served the request",
        "x-compute-time": "Total time (seconds)",
        "x-compute-characters": "Characters in `inputs`",
        "x-total-time": "Total time (milliseconds)",
        "x-validation-time": "Validation time (milliseconds)",
        "x-queue-time": "Time in the queue (milliseconds)",
        "x-inference-time": "Inference time (milliseconds)",
        "x-time-per-token": "Mean time per generated token (milliseconds)",
        "x-prompt-tokens": "Prompt tokens",
        "x-generated-tokens": "Generated tokens",
    }.items()
}


blp.before_request(require_api_key)  # first: 401 before anything about the body


@blp.before_request
def require_json():
    if request.method == "POST" and not request.is_json:
        abort(415)


def documented_errors(func):
    """TGI's error responses (422 is documented by `arguments`)."""
    for status, description in GENERATION_ERRORS.items():
        if status != ValidationError.status:
            func = blp.alt_response(status, schema=ErrorResponseSchema, description=description)(func)
    return func


def streamed(func):
    return blp.response(200, StreamResponseSchema, content_type=EVENT_STREAM, description="Server-sent events")(func)


@blp.route("/generate", methods=["POST"])
@blp.arguments(GenerateRequestSchema)
@blp.response(200, GenerateResponseSchema, description="Generated text", headers=TIMING_HEADERS)
@documented_errors
def generate(body):
    """Generate tokens"""
    return generate_json(body, full_text_default=False)


@blp.route("/generate_stream", methods=["POST"])
@blp.arguments(GenerateRequestSchema)
@streamed
@documented_errors
def generate_stream_(body):
    """Generate a stream of tokens using server-sent events"""
    return generate_stream(body, full_text_default=False)


def compat(body):
    if body.get("stream"):
        return generate_stream(body, full_text_default=True)
    return generate_json(body, full_text_default=True, as_list=True)


def compat_route(rule: str, endpoint: str, summary: str):
    @blp.route(rule, methods=["POST"], endpoint=endpoint)
    @blp.arguments(CompatGenerateRequestSchema)
    @blp.response(200, GenerateResponseSchema(many=True), description="Generated text (stream=false)",
                  headers=TIMING_HEADERS)
    @blp.alt_response(200, schema=StreamResponseSchema, content_type=EVENT_STREAM,
                      description="Server-sent events (stream=true)")
    @blp.doc(summary=summary, description="TGI's compatible route: `stream` picks JSON or server-sent events.")
    @documented_errors
    def view(body):
        return compat(body)

    view.__name__ = endpoint
    return view


compat_generate = compat_route("/", "compat_generate", "Generate tokens, or stream them when `stream` is true")
sagemaker = compat_route("/invocations", "invocations", "AWS Sagemaker compatible route (same as POST /)")
