"""Speculative decoding in the engine (`--speculate`), on the tiny random model, stepped by hand.

A random model seldom repeats itself, so most tests draft with an oracle: per row, the tokens
the same request gave without speculation, spoiled where a test wants a rejection. What a user
sees must not change: every row's tokens, logprobs, alternatives and finish equal its run
without speculation; only the number of steps drops."""
from __future__ import annotations

import copy
import re

import pytest
import torch

from engine.engine import Engine
from engine.grammar import grammar_matcher
from engine.lora_files import load_adapter
from engine.ngram import NgramDrafter
from engine.outputs import FinishReason
from engine.params import GenerationRequest, Grammar, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig
from engine.speculative import MAX_NGRAM, MAX_SPECULATE, SpeculationGate, SpeculativeConfig, accepted_tokens
from tests.lora_adapters import build_adapter
from tests.tiny_model import EOS_AFTER, EOS_PROMPT

TEXTS = ["The capital of France is", "Hello", "Numbers: 0 1 2 3 4 5 6 7 8 9 0 1 2 3", "Once upon a time"]
SPOILED = 3  # a token id the oracle puts where a draft must be rejected (never the right one: checked)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def request(tokenizer, rid, text, max_new_tokens=16, stop=(), ignore_eos=True, top_n=0, grammar=None,
            adapter=None, **sampling):
    return GenerationRequest(rid, tuple(tokenizer(text).input_ids), SamplingParams(**sampling),
                             StoppingParams(max_new_tokens=max_new_tokens, stop_sequences=tuple(stop),
                                            ignore_eos=ignore_eos), top_n_tokens=top_n, grammar=grammar,
                             adapter=adapter)


class VerifyWhenDrafted(SpeculationGate):
    """The gate weighs measured step times; these tests must not depend on the machine's speed
    (a verify step slower than its tokens' worth would silently turn them into plain runs)."""

    def drafts(self, rows, expected_tokens, draft_tokens):
        return True

    def observe(self, rows, seconds, draft_tokens=0):
        pass


def make_engine(model_and_tokenizer, speculate=0, adapters=(), **config):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(**config), adapters=adapters,
                    speculative=SpeculativeConfig(tokens=speculate, ngram_min=1) if speculate else None)
    if engine.speculator is not None:
        engine.speculator.gate = VerifyWhenDrafted()
    return engine


def run(engine, requests, together=True) -> tuple[dict, int]:
    """Each request's events (all at once, or one after another), and the steps taken; the step
    each request finished at goes to `engine.finished_at`."""
    steps, out = 0, {}
    engine.finished_at = {}
    engine.step_listener = lambda events: engine.finished_at.update(
        {e.request_id: steps for e in events if e.finish is not None})
    groups = [requests] if together else [[r] for r in requests]
    for group in groups:
        streams = {r.request_id: engine.submit(r) for r in group}
        while not all(s.wait(0) for s in streams.values()) or engine.scheduler.has_work:
            engine.step()
            steps += 1
        out.update({rid: list(stream) for rid, stream in streams.items()})
    return out, steps


def seen(events) -> list:
    """What a user sees of each token but its logprobs (`logprobs` compares those)."""
    return [(e.token.id, e.token.text, tuple(t.id for t in e.top_tokens), e.finish.reason if e.finish else None)
            for e in events]


def logprobs(events) -> list[float]:
    """Each token's logprob and its alternatives' (a forward of other rows or more tokens may
    change their float sums in the last bits)."""
    return [lp for e in events for lp in (e.token.logprob, *(t.logprob for t in e.top_tokens))]


def assert_same(got: dict, want: dict) -> None:
    assert {rid: seen(e) for rid, e in got.items()} == {rid: seen(e) for rid, e in want.items()}
    for rid, events in want.items():
        assert logprobs(got[rid]) == pytest.approx(logprobs(events), abs=1e-4)


class Oracle:
    """Drafts the row's reference continuation; `spoil(n)` → the draft positions (output index)
    it gets wrong on purpose."""

    def __init__(self, prompt_len: int, reference: list[int], spoil=()):
        self.prompt_len, self.reference, self.spoil = prompt_len, reference, set(spoil)

    def propose(self, tokens, count):
        start = len(tokens) - self.prompt_len
        drafts = self.reference[start : start + count]
        return tuple(SPOILED if start + j in self.spoil else t for j, t in enumerate(drafts))


