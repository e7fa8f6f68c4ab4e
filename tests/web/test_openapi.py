"""The OpenAPI document and the Swagger UI, served with local assets."""
from __future__ import annotations

import re

import pytest


@pytest.fixture
def spec(client):
    response = client.get("/api-doc/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    return response.get_json()


def test_every_route_is_documented(spec):
    paths = spec["paths"]
    expected = {"/generate": {"post"}, "/generate_stream": {"post"}, "/": {"get", "post"},
                "/invocations": {"post"}, "/info": {"get"}, "/health": {"get"}, "/ping": {"get"},
                "/metrics": {"get"}, "/v1/chat/completions": {"post"}, "/v1/completions": {"post"},
                "/v1/models": {"get"}, "/tokenize": {"post"}, "/chat_tokenize": {"post"},
                "/detokenize": {"post"}, "/tokenizer_info": {"get"}}
    for path, methods in expected.items():
        assert methods <= set(paths[path]), path


def test_schemas(spec):
    schemas = spec["components"]["schemas"]
    for name in ["GenerateParameters", "GenerateRequest", "CompatGenerateRequest", "GenerateResponse", "Details",
                 "BestOfSequence", "Token", "PrefillToken", "StreamResponse", "StreamDetails", "Info",
                 "ErrorResponse"]:
        assert name in schemas, name
    assert set(schemas["ErrorResponse"]["properties"]) == {"error", "error_type"}
    assert "stream" in schemas["CompatGenerateRequest"]["properties"]
    assert "top_n_tokens" in schemas["GenerateParameters"]["properties"]
    for name in ["ChatRequest", "CompletionRequest", "ChatCompletion", "ChatCompletionChunk", "Completion",
                 "ModelList", "TokenizeRequest", "ChatTokenizeResponse", "Message"]:
        assert name in schemas, name
    stop = schemas["ChatRequest"]["properties"]["stop"]
    assert [option["type"] for option in stop["oneOf"]] == ["string", "array"]


def _content(spec, response):
    if "$ref" in response:
        response = spec["components"]["responses"][response["$ref"].rsplit("/", 1)[-1]]
    return response["content"]


def test_streaming_routes_document_event_streams(spec):
    stream_ok = spec["paths"]["/generate_stream"]["post"]["responses"]["200"]
    assert _content(spec, stream_ok)["text/event-stream"]["schema"]["$ref"].endswith("/StreamResponse")
    for path in ("/", "/invocations"):
        content = _content(spec, spec["paths"][path]["post"]["responses"]["200"])
        assert {"application/json", "text/event-stream"} <= set(content)
        assert content["application/json"]["schema"]["type"] == "array"


def test_error_responses(spec):
    error_ref = "#/components/schemas/ErrorResponse"
    for path in ("/generate", "/generate_stream", "/", "/invocations"):
        responses = spec["paths"][path]["post"]["responses"]
        for status in ("422", "424", "429", "500"):
            assert _content(spec, responses[status])["application/json"]["schema"]["$ref"] == error_ref
    for path in ("/health", "/ping", "/"):
        responses = spec["paths"][path]["get"]["responses"]
        assert _content(spec, responses["503"])["application/json"]["schema"]["$ref"] == error_ref
    assert "x-compute-time" in spec["paths"]["/generate"]["post"]["responses"]["200"]["headers"]


def test_swagger_ui_uses_local_assets(client):
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    assets = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    assert any(a.endswith("swagger-ui.css") for a in assets)
    for asset in assets:
        assert asset.startswith("/docs/static/"), asset
        response = client.get(asset)
        assert response.status_code == 200 and len(response.data) > 1000, asset
        response.close()
    assert "/api-doc/openapi.json" in html
