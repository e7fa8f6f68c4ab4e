"""The OpenAI-compatible routes through the real web app, real Redis and a scripted replica:
body shapes, streams, choices, and every error path as JSON (the real model: tests/integration)."""
from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from common.settings import Settings
from tests.web.fake_replica import FakeReplica, fail_after, reply
from tests.web.test_failover import fast, dying_replica, post_after_the_dying_replica_took_it, rerun  # noqa: F401
from web.app import create_app

TEMPLATE = "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}a{% endif %}"
RAISING_TEMPLATE = "{{ raise_exception('no system messages here') }}"


@pytest.fixture(scope="module")
def chat_model_dir(model_dir, tmp_path_factory):
    """The word-level tokenizer of the web tests, with a chat template."""
    directory = tmp_path_factory.mktemp("chat-model")
    shutil.copy(model_dir / "tokenizer.json", directory / "tokenizer.json")
    (directory / "chat_template.jinja").write_text(TEMPLATE)
    return directory


def make_client(model_dir, redis_url, **overrides):
    settings = Settings(**{"model_id": str(model_dir), "redis_url": redis_url, "max_input_tokens": 10,
                           "max_total_tokens": 20, "queue_timeout": 3.0, "replica_silence_timeout": 3.0,
                           "keep_alive_interval": 0.1, **overrides})
    return create_app(settings).test_client()


@pytest.fixture
def client(chat_model_dir, redis_url, redis_client):
    return make_client(chat_model_dir, redis_url)


def chat(client, **body):
    body.setdefault("messages", [{"role": "user", "content": "hello world"}])
    return client.post("/v1/chat/completions", json={"model": "tiny", **body})


def sse_payloads(response) -> list:
    lines = [line for line in response.get_data(as_text=True).split("\n\n") if line.startswith("data: ")]
    return [line[len("data: "):] for line in lines]


def test_chat_answer_shape_and_usage(client):
    with FakeReplica(client.application.extensions["blitzscale"].settings.redis_url, reply([" a", " b"])) as replica:
        response = chat(client, temperature=0, max_tokens=2)
    assert response.status_code == 200, response.get_json()
    body = response.get_json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": " a b"}, "logprobs": None,
                                "finish_reason": "length"}]
    job = replica.jobs[0]
    assert body["usage"] == {"prompt_tokens": len(job.input_ids), "completion_tokens": 2,
                             "total_tokens": len(job.input_ids) + 2, "prompt_tokens_details": {"cached_tokens": 0}}
    assert job.sampling.do_sample is False and job.stopping.max_new_tokens == 2


def test_chat_stream_ends_with_done_and_usage(client, redis_url):
    with FakeReplica(redis_url, reply([" a", " b"], finish_reason="eos_token")):
        response = chat(client, stream=True, stream_options={"include_usage": True}, logprobs=True, top_logprobs=2)
        payloads = sse_payloads(response)  # read while the replica runs
    assert response.status_code == 200 and response.mimetype == "text/event-stream"
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    content = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["delta"].get("content", "") for c in content) == " a b"
    assert [c["finish_reason"] for c in content] == [None, None, "stop"]
    assert [len(c["logprobs"]["content"][0]["top_logprobs"]) for c in content[:2]] == [2, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 2


@pytest.mark.parametrize("stream", [False, True])
def test_usage_counts_the_prompt_tokens_a_replica_found_cached_once_per_prompt(client, redis_url, stream):
    """The final event's `cached_tokens` is OpenAI's usage.prompt_tokens_details.cached_tokens;
    with n choices of one prompt it counts once, as prompt_tokens does (the first choice's)."""
    with FakeReplica(redis_url, reply([" a"], cached_tokens=2)):
        response = client.post("/v1/completions", json={"prompt": ["hello world", "the capital"], "n": 2,
                                                       "stream": stream, "stream_options": {"include_usage": True}})
        usage = (json.loads(sse_payloads(response)[-2]) if stream else response.get_json())["usage"]
    assert usage["prompt_tokens"] == 4 and usage["prompt_tokens_details"] == {"cached_tokens": 4}


def test_n_choices_are_independent_jobs_with_derived_seeds(client, redis_url):
    with FakeReplica(redis_url, reply([" a"])) as replica:
        body = chat(client, n=2, seed=7).get_json()
    assert [c["index"] for c in body["choices"]] == [0, 1]
    seeds = sorted(job.sampling.seed for job in replica.jobs)
    assert len(replica.jobs) == 2 and 7 in seeds and len(set(seeds)) == 2
    assert body["usage"]["completion_tokens"] == 2


def test_completions_several_prompts_times_n_and_echo(client, redis_url):
    with FakeReplica(redis_url, reply([" c"])) as replica:
        response = client.post("/v1/completions", json={"prompt": ["hello", "world"], "n": 2, "echo": True,
                                                       "logprobs": 1})
    body = response.get_json()
    assert response.status_code == 200, body
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion"
    assert [c["text"] for c in body["choices"]] == ["hello c", "hello c", "world c", "world c"]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["text_offset"] == [0, 5]  # the prompt's one token, then the generated one
    assert logprobs["token_logprobs"] == [None, -0.5] and logprobs["top_logprobs"][0] is None
    assert all(j.decoder_input_details and j.prefill_top_n_tokens == 1 for j in replica.jobs)
    assert len(replica.jobs) == 4 and all(j.stopping.max_new_tokens == 16 for j in replica.jobs)  # OpenAI default
    assert body["usage"]["prompt_tokens"] == 2  # each prompt once, not once per choice


def test_completions_stream_with_several_choices(client, redis_url):
    with FakeReplica(redis_url, reply([" a", " b"])):
        response = client.post("/v1/completions", json={"prompt": "hello", "n": 2, "stream": True})
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p)["choices"][0] for p in payloads[:-1]]
    for index in (0, 1):
        mine = [c for c in chunks if c["index"] == index]
        assert "".join(c["text"] for c in mine) == " a b"
        assert [c["finish_reason"] for c in mine] == [None, None, "length"]