def with_oracle(engine, references: dict, spoil: dict | None = None):
    spoil = spoil or {}

    def new_drafter(sequence):
        rid = sequence.request_id
        return Oracle(sequence.prompt_len, [e.token.id if hasattr(e, "token") else e for e in references[rid]],
                      spoil.get(rid, ()))

    engine.speculator.new_drafter = new_drafter
    return engine


def test_greedy_ngram_drafts_give_the_tokens_of_plain_decoding(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    requests = [request(tokenizer, f"r{n}", text, max_new_tokens=24) for n, text in enumerate(TEXTS)]
    plain, _ = run(make_engine(model_and_tokenizer), requests)
    for together in (True, False):
        engine = make_engine(model_and_tokenizer, speculate=4)
        speculated, _ = run(engine, requests, together)
        assert_same(speculated, plain)
        assert engine.stats().spec_draft_tokens > 0  # the repeated numbers matched


def test_mixed_batch_of_accepted_rejected_and_undrafted_rows_equals_plain_decoding(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    requests = [request(tokenizer, f"r{n}", text, max_new_tokens=20, top_n=3) for n, text in enumerate(TEXTS)]
    plain, plain_steps = run(make_engine(model_and_tokenizer), requests)
    assert all(SPOILED not in [e.token.id for e in events] for events in plain.values())
    spoil = {"r0": range(0, 20, 3), "r2": (5,)}  # r3: every draft right
    undrafted = {**plain, "r1": []}  # r1 never has a match
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4), undrafted, spoil)
    speculated, _ = run(engine, requests)
    assert_same(speculated, plain)
    stats = engine.stats()
    assert 0 < stats.spec_accepted_tokens < stats.spec_draft_tokens
    assert engine.finished_at["r3"] <= 20 // 5 + 1  # 4 drafts and the token after them, a step
    assert engine.finished_at["r1"] == plain_steps - 1  # one token a step, as before (counted from 0)


@pytest.mark.parametrize("case", ["stop", "eos", "length"])
def test_a_row_ending_inside_an_accepted_draft_ends_exactly_there(model_and_tokenizer, case):
    tokenizer = model_and_tokenizer[1]
    if case == "eos":
        r = request(tokenizer, "r", EOS_PROMPT, max_new_tokens=20, ignore_eos=False)
    elif case == "length":
        r = request(tokenizer, "r", TEXTS[0], max_new_tokens=6)
    else:  # the first token from the 4th on whose text has not appeared before: the stop string
        full, _ = run(make_engine(model_and_tokenizer), [request(tokenizer, "r", TEXTS[3], max_new_tokens=12)])
        texts = [e.token.text for e in full["r"]]
        at = next(i for i in range(3, 12) if texts[i].strip() and texts[i] not in "".join(texts[: i + 1])[:-1])
        r = request(tokenizer, "r", TEXTS[3], max_new_tokens=12, stop=[texts[at]])
    plain, _ = run(make_engine(model_and_tokenizer), [r])
    references = {"r": plain["r"] + [plain["r"][-1]] * 8}  # drafts run on past the end
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4), references)
    speculated, _ = run(engine, [r])
    assert_same(speculated, plain)
    assert speculated["r"][-1].finish.generated_text == plain["r"][-1].finish.generated_text
    want = {"eos": FinishReason.EOS_TOKEN, "length": FinishReason.LENGTH, "stop": FinishReason.STOP_SEQUENCE}[case]
    assert speculated["r"][-1].finish.reason is want
    if case == "eos":
        assert len(speculated["r"]) == EOS_AFTER
    if case == "stop":
        assert len(speculated["r"]) == at + 1
    assert speculated["r"][-1].finish.skipped_tokens > 0  # the end came inside a verify step's accepted drafts


