"""BatchSampler against transformers' own scalar processors, row by row."""
from __future__ import annotations

import pytest
import torch
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from engine.params import SamplingParams
from engine.sampling import BatchSampler, RequestSampler

VOCAB = 64
# The summary pass runs in row chunks on a CPU and as one chunk on a GPU (scripts/gpu_check.sh).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


def make_logits(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 3  # [B, V]


def sampled(seed: int = 1, **kwargs) -> SamplingParams:
    return SamplingParams(do_sample=True, seed=seed, **kwargs)


def batch(params: list[SamplingParams]) -> BatchSampler:
    return BatchSampler([RequestSampler(p) for p in params], "cpu")


def assert_same_filtering(actual: torch.Tensor, expected: torch.Tensor):
    """Equal masks of filtered tokens and equal values everywhere else."""
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))
    finite = ~torch.isinf(expected)
    assert torch.allclose(actual[finite], expected[finite])


def reference(processor, logits: torch.Tensor, history=None) -> torch.Tensor:
    """One row through a transformers processor; `history` is that row's input ids."""
    input_ids = torch.tensor([list(history)]) if history is not None else None
    return processor(input_ids, logits.unsqueeze(0).clone())[0]


def test_greedy_only_batch_builds_no_settings_and_takes_argmax():
    sampler = batch([SamplingParams(), SamplingParams(top_k=3, temperature=0.5)])
    assert sampler.sampled_rows == []
    assert not sampler.needs_history
    for name in ("repetition", "frequency", "temperature", "top_k", "top_p", "typical_p"):
        assert getattr(sampler, name) is None, name
    logits = make_logits(2)
    out = sampler(logits, top_n=0)
    assert torch.equal(out.next_ids, logits.argmax(dim=-1))
    expected = torch.log_softmax(logits, dim=-1).gather(1, out.next_ids[:, None])[:, 0]
    assert torch.allclose(out.logprobs, expected)
    assert out.top_ids is None and out.top_logprobs is None


def test_a_greedy_batch_whose_logprobs_nobody_reads_takes_the_argmax_alone():
    logits = make_logits(4, seed=7)
    unread = BatchSampler([RequestSampler(SamplingParams(), logprobs=False) for _ in range(4)], "cpu")
    out = unread(logits)
    assert torch.equal(out.next_ids, logits.argmax(dim=-1)) and out.logprobs is None
    one_reads = BatchSampler([RequestSampler(SamplingParams(), logprobs=n == 2) for n in range(4)], "cpu")
    out = one_reads(logits)
    assert torch.equal(out.next_ids, logits.argmax(dim=-1))
    assert torch.allclose(out.logprobs, torch.log_softmax(logits, dim=-1).amax(dim=-1))
    top = unread(logits, top_n=2)  # alternatives come with their logprobs
    assert torch.allclose(top.top_logprobs, torch.log_softmax(logits, dim=-1).topk(2).values)


def test_temperature_per_row():
    temperatures = [0.5, 1.0, 2.0, 0.7]
    params = [sampled(temperature=t) for t in temperatures] + [SamplingParams(temperature=0.3)]
    logits = make_logits(len(params))
    processed = batch(params).process(logits)
    for i, t in enumerate(temperatures):
        assert torch.allclose(processed[i], reference(TemperatureLogitsWarper(t), logits[i]))
    assert torch.equal(processed[-1], logits[-1])  # greedy rows ignore temperature


def test_top_k_per_row():
    ks = [1, 5, None, 20, VOCAB + 10]
    params = [sampled(top_k=k) for k in ks] + [SamplingParams(top_k=3)]
    logits = make_logits(len(params))
    processed = batch(params).process(logits)
    for i, k in enumerate(ks):
        expected = logits[i] if k is None else reference(TopKLogitsWarper(k), logits[i])
        assert_same_filtering(processed[i], expected)
    assert torch.isinf(processed[0]).sum() == VOCAB - 1
    assert torch.equal(processed[2], logits[2])  # rows without top_k are untouched
    assert torch.equal(processed[-1], logits[-1])


def test_top_p_per_row():
    ps = [0.1, 0.5, None, 0.9, 0.99]
    params = [sampled(top_p=p) for p in ps] + [SamplingParams(top_p=0.2)]
    logits = make_logits(len(params), seed=1)
    processed = batch(params).process(logits)
    for i, p in enumerate(ps):
        expected = logits[i] if p is None else reference(TopPLogitsWarper(p), logits[i])
        assert_same_filtering(processed[i], expected)
    assert torch.isinf(processed[0]).any() and not torch.isinf(processed[0]).all()
    assert torch.equal(processed[2], logits[2])
    assert torch.equal(processed[-1], logits[-1])


