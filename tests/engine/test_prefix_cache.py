"""The prefix cache on the KV slots, through the engine driven step by step: what is reused, what
is prefilled, and that every request gets what it gets alone on an engine without the cache."""
from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.params import GenerationRequest, Grammar, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig
from engine.slot_table import BLOCK
from tests.engine.test_engine import PROMPTS, model_and_tokenizer  # noqa: F401 (fixture)

SHARED = " ".join(PROMPTS * 2)  # a "system prompt" of several blocks


def ids(tokenizer, text: str) -> tuple[int, ...]:
    return tuple(tokenizer(text).input_ids)


def req(rid: str, input_ids, max_new_tokens: int = 8, **options) -> GenerationRequest:
    sampling = options.pop("sampling", SamplingParams())
    stopping = StoppingParams(max_new_tokens, stop_sequences=tuple(options.pop("stop", ())), ignore_eos=True)
    return GenerationRequest(rid, tuple(input_ids), sampling, stopping, **options)


class Driven:
    """An engine never started: the test runs its steps and sees every prompt chunk computed."""

    def __init__(self, model_and_tokenizer, **config):
        model, tokenizer = model_and_tokenizer
        self.tokenizer = tokenizer
        self.engine = Engine(model, tokenizer, SchedulerConfig(**config))
        self.chunks: list[list[tuple[str, int, int]]] = []  # per step: (request, start, end) prefilled
        forward = self.engine.runner.forward

        def spy(batch):
            self.chunks.append([(c.sequence.request_id, c.start, c.end) for c in batch.prefill])
            return forward(batch)

        self.engine.runner.forward = spy
        self.streams = {}

    def submit(self, *requests: GenerationRequest) -> None:
        for request in requests:
            self.streams[request.request_id] = self.engine.submit(request)

    def run(self, max_steps: int = 500) -> None:
        for _ in range(max_steps):
            if not (self.engine.scheduler.has_work or not self.engine._inbox.empty()):
                return
            self.engine.step()
        raise AssertionError(f"still working after {max_steps} steps")

    def events(self, rid: str) -> list:
        return list(self.streams[rid])

    def prefilled(self, rid: str) -> list[tuple[int, int]]:
        return [(start, end) for step in self.chunks for r, start, end in step if r == rid]


def alone(model_and_tokenizer, request: GenerationRequest) -> list:
    """The request on a fresh engine without the prefix cache."""
    engine = Driven(model_and_tokenizer, prefix_caching=False)
    engine.submit(request)
    engine.run()
    return engine.events(request.request_id)


def assert_same(events, reference, atol=5e-5) -> None:
    assert [e.token.id for e in events] == [e.token.id for e in reference]
    assert torch.allclose(torch.tensor([e.token.logprob for e in events]),
                          torch.tensor([e.token.logprob for e in reference]), atol=atol)
    assert events[-1].finish.generated_text == reference[-1].finish.generated_text


def common_prefix(a, b) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_a_request_after_one_with_a_shared_prefix_prefills_only_the_difference(model_and_tokenizer):
    driven = Driven(model_and_tokenizer)
    tok = driven.tokenizer
    first, second = ids(tok, SHARED + " What is a queue?"), ids(tok, SHARED + " Who is the worker?")
    shared = common_prefix(first, second)
    assert shared >= 3 * BLOCK
    driven.submit(req("first", first))
    driven.run()
    driven.submit(req("second", second))
    driven.run()
    assert driven.prefilled("first") == [(0, len(first))]
    assert driven.prefilled("second") == [(shared, len(second))]  # only the difference went through the model
    events = driven.events("second")
    assert events[-1].finish.cached_tokens == shared
    assert_same(events, alone(model_and_tokenizer, req("second", second)))
    stats = driven.engine.stats()
    assert (stats.prefix_hit_tokens, stats.prefix_miss_tokens) == (shared, len(first) + len(second) - shared)