def test_drafts_never_pass_the_kv_slot(model_and_tokenizer):
    """Prompt and tokens fill the slot exactly; drafts stop at its last column."""
    tokenizer = model_and_tokenizer[1]
    prompt_len = len(tokenizer(TEXTS[2]).input_ids)
    r = request(tokenizer, "r", TEXTS[2], max_new_tokens=64 - prompt_len)
    config = dict(max_total_tokens=64, max_batch_total_tokens=128)
    plain, _ = run(make_engine(model_and_tokenizer, **config), [r])
    references = {"r": plain["r"] + [plain["r"][-1]] * 8}
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4, **config), references)
    speculated, _ = run(engine, [r])
    assert_same(speculated, plain)
    assert engine.stats().spec_accepted_tokens > 0


def test_seeded_penalized_and_watermarked_rows_give_the_same_tokens_alone_in_a_batch_and_unspeculated(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    sampled = dict(do_sample=True, temperature=0.7, top_k=40, repetition_penalty=1.2)
    requests = [request(tokenizer, f"s{n}", text, max_new_tokens=16, seed=n, **sampled) for n, text in enumerate(TEXTS)]
    requests.append(request(tokenizer, "greedy", TEXTS[0], max_new_tokens=16, frequency_penalty=0.5))
    requests.append(request(tokenizer, "marked", TEXTS[1], max_new_tokens=16, watermark=True, do_sample=True, seed=9))
    plain, _ = run(make_engine(model_and_tokenizer), requests)
    spoil = {"s1": (2, 7), "s3": range(0, 16, 2)}
    for together in (True, False):
        engine = with_oracle(make_engine(model_and_tokenizer, speculate=3), plain, spoil)
        speculated, _ = run(engine, requests, together)
        assert_same(speculated, plain)
        assert engine.stats().spec_accepted_tokens > 0


def test_grammar_rows_stay_valid_and_unchanged_when_drafts_break_the_grammar(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    date = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
    requests = [request(tokenizer, f"g{n}", "Today is", max_new_tokens=30, grammar=Grammar("regex", date),
                        **({"do_sample": True, "seed": n} if n else {})) for n in range(3)]
    requests.append(request(tokenizer, "free", TEXTS[2], max_new_tokens=12))
    plain, _ = run(make_engine(model_and_tokenizer), requests)
    spoil = {"g1": (1, 4), "g2": range(30)}  # a spoiled draft breaks the date: it must be cut, never sampled
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4), plain, spoil)
    speculated, _ = run(engine, requests)
    assert_same(speculated, plain)
    for n in range(3):
        assert re.fullmatch(date, speculated[f"g{n}"][-1].finish.generated_text)
    assert engine.stats().spec_accepted_tokens > 0


def test_grammar_cuts_a_draft_at_its_first_invalid_token(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    matcher = grammar_matcher(Grammar("regex", "a+b"), tokenizer, frozenset({tokenizer.eos_token_id}))
    a, b = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b"))
    assert matcher.valid_prefix((a, a, b, a)) == 3
    assert matcher.after((a, a)).valid_prefix((b,)) == 1
    assert matcher.valid_prefix((b,)) == 0  # the row's own matcher did not move


def test_a_draft_outside_the_tokenizers_vocabulary_is_cut_and_leaves_the_grammar_intact(model_and_tokenizer):
    """A prompt may hold ids the model has and the tokenizer lacks (a padded embedding; the
    engine takes ids): drafted, such an id put llguidance's matcher in error, and the row then
    ended early with EOS, its output outside the grammar."""
    tokenizer = model_and_tokenizer[1]
    matcher = grammar_matcher(Grammar("regex", "a+b"), tokenizer, frozenset({tokenizer.eos_token_id}))
    a, b = (tokenizer.convert_tokens_to_ids(t) for t in ("a", "b"))
    assert matcher.valid_prefix((a, matcher.vocab_size, b)) == 1
    assert matcher.valid_prefix((a, b)) == 2 and not matcher.is_complete  # the row's own matcher is unharmed


def test_prefix_cache_holds_only_accepted_positions(model_and_tokenizer):
    """A follow-up turn reuses the KV of a speculated request whose drafts were partly rejected:
    its tokens equal a fresh run's."""
    tokenizer = model_and_tokenizer[1]
    first = request(tokenizer, "first", TEXTS[2] * 2, max_new_tokens=20)
    plain, _ = run(make_engine(model_and_tokenizer), [first])
    follow_text = TEXTS[2] * 2 + plain["first"][-1].finish.generated_text + " and then"
    follow = request(tokenizer, "follow", follow_text, max_new_tokens=10)
    fresh, _ = run(make_engine(model_and_tokenizer, prefix_caching=False), [follow])
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4), plain, {"first": range(1, 20, 2)})
    run(engine, [first])
    engine.speculator.new_drafter = lambda _sequence: NgramDrafter(1, 3)
    again, _ = run(engine, [follow])
    assert engine.stats().prefix_hit_tokens > len(first.input_ids)
    assert_same(again, fresh)