def test_top_p_keeps_the_best_token_when_it_alone_exceeds_p():
    logits = torch.full((1, VOCAB), -10.0)
    logits[0, 7] = 10.0
    processed = batch([sampled(top_p=0.01)]).process(logits)
    assert torch.isfinite(processed[0]).nonzero().flatten().tolist() == [7]


def test_top_p_boundary_matches_transformers():
    """Four equally likely tokens, p=0.5: cumulative 0.5 exactly, so two tokens are removed."""
    logits = torch.full((1, VOCAB), -float("inf"))
    logits[0, :4] = 0.0
    processed = batch([sampled(top_p=0.5)]).process(logits)
    assert_same_filtering(processed[0], reference(TopPLogitsWarper(0.5), logits[0]))
    assert torch.isfinite(processed[0]).sum() == 2


def test_rows_without_a_filter_are_untouched_even_where_probabilities_underflow():
    logits = torch.zeros(2, VOCAB)
    logits[:, 0] = -200.0  # exp underflows to 0 in float32
    params = [sampled(top_p=0.9, typical_p=0.9), sampled()]
    processed = batch(params).process(logits)
    assert torch.isinf(processed[0, 0])
    assert torch.equal(processed[1], logits[1])


def test_typical_p_per_row():
    masses = [0.2, 0.5, None, 0.95]
    params = [sampled(typical_p=m) for m in masses] + [SamplingParams(typical_p=0.3)]
    logits = make_logits(len(params), seed=2)
    processed = batch(params).process(logits)
    for i, m in enumerate(masses):
        expected = logits[i] if m is None else reference(TypicalLogitsWarper(m), logits[i])
        assert_same_filtering(processed[i], expected)
    assert torch.equal(processed[2], logits[2])
    assert torch.equal(processed[-1], logits[-1])


def test_repetition_penalty_per_row_applies_to_greedy_rows_too():
    penalties = [1.3, 0.8, 1.0, 2.0]
    histories = [[1, 2, 2, 5], [3, 60, 3], [1, 2, 3], [7]]
    params = [sampled(repetition_penalty=penalties[0]), SamplingParams(repetition_penalty=0.8)]
    params += [sampled(), SamplingParams(repetition_penalty=2.0)]
    logits = make_logits(len(params), seed=3)
    processed = batch(params).process(logits, histories)
    for i, (penalty, history) in enumerate(zip(penalties, histories)):
        processor = RepetitionPenaltyLogitsProcessor(penalty)
        assert torch.allclose(processed[i], reference(processor, logits[i], history))
    assert torch.equal(processed[2], logits[2])


def test_frequency_penalty_subtracts_penalty_times_count():
    histories = [[4, 4, 4, 9], [4, 9, 9], [4]]
    params = [sampled(frequency_penalty=0.5), SamplingParams(frequency_penalty=-1.5), sampled()]
    logits = make_logits(3, seed=4)
    processed = batch(params).process(logits, histories)
    expected = logits.clone()
    expected[0, 4] -= 0.5 * 3
    expected[0, 9] -= 0.5 * 1
    expected[1, 4] -= -1.5 * 1
    expected[1, 9] -= -1.5 * 2
    assert torch.allclose(processed, expected)


def test_all_processors_chained_match_transformers_order():
    kwargs = dict(
        repetition_penalty=1.2, temperature=0.8, top_k=20, top_p=0.9, typical_p=0.95
    )
    history = [1, 2, 3, 3, 10]
    params = [sampled(**kwargs), sampled(temperature=1.5, top_k=4), SamplingParams()]
    logits = make_logits(3, seed=5)
    processed = batch(params).process(logits, [history, [], []])
    chain = [
        RepetitionPenaltyLogitsProcessor(1.2),
        TemperatureLogitsWarper(0.8),
        TopKLogitsWarper(20),
        TopPLogitsWarper(0.9),
        TypicalLogitsWarper(0.95),
    ]
    expected = logits[0]
    for processor in chain:
        expected = reference(processor, expected, history)
    assert_same_filtering(processed[0], expected)
    second = reference(TopKLogitsWarper(4), reference(TemperatureLogitsWarper(1.5), logits[1]))
    assert_same_filtering(processed[1], second)


