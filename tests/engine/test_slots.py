"""KV slots, chunked prefill and the scheduler's batch, through the engine called directly."""
from __future__ import annotations

import threading

import pytest
import torch

from engine.engine import Engine
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import Sequence, SequenceStatus
from tests.engine.test_engine import PROMPTS, model_and_tokenizer, request, token_ids  # noqa: F401 (fixture)

LONG_PROMPT = " ".join(PROMPTS * 3)


def run_all(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    results: dict[str, list[int]] = {}

    def run(req):
        results[req.request_id] = token_ids(engine.submit(req))

    threads = [threading.Thread(target=run, args=(r,)) for r in requests]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def test_slots_are_reused_across_many_joins_and_leaves(model_and_tokenizer, tiny_reference):
    """40 requests of mixed lengths through 3 slots: each gets what it gets alone, and the batch
    never holds more rows than slots."""
    model, tokenizer = model_and_tokenizer
    seen_rows = []
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=3),
                    step_listener=lambda events: seen_rows.append(len(events))).start()
    try:
        budgets = [3 + (n * 7) % 17 for n in range(40)]
        requests = [request(tokenizer, f"j{n}", PROMPTS[n % 5], budget) for n, budget in enumerate(budgets)]
        results = run_all(engine, requests)
        for n, budget in enumerate(budgets):
            assert results[f"j{n}"] == tiny_reference(PROMPTS[n % 5], budget), n
        assert max(seen_rows) == 3
        assert engine.stats().running == 0 and engine.stats().batch_tokens == 0
    finally:
        engine.stop()


def test_a_chunked_prompt_gives_the_tokens_and_logprobs_of_one_prefill(model_and_tokenizer, tiny_reference):
    model, tokenizer = model_and_tokenizer
    ids = tuple(tokenizer(LONG_PROMPT).input_ids)
    assert len(ids) > 40

    def generate(prefill_budget: int):
        engine = Engine(model, tokenizer, SchedulerConfig(max_batch_prefill_tokens=prefill_budget)).start()
        try:
            req = GenerationRequest("long", ids, stopping=StoppingParams(12, ignore_eos=True), prefill_logprobs=True)
            return list(engine.submit(req))
        finally:
            engine.stop()

    whole, chunked = generate(4096), generate(7)
    assert token_ids(chunked) == token_ids(whole) == tiny_reference(LONG_PROMPT, 12)
    assert [t.id for t in chunked[0].prefill] == list(ids)
    assert chunked[0].prefill[0].logprob is None
    assert torch.allclose(torch.tensor([t.logprob for t in chunked[0].prefill[1:]]),
                          torch.tensor([t.logprob for t in whole[0].prefill[1:]]), atol=1e-4)


