"""TGI's `grammar` through the real service (gunicorn, Celery replica, Redis) on the tiny model."""
from __future__ import annotations

import json
import re

import jsonschema
import requests

from tests.integration.sse import sse_events

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 8},
        "population": {"type": "integer", "minimum": 0, "maximum": 100000},
        "capital": {"type": "boolean"},
        "kind": {"enum": ["town", "city", "village"]},
    },
    "required": ["city", "population", "capital", "kind"],
    "additionalProperties": False,
}
PHONE = r"\+33 [1-9]( [0-9]{2}){4}"


def post(service, route, inputs, **parameters):
    return requests.post(f"{service.base_url}{route}", json={"inputs": inputs, "parameters": parameters}, timeout=60)


def test_generate_with_a_json_schema_validates_and_streaming_gives_the_same_text(service):
    grammar = {"type": "json", "value": SCHEMA}
    response = post(service, "/generate", "Paris:", grammar=grammar, max_new_tokens=200, details=True)
    assert response.status_code == 200, response.text
    body = response.json()
    jsonschema.validate(json.loads(body["generated_text"]), SCHEMA)
    assert body["details"]["finish_reason"] == "eos_token"

    stream = post(service, "/generate_stream", "Paris:", grammar=grammar, max_new_tokens=200)
    events = sse_events(stream)
    assert events[-1]["generated_text"] == body["generated_text"]
    assert "".join(e["token"]["text"] for e in events if not e["token"]["special"]) == body["generated_text"]


def test_sampled_json_object_alias_on_the_compat_routes(service):
    for route in ("/", "/invocations"):
        response = post(service, route, "Data:", grammar={"type": "json_object", "value": SCHEMA},
                        max_new_tokens=200, do_sample=True, seed=5)
        assert response.status_code == 200, response.text
        [body] = response.json()
        jsonschema.validate(json.loads(body["generated_text"].removeprefix("Data:")), SCHEMA)


def test_regex_output_full_matches(service):
    response = post(service, "/generate", "Call", grammar={"type": "regex", "value": PHONE}, max_new_tokens=60)
    assert response.status_code == 200, response.text
    assert re.fullmatch(PHONE, response.json()["generated_text"]), response.json()


def test_bad_grammars_are_422(service):
    for grammar in ({"type": "json", "value": {"type": "objekt"}}, {"type": "regex", "value": "(unclosed"}):
        response = post(service, "/generate", "Hello", grammar=grammar)
        assert response.status_code == 422, response.text
        body = response.json()
        assert body["error_type"] == "validation"
        assert body["error"].startswith("Input validation error: grammar is not valid: ")
