"""The benchmark's reference rows must be honest: the graph anchor decodes what `generate` does,
and the random-weights model directory loads and round-trips its tokens."""
from __future__ import annotations

import torch

from bench.graph_anchor import anchor_generate
from bench.random_model import word_tokenizer
from tests.engine.test_families import FAMILIES, build


def test_the_anchor_gives_the_greedy_tokens_of_generate():
    model = build(*FAMILIES["llama"])
    prompts = [[5, 17, 33, 2, 90, 4], [12, 13, 14, 15, 16, 200]]
    run = anchor_generate(model, prompts, 12)
    expected = model.generate(torch.tensor(prompts), attention_mask=torch.ones(2, 6, dtype=torch.long),
                              max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert run.tokens == expected[:, 6:].tolist()
    assert run.replayed_tokens == 2 * 11
    assert run.prefill_seconds > 0 and run.decode_seconds > 0


def test_the_word_tokenizer_covers_every_id():
    tokenizer = word_tokenizer(1000)
    ids = [0, 5, 999, 42]
    assert tokenizer(tokenizer.decode(ids)).input_ids == ids
