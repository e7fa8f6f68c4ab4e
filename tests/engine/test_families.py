"""The slot path on each decoder-only family people serve with transformers, and the generic
path for any other: a staggered batch gives every greedy request what `generate` gives it alone."""
from __future__ import annotations

import logging
import threading

import pytest
import torch
import transformers

from engine.engine import Engine
from engine.generic_runner import GenericRunner
from engine.model_runner import ModelRunner
from engine.params import GenerationRequest, StoppingParams
from engine.scheduler import SchedulerConfig

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             max_position_embeddings=512, initializer_range=0.5)
FAMILIES = {
    "llama": (transformers.LlamaConfig, dict(num_key_value_heads=2)),
    "mistral": (transformers.MistralConfig, dict(num_key_value_heads=2, sliding_window=4096)),
    "qwen2": (transformers.Qwen2Config, dict(num_key_value_heads=2)),
    "qwen3": (transformers.Qwen3Config, dict(num_key_value_heads=2, head_dim=16)),
    "gemma": (transformers.GemmaConfig, dict(num_key_value_heads=1, head_dim=16)),
    "phi": (transformers.PhiConfig, dict(num_key_value_heads=4)),
    "phi3": (transformers.Phi3Config, dict(num_key_value_heads=2, pad_token_id=0)),
}
PROMPTS = [[5, 17, 33, 2, 90, 41, 7], [12], [250, 3, 3, 3, 199, 64, 8, 21, 14, 77, 150, 16, 1], [9, 8]]


class IdTokenizer:
    """Enough of a tokenizer for the engine: token ids stand for themselves."""

    all_special_ids: list[int] = []
    eos_token_id = None

    def decode(self, ids, **_):
        return "".join(f"<{i}>" for i in ids)


def build(config_class, extra) -> torch.nn.Module:
    torch.manual_seed(0)
    config = config_class(**SMALL, **extra)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()


def alone(model, prompt, n) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def engine_tokens(model, budgets) -> dict[int, list[int]]:
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    engine = Engine(model, IdTokenizer(), SchedulerConfig(max_batch_size=4, max_batch_prefill_tokens=8,
                                                          max_total_tokens=128)).start()
    results = {}

    def run(n):
        req = GenerationRequest(f"r{n}", tuple(PROMPTS[n]), stopping=StoppingParams(budgets[n], ignore_eos=True))
        results[n] = [e.token.id for e in engine.submit(req)]

    try:
        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(PROMPTS))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        engine.stop()
    return results, engine


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_slot_path_equals_generate(family):
    model = build(*FAMILIES[family])
    budgets = [9, 14, 5, 11]
    expected = {n: alone(model, PROMPTS[n], budgets[n]) for n in range(len(PROMPTS))}
    results, engine = engine_tokens(model, budgets)
    assert isinstance(engine.runner, ModelRunner)
    assert results == expected


def test_other_architectures_run_on_the_generic_path(caplog):
    model = build(transformers.GPT2Config, dict(n_embd=64, n_layer=2, n_head=4, n_positions=512))
    budgets = [6, 8, 4, 7]
    expected = {n: alone(model, PROMPTS[n], budgets[n]) for n in range(len(PROMPTS))}
    with caplog.at_level(logging.WARNING, logger="engine.engine"):
        results, engine = engine_tokens(model, budgets)
    assert isinstance(engine.runner, GenericRunner)
    assert "generic" in caplog.text
    assert results == expected