def test_running_streams_get_a_token_every_step_while_a_long_prompt_is_prefilled(model_and_tokenizer, tiny_reference):
    model, tokenizer = model_and_tokenizer
    steps: list[set[str]] = []
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_prefill_tokens=5),
                    step_listener=lambda events: steps.append({e.request_id for e in events})).start()
    try:
        running = engine.submit(request(tokenizer, "running", "Hello", max_new_tokens=300))
        next(running)
        long = list(engine.submit(request(tokenizer, "long", LONG_PROMPT, max_new_tokens=4)))
        running.close()
    finally:
        engine.stop()
    assert token_ids(long) == tiny_reference(LONG_PROMPT, 4)
    first_long = next(i for i, ids in enumerate(steps) if "long" in ids)
    chunks = -(-len(tokenizer(LONG_PROMPT).input_ids) // 5)
    # The long prompt's chunks ran in steps that still gave "running" its token each time.
    assert first_long >= chunks
    assert all("running" in ids for ids in steps[1 : first_long + 1])


def test_sampled_and_greedy_rows_keep_their_tokens_when_slots_move(model_and_tokenizer, tiny_reference):
    """Short requests finish first, so the long ones move into lower slots mid-generation."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=6)).start()
    sampled = dict(do_sample=True, seed=7, temperature=0.8, top_k=20)
    try:
        alone = token_ids(engine.submit(request(tokenizer, "alone", "Hello", 30, **sampled)))
        crowd = [request(tokenizer, f"short{n}", PROMPTS[n], 2 + n) for n in range(4)]
        crowd += [request(tokenizer, "sampled", "Hello", 30, **sampled), request(tokenizer, "greedy", PROMPTS[2], 30)]
        results = run_all(engine, crowd)
    finally:
        engine.stop()
    assert results["sampled"] == alone
    assert results["greedy"] == tiny_reference(PROMPTS[2], 30)


def _sequence(tokenizer, rid: str, prompt_len: int) -> Sequence:
    req = GenerationRequest(rid, tuple(range(1, prompt_len + 1)), stopping=StoppingParams(5))
    return Sequence(req, tokenizer, frozenset(), "cpu")


def test_scheduler_refills_holes_from_the_top_and_keeps_slot_equal_to_row(model_and_tokenizer):
    _, tokenizer = model_and_tokenizer
    scheduler = Scheduler(SchedulerConfig(max_batch_size=5, max_batch_prefill_tokens=100))
    sequences = [_sequence(tokenizer, f"s{n}", 3 + n) for n in range(5)]
    for s in sequences:
        scheduler.add(s)
    batch = scheduler.schedule()
    assert [c.sequence.slot for c in batch.prefill] == [0, 1, 2, 3, 4]
    scheduler.postprocess(batch)
    for finished in (sequences[1], sequences[3]):
        finished.status = SequenceStatus.FINISHED
    scheduler.release_finished()
    batch = scheduler.schedule()
    # s4 (slot 4) fills the hole at 1; s2 stays at 2; the hole at 3 closes by shrinking.
    assert [(m.source, m.target, m.length) for m in batch.copies] == [(4, 1, 7)]
    assert [s.request_id for s in scheduler.running] == ["s0", "s4", "s2"]
    assert [s.slot for s in scheduler.running] == [0, 1, 2]
    assert batch.decode_positions == [3, 7, 5]


def test_short_prompts_share_a_step_while_their_tokens_fit_the_budget(model_and_tokenizer):
    """Prompts are packed, not padded to the longest: the budget counts their tokens."""
    _, tokenizer = model_and_tokenizer
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=40))
    for rid, length in [("a", 5), ("b", 30), ("c", 6)]:
        scheduler.add(_sequence(tokenizer, rid, length))
    first = scheduler.schedule()
    assert [c.sequence.request_id for c in first.prefill] == ["a", "b"]  # 35 tokens; with c, 41
    scheduler.postprocess(first)
    assert [c.sequence.request_id for c in scheduler.schedule().prefill] == ["c"]


def test_a_prompt_moved_under_a_decoding_row_writes_its_padding_row_past_its_chunk(model_and_tokenizer):
    """When a short request leaves while a long prompt is prefilled in chunks, the prompt moves
    into the low slot, under a decoding row: that slot's decode row is padding, and it must
    write where neither this step's chunk nor any query of the step looks."""
    _, tokenizer = model_and_tokenizer
    scheduler = Scheduler(SchedulerConfig(max_batch_size=3, max_batch_prefill_tokens=4))
    short, other, long = (_sequence(tokenizer, name, length) for name, length in [("short", 3), ("other", 3), ("long", 10)])
    for sequence in (short, other, long):
        scheduler.add(sequence)
    for _ in range(3):  # short, then other, then long's first chunk (each alone in the budget of 4)
        scheduler.postprocess(scheduler.schedule())
    assert [s.slot for s in (short, other, long)] == [0, 1, 2] and long.kv_len == 4
    short.status = SequenceStatus.FINISHED
    scheduler.release_finished()
    batch = scheduler.schedule()
    assert [(m.source, m.target) for m in batch.copies] == [(2, 0)]
    assert batch.decode == [None, other]
    assert [(c.start, c.end) for c in batch.prefill] == [(4, 8)]
    assert batch.decode_positions == [8, other.kv_len]


def test_a_long_prompt_moved_into_a_freed_slot_mid_prefill_gets_what_it_gets_alone(model_and_tokenizer, tiny_reference):
    """All three queued before the engine starts, so the order is fixed: short and other take
    slots 0 and 1, the long prompt slot 2; short ends while the long prompt is still in chunks,
    which then move into slot 0, under other's decoding row. Logprobs are compared, not just
    tokens: a tiny random model's greedy tokens survive a corrupted key, its logprobs do not."""
    model, tokenizer = model_and_tokenizer
    assert len(tokenizer(LONG_PROMPT).input_ids) > 8 * 5  # more chunks than short has steps

    def run(*requests):
        engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=3, max_batch_prefill_tokens=5))
        streams = [engine.submit(r) for r in requests]
        engine.start()
        try:
            return [list(stream) for stream in streams]
        finally:
            engine.stop()

    def long():
        return request(tokenizer, "long", LONG_PROMPT, max_new_tokens=6)

    short, other, crowded = run(request(tokenizer, "short", "Hello", max_new_tokens=3),
                                request(tokenizer, "other", PROMPTS[1], max_new_tokens=40), long())
    (alone,) = run(long())
    assert token_ids(short) == tiny_reference("Hello", 3)
    assert token_ids(other) == tiny_reference(PROMPTS[1], 40)
    assert token_ids(crowded) == token_ids(alone) == tiny_reference(LONG_PROMPT, 6)
    # Batch shapes alone move a logprob by ~5e-6; a key written over one of the prompt's, by 1e-4 to 1.
    assert torch.allclose(torch.tensor([e.token.logprob for e in crowded]),
                          torch.tensor([e.token.logprob for e in alone]), atol=5e-5)


