"""Hostile bodies: never a 500. What is not JSON is a 400, JSON of the wrong shape a 422, as TGI
(NaN and Infinity: 422 from the float fields that refuse them)."""
from __future__ import annotations

import json

import pytest

ROUTES = ["/generate", "/generate_stream", "/", "/invocations"]

NOT_JSON = {
    "deep array": b'{"inputs": "hello", "parameters": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "deep object": b'{"inputs": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_000 + b"}",
    "deep grammar value": b'{"inputs": "hello", "parameters": {"grammar": {"type": "json", "value": '
                          + b"[" * 200 + b"]" * 200 + b"}}}",
    "huge integer": b'{"inputs": "hello", "parameters": {"max_new_tokens": 1' + b"0" * 5000 + b"}}",
    "lone surrogate": b'{"inputs": "\\ud800 hello"}',
    "lone surrogate in stop": b'{"inputs": "hello", "parameters": {"stop": ["\\udfff"]}}',
    "invalid utf-8": b'{"inputs": "\xff\xfe"}',
    "utf-16": '{"inputs": "hello"}'.encode("utf-16"),
    "truncated": b'{"inputs": "hel',
    "empty": b"",
}
WRONG_SHAPE = {
    "a list": [1, 2],
    "a string": "hello",
    "null": None,
    "inputs a number": {"inputs": 3},
    "parameters a list": {"inputs": "hello", "parameters": []},
    "temperature a string": {"inputs": "hello", "parameters": {"temperature": "0.5"}},
    "max_new_tokens a float": {"inputs": "hello", "parameters": {"max_new_tokens": 1.5}},
    "do_sample a number": {"inputs": "hello", "parameters": {"do_sample": 1}},
    "stop a string": {"inputs": "hello", "parameters": {"stop": "a"}},
    "huge top_k": {"inputs": "hello", "parameters": {"top_k": 10**23}},
    "huge best_of": {"inputs": "hello", "parameters": {"best_of": 10**23, "do_sample": True}},
    "negative seed": {"inputs": "hello", "parameters": {"seed": -1}},
    "seed over uint64": {"inputs": "hello", "parameters": {"seed": 2**64}},
    "many stop sequences": {"inputs": "hello", "parameters": {"stop": ["a"] * 100_000}},
    "a huge prompt": {"inputs": "hello " * 300_000},
    "grammar of a wrong type": {"inputs": "hello", "parameters": {"grammar": {"type": "xml", "value": 1}}},
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", list(NOT_JSON))
def test_not_json_is_a_400(client, route, name):
    response = client.post(route, data=NOT_JSON[name], content_type="application/json")
    assert response.status_code in (400, 422), response.get_data()
    body = response.get_json()
    assert body["error_type"] == "validation" and body["error"].startswith("Input validation error: ")


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("name", list(WRONG_SHAPE))
def test_wrong_shape_is_a_422(client, route, name):
    response = client.post(route, data=json.dumps(WRONG_SHAPE[name], allow_nan=True), content_type="application/json")
    assert response.status_code == 422, response.get_data()
    assert response.get_json()["error_type"] == "validation"


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("number", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
@pytest.mark.parametrize("field", ["temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty"])
def test_nan_and_infinity_are_a_422(client, route, number, field):
    body = b'{"inputs": "hello", "parameters": {"' + field.encode() + b'": ' + number + b"}}"
    response = client.post(route, data=body, content_type="application/json")
    assert response.status_code == 422
    assert response.get_json()["error"] == (f"Input validation error: `parameters.{field}`: Special numeric values "
                                            "(nan or infinity) are not permitted.")


def test_specific_messages(client):
    deep = client.post("/generate", data=NOT_JSON["deep array"], content_type="application/json")
    assert deep.status_code == 400 and "nested deeper than" in deep.get_json()["error"]
    surrogate = client.post("/generate", data=NOT_JSON["lone surrogate"], content_type="application/json")
    assert surrogate.status_code == 400 and "surrogate" in surrogate.get_json()["error"]


@pytest.mark.parametrize("text", ["héllo wörld", "日本語のテキスト", "emoji 🦀🚀 and ZWJ 👩‍💻", "\u0000nul", "rtl \u202e txet",
                                  "combining e\u0301\u0301\u0301"])
def test_unicode_edge_cases_are_served(client, redis_url, text):
    from tests.web.fake_replica import FakeReplica, reply

    with FakeReplica(redis_url, reply([" a"])):
        response = client.post("/generate", json={"inputs": text, "parameters": {"max_new_tokens": 1}})
    assert response.status_code == 200, response.get_data()


def test_body_over_2_mb_is_a_json_413(client):
    response = client.post("/generate", data=b'{"inputs": "' + b"a" * 2_100_000 + b'"}', content_type="application/json")
    assert response.status_code == 413
    assert response.get_json() == {"error": "Input validation error: the request body is too large",
                                   "error_type": "validation"}
