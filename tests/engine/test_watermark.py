"""TGI's watermark: the sampler biases the green lists of watermarked rows only, as TGI's
processor does row by row, and the detector tells watermarked text from plain text."""
from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.sampling import BatchSampler, RequestSampler
from engine.scheduler import SchedulerConfig
from engine.watermark import Watermark, green_ids, z_score

VOCAB = 300


def tgi_watermark(previous_token: int, scores: torch.Tensor, gamma: float = 0.5, delta: float = 2.0) -> torch.Tensor:
    """TGI's WatermarkLogitsProcessor on one row, as text_generation_server writes it."""
    rng = torch.Generator(device="cpu")
    rng.manual_seed(15485863 * previous_token)
    greenlist = torch.randperm(scores.shape[-1], device="cpu", generator=rng)[: int(scores.shape[-1] * gamma)]
    mask = torch.zeros_like(scores)
    mask[greenlist] = 1
    out = scores.clone()
    out[mask.bool()] = out[mask.bool()] + delta
    return out


def test_only_watermarked_rows_get_tgis_green_list_bias():
    params = [SamplingParams(watermark=True), SamplingParams(),
              SamplingParams(do_sample=True, seed=3, watermark=True), SamplingParams(do_sample=True, seed=4)]
    histories = [[5, 17], [5, 17], [9, 250], [9, 250]]
    logits = torch.randn(4, VOCAB, generator=torch.Generator().manual_seed(0))
    processed = BatchSampler([RequestSampler(p) for p in params]).process(logits, histories)
    assert torch.allclose(processed[0], tgi_watermark(17, logits[0]))
    assert torch.allclose(processed[2], tgi_watermark(250, logits[2]))
    assert torch.equal(processed[1], logits[1]) and torch.equal(processed[3], logits[3])


def test_gamma_and_delta_are_the_engines():
    watermark = Watermark(gamma=0.25, delta=5.0)
    logits = torch.zeros(1, VOCAB)
    processed = BatchSampler([RequestSampler(SamplingParams(watermark=True))], watermark=watermark).process(logits, [[42]])
    green = processed[0] == 5.0
    assert green.sum() == int(VOCAB * 0.25) and torch.equal(green.nonzero().flatten().sort().values,
                                                             green_ids(42, VOCAB, 0.25).sort().values)
    assert torch.equal(processed[0], tgi_watermark(42, logits[0], gamma=0.25, delta=5.0))


def test_a_greedy_watermarked_row_takes_the_argmax_of_the_biased_logits():
    logits = torch.zeros(1, VOCAB)
    logits[0, 0] = 1.0  # best by 1 unless the watermark lifts others by 2
    out = BatchSampler([RequestSampler(SamplingParams(watermark=True))]).__call__(logits, [[7]])
    green = set(green_ids(7, VOCAB, 0.5).tolist())
    assert out.next_ids.item() in green and (0 in green) == (out.next_ids.item() == 0)


@pytest.mark.parametrize("gamma, delta", [(0.0, 2.0), (1.0, 2.0), (0.5, -1.0), (0.5, float("nan"))])
def test_out_of_range_settings_are_refused(gamma, delta):
    with pytest.raises(ValueError):
        Watermark(gamma, delta)


def test_the_detector_counts_green_successors():
    gamma, vocab = 0.5, VOCAB
    tokens = [11]
    for _ in range(60):  # every token green after its predecessor: the strongest watermark
        tokens.append(int(green_ids(tokens[-1], vocab, gamma)[0]))
    score = z_score(tokens, vocab, gamma)
    assert (score.scored, score.green) == (60, 60) and score.z == pytest.approx(60 ** 0.5)
    assert z_score([3], vocab).scored == 0 and z_score([3], vocab).z == 0.0


def test_sampled_text_scores_high_only_when_watermarked(tiny_reference):
    model, tokenizer = tiny_reference.model, tiny_reference.tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig()).start()
    prompt = tuple(tokenizer("The capital of France is").input_ids)
    try:
        streams = {(watermark, seed): engine.submit(GenerationRequest(
            f"{watermark}-{seed}", prompt, SamplingParams(do_sample=True, seed=seed, watermark=watermark),
            StoppingParams(100, ignore_eos=True))) for watermark in (True, False) for seed in (1, 2)}
        scores = {key: z_score([prompt[-1]] + [e.token.id for e in stream], model.config.vocab_size).z
                  for key, stream in streams.items()}
    finally:
        engine.stop()
    assert all(scores[(True, seed)] > 4 for seed in (1, 2)), scores
    assert all(scores[(False, seed)] < 2 for seed in (1, 2)), scores


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
def test_green_lists_kept_on_the_device_are_tgis_and_each_is_drawn_once_while_kept(device, monkeypatch):
    """Three rows of lists for a run of previous tokens (repeats, a token twice in one step, the
    least recently used evicted): every list read is the one drawn from the token itself, and a
    token's list is drawn again only after it was evicted. On CUDA the lookups never make the
    host wait for the device (scripts/gpu_check.sh)."""
    import engine.watermark as watermark_module

    drawn = []
    draw = watermark_module.green_mask
    monkeypatch.setattr(watermark_module, "green_mask", lambda token, *args: drawn.append(token) or draw(token, *args))
    lists = watermark_module.GreenLists(VOCAB, 0.5, torch.device(device), capacity=3)
    steps = [[5, 9], [9, 5], [7, 7, 5], [11], [9, 5], [7]]
    if device == "cuda":
        torch.cuda.set_sync_debug_mode("error")
    try:
        masks = [lists.of(tokens) for tokens in steps]
    finally:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("default")
    for tokens, mask in zip(steps, masks):
        assert torch.equal(mask.cpu(), torch.stack([draw(t, VOCAB, 0.5) for t in tokens]))
    # 11 evicts 9 (least recent after step 3), then 9 evicts 7, then 7 evicts 11.
    assert drawn == [5, 9, 7, 11, 9, 7]


def test_a_step_with_more_distinct_previous_tokens_than_lists_kept_still_gets_each_rows_list():
    """A batch larger than the lists kept (max_batch_size may exceed it), every watermarked row
    after another previous token: the step must not fail (it would fail the whole batch), and
    every row reads its own token's list, also in the steps after."""
    from engine.watermark import GreenLists, green_mask

    lists = GreenLists(VOCAB, 0.5, torch.device("cpu"), capacity=3)
    for tokens in ([1, 2, 3, 4, 5], [5, 6], [2, 7, 8, 9, 1, 3]):
        assert torch.equal(lists.of(tokens), torch.stack([green_mask(t, VOCAB, 0.5) for t in tokens]))
