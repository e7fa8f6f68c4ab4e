"""Where real clients rely on OpenAI's exact behaviour, through the official `openai` client and its
own helpers against the real service (web, Redis, a replica serving the tiny model): the stream
helper's message, stop sequences cut (also when split across tokens), served model objects,
`top_p: 0`, completions' `best_of`, logprobs without the end token, legacy `functions`.
Errors and context overflow: tests/integration/test_openai_client.py."""
from __future__ import annotations

import json

import openai
import pytest
import requests

from tests.tiny_model import EOS_AFTER, EOS_PROMPT

MESSAGES = [{"role": "user", "content": "The capital of France is"}]
WEATHER = {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"location": {"type": "string", "maxLength": 12}}, "required": ["location"],
    "additionalProperties": False}}


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="-", timeout=120, max_retries=0)


def chat(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model="tiny", **kwargs)


def streamed_text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_the_stream_helper_assembles_one_assistant_message(client):
    free = chat(client, temperature=0, max_tokens=16, logprobs=True).choices[0]
    stop = stop_cases([t.token for t in free.logprobs.content])[0]  # the helper refuses a `length` finish
    answer = chat(client, temperature=0, max_tokens=16, stop=stop)
    with client.chat.completions.stream(model="tiny", messages=MESSAGES, temperature=0, max_tokens=16,
                                        stop=stop) as stream:
        final = stream.get_final_completion()
    message = final.choices[0].message
    assert message.role == "assistant" and message.content == answer.choices[0].message.content
    chunks = list(chat(client, temperature=0, max_tokens=8, stream=True))
    roles = [c.choices[0].delta.role for c in chunks if c.choices]
    assert roles[0] == "assistant" and not any(roles[1:])


def test_stream_responses_say_their_charset(service):
    response = requests.post(f"{service.base_url}/v1/completions", json={"prompt": "é", "max_tokens": 2,
                                                                         "stream": True}, timeout=60)
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert response.text.rstrip().endswith("data: [DONE]")


def stop_cases(tokens: list[str]) -> list[str]:
    """Two stop strings for a greedy answer made of `tokens`: a later token's text, and one split
    across two tokens (the last character of one, the first of the next)."""
    whole = [k for k in range(2, len(tokens) - 1)
             if tokens[k].strip() and tokens[k + 1].strip() and "bytes:" not in tokens[k] + tokens[k + 1]]
    k = whole[len(whole) // 2]
    return [tokens[k + 1], tokens[k][-1] + tokens[k + 1][0]]


def test_a_stop_string_is_cut_from_chat_answers_streamed_or_not(client):
    free = chat(client, temperature=0, max_tokens=16, logprobs=True).choices[0]
    for stop in stop_cases([t.token for t in free.logprobs.content]):
        expected = free.message.content[:free.message.content.index(stop)]
        answer = chat(client, temperature=0, max_tokens=16, stop=stop).choices[0]
        assert (answer.message.content, answer.finish_reason) == (expected, "stop")
        chunks = list(chat(client, temperature=0, max_tokens=16, stop=[stop], stream=True))
        assert streamed_text(chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_a_stop_string_is_cut_from_completions_streamed_or_not(client):
    kwargs = {"model": "tiny", "prompt": "Once upon a time", "temperature": 0, "max_tokens": 16}
    free = client.completions.create(logprobs=0, **kwargs).choices[0]
    for stop in stop_cases(free.logprobs.tokens):
        expected = free.text[:free.text.index(stop)]
        answer = client.completions.create(stop=stop, logprobs=1, **kwargs).choices[0]
        assert (answer.text, answer.finish_reason) == (expected, "stop")
        assert answer.logprobs.text_offset[-1] < len(expected)  # only the tokens whose text was received
        chunks = list(client.completions.create(stop=stop, stream=True, **kwargs))
        assert "".join(c.choices[0].text for c in chunks) == expected and chunks[-1].choices[0].finish_reason == "stop"


def test_models_retrieve_the_served_model(client, tiny_model_dir):
    model = client.models.retrieve(tiny_model_dir.name)
    assert model.id == tiny_model_dir.name and model.owned_by == "blitzscale"
    assert model.created == int(tiny_model_dir.joinpath("tokenizer.json").stat().st_mtime)
    with pytest.raises(openai.NotFoundError) as raised:
        client.models.retrieve("gpt-4o")
    assert raised.value.code == "model_not_found" and "`gpt-4o` does not exist" in str(raised.value)


def test_top_p_zero_keeps_only_the_most_likely_token(client):
    greedy = chat(client, temperature=0, max_tokens=10).choices[0].message.content
    assert chat(client, top_p=0, seed=3, max_tokens=10).choices[0].message.content == greedy
    assert chat(client, top_p=1, seed=3, max_tokens=10).choices[0].message.content  # 1.0: no filter


def test_best_of_returns_the_likeliest_of_its_candidates(client):
    kwargs = {"model": "tiny", "prompt": "Numbers:", "max_tokens": 6, "seed": 21, "logprobs": 0}
    candidates = client.completions.create(n=2, **kwargs)  # the same two samples best_of draws
    best = client.completions.create(best_of=2, **kwargs)
    assert len(best.choices) == 1 and best.usage.completion_tokens == candidates.usage.completion_tokens
    scores = {c.text: sum(c.logprobs.token_logprobs) for c in candidates.choices}
    assert len(scores) == 2 and best.choices[0].text == max(scores, key=scores.get)


def test_logprobs_have_no_entry_for_the_end_token(client):
    answer = client.completions.create(model="tiny", prompt=EOS_PROMPT, temperature=0, max_tokens=10, logprobs=1)
    choice = answer.choices[0]
    assert choice.finish_reason == "stop" and answer.usage.completion_tokens == EOS_AFTER
    assert len(choice.logprobs.tokens) == len(choice.logprobs.text_offset) == EOS_AFTER - 1


def test_legacy_functions_produce_a_function_call(client):
    answer = chat(client, functions=[WEATHER], function_call={"name": "get_weather"}, temperature=0, max_tokens=200)
    choice = answer.choices[0]
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "get_weather"
    assert isinstance(json.loads(choice.message.function_call.arguments)["location"], str)
    chunks = list(chat(client, functions=[WEATHER], function_call={"name": "get_weather"}, temperature=0,
                       max_tokens=200, stream=True))
    calls = [c.choices[0].delta.function_call for c in chunks if c.choices and c.choices[0].delta.function_call]
    assert calls[0].name == "get_weather" and chunks[-1].choices[0].finish_reason == "function_call"
    assert "".join(c.arguments or "" for c in calls) == choice.message.function_call.arguments