@pytest.mark.parametrize("options", [
    {"sampling": SamplingParams(do_sample=True, seed=11, temperature=0.9, top_k=30)},
    {"stop": ["e"], "top_n_tokens": 3},
    {"grammar": Grammar("regex", "[0-9]{2,4}")},
], ids=["seeded", "stop-and-top-n", "grammar"])
def test_sampling_stop_sequences_and_grammar_behave_as_without_the_cache(model_and_tokenizer, options):
    driven = Driven(model_and_tokenizer)
    prompt = ids(driven.tokenizer, SHARED + " Numbers:")
    driven.submit(req("warm", ids(driven.tokenizer, SHARED + " Hello")))
    driven.run()
    driven.submit(req("cached", prompt, 10, **options))
    driven.run()
    events = driven.events("cached")
    assert events[-1].finish.cached_tokens >= 3 * BLOCK
    reference = alone(model_and_tokenizer, req("cached", prompt, 10, **options))
    assert_same(events, reference)
    for mine, theirs in zip(events, reference):
        assert [t.id for t in mine.top_tokens] == [t.id for t in theirs.top_tokens]
        assert torch.allclose(torch.tensor([t.logprob for t in mine.top_tokens]),
                              torch.tensor([t.logprob for t in theirs.top_tokens]), atol=5e-5)


def test_the_next_turn_reuses_the_previous_prompt_and_reply(model_and_tokenizer):
    driven = Driven(model_and_tokenizer)
    turn1 = ids(driven.tokenizer, SHARED)
    driven.submit(req("turn1", turn1, 12))
    driven.run()
    reply = [e.token.id for e in driven.events("turn1")]
    turn2 = turn1 + tuple(reply) + ids(driven.tokenizer, " And then?")
    driven.submit(req("turn2", turn2, 12))
    driven.run()
    # Everything the first turn wrote: its prompt and its reply but the last token, never fed back.
    assert driven.prefilled("turn2") == [(len(turn1) + len(reply) - 1, len(turn2))]
    assert_same(driven.events("turn2"), alone(model_and_tokenizer, req("turn2", turn2, 12)))


def test_a_prefix_held_by_a_running_request_is_copied(model_and_tokenizer):
    driven = Driven(model_and_tokenizer)
    tok = driven.tokenizer
    running, newcomer = ids(tok, SHARED + " Once"), ids(tok, SHARED + " The capital")
    driven.submit(req("running", running, 30))
    driven.engine.step()  # its prompt, and its first token
    driven.submit(req("newcomer", newcomer))
    driven.engine.step()
    assert driven.engine.scheduler.running[0].request_id == "running"  # still decoding
    driven.run()
    shared = common_prefix(running, newcomer)
    assert driven.prefilled("newcomer") == [(shared, len(newcomer))]
    assert_same(driven.events("newcomer"), alone(model_and_tokenizer, req("newcomer", newcomer)))
    assert_same(driven.events("running"), alone(model_and_tokenizer, req("running", running, 30)))


def test_requests_arriving_together_with_one_system_prompt_compute_it_once(model_and_tokenizer):
    """The first prefills it; the others wait one step, then copy it from the first's slot."""
    driven = Driven(model_and_tokenizer)
    prompts = {f"q{n}": ids(driven.tokenizer, SHARED + f" Question {n}?") for n in range(3)}
    driven.submit(*(req(rid, prompt) for rid, prompt in prompts.items()))
    driven.run()
    first, *others = driven.chunks
    assert first == [("q0", 0, len(prompts["q0"]))]
    assert [(r, start) for r, start, _end in others[0]] == [("q1", common_prefix(prompts["q0"], prompts["q1"])),
                                                           ("q2", common_prefix(prompts["q0"], prompts["q2"]))]
    for rid, prompt in prompts.items():
        assert_same(driven.events(rid), alone(model_and_tokenizer, req(rid, prompt)))


