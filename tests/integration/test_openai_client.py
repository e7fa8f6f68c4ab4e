"""The official `openai` client (sync, async, streaming), unchanged, against the real service:
web, Redis and a replica serving the tiny model (its tokenizer has a ChatML template)."""
# The client's own helpers and errors on the OpenAI-exact behaviours: tests/integration/test_openai_exact.py.
from __future__ import annotations

import asyncio

import openai
import pytest
import requests

MESSAGES = [{"role": "user", "content": "The capital of France is"}]


@pytest.fixture(scope="module")
def client(service):
    return openai.OpenAI(base_url=f"{service.base_url}/v1", api_key="-", timeout=120, max_retries=0)


@pytest.fixture(scope="module")
def async_client(service):
    return openai.AsyncOpenAI(base_url=f"{service.base_url}/v1", api_key="-", timeout=120, max_retries=0)


def chat(client, **kwargs):
    kwargs.setdefault("messages", MESSAGES)
    return client.chat.completions.create(model="tiny", **kwargs)


def stream_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return text, chunks


def templated(service, messages=MESSAGES) -> dict:
    return requests.post(f"{service.base_url}/chat_tokenize", json={"messages": messages}, timeout=30).json()


def test_models_lists_the_served_model(client, tiny_model_dir):
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_model_dir.name] and models[0].object == "model"  # never a path


def test_streamed_chat_equals_the_answer(client):
    answer = chat(client, temperature=0, max_tokens=12)
    text, chunks = stream_text(chat(client, temperature=0, max_tokens=12, stream=True))
    assert text == answer.choices[0].message.content and text
    assert answer.id.startswith("chatcmpl-") and len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason


def test_streamed_completion_equals_the_answer(client):
    answer = client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=10)
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", temperature=0, max_tokens=10,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == answer.choices[0].text
    assert answer.id.startswith("cmpl-") and chunks[-1].choices[0].finish_reason == "length"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


def test_usage_adds_up(client, service):
    prompt_tokens = len(templated(service)["tokenize_response"])
    answer = chat(client, temperature=0, max_tokens=7, logprobs=True)
    usage = answer.usage
    assert usage.prompt_tokens == prompt_tokens
    assert usage.completion_tokens == len(answer.choices[0].logprobs.content) == 7
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    text, chunks = stream_text(chat(client, temperature=0, max_tokens=7, stream=True,
                                    stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.model_dump() == usage.model_dump()


def test_max_tokens_reached_is_length_with_exactly_that_many_tokens(client):
    for max_tokens in (1, 5):
        answer = chat(client, temperature=0, max_tokens=max_tokens, logprobs=True)
        assert answer.choices[0].finish_reason == "length"
        assert answer.usage.completion_tokens == max_tokens == len(answer.choices[0].logprobs.content)


def test_stop_string_ends_with_stop(client):
    free = chat(client, temperature=0, max_tokens=12, logprobs=True).choices[0]
    tokens = [t.token for t in free.logprobs.content]
    stop = next(t for t in tokens[2:] if t.strip() and not t.startswith("bytes:"))  # a later token's text
    answer = chat(client, temperature=0, max_tokens=12, stop=stop)
    assert answer.choices[0].finish_reason == "stop"
    content = answer.choices[0].message.content
    assert stop not in content and free.message.content.startswith(content + stop)  # cut before it, as OpenAI
    listed = chat(client, temperature=0, max_tokens=12, stop=["never there", stop])
    assert listed.choices[0].message.content == content


def test_logprobs_one_entry_per_token_with_the_alternatives_asked(client):
    answer = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 6
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)  # greedy takes the best
        if not entry.token.startswith("bytes:"):  # a token inside a UTF-8 character: its raw bytes
            assert bytes(entry.bytes) == entry.token.encode()
    joined = b"".join(bytes(entry.bytes) for entry in content)
    assert joined.decode("utf-8", errors="replace") == answer.choices[0].message.content
    streamed = [entry for c in chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]  # a chunk holds the tokens its text ends
    legacy = client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=4, logprobs=2)
    logprobs = legacy.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_n_choices_are_indexed_and_the_same_seed_gives_the_same_text(client):
    first = chat(client, n=2, seed=1234, max_tokens=16)
    again = chat(client, n=2, seed=1234, max_tokens=16)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # independent samples
    assert first.usage.completion_tokens <= 32
    batch = client.completions.create(model="tiny", prompt=["Hello", "Numbers:"], n=2, max_tokens=3, seed=5)
    assert [c.index for c in batch.choices] == [0, 1, 2, 3]


def test_chat_gives_the_greedy_tokens_of_generate_on_the_templated_text(client, service):
    text = templated(service)["templated_text"]
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    answer = chat(client, temperature=0, max_tokens=10, logprobs=True)
    generated = requests.post(f"{service.base_url}/generate", json={
        "inputs": text, "parameters": {"max_new_tokens": 10, "details": True}}, timeout=60).json()
    tokens = generated["details"]["tokens"]
    assert [t.logprob for t in answer.choices[0].logprobs.content] == pytest.approx([t["logprob"] for t in tokens])
    assert answer.choices[0].message.content == generated["generated_text"]


