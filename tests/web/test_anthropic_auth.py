"""/v1/messages under `--api-key`: Anthropic's `x-api-key` header is accepted as the bearer token
is, and a missing or wrong key is Anthropic's 401 error object."""
from __future__ import annotations

import pytest

from web.app import create_app

KEY = "s3cret-key"
BODY = {"max_tokens": 0, "messages": []}  # past the key check, the schema refuses it (400)


@pytest.fixture
def keyed(settings):
    return create_app(settings.replace(api_key=KEY)).test_client()


@pytest.mark.parametrize("headers", [{}, {"x-api-key": "wrong"}, {"x-api-key": ""}, {"Authorization": KEY}])
def test_messages_need_the_key(keyed, headers):
    response = keyed.post("/v1/messages", json=BODY, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["type"] == "error"
    assert response.get_json()["error"]["type"] == "authentication_error"


@pytest.mark.parametrize("headers", [{"x-api-key": KEY, "anthropic-version": "2023-06-01"},
                                     {"Authorization": f"Bearer {KEY}"}])
def test_either_header_carries_the_key(keyed, headers):
    response = keyed.post("/v1/messages", json=BODY, headers=headers)
    assert response.status_code == 400 and response.get_json()["error"]["type"] == "invalid_request_error"
