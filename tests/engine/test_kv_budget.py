"""The KV budget sets aside what the engine allocates besides the cache: a replica with 4 LoRA
adapters gets fewer slots than one without, by exactly what its adapter stacks take (LoraLayers'
own tensors are the oracle), and the budget says each part. Pure: checked on CPU with the free
memory given; on a GPU `affordable_slots` reads it from `torch.cuda.mem_get_info`."""
from __future__ import annotations

import pytest

from engine.kv_budget import MARGIN, kv_budget
from engine.lora import LoraLayers
from engine.lora_files import load_adapter
from tests.lora_adapters import build_adapter

GIB = 2**30


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


@pytest.fixture(scope="module")
def adapters(model, tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("budget-adapters")
    return [load_adapter(f"a{n}", build_adapter(tiny_model_dir, root / f"a{n}", seed=n, rank=4 * (n + 1)), model)
            for n in range(4)]


def test_four_adapters_take_their_stacks_out_of_the_kv_budget(model, adapters):
    free, slots, length = 1 * GIB // 64, 64, 1024
    plain = kv_budget(model, free, slots, length)
    with_adapters = kv_budget(model, free, slots, length, adapters)
    layers = LoraLayers(model, adapters)
    try:
        allocated = sum(p.a.nbytes + p.b.nbytes for p in layers.projections.values())
    finally:
        layers.remove()
    assert with_adapters.parts["LoRA stacks"] == allocated > 0
    assert "LoRA stacks" not in plain.parts
    assert plain.kv_bytes - with_adapters.kv_bytes == allocated
    assert with_adapters.kv_bytes == int((1 - MARGIN) * free) - sum(with_adapters.parts.values())
    assert with_adapters.slots == with_adapters.kv_bytes // with_adapters.slot_bytes < plain.slots
    line = with_adapters.describe()
    assert "LoRA stacks" in line and "sampler buffers" in line and f"{with_adapters.slots} slots" in line


def test_graphs_take_their_pool_out_of_the_budget(model):
    free, slots, length = GIB // 8, 8, 512
    eager, graphed = kv_budget(model, free, slots, length), kv_budget(model, free, slots, length, cuda_graphs=True)
    assert graphed.parts["CUDA graph pool"] > 0 and "CUDA graph pool" not in eager.parts
    assert eager.kv_bytes - graphed.kv_bytes == graphed.parts["CUDA graph pool"]


def test_a_budget_smaller_than_its_parts_holds_no_slot(model, adapters):
    budget = kv_budget(model, 4096, 8, 256, adapters)
    assert budget.kv_bytes == 0 and budget.slots == 0


@pytest.mark.parametrize("slots", [8, 1024])
def test_the_watermark_green_lists_are_counted_as_large_as_they_can_grow(model, slots):
    """A step whose every row asks for a watermark with a different previous token grows the lists
    to one per row (engine/watermark.py): the budget counts the larger of that and the lists kept."""
    import torch

    from engine.watermark import GreenLists

    vocab = model.config.vocab_size
    lists = GreenLists(vocab, 0.25, torch.device("cpu"))
    lists.of(list(range(slots)))  # one step, every slot a different previous token
    budget = kv_budget(model, GIB, slots, 256)
    assert budget.parts["watermark green lists"] == lists.masks.nbytes
    assert "watermark green lists" in budget.describe()


def test_a_verify_step_samples_k_plus_one_rows_per_slot_and_the_budget_counts_them(model):
    """With --speculate k, a verify step's sampler has one row per position (each slot's last
    token and its k drafts, engine/speculative.py verify_rows): its buffers are k + 1 times a
    plain step's, graphs or not."""
    free, slots, length, k = GIB // 4, 8, 256, 4
    plain, verifying = kv_budget(model, free, slots, length), kv_budget(model, free, slots, length, verify_drafts=k)
    assert verifying.parts["sampler buffers"] == (k + 1) * plain.parts["sampler buffers"]
    assert verifying.slots <= plain.slots