def test_greedy_rows_take_argmax_of_penalized_logits():
    logits = torch.zeros(1, VOCAB)
    logits[0, 3], logits[0, 5] = 2.0, 1.5
    out = batch([SamplingParams(repetition_penalty=2.0)])(logits, [[3]])
    assert out.next_ids.tolist() == [5]


def draw_sequence(params: SamplingParams, others: list[SamplingParams], steps: int = 30, device="cpu") -> list:
    """The row's tokens over `steps` steps, placed after `others` in the batch."""
    sampler = BatchSampler([RequestSampler(p) for p in others + [params]], device)
    tokens = []
    for step in range(steps):
        logits = make_logits(len(others) + 1, seed=100 + step)
        logits[-1] = make_logits(1, seed=step)[0]  # the row sees the same logits every run
        tokens.append(sampler(logits.to(device)).next_ids[-1].item())
    return tokens


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_alone_or_in_any_batch(device):
    params = sampled(seed=1234, temperature=1.3, top_k=30)
    alone = draw_sequence(params, [], device=device)
    others = [sampled(seed=7), SamplingParams(), sampled(seed=8, top_p=0.5)] + [sampled(seed=n) for n in range(40)]
    assert draw_sequence(params, others[:3], device=device) == alone
    assert draw_sequence(params, others[::-1], device=device) == alone  # 44 rows: several CPU chunks


def test_different_seeds_give_different_tokens():
    first = draw_sequence(sampled(seed=1, temperature=2.0), [])
    second = draw_sequence(sampled(seed=2, temperature=2.0), [])
    assert first != second


def test_sampled_tokens_are_never_filtered_ones():
    params = [sampled(seed=s, top_k=3) for s in range(4)]
    sampler = batch(params)
    for step in range(20):
        logits = make_logits(4, seed=step)
        out = sampler(logits)
        allowed = logits.topk(3, dim=-1).indices
        assert (allowed == out.next_ids[:, None]).any(dim=1).all()
        assert torch.isfinite(out.logprobs).all()


def test_top_k_of_one_samples_the_argmax():
    logits = make_logits(2, seed=9)
    out = batch([sampled(seed=3, top_k=1), sampled(seed=4, top_k=1)])(logits)
    assert torch.equal(out.next_ids, logits.argmax(dim=-1))
    assert torch.allclose(out.logprobs, torch.zeros(2))


@pytest.mark.parametrize("top_n", [1, 5])
def test_logprobs_and_top_n_come_from_the_processed_log_softmax(top_n):
    params = [sampled(seed=5, temperature=0.7, top_p=0.8), SamplingParams(), sampled(seed=6)]
    history = [[1, 2], [3], [4]]
    logits = make_logits(3, seed=10)
    sampler = batch(params)
    out = sampler(logits, history, top_n=top_n)
    logprobs = torch.log_softmax(sampler.process(logits, history), dim=-1)
    assert out.next_ids.shape == (3,) and out.next_ids.dtype == torch.long
    assert torch.allclose(out.logprobs, logprobs.gather(1, out.next_ids[:, None])[:, 0])
    assert out.top_ids.shape == out.top_logprobs.shape == (3, top_n)
    values, ids = logprobs.topk(top_n, dim=-1)
    assert torch.equal(out.top_ids, ids)
    assert torch.allclose(out.top_logprobs, values)
    assert torch.allclose(out.logprobs[1], torch.log_softmax(logits[1], dim=-1).max())


