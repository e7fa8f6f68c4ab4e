"""OpenAI's exact behaviour on /v1 through the real web app and Redis with a scripted replica:
`role` once per choice, stop sequences cut from streams and answers, the end token's logprob
left out, completions' `best_of`, legacy `functions`, what the template sees of developer and
tool messages, the served model objects (the real model: tests/integration/test_openai_exact.py)."""
from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from common.protocol import EVENT_FINAL, EVENT_STARTED, StreamEvent
from tests.web.fake_replica import FakeReplica, reply, token
from tests.web.test_openai_routes import chat, chat_model_dir, make_client, openai_error, sse_payloads  # noqa: F401
from web.openai.tools import NO_TOOL
from web.token_bytes import TokenBytes

# Renders neither tools nor tool calls, and adds a default system turn (as SmolLM2's does).
PLAIN_TEMPLATE = ("{% if messages[0].role != 'system' %}system default {% endif %}"
                  "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}a")
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"location": {"type": "string"}}}}
CALL = ['{"name": "get_', 'weather", "arguments": {"loc', 'ation": "Par', 'is"}}']


@pytest.fixture
def client(chat_model_dir, redis_url, redis_client):  # noqa: F811
    return make_client(chat_model_dir, redis_url, max_input_tokens=400, max_total_tokens=500)


@pytest.fixture
def plain_client(chat_model_dir, redis_url, redis_client, tmp_path):  # noqa: F811
    shutil.copy(chat_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(PLAIN_TEMPLATE)
    return make_client(tmp_path, redis_url, max_input_tokens=400, max_total_tokens=500)


def chunks_of(response) -> list[dict]:
    payloads = sse_payloads(response)
    assert payloads[-1] == "[DONE]"
    return [json.loads(p) for p in payloads[:-1]]


def test_role_is_in_each_choices_first_chunk_only_and_streams_say_utf8(client, redis_url):
    with FakeReplica(redis_url, reply([" a", " b", " c"])):
        response = chat(client, stream=True, n=2)
        chunks = chunks_of(response)
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    for index in (0, 1):
        deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"][0]["index"] == index]
        assert [d.get("role") for d in deltas] == ["assistant", None, None, None]
        assert "".join(d.get("content", "") for d in deltas) == " a b c"


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_split_across_tokens_is_cut_streamed_or_not(client, redis_url, stream):
    with FakeReplica(redis_url, reply([" the", " cap", "ital", " is"], finish_reason="stop_sequence")):
        response = chat(client, stream=stream, stop=["capital"], logprobs=True)
        if stream:
            choices = [c["choices"][0] for c in chunks_of(response)]
            text = "".join(c["delta"].get("content", "") for c in choices)
            entries = [e["token"] for c in choices if c["logprobs"] for e in c["logprobs"]["content"]]
            reason = choices[-1]["finish_reason"]
        else:
            choice = response.get_json()["choices"][0]
            text, reason = choice["message"]["content"], choice["finish_reason"]
            entries = [e["token"] for e in choice["logprobs"]["content"]]
    assert (text, reason) == (" the ", "stop")
    assert entries == [" the", " cap"]  # " cap" began with text the client got


def test_completions_cut_the_stop_too(client, redis_url):
    with FakeReplica(redis_url, reply([" one", " two."], finish_reason="stop_sequence")):
        body = client.post("/v1/completions", json={"prompt": "hello", "stop": ".", "echo": True}).get_json()
        streamed = chunks_of(client.post("/v1/completions", json={"prompt": "hello", "stop": ".", "stream": True}))
    assert body["choices"][0]["text"] == "hello one two" and body["choices"][0]["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["text"] for c in streamed) == " one two"


def eos_reply(job):
    yield StreamEvent(kind=EVENT_STARTED, replica="replica0@test")
    tokens = [token(1, " hi").token, {"id": 0, "text": "</s>", "logprob": -0.1, "special": True}]
    yield StreamEvent(kind=EVENT_FINAL, index=2, generated_text=" hi", details={
        "finish_reason": "eos_token", "generated_tokens": 2, "seed": None, "prefill": [], "tokens": tokens})


def test_logprobs_have_no_entry_for_the_end_token(client, redis_url):
    with FakeReplica(redis_url, eos_reply):
        body = chat(client, logprobs=True).get_json()
    assert [e["token"] for e in body["choices"][0]["logprobs"]["content"]] == [" hi"]
    assert body["usage"]["completion_tokens"] == 2 and body["choices"][0]["finish_reason"] == "stop"


def scored_reply(job):
    """Each candidate's text and logprob follow from its seed."""
    yield StreamEvent(kind=EVENT_STARTED, replica="replica0@test")
    seed = job.sampling.seed or 0  # greedy: none
    score = -(seed % 7) - 0.5
    text = f" s{seed % 7}"
    tok = {"id": 11, "text": text, "logprob": score, "special": False}
    yield StreamEvent(kind=EVENT_FINAL, index=1, generated_text=text, details={
        "finish_reason": "length", "generated_tokens": 1, "seed": seed, "prefill": [], "tokens": [tok]})


def test_best_of_keeps_the_likeliest_candidates_per_prompt(client, redis_url):
    with FakeReplica(redis_url, scored_reply) as replica:
        body = client.post("/v1/completions", json={"prompt": ["hello", "world"], "best_of": 2, "seed": 5}).get_json()
    assert len(replica.jobs) == 4 and body["usage"]["completion_tokens"] == 4  # every candidate was generated
    by_prompt = [sorted(replica.jobs[i:i + 2], key=lambda j: j.sampling.seed % 7)[0] for i in (0, 2)]
    assert [c["text"] for c in body["choices"]] == [f" s{job.sampling.seed % 7}" for job in by_prompt]
    assert [c["index"] for c in body["choices"]] == [0, 1]
    with FakeReplica(redis_url, scored_reply) as replica:
        greedy = client.post("/v1/completions", json={"prompt": "hello", "best_of": 2, "temperature": 0})
    assert greedy.status_code == 200 and len(replica.jobs) == 1  # greedy candidates would all be the same


def test_jobs_ask_for_token_logprobs_only_where_the_answer_shows_or_ranks_by_them(client, redis_url):
    """A replica skips the logprobs a job says nobody reads; OpenAI shows them with `logprobs`, and
    completions' `best_of` ranks its candidates by them."""
    with FakeReplica(redis_url, reply([" a"])) as replica:
        plain = chat(client).get_json()
        chat(client, stream=True)
        shown = chat(client, logprobs=True).get_json()
        client.post("/v1/completions", json={"prompt": "hi", "n": 2, "seed": 1})
        client.post("/v1/completions", json={"prompt": "hi", "best_of": 2, "seed": 1})
    assert [job.token_logprobs for job in replica.jobs] == [False, False, True, False, False, True, True]
    assert plain["choices"][0]["logprobs"] is None
    assert [t["logprob"] for t in shown["choices"][0]["logprobs"]["content"]] == [-0.5]


def test_legacy_functions_are_tools_and_answer_a_function_call(client, redis_url):
    with FakeReplica(redis_url, reply(CALL, finish_reason="eos_token")) as replica:
        body = chat(client, functions=[WEATHER], function_call={"name": "get_weather"}).get_json()
        chunks = chunks_of(chat(client, functions=[WEATHER], function_call="auto", stream=True))
    grammar = replica.jobs[0].grammar.value
    assert grammar["properties"]["name"] == {"const": "get_weather"}
    assert [a["properties"]["name"]["const"] for a in replica.jobs[1].grammar.value["anyOf"]] == \
        ["get_weather", NO_TOOL]
    choice = body["choices"][0]
    assert choice["finish_reason"] == "function_call" and "tool_calls" not in choice["message"]
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"location": "Paris"}'}
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert deltas[0] == {"role": "assistant", "content": None,
                         "function_call": {"name": "get_weather", "arguments": ""}}
    assert "".join(d["function_call"]["arguments"] for d in deltas[1:-1]) == '{"location": "Paris"}'
    assert chunks[-1]["choices"][0]["finish_reason"] == "function_call"


def templated(client, messages, **body) -> str:
    response = client.post("/chat_tokenize", json={"messages": messages, **body})
    assert response.status_code == 200, response.get_json()
    return response.get_json()["templated_text"]


def test_developer_is_rendered_as_system(plain_client):
    text = templated(plain_client, [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "hello"}])
    assert text == "system be brief user hello a"


