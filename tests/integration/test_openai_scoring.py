"""Scoring text as evaluation harnesses do, through the official `openai` client and plain HTTP
against the real service: token-id prompts, `echo` with `logprobs` and `max_tokens: 0`."""
from __future__ import annotations

import openai
import pytest
import requests

PROMPTS = ["The capital of France is", "Once upon a time there was"]


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="-", timeout=120, max_retries=0)


def token_ids(service, text: str) -> list[int]:
    tokens = requests.post(f"{service.base_url}/tokenize", json={"inputs": text}, timeout=30).json()
    return [t["id"] for t in tokens]


def test_token_prompts_complete_as_their_text_does(client, service):
    ids = [token_ids(service, p) for p in PROMPTS]
    by_text = client.completions.create(model="tiny", prompt=PROMPTS, temperature=0, max_tokens=8)
    batched = client.completions.create(model="tiny", prompt=ids, temperature=0, max_tokens=8)
    single = client.completions.create(model="tiny", prompt=ids[0], temperature=0, max_tokens=8)
    texts = [c.text for c in by_text.choices]
    assert [c.text for c in batched.choices] == texts and single.choices[0].text == texts[0]
    assert batched.usage == by_text.usage
    plain = requests.post(f"{service.base_url}/v1/completions", timeout=120, json={
        "prompt": ids[1], "temperature": 0, "max_tokens": 8, "echo": True}).json()
    assert plain["choices"][0]["text"] == PROMPTS[1] + texts[1]  # echoed: what the ids decode to


def test_echo_scores_the_prompt_as_decoder_input_details_does(client, service):
    text = PROMPTS[0] + " Paris, a city of light"
    scored = client.completions.create(model="tiny", prompt=text, echo=True, logprobs=2, max_tokens=0)
    choice = scored.choices[0]
    generate = requests.post(f"{service.base_url}/generate", timeout=120, json={
        "inputs": text, "parameters": {"max_new_tokens": 1, "decoder_input_details": True}}).json()
    prefill = generate["details"]["prefill"]
    assert choice.text == text and choice.finish_reason == "length" and scored.usage.completion_tokens == 0
    assert len(choice.logprobs.token_logprobs) == len(prefill) == scored.usage.prompt_tokens
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert choice.logprobs.token_logprobs[1:] == pytest.approx([t["logprob"] for t in prefill[1:]], abs=1e-4)
    assert "".join(choice.logprobs.tokens) == text
    assert [text[o:].startswith(t) for o, t in zip(choice.logprobs.text_offset, choice.logprobs.tokens)] \
        == [True] * len(prefill)
    for token, logprob, top in zip(choice.logprobs.tokens[1:], choice.logprobs.token_logprobs[1:],
                                   choice.logprobs.top_logprobs[1:]):
        assert len(top) <= 2 and max(top.values()) >= logprob - 1e-6  # the likeliest alternatives
        assert token not in top or top[token] == pytest.approx(logprob, abs=1e-4)


def test_echo_with_a_continuation_lists_the_prompt_then_the_generated_tokens(client, service):
    ids = token_ids(service, PROMPTS[1])
    answer = client.completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=4,
                                       temperature=0)
    streamed = list(client.completions.create(model="tiny", prompt=[ids], echo=True, logprobs=1, max_tokens=4,
                                              temperature=0, stream=True))
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(ids) + 4 and logprobs.text_offset[len(ids)] == len(PROMPTS[1])
    assert "".join(c.choices[0].text for c in streamed) == answer.choices[0].text
    streamed_logprobs = [lp for c in streamed if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed_logprobs[0] is None and streamed_logprobs[1:] == pytest.approx(logprobs.token_logprobs[1:],
                                                                                   abs=1e-4)