def plain_lora_run(model_and_tokenizer, tiny_model_dir, tmp_path):
    """A LoRA adapter, rows with and without it, and their plain (unspeculated) outputs."""
    model, tokenizer = model_and_tokenizer
    directory = build_adapter(tiny_model_dir, tmp_path / "head", seed=5, targets=["q_proj", "lm_head"])
    adapter = load_adapter("head", directory, model)
    requests = [request(tokenizer, f"r{n}-{name}", text, adapter=name)
                for n, text in enumerate(TEXTS[:2]) for name in (None, "head")]
    plain_engine = make_engine(model_and_tokenizer, adapters=[adapter])
    try:
        plain, _ = run(plain_engine, requests)
    finally:
        plain_engine.runner.lora.remove()
    return adapter, requests, plain


def test_lora_rows_verify_under_their_adapter(model_and_tokenizer, tiny_model_dir, tmp_path):
    adapter, requests, plain = plain_lora_run(model_and_tokenizer, tiny_model_dir, tmp_path)
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4, adapters=[adapter]), plain,
                         {"r0-head": (3,)})
    try:
        speculated, _ = run(engine, requests)
    finally:
        engine.runner.lora.remove()
    assert_same(speculated, plain)
    assert engine.stats().spec_accepted_tokens > 0


def test_a_row_whose_drafts_fail_rests(model_and_tokenizer):
    tokenizer = model_and_tokenizer[1]
    r = request(tokenizer, "r", TEXTS[0], max_new_tokens=40)
    plain, _ = run(make_engine(model_and_tokenizer), [r])
    engine = with_oracle(make_engine(model_and_tokenizer, speculate=4), plain, {"r": range(40)})
    speculated, _ = run(engine, [r])
    assert_same(speculated, plain)
    stats = engine.stats()
    assert stats.spec_accepted_tokens == 0
    assert stats.spec_drafts < 40 // 2  # it stopped drafting after a few rejections


def test_ngram_drafter_proposes_what_followed_the_latest_longest_match():
    drafter = NgramDrafter(1, 3)
    assert drafter.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2) == (7, 1)  # the latest occurrence
    assert drafter.propose([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3, 7], 3) == (1, 2, 3)  # grown incrementally
    assert NgramDrafter(2, 3).propose([5, 6, 7, 6], 2) == ()  # no bigram repeats
    assert NgramDrafter(1, 2).propose([4, 4, 4], 3) == (4,)  # a run of one token
    assert drafter.propose([1, 2], 0) == ()


def test_accepted_tokens_are_the_matching_drafts_and_the_token_after_them():
    assert accepted_tokens([5, 6, 7], (5, 6)) == [5, 6, 7]
    assert accepted_tokens([5, 9, 7], (5, 6)) == [5, 9]
    assert accepted_tokens([4, 6, 7], (5, 6)) == [4]
    assert accepted_tokens([4], ()) == [4]