HISTORY = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"location": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_tool_calls_become_text_for_a_template_that_does_not_render_them(plain_client):
    assert templated(plain_client, HISTORY) == ('system default user hello assistant {"name": "get_weather", '
                                                '"arguments": {"location": "Paris"}} tool sunny a')
    legacy = [HISTORY[0], {"role": "assistant", "content": "Let me see.",
                           "function_call": {"name": "get_weather", "arguments": '{"location": "Paris"}'}},
              {"role": "function", "name": "get_weather", "content": "sunny"}]
    assert templated(plain_client, legacy) == ('system default user hello assistant Let me see.\n{"name": '
                                               '"get_weather", "arguments": {"location": "Paris"}} tool sunny a')


def test_a_template_that_renders_tool_calls_gets_them(chat_model_dir, redis_url, redis_client, tmp_path):  # noqa: F811
    shutil.copy(chat_model_dir / "tokenizer.json", tmp_path / "tokenizer.json")
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}{% for c in m.tool_calls or [] %} call {{ c.function.name }}"
        "{{ c.function.arguments.location }}{% endfor %} {% endfor %}")
    client = make_client(tmp_path, redis_url, max_input_tokens=400, max_total_tokens=500)
    assert templated(client, HISTORY) == "user assistant call get_weatherParis tool "


def test_the_model_objects(client, chat_model_dir):  # noqa: F811
    listed = client.get("/v1/models").get_json()["data"]
    one = client.get(f"/v1/models/{chat_model_dir.name}").get_json()
    assert listed == [one] and one["id"] == chat_model_dir.name and one["owned_by"] == "blitzscale"
    assert one["created"] == int((chat_model_dir / "tokenizer.json").stat().st_mtime)
    error = openai_error(client.get("/v1/models/gpt-4o"), 404, "not_found_error")
    assert error == {"message": "The model `gpt-4o` does not exist.", "type": "not_found_error", "param": "model",
                     "code": "model_not_found"}


def test_served_model_name(chat_model_dir, redis_url, redis_client):  # noqa: F811
    client = make_client(chat_model_dir, redis_url, served_model_name="org/my-model")
    assert client.get("/v1/models/org/my-model").get_json()["id"] == "org/my-model"
    with FakeReplica(redis_url, reply([" a"])):
        answer = client.post("/v1/completions", json={"prompt": "hello"}).get_json()
    assert answer["model"] == "org/my-model"  # a request without `model` is answered by the served name


def test_token_bytes_of_a_byte_level_vocabulary(tmp_path):
    tokenizer = Tokenizer(models.BPE(vocab={"Ġ": 0, "â": 1, "Ĥ": 2, "¬": 3, "a": 4, "<|end|>": 5}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    raw = TokenBytes(tokenizer)
    assert [raw(i) for i in range(6)] == [b" ", b"\xe2", b"\x82", b"\xac", b"a", b"<|end|>"]  # "€" is e2 82 ac
    assert raw(99) is None
