"""The continuous-batching engine, called directly (no queue, no HTTP)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from engine.engine import Engine
from engine.outputs import EngineError, FinishReason, RequestCancelled
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig
from tests.tiny_model import EOS_AFTER, EOS_PROMPT

PROMPTS = [
    "The capital of France is",
    "Hello",
    "Once upon a time there was a queue, a worker and a stream of tokens.",
    "Numbers: 0 1 2 3",
    "中文 é and more",
]


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def make_engine(model_and_tokenizer, step_listener=None, **config) -> Engine:
    model, tokenizer = model_and_tokenizer
    return Engine(model, tokenizer, SchedulerConfig(**config), step_listener=step_listener).start()


@pytest.fixture
def engine(model_and_tokenizer):
    engine = make_engine(model_and_tokenizer)
    yield engine
    engine.stop()


def request(tokenizer, rid, text, max_new_tokens=12, stop=(), ignore_eos=True, **sampling):
    return GenerationRequest(
        request_id=rid,
        input_ids=tuple(tokenizer(text).input_ids),
        sampling=SamplingParams(**sampling),
        stopping=StoppingParams(max_new_tokens=max_new_tokens, stop_sequences=tuple(stop), ignore_eos=ignore_eos),
    )


def token_ids(events) -> list[int]:
    return [e.token.id for e in events]


def eventually(condition, timeout: float = 5.0) -> bool:
    """Poll until `condition()` holds (the engine acts at its next step boundary)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_lone_greedy_request_equals_transformers_generate(engine, tiny_reference):
    tokenizer = tiny_reference.tokenizer
    for n, text in enumerate(PROMPTS):
        events = list(engine.submit(request(tokenizer, f"r{n}", text, max_new_tokens=10)))
        assert token_ids(events) == tiny_reference(text, 10)
        assert events[-1].finish.reason is FinishReason.LENGTH
        assert [e.index for e in events] == list(range(1, 11))