def test_gate_drafts_when_the_expected_tokens_beat_the_measured_cost_of_verifying():
    gate = SpeculationGate(probe_every=4)
    assert gate.drafts(1, expected_tokens=5, draft_tokens=4)  # nothing measured: a verify step
    gate.observe(1, 0.030, draft_tokens=4)
    assert not gate.drafts(1, expected_tokens=5, draft_tokens=4)  # then a plain one
    gate.observe(1, 0.010)
    assert gate.cost_ratio(1, 4) == pytest.approx(3.0)  # a verify step costs three plain ones here
    assert [gate.drafts(1, expected_tokens=4, draft_tokens=3) for _ in range(4)] == [True, True, True, False]
    assert [gate.drafts(1, expected_tokens=3.2, draft_tokens=4) for _ in range(4)] == [False, False, False, True]
    assert gate.drafts(1, expected_tokens=1.5, draft_tokens=8)  # 8 drafts a row: not measured yet, tried
    gate.observe(32, 0.020)
    gate.observe(32, 0.030, draft_tokens=40)  # 32 rows, 2 drafts a row: 1.5 plain steps
    assert gate.drafts(32, expected_tokens=32 * 1.7, draft_tokens=40)
    assert not gate.drafts(32, expected_tokens=32 * 1.6, draft_tokens=40)  # not 10% better
    assert gate.ratios() == {"1x4": 3.0, "32x2": 1.5}


@pytest.mark.parametrize("when", ["first", "steady"])
def test_one_slow_verify_step_keeps_speculation_off_no_longer_than_a_probe(when):
    """A warm-up or a pause makes one verify step 100 times slower: drafting resumes at the
    next probe, not after the outlier has decayed over hundreds of steps."""
    gate = SpeculationGate(probe_every=8)
    if when == "steady":
        gate.observe(1, 0.012, draft_tokens=4)
        gate.observe(1, 0.010)
        assert all(gate.drafts(1, expected_tokens=3, draft_tokens=4) for _ in range(3))
    gate.observe(1, 1.2, draft_tokens=4)  # the outlier
    gate.observe(1, 0.010)
    steps = 0
    while not gate.drafts(1, expected_tokens=3, draft_tokens=4):
        gate.observe(1, 0.010)
        steps += 1
        assert steps <= gate.probe_every, "still off"
    gate.observe(1, 0.012, draft_tokens=4)  # the probe's verify step, at its usual cost
    assert gate.drafts(1, expected_tokens=3, draft_tokens=4)


@pytest.mark.parametrize("settings", [dict(tokens=-1), dict(tokens=MAX_SPECULATE + 1),
                                      dict(tokens=2, ngram_min=3, ngram_max=2), dict(tokens=2, ngram_max=MAX_NGRAM + 1)])
def test_speculative_config_refuses_what_it_cannot_serve(settings):
    with pytest.raises(ValueError):
        SpeculativeConfig(**settings)


def test_speculation_turns_overlap_off(model_and_tokenizer):
    """A verify step's successor depends on how many drafts were accepted: nothing runs ahead."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(), overlap=True, speculative=SpeculativeConfig(tokens=2))
    assert not engine.overlap and engine.speculator is not None
    assert Engine(model, tokenizer, SchedulerConfig(), overlap=True).overlap  # unchanged without it


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_verify_steps_on_cuda_give_what_graph_replayed_plain_steps_give(model_and_tokenizer):
    """On a GPU the plain steps replay CUDA graphs (and overlap); verify steps run eagerly beside
    them in the same engine: every row's tokens are the plain engine's (scripts/gpu_check.sh)."""
    model, tokenizer = model_and_tokenizer
    cuda_model = copy.deepcopy(model).to("cuda")
    requests = [request(tokenizer, f"r{n}", text, max_new_tokens=20, top_n=2) for n, text in enumerate(TEXTS)]
    requests.append(request(tokenizer, "s", TEXTS[2], max_new_tokens=20, do_sample=True, seed=3, top_k=20))
    plain_engine = Engine(cuda_model, tokenizer, SchedulerConfig(max_total_tokens=128, max_batch_total_tokens=1024))
    plain, _ = run(plain_engine, requests)
    engine = Engine(cuda_model, tokenizer, SchedulerConfig(max_total_tokens=128, max_batch_total_tokens=1024),
                    speculative=SpeculativeConfig(tokens=4))
    with_oracle(engine, plain, {"r0": (2, 9), "s": (4,)})
    speculated, _ = run(engine, requests)
    assert {rid: [e.token.id for e in events] for rid, events in speculated.items()} == \
        {rid: [e.token.id for e in events] for rid, events in plain.items()}
    assert engine.stats().spec_accepted_tokens > 0
