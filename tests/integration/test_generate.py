"""POST /generate through gunicorn, Celery replica workers and Redis, on the tiny model."""
from __future__ import annotations

import pytest
import requests

from tests.tiny_model import EOS_AFTER, EOS_PROMPT


def generate(service, inputs, **parameters):
    response = requests.post(f"{service.base_url}/generate", json={"inputs": inputs, "parameters": parameters}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def test_greedy_generation_equals_transformers(service, tiny_reference):
    body = generate(service, "The capital of France is", max_new_tokens=12, details=True)
    details = body["details"]
    expected = tiny_reference("The capital of France is", 12)
    ids = [t["id"] for t in details["tokens"]]
    assert ids == expected[: len(ids)]
    assert details["finish_reason"] in ("length", "eos_token")
    assert details["generated_tokens"] == len(ids)
    assert details["seed"] is None
    assert details["prefill"] == []
    # Token texts (special tokens aside) concatenate to the generated text.
    assert "".join(t["text"] for t in details["tokens"] if not t["special"]) == body["generated_text"]
    assert body["generated_text"] == tiny_reference.tokenizer.decode(ids, skip_special_tokens=True)


def test_details_absent_unless_asked(service):
    body = generate(service, "Hello", max_new_tokens=3)
    assert set(body) == {"generated_text"}


def test_max_new_tokens_gives_length(service):
    body = generate(service, "Hello", max_new_tokens=5, details=True)
    assert body["details"]["finish_reason"] == "length"
    assert body["details"]["generated_tokens"] == 5 and len(body["details"]["tokens"]) == 5


def test_return_full_text_prepends_the_prompt(service):
    plain = generate(service, "Hello", max_new_tokens=4)["generated_text"]
    full = generate(service, "Hello", max_new_tokens=4, return_full_text=True)["generated_text"]
    assert full == "Hello" + plain


def test_stop_sequence(service):
    free = generate(service, "Once upon a time", max_new_tokens=20, details=True)
    text = free["generated_text"]
    stop = text[4:7]
    assert len(stop) == 3
    stopped = generate(service, "Once upon a time", max_new_tokens=20, stop=[stop], details=True)
    assert stopped["details"]["finish_reason"] == "stop_sequence"
    # It stopped at the first token that completed `stop`: the free run's text up to that token.
    assert stopped["details"]["generated_tokens"] == tokens_until(free["details"]["tokens"], stop)
    assert stop in stopped["generated_text"] and text.startswith(stopped["generated_text"])


def tokens_until(tokens: list[dict], stop: str) -> int:
    """How many of `tokens` it takes for their text to contain `stop`."""
    return next(k for k in range(1, len(tokens) + 1) if stop in "".join(t["text"] for t in tokens[:k]))


def test_eos_token_finish_reason(service, tiny_reference):
    """The tiny model is built so that greedy decoding of EOS_PROMPT emits EOS as token 4."""
    eos = tiny_reference.tokenizer.eos_token_id
    body = generate(service, EOS_PROMPT, max_new_tokens=60, details=True)
    assert body["details"]["finish_reason"] == "eos_token"
    assert body["details"]["generated_tokens"] == EOS_AFTER
    last = body["details"]["tokens"][-1]
    assert last["id"] == eos and last["special"] is True
    assert last["text"] == tiny_reference.tokenizer.eos_token
    assert tiny_reference.tokenizer.eos_token not in body["generated_text"]


def test_seed_gives_the_same_text_and_is_returned(service):
    params = dict(max_new_tokens=15, do_sample=True, seed=42, details=True)
    first = generate(service, "Hello", **params)
    second = generate(service, "Hello", **params)
    assert first["generated_text"] == second["generated_text"]
    assert first["details"]["seed"] == 42
    others = {generate(service, "Hello", **{**params, "seed": s})["generated_text"] for s in range(1, 6)}
    assert len(others | {first["generated_text"]}) > 1


def test_sampling_without_seed_reports_the_seed_it_used(service):
    body = generate(service, "Hello", max_new_tokens=5, temperature=0.7, details=True)
    seed = body["details"]["seed"]
    assert isinstance(seed, int)
    again = generate(service, "Hello", max_new_tokens=5, temperature=0.7, seed=seed, details=True)
    assert again["generated_text"] == body["generated_text"]


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.5},
        {"top_k": 3},
        {"top_p": 0.5},
        {"typical_p": 0.5},
        {"repetition_penalty": 1.5, "do_sample": False},
        {"frequency_penalty": 1.5, "do_sample": False},
    ],
)
def test_each_sampling_parameter_is_applied(service, tiny_reference, params):
    """Each parameter changes what the model picks in a way we can check on the logprobs."""
    sampled = "do_sample" not in params
    body = generate(service, "Numbers: 0 1 2 3", max_new_tokens=12, details=True, top_n_tokens=5,
                    **({"seed": 7} if sampled else {}), **params)
    tokens, tops = body["details"]["tokens"], body["details"]["top_tokens"]
    greedy = generate(service, "Numbers: 0 1 2 3", max_new_tokens=12, details=True)
    if "top_k" in params:
        # Only the top 3 can be drawn: every chosen token is among the top 3 of its step.
        for token, top in zip(tokens, tops):
            assert token["id"] in [t["id"] for t in top[:3]]
    first_greedy = greedy["details"]["tokens"][0]  # the same first step, unprocessed
    if "temperature" in params:
        # Temperature 0.5 sharpens: the most likely first token is likelier than at temperature 1.
        assert all(t["logprob"] is not None for t in tokens)
        assert tops[0][0]["id"] == first_greedy["id"]
        assert tops[0][0]["logprob"] > first_greedy["logprob"] + 1e-3
    if "top_p" in params or "typical_p" in params:
        # Tokens are cut and the kept mass renormalised: the top token's logprob is strictly above
        # its raw value (a filter that did nothing would leave it equal).
        assert tops[0][0]["logprob"] > first_greedy["logprob"] + 1e-3
    if "repetition_penalty" in params or "frequency_penalty" in params:
        # Penalised greedy decoding repeats less than plain greedy decoding.
        penalised_ids = [t["id"] for t in tokens]
        plain_ids = [t["id"] for t in greedy["details"]["tokens"]]
        assert penalised_ids != plain_ids or len(set(plain_ids)) == len(plain_ids)
        assert len(set(penalised_ids)) >= len(set(plain_ids))