def test_identical_prompts_together_compute_all_but_the_last_token_once(model_and_tokenizer):
    """best_of and n submit one prompt several times at once: the copies differ only by seed."""
    driven = Driven(model_and_tokenizer)
    prompt = ids(driven.tokenizer, SHARED)
    samples = [req(f"n{k}", prompt, 10, sampling=SamplingParams(do_sample=True, seed=k, temperature=0.8))
               for k in range(3)]
    driven.submit(*samples)
    driven.run()
    assert driven.prefilled("n0") == [(0, len(prompt))]
    assert driven.prefilled("n1") == driven.prefilled("n2") == [(len(prompt) - 1, len(prompt))]
    for sample in samples:
        assert_same(driven.events(sample.request_id), alone(model_and_tokenizer, sample))


def test_an_evicted_prefix_is_never_read_again(model_and_tokenizer):
    """Two slots: the cached prompt is overwritten by other work in every slot; the same prompt
    again is prefilled whole and gets what it gets alone (a stale read would reuse other KV)."""
    driven = Driven(model_and_tokenizer, max_batch_size=2)
    tok = driven.tokenizer
    prompt = ids(tok, SHARED + " What is a queue?")
    driven.submit(req("cached", prompt))
    driven.run()
    other = [ids(tok, " ".join(reversed(PROMPTS)) + f" {n}") for n in range(2)]
    assert all(common_prefix(prompt, o) < BLOCK for o in other)
    driven.submit(req("other0", other[0], 20), req("other1", other[1], 20))  # both slots at once
    driven.run()
    driven.submit(req("again", prompt))
    driven.run()
    assert driven.prefilled("again") == [(0, len(prompt))]
    events = driven.events("again")
    assert events[-1].finish.cached_tokens == 0
    assert_same(events, alone(model_and_tokenizer, req("again", prompt)))


def test_slot_moves_keep_cached_rows_right(model_and_tokenizer):
    """The first request ends while two others decode: the highest moves into its slot and its
    KV moves up (a swap); a request sharing its prefix then reuses the moved rows."""
    driven = Driven(model_and_tokenizer, max_batch_size=3)
    tok = driven.tokenizer
    short, middle, long = ids(tok, SHARED + " Hello"), ids(tok, PROMPTS[2]), ids(tok, PROMPTS[3] + " 4 5 6")
    driven.submit(req("short", short, 2), req("middle", middle, 30), req("long", long, 30))
    for _ in range(3):
        driven.engine.step()
    table = driven.engine.scheduler.table
    assert [s.request_id for s in driven.engine.scheduler.running] == ["long", "middle"]  # long moved to slot 0
    assert table.slots[2].tokens[: len(short)] == short  # short's KV moved up, still cached
    follow = ids(tok, SHARED + " Hello, world! Again")
    driven.submit(req("follow", follow, 10))
    driven.run()
    assert driven.prefilled("follow")[0][0] >= len(short)
    for rid, prompt, budget in [("follow", follow, 10), ("middle", middle, 30), ("long", long, 30)]:
        assert_same(driven.events(rid), alone(model_and_tokenizer, req(rid, prompt, budget)))


def test_cancel_mid_prefill_leaves_only_what_was_written(model_and_tokenizer):
    driven = Driven(model_and_tokenizer, max_batch_prefill_tokens=BLOCK)
    prompt = ids(driven.tokenizer, " ".join(PROMPTS * 3))
    assert len(prompt) > 4 * BLOCK
    driven.submit(req("cancelled", prompt))
    driven.engine.step()
    driven.engine.step()  # two chunks written
    driven.engine.cancel("cancelled")
    driven.engine.step()
    assert driven.engine.scheduler.table.slots[0].tokens == prompt[: 2 * BLOCK]  # no more than it wrote
    driven.submit(req("again", prompt))
    driven.run()
    assert driven.prefilled("again")[0] == (2 * BLOCK, 3 * BLOCK)
    assert_same(driven.events("again"), alone(model_and_tokenizer, req("again", prompt)))


