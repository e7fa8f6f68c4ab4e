"""The overlapped loop (a decode step launched before the previous one's tokens become events)
gives exactly the synchronous loop's events, for every kind of row."""
from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.params import GenerationRequest, Grammar, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def request(tokenizer, rid, text, max_new_tokens, stop=(), grammar=None, top_n=0, logprobs=True, **sampling):
    return GenerationRequest(rid, tuple(tokenizer(text).input_ids), SamplingParams(**sampling),
                             StoppingParams(max_new_tokens, stop_sequences=tuple(stop), ignore_eos=grammar is None),
                             top_n_tokens=top_n, grammar=grammar, token_logprobs=logprobs)


def drive(model_and_tokenizer, overlap: bool, first: list[GenerationRequest], late: list[GenerationRequest]):
    """Step an engine by hand: `first` at once, `late` after 5 steps; every stream's events, and
    how many forwards took their input ids from the previous step's device tensor."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=8, max_total_tokens=256), overlap=overlap)
    ran_ahead = []
    forward = engine.runner.forward

    def spy(batch):
        ran_ahead.append(isinstance(batch.decode_ids, torch.Tensor))
        return forward(batch)

    engine.runner.forward = spy
    streams = [engine.submit(r) for r in first]
    for step in range(400):
        if step == 5:
            streams += [engine.submit(r) for r in late]
        engine.step()
        if all(s.wait(0) for s in streams) and step > 5:
            break
    events = [[(e.token.id, e.token.text, None if e.token.logprob is None else round(e.token.logprob, 4),
                tuple(t.id for t in e.top_tokens),
                e.finish.reason if e.finish else None) for e in s] for s in streams]
    return events, sum(ran_ahead)


def test_overlapped_steps_give_the_synchronous_events(model_and_tokenizer):
    _model, tokenizer = model_and_tokenizer
    sampled = dict(do_sample=True, temperature=0.9, top_k=30)
    # A stop string the greedy row is known to produce: from a synchronous run of it alone.
    probe = [request(tokenizer, "probe", "Hello", 24)]
    (greedy_events,), _ = drive(model_and_tokenizer, False, probe, [])
    text = "".join(e[1] for e in greedy_events)
    stop = text[len(text) // 2: len(text) // 2 + 3]
    first = [
        request(tokenizer, "greedy", "Hello", 40),
        request(tokenizer, "seeded", "The capital of France is", 36, seed=11, repetition_penalty=1.3,
                presence_penalty=0.5, top_n=3, **sampled),
        request(tokenizer, "stop", "Hello", 24, stop=[stop]),
        request(tokenizer, "grammar", "Numbers:", 30, grammar=Grammar("regex", "[0-9]{3,12}"), seed=5, **sampled),
        request(tokenizer, "short", "Numbers: 0 1 2 3", 7, seed=3, **sampled),
    ]
    late = [request(tokenizer, "late", "Once upon a time", 20, seed=8, frequency_penalty=0.4, **sampled),
            request(tokenizer, "late-greedy", "Continuous batching", 15, top_n=2)]
    synchronous, sync_ahead = drive(model_and_tokenizer, False, first, late)
    overlapped, ahead = drive(model_and_tokenizer, True, first, late)
    assert sync_ahead == 0
    assert ahead > 10  # the overlapped engine did run ahead, for most of the decode steps
    assert overlapped == synchronous
    assert synchronous[2][-1][4] is not None and stop in "".join(e[1] for e in synchronous[2])
    assert len(synchronous[2]) < 24  # the stop string ended it


def test_overlapped_greedy_rows_whose_logprobs_nobody_reads_give_the_synchronous_events(model_and_tokenizer):
    """Their steps take the argmax alone (no logprobs come back from the device)."""
    _model, tokenizer = model_and_tokenizer
    first = [request(tokenizer, f"unread{n}", text, 20 + n, logprobs=False)
             for n, text in enumerate(["Hello", "The capital of France is", "Numbers: 0 1 2 3"])]
    synchronous, _ = drive(model_and_tokenizer, False, first, [])
    overlapped, ahead = drive(model_and_tokenizer, True, first, [])
    assert ahead > 10 and overlapped == synchronous
    assert all(event[2] is None for events in synchronous for event in events)


def test_a_grammar_row_runs_its_forward_ahead_and_samples_after_the_host(model_and_tokenizer):
    """A batch with a grammar row (its next mask needs the previous token on the host) runs each
    forward ahead and launches its sampling once the previous tokens are on the host: the same
    events as the synchronous loop, the grammar row's whole output a match."""
    _model, tokenizer = model_and_tokenizer
    sampled = dict(do_sample=True, temperature=1.5, seed=3)
    rows = [request(tokenizer, "g", "Numbers:", 20, grammar=Grammar("regex", "[0-9]{5,30}"), **sampled),
            request(tokenizer, "free", "Hello", 20, watermark=True, **sampled),
            request(tokenizer, "short", "Hello", 6)]
    events, ahead = drive(model_and_tokenizer, True, rows, [])
    assert ahead >= 10
    assert events == drive(model_and_tokenizer, False, rows, [])[0]
    text = "".join(e[1] for e in events[0])
    assert text.isdigit() and 5 <= len(text) <= 30


@pytest.mark.parametrize("overlap", [False, True])
def test_the_next_forward_is_launched_while_the_previous_one_runs(model_and_tokenizer, overlap):
    """Over a simulated device (each forward done 50 ms after its launch, on another thread), the
    overlapped loop launches every steady decode step before the previous one is done, so the
    device never waits for the host; the synchronous loop launches each only after."""
    from bench.simulated_device import SimulatedDevice

    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=4, max_total_tokens=256), overlap=overlap)
    logits = torch.randn(4, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    device = engine.runner = SimulatedDevice(engine.runner, logits, 0.05)
    streams = [engine.submit(request(tokenizer, f"r{n}", "Hello", 12)) for n in range(4)]
    while not all(s.wait(0) for s in streams):
        engine.step()
    assert [len(list(s)) for s in streams] == [12] * 4
    decode = device.forwards[1:]  # after the one prefill step (its first token)
    # 11 more tokens; running ahead computes one more, dropped, after the rows finished.
    assert len(decode) == (12 if overlap else 11)
    ahead = sum(launched < previous_ready for (_, previous_ready), (launched, _) in zip(decode, decode[1:]))
    assert ahead == (len(decode) - 1 if overlap else 0)