def test_top_n_tokens(service):
    body = generate(service, "Hello", max_new_tokens=4, details=True, top_n_tokens=3)
    tops = body["details"]["top_tokens"]
    assert len(tops) == len(body["details"]["tokens"])
    for token, top in zip(body["details"]["tokens"], tops):
        assert len(top) == 3
        assert top[0]["id"] == token["id"]
        assert set(top[0]) == {"id", "text", "logprob", "special"}


def test_decoder_input_details(service, tiny_reference):
    body = generate(service, "The capital of France", max_new_tokens=2, decoder_input_details=True)
    prefill = body["details"]["prefill"]
    ids = tiny_reference.tokenizer("The capital of France").input_ids
    assert [p["id"] for p in prefill] == ids
    assert prefill[0]["logprob"] is None
    assert all(isinstance(p["logprob"], float) and p["logprob"] <= 0 for p in prefill[1:])
    assert "".join(p["text"] for p in prefill) == "The capital of France"


def test_truncate_keeps_the_last_tokens(service, tiny_reference):
    prompt = "Once upon a time there was a queue, a worker and a stream of tokens."
    ids = tiny_reference.tokenizer(prompt).input_ids
    body = generate(service, prompt, max_new_tokens=3, truncate=4, decoder_input_details=True)
    assert [p["id"] for p in body["details"]["prefill"]] == ids[-4:]
    short = tiny_reference.tokenizer.decode(ids[-4:])
    assert generate(service, short, max_new_tokens=3)["generated_text"] == body["generated_text"]


def test_best_of_returns_the_losers(service):
    body = generate(service, "Hello", max_new_tokens=6, best_of=2, do_sample=True, details=True)
    losers = body["details"]["best_of_sequences"]
    assert len(losers) == 1
    assert set(losers[0]) >= {"generated_text", "finish_reason", "generated_tokens", "seed", "prefill", "tokens"}

    def mean(tokens):
        return sum(t["logprob"] for t in tokens) / len(tokens)

    assert mean(body["details"]["tokens"]) >= mean(losers[0]["tokens"])


def test_multibyte_characters_survive_token_splits(service):
    """Whatever the model generates, the streamed token texts join to the final text and no
    token text holds half a character."""
    for seed in range(3):
        body = generate(service, "中文 é", max_new_tokens=30, do_sample=True, seed=seed, details=True)
        texts = [t["text"] for t in body["details"]["tokens"] if not t["special"]]
        assert "".join(texts) == body["generated_text"]
