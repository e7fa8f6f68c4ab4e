"""Every error is TGI's ErrorResponse JSON `{error, error_type}`, whatever went wrong."""
from __future__ import annotations

import pytest

from common.settings import Settings
from web.app import create_app

PREFIX = "Input validation error: "


def assert_error(response, status: int, error_type: str) -> str:
    assert response.status_code == status
    assert response.mimetype == "application/json"
    body = response.get_json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type
    return body["error"]


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/", "/invocations"])
def test_validation_errors_are_422_on_every_route(client, route):
    response = client.post(route, json={"inputs": "hello", "parameters": {"temperature": 0}})
    assert assert_error(response, 422, "validation") == PREFIX + "`temperature` must be strictly positive"


def test_streaming_only_rules_on_streaming_routes(client):
    body = {"inputs": "hello", "parameters": {"best_of": 2, "do_sample": True}}
    message = PREFIX + "`best_of` != 1 is not supported when streaming tokens"
    assert assert_error(client.post("/generate_stream", json=body), 422, "validation") == message
    assert assert_error(client.post("/", json={**body, "stream": True}), 422, "validation") == message


@pytest.mark.parametrize("body, fragment", [
    ({"parameters": {}}, "`inputs`: Missing data for required field."),
    ({"inputs": 5}, "`inputs`: Not a valid string."),
    ({"inputs": "a", "parameters": {"temperature": "0.5"}}, "`parameters.temperature`: Not a valid number."),
    ({"inputs": "a", "parameters": {"max_new_tokens": 2.5}}, "`parameters.max_new_tokens`: Not a valid integer."),
    ({"inputs": "a", "parameters": {"max_new_tokens": True}}, "`parameters.max_new_tokens`: Not a valid integer."),
    ({"inputs": "a", "parameters": {"details": 1}}, "`parameters.details`: Not a valid boolean."),
    ({"inputs": "a", "parameters": {"stop": "x"}}, "`parameters.stop`: Not a valid list."),
    ({"inputs": "a", "parameters": {"seed": -1}}, "`parameters.seed`:"),
    ({"inputs": "a", "stream": "yes"}, "`stream`: Not a valid boolean."),
])
def test_wrong_json_types_are_422(client, body, fragment):
    route = "/" if "stream" in body else "/generate"
    message = assert_error(client.post(route, json=body), 422, "validation")
    assert message.startswith(PREFIX) and fragment in message


def test_unknown_fields_are_ignored(client):
    response = client.post("/generate", json={"inputs": "", "foo": 1, "parameters": {"bar": 2}})
    assert assert_error(response, 422, "validation") == PREFIX + "`inputs` cannot be empty"


def test_malformed_json_is_400(client):
    response = client.post("/generate", data="{not json", content_type="application/json")
    assert "Failed to parse the request body as JSON" in assert_error(response, 400, "validation")


def test_json_that_is_not_an_object_is_422(client):
    assert_error(client.post("/generate", json=["inputs"]), 422, "validation")


@pytest.mark.parametrize("kwargs", [{"data": '{"inputs": "a"}'}, {"data": "inputs=a", "content_type": "text/plain"}])
def test_wrong_content_type_is_415(client, kwargs):
    message = assert_error(client.post("/generate", **kwargs), 415, "validation")
    assert "Content-Type: application/json" in message


def test_not_found_and_method_not_allowed(client):
    assert_error(client.get("/nowhere"), 404, "not_found")
    response = client.get("/generate")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]
    assert_error(client.delete("/info"), 405, "method_not_allowed")


def test_payload_too_large_is_413(client):
    response = client.post("/generate", json={"inputs": "a" * 2_100_000})
    assert_error(response, 413, "validation")


def test_queue_unavailable_is_424(model_dir):
    app = create_app(Settings(model_id=str(model_dir), redis_url="redis://127.0.0.1:1/0"))
    message = assert_error(app.test_client().post("/generate", json={"inputs": "hello"}), 424, "generation")
    assert message.startswith("Request failed during generation: ")


def test_unhandled_exception_is_json_500(app, client):
    @app.get("/boom")
    def boom():
        raise RuntimeError("kaboom")

    app.testing = False
    assert_error(client.get("/boom"), 500, "internal_server_error")


def test_tokenizer_not_ready_is_424(tmp_path, redis_url, monkeypatch):
    from tests.web.test_tokenizer import fake_model_files

    fake_model_files(monkeypatch, FileNotFoundError("the model is still being prepared"))
    app = create_app(Settings(model_id=str(tmp_path / "model.gguf"), redis_url=redis_url))
    message = assert_error(app.test_client().post("/generate", json={"inputs": "hello"}), 424, "generation")
    assert "tokenizer" in message
