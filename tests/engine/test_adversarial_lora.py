"""Adversarial: an adapter on an untied lm_head, in batches mixing it with base rows while long
prompts are prefilled in chunks, rows asking for their prompt's logprobs (every position's
logits kept, not only the last) and alternatives: each row's tokens, logprobs and prompt
logprobs are its solo run's, and peft's merged model's."""
from __future__ import annotations

import pytest
import torch

from engine.engine import Engine
from engine.lora_files import load_adapter
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig
from tests.engine.test_lora import base  # noqa: F401 (fixture)
from tests.lora_adapters import build_adapter, merged_model

TEXTS = ["The capital of France is a city of many bridges and", "Hello", "Numbers: 0 1 2 3 4 5 6 7 8 9",
         "Once upon a time"]


def req(tokenizer, rid, text, adapter, details):
    return GenerationRequest(rid, tuple(tokenizer(text).input_ids), SamplingParams(),
                             StoppingParams(max_new_tokens=5, ignore_eos=True), adapter=adapter,
                             top_n_tokens=3 if details else 0, prefill_logprobs=details,
                             prefill_top_n_tokens=2 if details else 0)


def seen(stream):
    events = list(stream)
    first = events[0]
    prompt = [(t.id, None if t.logprob is None else round(t.logprob, 3)) for t in first.prefill or ()]
    prompt_top = [[t.id for t in alts] for alts in first.prefill_top_tokens or ()]
    return ([(e.token.id, round(e.token.logprob, 3), tuple(t.id for t in e.top_tokens)) for e in events],
            prompt, prompt_top)


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("prefill_budget", [3, 7, 4096])
def test_lm_head_adapter_rows_beside_base_rows_with_prompt_logprobs_are_their_solo_runs(base, tiny_model_dir,
                                                                                       tmp_path, overlap,
                                                                                       prefill_budget):
    model, tokenizer = base
    directory = build_adapter(tiny_model_dir, tmp_path / "head", seed=5, targets=["q_proj", "lm_head"])
    adapter = load_adapter("head", directory, model)
    config = SchedulerConfig(max_batch_size=8, max_batch_total_tokens=8 * 128, max_total_tokens=128,
                             max_batch_prefill_tokens=prefill_budget)
    requests = [req(tokenizer, f"r{n}", text, name, details)
                for n, (text, name, details) in enumerate(
                    (t, a, d) for t in TEXTS for a in (None, "head") for d in (False, True))]
    engine = Engine(model, tokenizer, config, adapters=[adapter], overlap=overlap)
    try:
        solo = {}
        for r in requests:
            stream = engine.submit(r)
            while not stream.wait(0) or engine.scheduler.has_work:
                engine.step()
            solo[r.request_id] = seen(stream)
        streams = {r.request_id: engine.submit(r) for r in requests}
        while not all(s.wait(0) for s in streams.values()) or engine.scheduler.has_work:
            engine.step()
        assert {rid: seen(s) for rid, s in streams.items()} == solo
    finally:
        engine.runner.lora.remove()
    # The solo runs are peft's: the adapter rows' prompt logprobs from the merged model.
    merged = merged_model(tiny_model_dir, directory)
    for r in requests:
        if r.adapter is None or not r.prefill_logprobs:
            continue
        ids = torch.tensor([r.input_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(merged(ids).logits[0].float(), -1)
        want = [round(logprobs[i - 1, t].item(), 3) for i, t in enumerate(r.input_ids) if i > 0]
        got = [lp for _id, lp in solo[r.request_id][1][1:]]
        assert got == pytest.approx(want, abs=2e-3)
        assert solo[r.request_id][0][0][0] == int(logprobs[-1].argmax())