def test_prefill_logprobs_are_computed_not_reused(model_and_tokenizer):
    """decoder_input_details needs every prompt token's logprob: such a request prefills whole."""
    driven = Driven(model_and_tokenizer)
    prompt = ids(driven.tokenizer, SHARED + " Hello")
    driven.submit(req("warm", prompt))
    driven.run()
    driven.submit(req("details", prompt, prefill_logprobs=True))
    driven.run()
    assert driven.prefilled("details") == [(0, len(prompt))]
    events, reference = driven.events("details"), alone(model_and_tokenizer, req("details", prompt, prefill_logprobs=True))
    assert_same(events, reference)
    assert [t.id for t in events[0].prefill] == list(prompt)
    assert torch.allclose(torch.tensor([t.logprob for t in events[0].prefill[1:]]),
                          torch.tensor([t.logprob for t in reference[0].prefill[1:]]), atol=5e-5)


def test_a_different_salt_never_shares_a_prefix(model_and_tokenizer):
    driven = Driven(model_and_tokenizer)
    prompt = ids(driven.tokenizer, SHARED + " Hello")
    driven.submit(req("adapter-a", prompt, cache_salt="a"))
    driven.run()
    driven.submit(req("adapter-b", prompt, cache_salt="b"), )
    driven.run()
    driven.submit(req("adapter-a-again", prompt, cache_salt="a"))
    driven.run()
    assert driven.prefilled("adapter-b") == [(0, len(prompt))]
    assert driven.prefilled("adapter-a-again") == [(len(prompt) - 1, len(prompt))]


def test_without_prefix_caching_every_prompt_is_prefilled(model_and_tokenizer):
    driven = Driven(model_and_tokenizer, prefix_caching=False)
    prompt = ids(driven.tokenizer, SHARED)
    for rid in ("a", "b"):
        driven.submit(req(rid, prompt))
        driven.run()
    assert driven.prefilled("b") == [(0, len(prompt))]
    stats = driven.engine.stats()
    assert not stats.prefix_caching and stats.prefix_hit_tokens == 0 and stats.prefix_cached_tokens == 0


def test_the_cache_is_the_free_slots_within_the_kv_budget(model_and_tokenizer):
    """Cached prefixes live in free slots: cached and running positions together never exceed the
    slots' budget, and the KV tensors are no larger than without the cache."""
    sizes = {}
    for caching in (True, False):
        driven = Driven(model_and_tokenizer, max_batch_size=3, prefix_caching=caching)
        for n in range(5):
            driven.submit(req(f"r{n}", ids(driven.tokenizer, SHARED + f" {n}" * (n + 1)), 6))
            driven.engine.step()
        driven.run()
        stats = driven.engine.stats()
        assert stats.prefix_cached_tokens + stats.batch_tokens <= stats.max_batch_total_tokens
        sizes[caching] = sum(t.numel() for t in driven.engine.runner.cache.keys + driven.engine.runner.cache.values)
    assert sizes[True] == sizes[False]
    assert stats.prefix_cached_slots == 0


def test_a_new_request_takes_an_empty_slot_first_then_the_least_recently_used(model_and_tokenizer):
    """Three slots fill with a, b, c (each cached when it ends); a's conversation goes on in a's
    slot; an unrelated request then evicts the least recently used, b, not a."""
    driven = Driven(model_and_tokenizer, max_batch_size=3)
    tok = driven.tokenizer
    prompts = {name: ids(tok, f"{name}: " + " ".join(PROMPTS)) for name in "abc"}  # each its own first token

    def send(rid, prompt):
        driven.submit(req(rid, prompt, 4))
        driven.run()
        return driven.prefilled(rid)[0][0]  # where its prefill began: the cached length

    assert [send(name, prompt) for name, prompt in prompts.items()] == [0, 0, 0]  # three empty slots
    assert driven.engine.stats().prefix_cached_slots == 3
    reply = tuple(e.token.id for e in driven.events("a"))
    assert send("a-next-turn", prompts["a"] + reply + ids(tok, " again")) == len(prompts["a"]) + len(reply) - 1
    assert send("unrelated", ids(tok, "x: " + " ".join(reversed(PROMPTS)))) == 0
    assert send("c-again", prompts["c"]) == len(prompts["c"]) - 1  # c was used after b
    assert send("b-again", prompts["b"]) == 0  # b was evicted
