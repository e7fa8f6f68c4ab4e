"""Models whose RoPE changes with the sequence's length (Phi-3's longrope, dynamic NTK scaling):
transformers picks the factors from the longest position of the forward, so in one packed forward
a short request beside a long one would get the long one's factors. They run one request per
forward (the generic path, no CUDA graphs), so a short request batched with a long one gets
exactly its solo tokens."""
from __future__ import annotations

import logging

import pytest
import torch
import transformers

from engine.engine import Engine
from engine.generic_runner import GenericRunner
from engine.params import GenerationRequest, StoppingParams
from engine.scheduler import SchedulerConfig
from tests.engine.test_families import IdTokenizer, alone

ORIGINAL = 32  # the pretraining length: a long request passes it, a short one never does
SHORT, LONG = [5, 17, 33, 2, 90], [(7 * i) % 290 + 3 for i in range(48)]
MODELS = {
    "phi3-longrope": (transformers.Phi3Config, dict(
        num_key_value_heads=2, pad_token_id=0, max_position_embeddings=256, original_max_position_embeddings=ORIGINAL,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
                         "long_factor": [1.0 + 3 * i for i in range(8)],
                         "original_max_position_embeddings": ORIGINAL})),
    "llama-dynamic": (transformers.LlamaConfig, dict(
        num_key_value_heads=2, max_position_embeddings=ORIGINAL,
        rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 8.0})),
}


def build(name: str):
    config_class, extra = MODELS[name]
    torch.manual_seed(0)
    config = config_class(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, initializer_range=0.5, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").eval()
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    return model


@pytest.mark.parametrize("name", sorted(MODELS))
def test_a_short_request_batched_with_a_long_one_gets_its_solo_tokens(name, caplog):
    model = build(name)
    expected = {"short": alone(model, SHORT, 10), "long": alone(model, LONG, 24)}
    with caplog.at_level(logging.WARNING, logger="engine.engine"):
        engine = Engine(model, IdTokenizer(), SchedulerConfig(max_batch_size=4, max_total_tokens=128))
    assert isinstance(engine.runner, GenericRunner) and engine.runner.graphs is None
    assert "RoPE" in caplog.text and "changes with each sequence's length" in caplog.text
    # Both queued before the loop starts: they are admitted together and share every step.
    streams = {"short": engine.submit(GenerationRequest("short", tuple(SHORT), stopping=StoppingParams(10, ignore_eos=True))),
               "long": engine.submit(GenerationRequest("long", tuple(LONG), stopping=StoppingParams(24, ignore_eos=True)))}
    engine.start()
    try:
        got = {name: [event.token.id for event in stream] for name, stream in streams.items()}
    finally:
        engine.stop()
    assert got == expected
