"""/v1/completions for evaluation harnesses, through the real web app, real Redis and a scripted
replica: OpenAI's four prompt forms, `echo` with `logprobs` (the prompt's tokens scored), and
`max_tokens: 0` (the prompt alone). The real engine's numbers: tests/integration/test_openai_scoring.py."""
from __future__ import annotations

import json

import pytest

from tests.web.fake_replica import FakeReplica, reply
from tests.web.test_openai_routes import sse_payloads

WORD = {"hello": 1, "world": 2, "the": 3, "capital": 4, "of": 5}  # the web tests' word-level vocabulary
VOCAB = 17  # [UNK] and 16 words


def complete(client, **body):
    response = client.post("/v1/completions", json={"model": "tiny", "temperature": 0, **body})
    return response.status_code, response.get_json()


@pytest.mark.parametrize("prompt, expected", [
    ([1, 2], [[1, 2]]),  # a list of token ids is one prompt
    ([[1, 2], [3, 4, 5]], [[1, 2], [3, 4, 5]]),
    (["hello world", "the capital of"], [[1, 2], [3, 4, 5]]),
])
def test_token_prompts_reach_the_engine_as_sent(client, redis_url, prompt, expected):
    with FakeReplica(redis_url, reply([" c"])) as replica:
        status, body = complete(client, prompt=prompt, echo=True)
    assert status == 200, body
    assert sorted(j.input_ids for j in replica.jobs) == expected
    texts = {" ".join(k for k, v in WORD.items() if v in ids) + " c" for ids in expected}
    assert {c["text"] for c in body["choices"]} == texts  # token prompts echo their decoded text
    assert body["usage"]["prompt_tokens"] == sum(map(len, expected))


@pytest.mark.parametrize("prompt, message", [
    ([1, VOCAB], f"`prompt` token ids must be from 0 to {VOCAB - 1}. Given: {VOCAB}"),
    ([[1], [-1]], f"`prompt` token ids must be from 0 to {VOCAB - 1}. Given: -1"),
    ([[1]] * 5, "Number of prompts exceeds the maximum allowed batch size of 4. Given: 5"),
    ([[]], "Empty array detected. Do not use an empty array for the prompt."),
    ([1, "hello"], "`prompt`: Not a string, a list of strings, a list of token ids or a list of lists of token ids."),
    ([[1], 2], "`prompt`: Not a string, a list of strings, a list of token ids or a list of lists of token ids."),
    ([True], "`prompt`: Not a string, a list of strings, a list of token ids or a list of lists of token ids."),
])
def test_bad_token_prompts_are_openai_400s(client, redis_url, prompt, message):
    with FakeReplica(redis_url, reply([" c"])) as replica:
        status, body = complete(client, prompt=prompt)
    assert status == 400 and body["error"]["param"] == "prompt" and body["error"]["type"] == "invalid_request_error"
    assert message in body["error"]["message"] and not replica.jobs


def test_a_token_prompt_over_max_input_tokens_is_context_length_exceeded(client, redis_url):
    status, body = complete(client, prompt=[1] * 11, max_tokens=2)
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "However, you requested 13 tokens (11 in the messages, 2 in the completion)" in body["error"]["message"]


def test_echo_with_logprobs_lists_the_prompts_tokens_then_the_generated_ones(client, redis_url):
    with FakeReplica(redis_url, reply([" c", " d"])) as replica:
        status, body = complete(client, prompt="hello world", echo=True, logprobs=1, max_tokens=2)
    assert status == 200, body
    [job] = replica.jobs
    assert job.decoder_input_details and job.prefill_top_n_tokens == 1  # the engine scores the prompt
    [choice] = body["choices"]
    assert choice["text"] == "hello world c d"
    assert choice["logprobs"] == {
        "tokens": ["p", "p", " c", " d"],  # the replica's token texts (a word-level vocabulary has no bytes)
        "token_logprobs": [None, -1.0, -0.5, -0.5],
        "top_logprobs": [None, {"p": -0.25}, {" c": -0.5}, {" d": -0.5}],
        "text_offset": [0, 6, 11, 13],
    }


def test_max_tokens_0_with_echo_returns_the_scored_prompt_alone(client, redis_url):
    with FakeReplica(redis_url, reply([" c"])) as replica:
        status, body = complete(client, prompt=[[1, 2], [3]], echo=True, logprobs=0, max_tokens=0)
    assert status == 200, body
    assert all(j.stopping.max_new_tokens == 1 for j in replica.jobs)  # one token, not the client's
    assert [c["text"] for c in body["choices"]] == ["hello world", "the"]
    assert [c["finish_reason"] for c in body["choices"]] == ["length", "length"]
    assert body["choices"][0]["logprobs"] == {"tokens": ["p", "p"], "token_logprobs": [None, -1.0],
                                              "top_logprobs": [None, {}], "text_offset": [0, 5]}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 0, "total_tokens": 3,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    status, body = complete(client, prompt="hello", max_tokens=0)  # without echo there is nothing to return
    assert status == 400 and body["error"]["param"] == "max_tokens"


def test_a_stream_echoes_the_scored_prompt_in_its_first_chunk(client, redis_url):
    with FakeReplica(redis_url, reply([" c", " d"])):
        response = client.post("/v1/completions", json={"prompt": [1, 2], "echo": True, "logprobs": 1,
                                                       "max_tokens": 2, "stream": True})
        chunks = [json.loads(p)["choices"][0] for p in sse_payloads(response)[:-1]]
        only = client.post("/v1/completions", json={"prompt": [1, 2], "echo": True, "logprobs": 1, "max_tokens": 0,
                                                    "stream": True, "stream_options": {"include_usage": True}})
        *prompt_only, usage = [json.loads(p) for p in sse_payloads(only)[:-1]]
        prompt_only = [chunk["choices"][0] for chunk in prompt_only]
    assert "".join(c["text"] for c in chunks) == "hello world c d"
    first = chunks[0]["logprobs"]
    assert first["tokens"] == ["p", "p", " c"] and first["token_logprobs"][:2] == [None, -1.0]
    assert first["text_offset"] == [0, 5, 11] and first["top_logprobs"][:2] == [None, {"p": -0.25}]
    assert chunks[1]["logprobs"]["text_offset"] == [13] and chunks[-1]["finish_reason"] == "length"
    [choice] = prompt_only
    assert choice["text"] == "hello world" and choice["finish_reason"] == "length"
    assert choice["logprobs"]["token_logprobs"] == [None, -1.0]
    assert usage["usage"] == {"prompt_tokens": 2, "completion_tokens": 0, "total_tokens": 2,
                              "prompt_tokens_details": {"cached_tokens": 0}}
