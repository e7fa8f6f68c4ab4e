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


def test_vllms_tokenize_detokenize_round_trip(service):
    """What a client written for vLLM does: count tokens, round trip them, read the tokenizer."""
    text = "Once upon a time, 中文 and é: a queue of tokens."
    tokenized = requests.post(f"{service.base_url}/tokenize", json={"model": "tiny", "prompt": text}, timeout=30).json()
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 1024
    assert tokenized["tokens"] == token_ids(service, text)  # the same tokens TGI's shape lists
    detokenized = requests.post(f"{service.base_url}/detokenize", json={"tokens": tokenized["tokens"]}, timeout=30)
    assert detokenized.json() == {"prompt": text}
    chat = requests.post(f"{service.base_url}/tokenize", timeout=30, json={
        "messages": [{"role": "user", "content": "Hello"}], "return_token_strs": True}).json()
    templated = requests.post(f"{service.base_url}/chat_tokenize", timeout=30,
                              json={"messages": [{"role": "user", "content": "Hello"}]}).json()
    assert chat["tokens"] == [t["id"] for t in templated["tokenize_response"]] and len(chat["token_strs"]) == chat["count"]
    info = requests.get(f"{service.base_url}/tokenizer_info", timeout=30).json()
    assert info["eos_token"] == "<|endoftext|>" and "<|im_start|>" in info["chat_template"]


FACTS = [  # (context, right continuation, wrong continuation)
    ("The capital of France is", " Paris", " London"),
    ("Water is made of hydrogen and", " oxygen", " gold"),
    ("The first president of the United States was George", " Washington", " Clooney"),
    ("The Great Wall is in", " China", " Brazil"),
    ("One, two, three, four,", " five", " nine"),
    ("Shakespeare wrote Romeo and", " Juliet", " Jupiter"),
]


def test_the_default_model_ranks_right_answers_first_as_a_harness_scores_them(real_service):
    """lm-evaluation-harness's loglikelihood: context + continuation sent whole with echo,
    logprobs and max_tokens 0; the continuation's tokens (those at or past the context's end)
    summed."""
    client = openai.OpenAI(base_url=f"{real_service.base_url}/v1", api_key="-", timeout=300, max_retries=0)
    texts = [context + continuation for context, right, wrong in FACTS for continuation in (right, wrong)]
    choices = [c for first in range(0, len(texts), 4) for c in client.completions.create(
        model="smollm2", prompt=texts[first:first + 4], echo=True, logprobs=1, max_tokens=0).choices]
    scores = []
    for (context, _, _), choice in zip([f for f in FACTS for _ in (0, 1)], choices):
        logprobs = choice.logprobs
        scores.append(sum(lp for lp, offset in zip(logprobs.token_logprobs, logprobs.text_offset)
                          if offset >= len(context)))
    assert all(right > wrong for right, wrong in zip(scores[::2], scores[1::2])), list(zip(FACTS, scores))
    details = requests.post(f"{real_service.base_url}/generate", timeout=300, json={
        "inputs": texts[0], "parameters": {"max_new_tokens": 1, "decoder_input_details": True}}).json()["details"]
    assert choices[0].logprobs.token_logprobs[1:] == pytest.approx([t["logprob"] for t in details["prefill"][1:]],
                                                                   abs=1e-4)