def test_mixed_batch_gives_each_greedy_request_what_it_gets_alone(engine, tiny_reference):
    """Requests arrive staggered (joining a running batch), with different lengths, token
    budgets and sampled neighbours; every greedy one equals its lone result token for token."""
    tokenizer = tiny_reference.tokenizer
    budgets = [6, 20, 9, 14, 11]
    alone = {text: tiny_reference(text, n) for text, n in zip(PROMPTS, budgets)}
    results: dict[str, list[int]] = {}

    def run(n, text, budget, delay, **sampling):
        time.sleep(delay)
        results[f"{n}:{text}"] = token_ids(engine.submit(request(tokenizer, f"m{n}", text, budget, **sampling)))

    threads = [threading.Thread(target=run, args=(n, t, b, 0.003 * n)) for n, (t, b) in enumerate(zip(PROMPTS, budgets))]
    threads += [
        threading.Thread(target=run, args=(10 + n, t, 15, 0.002 * n), kwargs={"do_sample": True, "seed": n, "temperature": 0.8, "top_k": 5})
        for n, t in enumerate(PROMPTS)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for n, (text, budget) in enumerate(zip(PROMPTS, budgets)):
        assert results[f"{n}:{text}"] == alone[text], text


def test_token_logprobs_nobody_reads_are_none_and_change_no_token(engine, tiny_reference):
    """Rows whose logprobs the client never sees (`token_logprobs=False`) get the same tokens,
    alone or beside rows that want them; only the rows that want them carry numbers."""
    import dataclasses

    tokenizer = tiny_reference.tokenizer
    wanted = [request(tokenizer, f"w{n}", text, 8) for n, text in enumerate(PROMPTS)]
    unread = [dataclasses.replace(request(tokenizer, f"u{n}", text, 8), token_logprobs=False)
              for n, text in enumerate(PROMPTS)]
    alone = {r.request_id: list(engine.submit(r)) for r in wanted}
    streams = [engine.submit(r) for pair in zip(wanted, unread) for r in pair]  # one batch, both kinds
    together = {r.request_id: list(stream) for r, stream in zip([r for p in zip(wanted, unread) for r in p], streams)}
    for n, text in enumerate(PROMPTS):
        assert token_ids(together[f"u{n}"]) == token_ids(together[f"w{n}"]) == tiny_reference(text, 8)
        assert all(e.token.logprob is None for e in together[f"u{n}"])
        assert [e.token.logprob for e in together[f"w{n}"]] == pytest.approx(
            [e.token.logprob for e in alone[f"w{n}"]], abs=1e-4)
    only_unread = [engine.submit(dataclasses.replace(r, request_id=r.request_id + "x")) for r in unread]
    for text, stream in zip(PROMPTS, only_unread):
        events = list(stream)
        assert token_ids(events) == tiny_reference(text, 8) and all(e.token.logprob is None for e in events)


def test_same_seed_same_tokens_alone_or_in_a_batch(engine, tiny_reference):
    tokenizer = tiny_reference.tokenizer
    sampled = dict(do_sample=True, seed=1234, temperature=0.9, top_p=0.9)
    alone = token_ids(engine.submit(request(tokenizer, "s1", "Hello", 15, **sampled)))
    crowd = [engine.submit(request(tokenizer, f"c{n}", PROMPTS[n % 5], 15)) for n in range(6)]
    again = token_ids(engine.submit(request(tokenizer, "s2", "Hello", 15, **sampled)))
    for stream in crowd:
        list(stream)
    assert again == alone
    other = token_ids(engine.submit(request(tokenizer, "s3", "Hello", 15, **{**sampled, "seed": 99})))
    assert other != alone


def test_cancel_frees_the_slot_within_a_step(engine, tiny_reference):
    tokenizer = tiny_reference.tokenizer
    stream = engine.submit(request(tokenizer, "long", "Hello", max_new_tokens=2000))
    next(stream)
    engine.cancel("long")
    with pytest.raises(RequestCancelled):
        list(stream)
    assert eventually(lambda: engine.stats().running == 0)
    assert engine.stats().batch_tokens == 0


def test_closing_the_event_iterator_cancels(engine, tiny_reference):
    stream = engine.submit(request(tiny_reference.tokenizer, "closed", "Hello", max_new_tokens=2000))
    next(stream)
    stream.close()
    assert eventually(lambda: engine.stats().running == 0)


def test_a_finished_request_frees_its_kv_memory_at_once(engine, tiny_reference):
    tokenizer = tiny_reference.tokenizer
    long_prompt = " ".join(PROMPTS * 3)
    short = engine.submit(request(tokenizer, "short", long_prompt, max_new_tokens=3))
    running = engine.submit(request(tokenizer, "running", "Hello", max_new_tokens=400))
    list(short)  # its stream ends once its slot is given back
    next(running)
    stats = engine.stats()
    assert stats.running == 1
    # One request left, holding only its own positions.
    assert stats.batch_tokens < len(tokenizer(long_prompt).input_ids)
    running.close()


def test_requests_over_the_token_budget_wait_in_the_replica(model_and_tokenizer, tiny_reference):
    tokenizer = tiny_reference.tokenizer
    engine = make_engine(model_and_tokenizer, max_batch_total_tokens=3000)
    try:
        first = engine.submit(request(tokenizer, "a", "Hello", max_new_tokens=2000))
        next(first)
        second = engine.submit(request(tokenizer, "b", "Hello", max_new_tokens=2000))
        for _ in range(20):  # the first keeps generating; the second keeps waiting
            next(first)
            assert engine.stats().running == 1 and engine.stats().waiting == 1
        # its prompt is what waits to be prefilled (the SLO autoscaler's demand)
        assert engine.stats().waiting_tokens == len(tokenizer("Hello").input_ids)
        first.close()  # the first leaves: the second now fits and runs to the end
        assert len(list(second)) == 2000
        with pytest.raises(EngineError, match="batch budget"):
            engine.submit(request(tokenizer, "c", "Hello", max_new_tokens=5000))
    finally:
        engine.stop()


def test_batch_size_limit(model_and_tokenizer, tiny_reference):
    tokenizer = tiny_reference.tokenizer
    rows_per_step = []
    engine = make_engine(model_and_tokenizer, step_listener=lambda events: rows_per_step.append(len(events)),
                         max_batch_size=2)
    try:
        streams = [engine.submit(request(tokenizer, f"b{n}", "Hello", max_new_tokens=50)) for n in range(3)]
        assert [len(list(s)) for s in streams] == [50, 50, 50]
        assert max(rows_per_step) == 2  # the third waited for a free slot
    finally:
        engine.stop()


def test_stop_sequence_eos_and_details(engine, tiny_reference):
    tokenizer = tiny_reference.tokenizer
    free = list(engine.submit(request(tokenizer, "free", "Hello", max_new_tokens=10)))
    text = free[-1].finish.generated_text
    stop = text[3:6]
    stopped = list(engine.submit(request(tokenizer, "stop", "Hello", max_new_tokens=10, stop=[stop])))
    assert stopped[-1].finish.reason is FinishReason.STOP_SEQUENCE
    # It stopped at the first token that completed `stop`, with the free run's tokens up to it.
    completes = next(k for k in range(1, len(free) + 1) if stop in "".join(e.token.text for e in free[:k]))
    assert [e.token.id for e in stopped] == [e.token.id for e in free[:completes]]
    assert stop in stopped[-1].finish.generated_text and text.startswith(stopped[-1].finish.generated_text)
    eos = list(engine.submit(request(tokenizer, "eos", EOS_PROMPT, max_new_tokens=60, ignore_eos=False)))
    assert eos[-1].finish.reason is FinishReason.EOS_TOKEN
    assert len(eos) == EOS_AFTER
    assert eos[-1].token.id == tokenizer.eos_token_id and eos[-1].token.special
    ignored = list(engine.submit(request(tokenizer, "eos-ignored", EOS_PROMPT, max_new_tokens=10, ignore_eos=True)))
    assert len(ignored) == 10 and ignored[-1].finish.reason is FinishReason.LENGTH


def test_prefill_logprobs_and_top_tokens(engine, tiny_reference):
    tokenizer, model = tiny_reference.tokenizer, tiny_reference.model
    req = GenerationRequest(
        request_id="p", input_ids=tuple(tokenizer("The capital of France").input_ids),
        stopping=StoppingParams(max_new_tokens=3, ignore_eos=True), top_n_tokens=3, prefill_logprobs=True,
        prefill_top_n_tokens=2,
    )
    events = list(engine.submit(req))
    prefill = events[0].prefill
    assert [t.id for t in prefill] == list(req.input_ids)
    assert prefill[0].logprob is None
    with torch.inference_mode():
        logits = model(torch.tensor([req.input_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits[:-1], -1)
    expected = logprobs.gather(1, torch.tensor(req.input_ids[1:]).view(-1, 1)).view(-1)
    assert torch.allclose(torch.tensor([t.logprob for t in prefill[1:]]), expected, atol=1e-4)
    # Each prompt token's two likeliest alternatives (none for the first); only the first event has them.
    top = events[0].prefill_top_tokens
    assert len(top) == len(prefill) and top[0] == ()
    best = logprobs.topk(2, dim=-1)
    assert [[t.id for t in alternatives] for alternatives in top[1:]] == best.indices.tolist()
    assert torch.allclose(torch.tensor([[t.logprob for t in a] for a in top[1:]]), best.values, atol=1e-4)
    assert all(e.prefill is None and e.prefill_top_tokens is None for e in events[1:])
    for event in events:
        assert len(event.top_tokens) == 3
        assert event.top_tokens[0].id == event.token.id  # greedy: the chosen token is the top one
        assert event.top_tokens[0].logprob == pytest.approx(event.token.logprob)
        assert [t.logprob for t in event.top_tokens] == sorted((t.logprob for t in event.top_tokens), reverse=True)