def test_one_packed_step_decodes_and_prefills_prompts_of_several_lengths_as_each_alone(model_and_tokenizer):
    """One step, driven by hand: a running request decodes while four prompts, two of one length
    (attended in one call) and two asking for prefill logprobs, are prefilled in the same
    forward. Each gets the tokens, logprobs and prompt logprobs it gets alone."""
    model, tokenizer = model_and_tokenizer

    def requests():
        return [request(tokenizer, "running", "Hello", 10),
                GenerationRequest("long", tuple(tokenizer(LONG_PROMPT).input_ids), prefill_logprobs=True,
                                  stopping=StoppingParams(6, ignore_eos=True)),
                request(tokenizer, "short", PROMPTS[0], 6),
                request(tokenizer, "twin", PROMPTS[0], 4),
                GenerationRequest("medium", tuple(tokenizer(PROMPTS[2]).input_ids), prefill_logprobs=True,
                                  stopping=StoppingParams(6, ignore_eos=True))]

    def alone(req):
        engine = Engine(model, tokenizer, SchedulerConfig()).start()
        try:
            return list(engine.submit(req))
        finally:
            engine.stop()

    steps: list[list[str]] = []
    engine = Engine(model, tokenizer, SchedulerConfig(), step_listener=lambda events: steps.append(
        sorted(e.request_id for e in events)))
    first, *others = requests()
    streams = [engine.submit(first)]
    engine.step()  # the running request's prompt
    streams += [engine.submit(r) for r in others]
    while engine.scheduler.has_work:
        engine.step()
    assert steps[1] == ["long", "medium", "running", "short", "twin"]  # one step: a decode and four prompts
    for stream, req in zip(streams, requests()):
        together, by_itself = list(stream), alone(req)
        assert token_ids(together) == token_ids(by_itself), req.request_id
        assert torch.allclose(torch.tensor([e.token.logprob for e in together]),
                              torch.tensor([e.token.logprob for e in by_itself]), atol=5e-5)
        if req.prefill_logprobs:
            prompt, prompt_alone = together[0].prefill, by_itself[0].prefill
            assert [t.id for t in prompt] == list(req.input_ids) == [t.id for t in prompt_alone]
            assert torch.allclose(torch.tensor([t.logprob for t in prompt[1:]]),
                                  torch.tensor([t.logprob for t in prompt_alone[1:]]), atol=5e-5)


@pytest.mark.parametrize("budget, expected", [(4, [[0, 4], [4, 8], [8, 10]]), (100, [[0, 10]])])
def test_a_prompt_over_the_prefill_budget_is_split_into_chunks(model_and_tokenizer, budget, expected):
    _, tokenizer = model_and_tokenizer
    scheduler = Scheduler(SchedulerConfig(max_batch_prefill_tokens=budget))
    scheduler.add(_sequence(tokenizer, "long", 10))
    chunks = []
    while scheduler.running == [] or scheduler.running[0].is_prefilling:
        batch = scheduler.schedule()
        chunks += [[c.start, c.end] for c in batch.prefill]
        scheduler.postprocess(batch)
    assert chunks == expected


def test_the_prompt_tokens_to_prefill_include_a_long_prompt_in_chunks(model_and_tokenizer):
    """What the SLO autoscaler reads as `waiting_tokens`: the waiting prompts, and the rest of a
    long prompt being prefilled in chunks (it delays every waiting request as much)."""
    _, tokenizer = model_and_tokenizer
    scheduler = Scheduler(SchedulerConfig(max_batch_size=3, max_batch_prefill_tokens=4))
    long, waiting = _sequence(tokenizer, "long", 10), _sequence(tokenizer, "waiting", 6)
    scheduler.add(long)
    scheduler.postprocess(scheduler.schedule())  # its first chunk: 4 of 10
    scheduler.add(waiting)
    assert long.kv_len == 4 and list(scheduler.waiting) == [waiting]
    assert scheduler.prompt_tokens_to_prefill() == 6 + 6
