"""POST / and /invocations (TGI's compat route and SageMaker's), stream false and true."""
from __future__ import annotations

import pytest
import requests

from tests.integration.sse import sse_events


@pytest.mark.parametrize("path", ["/", "/invocations"])
def test_non_stream_returns_an_array_with_full_text(service, path):
    response = requests.post(f"{service.base_url}{path}", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}})
    assert response.status_code == 200
    body = response.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["generated_text"].startswith("Hello")  # return_full_text defaults to true here
    alone = requests.post(f"{service.base_url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}}).json()
    assert body[0]["generated_text"] == "Hello" + alone["generated_text"]


@pytest.mark.parametrize("path", ["/", "/invocations"])
def test_stream_true_streams(service, path):
    response = requests.post(f"{service.base_url}{path}", json={"inputs": "Hello", "stream": True,
                                                                 "parameters": {"max_new_tokens": 4}}, stream=True)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[-1]["generated_text"] is not None
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))


def test_compat_return_full_text_false(service):
    body = requests.post(f"{service.base_url}/", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4, "return_full_text": False}}).json()
    assert not body[0]["generated_text"].startswith("Hello") or body[0]["generated_text"] == "Hello"


def test_compat_validation_error(service):
    response = requests.post(f"{service.base_url}/invocations", json={"inputs": "", "parameters": {}})
    assert response.status_code == 422
    assert response.json() == {"error": "Input validation error: `inputs` cannot be empty", "error_type": "validation"}
