"""The few tests that need real text: the default model, SmolLM2-135M-Instruct."""
from __future__ import annotations

import requests


def test_capital_of_france(real_service):
    body = requests.post(f"{real_service.base_url}/generate", json={
        "inputs": "The capital of France is", "parameters": {"max_new_tokens": 8, "details": True}}, timeout=120).json()
    assert "Paris" in body["generated_text"]
    info = requests.get(f"{real_service.base_url}/info").json()
    assert info["model_id"].endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    assert info["model_dtype"] == "float32"


def test_real_text_streams_and_stops(real_service):
    response = requests.post(f"{real_service.base_url}/generate_stream", json={
        "inputs": "The capital of France is", "parameters": {"max_new_tokens": 20, "stop": ["."], "details": True}},
        stream=True, timeout=120)
    from tests.integration.sse import sse_events

    events = sse_events(response)
    assert events[-1]["details"]["finish_reason"] == "stop_sequence"
    assert events[-1]["generated_text"].endswith(".")
    assert "Paris" in events[-1]["generated_text"]


def test_real_json_under_a_schema(real_service):
    """The default model writes the JSON itself: the grammar only keeps it in shape."""
    import json

    import jsonschema

    schema = {"type": "object", "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
              "required": ["city", "country"], "additionalProperties": False}
    prompt = ("<|im_start|>user\nGive the capital of France as JSON with keys city and country.<|im_end|>\n"
              "<|im_start|>assistant\n")
    body = requests.post(f"{real_service.base_url}/generate", json={"inputs": prompt, "parameters": {
        "max_new_tokens": 40, "grammar": {"type": "json", "value": schema}, "details": True}}, timeout=120).json()
    answer = json.loads(body["generated_text"])
    jsonschema.validate(answer, schema)
    assert body["details"]["finish_reason"] == "eos_token"
    assert "Paris" in answer["city"]