def openai_penalized(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """OpenAI's definition, token by token: mu[j] - c[j] * frequency - (c[j] > 0) * presence,
    c[j] = how often token j was generated so far (the prompt does not count)."""
    out = logits.clone()
    for token_id in set(generated):
        count = generated.count(token_id)
        out[token_id] -= count * frequency + (1.0 if count else 0.0) * presence
    return out


def test_presence_penalty_subtracts_once_per_generated_token_not_prompt_tokens():
    prompt, generated = [1, 2, 3, 3], [3, 5, 5, 5, 7]
    presences = [0.5, -1.5, 0.0, 2.0]
    rows = [RequestSampler(SamplingParams(presence_penalty=p), prompt_len=len(prompt)) for p in presences]
    rows.append(RequestSampler(sampled(presence_penalty=1.0), prompt_len=len(prompt)))
    logits = make_logits(len(rows))
    processed = BatchSampler(rows, "cpu").process(logits, [prompt + generated] * len(rows))
    for i, presence in enumerate(presences + [1.0]):  # the sampled row's temperature is 1.0
        expected = openai_penalized(logits[i], generated, presence, 0.0)
        assert torch.allclose(processed[i], expected), i
    assert torch.allclose(processed[0, 1], logits[0, 1])  # a prompt-only token is not penalized
    assert torch.allclose(processed[0, 5], logits[0, 5] - 0.5)  # generated three times: once


def test_generated_frequency_penalty_counts_only_generated_tokens():
    prompt, generated = [5, 5, 9], [5, 7, 7, 7]
    params = [(0.0, 0.7), (0.4, -0.3), (1.0, 2.0)]
    rows = [RequestSampler(SamplingParams(presence_penalty=p, generated_frequency_penalty=f), prompt_len=len(prompt))
            for p, f in params]
    logits = make_logits(len(rows))
    sampler = BatchSampler(rows, "cpu")
    assert sampler.frequency is None  # TGI's frequency penalty (prompt included) stays off
    processed = sampler.process(logits, [prompt + generated] * len(rows))
    for i, (presence, frequency) in enumerate(params):
        assert torch.allclose(processed[i], openai_penalized(logits[i], generated, presence, frequency))
    assert torch.allclose(processed[0, 9], logits[0, 9])


def test_openai_penalties_are_off_unless_a_row_asks():
    sampler = batch([SamplingParams(), sampled()])
    assert sampler.presence is None and sampler.generated_frequency is None and sampler.logit_bias is None
    assert not sampler.needs_history


def test_logit_bias_adds_each_rows_own_biases_and_steers_greedy_rows():
    logits = make_logits(3)
    worst = int(logits[0].argmin())
    params = [
        SamplingParams(logit_bias=((worst, 100.0),)),
        SamplingParams(logit_bias=((1, -2.5), (4, 3.0), (VOCAB + 7, 50.0))),  # an id past the vocabulary: skipped
        SamplingParams(),
    ]
    sampler = batch(params)
    processed = sampler.process(logits)
    expected = logits.clone()
    expected[0, worst] += 100.0
    expected[1, 1] -= 2.5
    expected[1, 4] += 3.0
    assert torch.allclose(processed, expected)
    assert int(sampler(logits).next_ids[0]) == worst  # OpenAI: +100 makes the token the only choice


def test_logit_bias_of_minus_100_bans_a_token_from_sampling():
    logits = torch.zeros(1, VOCAB)
    banned = tuple((i, -100.0) for i in range(VOCAB) if i != 3)
    sampler = batch([sampled(seed=5, logit_bias=banned)])
    draws = {int(sampler(logits).next_ids[0]) for _ in range(20)}
    assert draws == {3}


@pytest.mark.parametrize("kwargs", [{"presence_penalty": 2.5}, {"generated_frequency_penalty": -2.1},
                                    {"logit_bias": ((1, 101.0),)}, {"logit_bias": ((-1, 1.0),)}])
def test_openai_settings_out_of_range_are_refused(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_seeded_numbers_are_a_function_of_seed_and_draw_only():
    """The counter-based uniform on tensors equals its Python reference, for 64-bit seeds too."""
    from engine.seeded_noise import split_seed, uniform, uniform_reference

    seeds = [0, 1, 42, 2**32 + 5, 2**64 - 1]
    halves = torch.tensor([split_seed(s) for s in seeds])
    for draw in (0, 1, 7, 10_000):
        values = uniform(halves[:, 0], halves[:, 1], torch.full((len(seeds),), draw)).tolist()
        assert values == [uniform_reference(s, draw) for s in seeds]
        assert all(0.0 <= v < 1.0 for v in values)
    assert len({uniform_reference(s, d) for s in range(50) for d in range(50)}) > 2490  # no obvious collisions


def test_draws_follow_the_processed_distribution():
    """Over many seeds, a row's first draw lands on each token as often as its probability says."""
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, float("-inf")]]).repeat(2000, 1)
    rows = [RequestSampler(sampled(seed=s)) for s in range(2000)]
    drawn = BatchSampler(rows, "cpu")(logits).next_ids
    observed = torch.bincount(drawn, minlength=5).float() / len(rows)
    expected = torch.softmax(logits[0], dim=-1)
    assert observed[4] == 0  # a filtered token is never drawn
    assert torch.allclose(observed, expected, atol=0.03)