def test_models_and_tokenize(client):
    models = client.get("/v1/models").get_json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    assert models["data"][0]["max_model_len"] == 20
    tokens = client.post("/tokenize", json={"inputs": "hello paris"}).get_json()
    assert [(t["text"], t["start"], t["stop"]) for t in tokens] == [("hello", 0, 5), ("paris", 6, 11)]
    assert client.post("/tokenize", json={"inputs": "hello paris", "parameters": {"truncate": 1}}).get_json() == \
        tokens[-1:]
    templated = client.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "hello"}]}).get_json()
    assert templated["templated_text"] == "user hello a"
    assert [t["text"] for t in templated["tokenize_response"]] == ["user", "hello", "a"]


def test_content_parts_are_joined_without_separator(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    templated = client.post("/chat_tokenize", json={"messages": messages}).get_json()
    assert templated["templated_text"] == "user hello a"


def openai_error(response, status: int, error_type: str = "invalid_request_error") -> dict:
    """OpenAI's error object, with its status."""
    assert response.status_code == status, response.get_json()
    body = response.get_json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == error_type
    return body["error"]


@pytest.mark.parametrize("body, param, fragment", [
    ({"messages": []}, "messages", "`messages` cannot be empty"),
    ({"n": 3}, "n", "`n` must be > 0 and <= 2. Given: 3"),
    ({"temperature": -1}, "temperature", "`temperature` must be strictly positive"),
    ({"top_p": 1.5}, "top_p", "`top_p` must be >= 0.0 and <= 1.0"),
    ({"top_p": -0.1}, "top_p", "`top_p` must be >= 0.0 and <= 1.0"),
    ({"presence_penalty": 3}, "presence_penalty", "`presence_penalty` must be >= -2.0 and <= 2.0"),
    ({"frequency_penalty": -3}, "frequency_penalty", "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "`logit_bias` keys must be token ids"),
    ({"logit_bias": {"99999": 1}}, "logit_bias", "`logit_bias` keys must be token ids"),
    ({"logit_bias": {"1": 101}}, "logit_bias", "`logit_bias` values must be >= -100 and <= 100"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"logprobs": True, "top_logprobs": 9}, "top_logprobs", "`top_logprobs` must be >= 0 and <= 5. Given: 9"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages",
     "text content"),
    ({"tools": [{"type": "function"}]}, "tools", "`tools` entries must be"),
    ({"messages": "hello"}, "messages", "`messages`"),
    ({"stop": 3}, "stop", "`stop`"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content", "`messages.0.content`"),
])
def test_chat_errors_are_openai_400s_naming_the_field(client, body, param, fragment):
    error = openai_error(chat(client, **body), 400)
    assert fragment in error["message"] and error["param"] == param and error["code"] is None


def test_an_over_long_prompt_is_context_length_exceeded(client):
    error = openai_error(chat(client, messages=[{"role": "user", "content": "hello " * 12}], max_tokens=3), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    # templated: "user hello ... a" is 14 tokens; --max-input-tokens 10
    assert error["message"] == ("This model's maximum context length is 10 tokens. However, you requested 17 tokens "
                                "(14 in the messages, 3 in the completion). Please reduce the length of the "
                                "messages or completion. The prompt is too long.")
    error = openai_error(client.post("/v1/completions", json={"prompt": "hello " * 11}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert "(11 in the messages, 16 in the completion)" in error["message"]  # completions' default max_tokens


@pytest.mark.parametrize("body, param, fragment", [
    ({"prompt": []}, "prompt", "Empty array detected. Do not use an empty array for the prompt."),
    ({"prompt": ["a"] * 5}, "prompt", "Number of prompts exceeds the maximum allowed batch size of 4"),
    ({"prompt": "a", "suffix": "b"}, "suffix",
     "Suffix is not supported and can be achieved by preprocessing the prompt."),
    ({"prompt": "a", "logprobs": 6}, "logprobs", "`logprobs` must be >= 0 and <= 5"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens", "`max_new_tokens` must be strictly positive"),
    ({"prompt": "a", "n": 2, "best_of": 1}, "best_of", "`best_of` must be >= `n` (2) and <= 2. Given: 1"),
    ({"prompt": "a", "best_of": 3}, "best_of", "`best_of` must be >= `n` (1) and <= 2. Given: 3"),
    ({"prompt": "a", "best_of": 2, "stream": True}, "best_of", "`best_of` > `n` cannot be streamed"),
])
def test_completion_errors_are_openai_400s(client, body, param, fragment):
    error = openai_error(client.post("/v1/completions", json=body), 400)
    assert fragment in error["message"] and error["param"] == param


def test_bad_json_wrong_type_and_unknown_routes_are_openai_errors(client):
    error = openai_error(client.post("/v1/chat/completions", data="{not json", content_type="application/json"), 400)
    assert "Failed to parse the request body as JSON" in error["message"] and error["param"] is None
    assert "Content-Type: application/json" in openai_error(
        client.post("/v1/completions", data="prompt=a", content_type="text/plain"), 415)["message"]
    openai_error(client.get("/v1/nowhere"), 404, "not_found_error")
    openai_error(client.get("/v1/chat/completions"), 405)
    assert client.post("/tokenize", json={"inputs": 5}).get_json()["error_type"] == "validation"  # TGI's route


def test_no_template_is_a_template_error(model_dir, redis_url, redis_client):
    client = make_client(model_dir, redis_url)
    assert openai_error(chat(client), 400)["message"] == "Template error: template not found"
    response = client.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "a"}]})
    assert response.status_code == 422 and response.get_json()["error_type"] == "template_error"  # TGI's route


def test_template_raise_exception_is_a_template_error(chat_model_dir, redis_url, redis_client, tmp_path):
    shutil.copy(chat_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(RAISING_TEMPLATE)
    assert openai_error(chat(make_client(tmp_path, redis_url)), 400)["message"] == \
        "Template error: no system messages here"


def test_api_key_guards_generation_and_tokenize_not_models(chat_model_dir, redis_url, redis_client):
    client = make_client(chat_model_dir, redis_url, api_key="sesame")
    error = openai_error(chat(client), 401, "authentication_error")
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer" in error["message"]
    assert client.post("/v1/completions", json={"prompt": "a"}).status_code == 401
    assert client.post("/tokenize", json={"inputs": "a"}).status_code == 401
    assert client.get("/v1/models").status_code == 200
    assert client.get(f"/v1/models/{chat_model_dir.name}").status_code == 200
    assert client.post("/chat_tokenize", json={"messages": [{"role": "user", "content": "a"}]}).status_code == 200
    authorized = client.post("/tokenize", json={"inputs": "hello"}, headers={"Authorization": "Bearer sesame"})
    assert authorized.status_code == 200


def test_overloaded_is_429_and_counted(chat_model_dir, redis_url, redis_client):
    client = make_client(chat_model_dir, redis_url, max_concurrent_requests=0)
    error = openai_error(chat(client), 429, "rate_limit_error")
    assert error["code"] == "rate_limit_exceeded" and error["message"] == "Model is overloaded"
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'tgi_request_failure_total{err="overloaded",reason="overloaded"} 1.0' in metrics


def test_error_during_a_stream_is_an_error_chunk_then_done(client, redis_url):
    with FakeReplica(redis_url, fail_after([" a"], "boom")):
        response = chat(client, stream=True)
        payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert "boom" in error["message"] and error["type"] == "server_error"
    assert error["param"] is None and error["code"] is None


def test_requests_are_counted_in_tgi_metrics_and_carry_request_ids(client, redis_url):
    with FakeReplica(redis_url, reply([" a"])):
        response = client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello"}], "n": 2},
            headers={"x-request-id": "my-chat-1"})
        streamed = client.post("/v1/completions", json={"prompt": "hello", "stream": True})
        sse_payloads(streamed)
    assert response.status_code == 200 and response.headers["x-request-id"] == "my-chat-1"
    assert streamed.headers["x-request-id"]
    chat(client, messages=[])  # a validation failure
    metrics = client.get("/metrics").get_data(as_text=True)
    assert "tgi_request_count_total 3.0" in metrics  # one per HTTP request, whatever its choices
    assert "tgi_request_success_total 2.0" in metrics
    assert 'tgi_request_failure_total{err="validation",reason="validation"} 1.0' in metrics


@pytest.mark.parametrize("body, expected", [
    ({}, {"do_sample": True, "temperature": 1.0, "top_p": None, "max_new_tokens": 20 - 4}),  # up to max_total_tokens
    ({"temperature": 0, "top_p": 0.5}, {"do_sample": False, "top_p": None}),  # greedy: no sampling filter either
    ({"top_p": 0}, {"do_sample": True, "top_p": None, "top_k": 1}),  # OpenAI's 0: the most likely token only
    ({"top_p": 0.5}, {"do_sample": True, "top_p": 0.5, "top_k": None}),
    ({"temperature": 0.7, "top_p": 1.0}, {"do_sample": True, "temperature": 0.7, "top_p": None}),
    ({"max_tokens": 500}, {"max_new_tokens": 16}),  # capped at what max_total_tokens leaves, not refused
    ({"max_completion_tokens": 3, "max_tokens": 9}, {"max_new_tokens": 3}),
    ({"stop": "paris"}, {"stop": ["paris"]}),
    ({"stop": ["a", "b"]}, {"stop": ["a", "b"]}),
    ({"presence_penalty": 0.5, "frequency_penalty": -1.0, "logit_bias": {"3": -100, "5": 2.5}},
     {"presence_penalty": 0.5, "generated_frequency_penalty": -1.0, "frequency_penalty": 0.0,
      "logit_bias": [(3, -100.0), (5, 2.5)]}),
    ({"logprobs": True, "top_logprobs": 4}, {"top_n_tokens": 4}),
    ({"top_logprobs": 4}, {"top_n_tokens": 0}),  # alternatives only with logprobs
    ({"seed": 42}, {"seed": 42, "do_sample": True}),
])
def test_openai_fields_become_job_parameters(client, redis_url, body, expected):
    with FakeReplica(redis_url, reply([" a"])) as replica:
        response = chat(client, **body)  # templated: "user hello world a", 4 tokens
    assert response.status_code == 200, response.get_json()
    job = replica.jobs[0]
    parameters = {**dataclasses.asdict(job.sampling), "max_new_tokens": job.stopping.max_new_tokens,
                  "stop": job.stopping.stop_sequences, "top_n_tokens": job.top_n_tokens}
    assert {key: parameters[key] for key in expected} == expected


def test_an_openai_stream_fails_over_without_repeating_tokens(fast, redis_url):
    dying = dying_replica(redis_url, tokens=2)
    survivor = FakeReplica(redis_url, rerun([" t1", " t2", " t3"]), name="replica1@test")
    response = post_after_the_dying_replica_took_it(
        fast, dying, "/v1/completions", {"prompt": "hello", "stream": True, "max_tokens": 3}, survivor)
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    choices = [json.loads(p)["choices"][0] for p in payloads[:-1]]
    assert "".join(c["text"] for c in choices) == " t1 t2 t3" and choices[-1]["finish_reason"] == "length"
    assert [job.attempt for job in survivor.jobs] == [1]