def test_tokenize_ids_are_the_prefill_ids_of_generate(service):
    inputs = "Once upon a time there was a queue é"
    tokens = requests.post(f"{service.base_url}/tokenize", json={"inputs": inputs}, timeout=30).json()
    generated = requests.post(f"{service.base_url}/generate", json={
        "inputs": inputs, "parameters": {"max_new_tokens": 1, "decoder_input_details": True}}, timeout=60).json()
    assert [t["id"] for t in tokens] == [t["id"] for t in generated["details"]["prefill"]]
    raw = inputs.encode()
    assert all(raw[t["start"]:t["stop"]].decode(errors="replace") == t["text"] for t in tokens if t["text"])


def test_async_client_and_16_concurrent_streaming_chats(async_client):
    async def one(i: int) -> tuple[str, str]:
        stream = await async_client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Hello {i}"}], max_tokens=8, temperature=0,
            stream=True)
        text, reason = "", None
        async for chunk in stream:
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
                reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def run():
        streams = await asyncio.gather(*(one(i) for i in range(16)))
        answer = await async_client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "Hello 3"}], max_tokens=8, temperature=0)
        return streams, answer

    streams, answer = asyncio.run(run())
    assert len(streams) == 16 and all(reason in ("stop", "length") for _, reason in streams)
    assert streams[3][0] == answer.choices[0].message.content


def refusal(call) -> openai.BadRequestError:
    """The SDK's own BadRequestError, its message readable and OpenAI's fields set."""
    with pytest.raises(openai.BadRequestError) as raised:
        call()
    error = raised.value
    assert error.status_code == 400 and error.type == "invalid_request_error"
    assert error.body["message"] in str(error)
    return error


def test_errors_are_the_clients_own_exceptions(client, service):
    error = refusal(lambda: chat(client, messages=[]))
    assert error.body["message"] == "Input validation error: `messages` cannot be empty" and error.param == "messages"
    assert refusal(lambda: client.completions.create(model="tiny", prompt=[])).body["message"] == \
        "Empty array detected. Do not use an empty array for the prompt."
    assert "maximum allowed batch size of 4" in str(refusal(
        lambda: client.completions.create(model="tiny", prompt=["a"] * 5, max_tokens=1)))
    assert refusal(lambda: chat(client, n=3, max_tokens=1)).param == "n"
    assert refusal(lambda: chat(client, top_p=1.5, max_tokens=1)).param == "top_p"
    assert refusal(lambda: client.completions.create(model="tiny", prompt="a", suffix="b")).param == "suffix"
    response = requests.post(f"{service.base_url}/v1/chat/completions", data="{not json",
                             headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["type"] == "invalid_request_error"
    response = requests.post(f"{service.base_url}/v1/chat/completions", data="x", timeout=30)
    assert response.status_code == 415 and "message" in response.json()["error"]


def test_an_over_long_prompt_is_context_length_exceeded(client):
    too_long = [{"role": "user", "content": "Hello " * 300}]  # ~600 tokens: over 512, under 1024
    error = refusal(lambda: chat(client, messages=too_long, max_tokens=7))
    assert error.code == "context_length_exceeded" and error.param == "messages"
    assert "This model's maximum context length is 512 tokens. However, you requested " in str(error)
    assert " in the messages, 7 in the completion). Please reduce the length of the messages or completion." \
        in str(error)
    error = refusal(lambda: client.completions.create(model="tiny", prompt="Hello " * 600, max_tokens=1))
    assert error.code == "context_length_exceeded" and error.param == "prompt"


def test_a_long_max_tokens_is_capped_not_refused(client):
    answer = client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=5000,
                                       stop=["."], logit_bias={"0": -100})
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.total_tokens <= 1024


def test_logit_bias_steers_greedy_decoding(client, service):
    target = requests.post(f"{service.base_url}/tokenize", json={"inputs": " Paris"}, timeout=30).json()[0]
    answer = chat(client, temperature=0, max_tokens=3, logit_bias={str(target["id"]): 100}, logprobs=True)
    assert [e.token for e in answer.choices[0].logprobs.content] == [target["text"]] * 3


def test_presence_penalty_changes_a_repetitive_greedy_answer(client):
    plain = chat(client, temperature=0, max_tokens=24).choices[0].message.content
    penalized = chat(client, temperature=0, max_tokens=24, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalized.choices[0].message.content != plain


def test_a_stream_of_several_choices_equals_their_answers(client):
    answer = chat(client, n=2, seed=99, max_tokens=10)
    texts = {0: "", 1: ""}
    reasons = {}
    for chunk in chat(client, n=2, seed=99, max_tokens=10, stream=True):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] = choice.finish_reason or reasons.get(choice.index)
    assert [texts[0], texts[1]] == [c.message.content for c in answer.choices]
    assert [reasons[0], reasons[1]] == [c.finish_reason for c in answer.choices]