def test_penalty_counts_kept_on_the_device_equal_a_rebuild_from_history():
    """The sampler counts the tokens it samples in place: its processed logits at every step equal
    those of a sampler rebuilt from the whole history."""
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.3),
              sampled(seed=3, presence_penalty=0.8, generated_frequency_penalty=0.4), SamplingParams()]
    history = [[1, 2, 3], [4, 4], [5]]
    kept = BatchSampler([RequestSampler(p, prompt_len=len(h)) for p, h in zip(params, history)], "cpu")
    for step in range(12):
        logits = make_logits(3, seed=50 + step)
        fresh = BatchSampler([RequestSampler(p, prompt_len=len(h)) for p, h in zip(params, [[1, 2, 3], [4, 4], [5]])],
                             "cpu")
        expected = fresh.process(logits, history)
        assert torch.allclose(kept.process(logits, history), expected), step
        tokens = kept(logits, history).next_ids.tolist()
        history = [h + [t] for h, t in zip(history, tokens)]


@pytest.mark.parametrize("vocab", [64, 49152, 1000, 37])
def test_blocked_argmax_is_the_first_maximum(vocab):
    from engine.draw import first_argmax

    scores = torch.randn(6, vocab, generator=torch.Generator().manual_seed(vocab))
    scores[1, :] = 0.0  # all tied: the first
    scores[2, vocab // 3] = scores[2, vocab - 1] = 50.0  # two maxima in different blocks
    assert torch.equal(first_argmax(scores), scores.argmax(dim=-1))


@pytest.mark.parametrize("device", DEVICES)
def test_a_draw_never_lands_on_a_weightless_token(device):
    from engine.draw import draw, summarize

    probs = torch.zeros(5, 64)
    probs[0, 0] = 1.0  # only the first
    probs[1, 63] = 1.0  # only the last (the last block)
    probs[2, [5, 40]] = torch.tensor([1e-30, 1.0])
    probs[3, 31:33] = 0.5  # across a block boundary
    probs[4] = torch.rand(64, generator=torch.Generator().manual_seed(0))
    summary = summarize(probs.log().to(device))  # weights exp(log p - max): p up to a factor per row

    def drawn(rows: list[int], u: float) -> list[int]:
        as_tensor = torch.tensor(rows, device=device)
        return draw(summary, as_tensor, torch.full((len(rows),), u, device=device)).tolist()

    for u in (0.0, 0.3, 0.5, 1 - 2**-24):
        ids = drawn([0, 1, 2, 3, 4], u)
        assert all(probs[row, token] > 0 for row, token in enumerate(ids)), u
    assert drawn([3], 0.49) == [31]
    assert drawn([3], 0.51) == [32]
    expected = torch.searchsorted(probs[4].cumsum(0), torch.tensor([0.37]) * probs[4].sum(), right=True)
    assert drawn([4], 0.37) == expected.tolist()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("vocab", [49152, 1000, 37])
def test_the_summary_pass_gives_log_softmax_and_argmax_over_many_row_chunks(vocab, device):
    """The CPU pass works a few rows at a time: 40 rows of 49k span several chunks (one on a GPU)."""
    from engine.draw import summarize

    scores = (torch.randn(40, vocab, generator=torch.Generator().manual_seed(1)) * 4).to(device)
    scale = torch.linspace(0.5, 2.0, 40, device=device).unsqueeze(1)
    for row_scale in (None, scale):
        summary = summarize(scores, row_scale)
        expected = torch.log_softmax(scores if row_scale is None else scores * row_scale, dim=-1)
        assert torch.allclose(summary.log_probability(scores), expected, atol=1e-4)
        assert torch.equal(summary.argmax, scores.argmax(dim=-1))


def test_a_deferred_temperature_draws_what_the_tempered_logits_draw():
    """Without top-p/typical-p the temperature is applied in the summary pass, not to the logits:
    the same tokens and logprobs as tempering first."""
    from engine.draw import draw, summarize

    scores = torch.randn(6, 4096, generator=torch.Generator().manual_seed(2)) * 3
    temperature = torch.tensor([0.3, 0.7, 1.0, 1.3, 2.0, 5.0]).unsqueeze(1)
    rows, uniforms = torch.arange(6), torch.rand(6, generator=torch.Generator().manual_seed(3))
    deferred, tempered = summarize(scores, 1 / temperature), summarize(scores / temperature)
    ids = draw(deferred, rows, uniforms)
    assert torch.equal(ids, draw(tempered, rows, uniforms))
    picked = scores.gather(1, ids[:, None])
    assert torch.allclose(deferred.log_probability(picked), tempered.log_probability(picked / temperature),
                          atol=1e-5)
