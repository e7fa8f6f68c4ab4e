"""Adversarial checks of the step loop, stepped by hand: whatever step a request is cancelled at,
overlap on or off, every stream ends, and the other requests get exactly their solo tokens
(no token twice, none lost, none of a dropped step)."""
from __future__ import annotations

import pytest

from engine.engine import Engine
from engine.outputs import EngineError, RequestCancelled
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig
from tests.engine.test_engine import model_and_tokenizer  # noqa: F401 (fixture)


def req(tokenizer, rid, text, max_new_tokens, **sampling) -> GenerationRequest:
    return GenerationRequest(request_id=rid, input_ids=tuple(tokenizer(text).input_ids),
                             sampling=SamplingParams(**sampling),
                             stopping=StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True))


def events_of(stream) -> tuple[list[tuple[int, float | None]], str]:
    out = []
    try:
        for event in stream:
            out.append((event.token.id, None if event.token.logprob is None else round(event.token.logprob, 4)))
    except RequestCancelled:
        return out, "cancelled"
    except EngineError:
        return out, "error"
    return out, "final"


def run(model_and_tokenizer, overlap, requests, cancel=None, stop_at=None, slots=4):
    """Step an engine by hand; `cancel` = (request id, step) cancels it before that step;
    `stop_at`: stop() before that step. Every stream must have ended after at most 200 steps."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=slots, max_total_tokens=64), overlap=overlap)
    streams = {r.request_id: engine.submit(r) for r in requests}
    forward = engine.runner.forward
    ran_ahead = []
    engine.runner.forward = lambda batch: ran_ahead.append(not isinstance(batch.decode_ids, list)) or forward(batch)
    for step in range(200):
        if cancel is not None and step == cancel[1]:
            engine.cancel(cancel[0])
        if stop_at is not None and step == stop_at:
            engine.stop()
            break
        if all(s.wait(0) for s in streams.values()) and not engine.scheduler.has_work:
            break
        engine.step()
    assert all(s.wait(0) for s in streams.values()), "a stream never ended"
    assert not engine.scheduler.has_work or stop_at is not None  # every slot given back
    if overlap and cancel is None and stop_at is None:
        assert any(ran_ahead)  # the overlap paths were taken
    return {rid: events_of(s) for rid, s in streams.items()}


WATERMARK = [False]  # the last request's watermark: with it the batch samples after the host


@pytest.fixture(params=[False, True], ids=["sampled-ahead", "watermarked"], autouse=True)
def watermarked(request):
    WATERMARK[0] = request.param


_SOLO: dict = {}


def solo_runs(model_and_tokenizer) -> dict:
    """Each request of the workload run alone (computed once per workload)."""
    _, tokenizer = model_and_tokenizer
    if WATERMARK[0] not in _SOLO:
        _SOLO[WATERMARK[0]] = {r.request_id: run(model_and_tokenizer, False, [r])[r.request_id]
                               for r in workload(tokenizer)}
    return _SOLO[WATERMARK[0]]


def workload(tokenizer):
    return [req(tokenizer, "a", "Hello there", 6),
            req(tokenizer, "b", "Hello there", 1),  # one token: finishes at its prefill
            req(tokenizer, "c", "Hello there, general", 9, do_sample=True, seed=7, top_k=20),
            req(tokenizer, "d", "Hello", 4, watermark=WATERMARK[0])]


@pytest.mark.parametrize("slots", [1, 2, 4])  # fewer: requests wait, slots compact, prefixes are reused
@pytest.mark.parametrize("overlap", [False, True])
def test_the_workload_overlapped_is_each_requests_solo_run(model_and_tokenizer, overlap, slots):
    _, tokenizer = model_and_tokenizer
    solo = solo_runs(model_and_tokenizer)
    assert run(model_and_tokenizer, overlap, workload(tokenizer), slots=slots) == solo


@pytest.mark.parametrize("slots", [2, 4])
@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("victim", ["a", "b", "c"])
@pytest.mark.parametrize("at", range(0, 10))
def test_cancel_at_any_step_ends_its_stream_and_leaves_the_others_solo(model_and_tokenizer, overlap, victim, at,
                                                                       slots):
    _, tokenizer = model_and_tokenizer
    solo = solo_runs(model_and_tokenizer)
    got = run(model_and_tokenizer, overlap, workload(tokenizer), cancel=(victim, at), slots=slots)
    for rid, (tokens, end) in got.items():
        if rid == victim and end == "cancelled":
            assert tokens == solo[rid][0][: len(tokens)]  # a prefix of its own tokens, each once
        else:
            assert (tokens, end) == solo[rid], rid


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("at", range(1, 10))
def test_stop_at_any_step_ends_every_stream_with_its_own_tokens(model_and_tokenizer, overlap, at):
    _, tokenizer = model_and_tokenizer
    solo = solo_runs(model_and_tokenizer)
    got = run(model_and_tokenizer, overlap, workload(tokenizer), stop_at=at)
    for rid, (tokens, end) in got.items():
        assert end in ("final", "error"), rid
        assert tokens == solo[rid][0][: len(tokens)], rid
        if end == "final":
            assert (tokens, end) == solo[rid], rid


@pytest.mark.parametrize("slots", [1, 2, 3])
@pytest.mark.parametrize("overlap", [False, True])
def test_requests_that_fill_their_slot_exactly_are_their_solo_runs(model_and_tokenizer, overlap, slots):
    """Prompt + max_new_tokens = the slot's 64 positions: with overlap the step after a row's last
    token writes its last position, never past the slot."""
    _, tokenizer = model_and_tokenizer
    prompt = tuple((list(tokenizer("Hello there").input_ids) * 40)[:60])
    stopping = StoppingParams(max_new_tokens=4, ignore_eos=True)
    requests = [GenerationRequest("full", prompt, SamplingParams(), stopping),
                GenerationRequest("one", prompt[:63], SamplingParams(), StoppingParams(max_new_tokens=1, ignore_eos=True)),
                req(tokenizer, "o", "Hello", 8)]
    solo = {r.request_id: run(model_and_tokenizer, False, [r])[r.request_id] for r in requests}
    assert run(model_and_tokenizer, overlap, requests, slots=slots) == solo
