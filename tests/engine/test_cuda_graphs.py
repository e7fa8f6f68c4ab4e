"""Decode steps replayed from CUDA graphs give the tokens of the eager step (CUDA only)."""
from __future__ import annotations

import pytest
import torch
import transformers

from tests.engine.test_families import FAMILIES, PROMPTS, SMALL, IdTokenizer, alone
from engine.engine import Engine
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def build_on_cuda(dtype=torch.float32):
    config_class, extra = FAMILIES["llama"]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config_class(**SMALL, **extra), attn_implementation="sdpa")
    model.generation_config.eos_token_id = model.config.eos_token_id = None
    return model.to("cuda", dtype).eval()


def run(model, cuda_graphs: bool, requests: list[GenerationRequest]) -> tuple[list[list[int]], Engine]:
    engine = Engine(model, IdTokenizer(), SchedulerConfig(max_batch_size=8, max_total_tokens=512),
                    cuda_graphs=cuda_graphs).start()
    try:
        streams = [engine.submit(r) for r in requests]
        return [[e.token.id for e in s] for s in streams], engine
    finally:
        engine.stop()


def requests() -> list[GenerationRequest]:
    out = []
    for n in range(7):  # 7 rows: replayed in the graph of 8 with a padding row
        sampling = SamplingParams(do_sample=True, seed=n, temperature=0.7, top_k=50) if n % 3 == 0 else SamplingParams()
        out.append(GenerationRequest(f"g{n}", tuple(PROMPTS[n % 4]), sampling, StoppingParams(20 + 5 * n, ignore_eos=True)))
    return out


def test_graph_replay_gives_the_eager_tokens():
    model = build_on_cuda()
    eager, eager_engine = run(model, False, requests())
    graphed, engine = run(model, True, requests())
    assert eager_engine.stats().cuda_graphs == 0
    assert engine.stats().cuda_graphs > 0 and engine.stats().graph_capture_seconds > 0
    assert graphed == eager


def test_graph_replay_equals_generate_for_a_lone_request():
    model = build_on_cuda()
    req = GenerationRequest("lone", tuple(PROMPTS[0]), stopping=StoppingParams(40, ignore_eos=True))
    (tokens,), _ = run(model, True, [req])
    assert tokens == alone(model.cpu(), PROMPTS[0], 40)


def test_graph_replay_keeps_the_prefix_cache_of_free_slots():
    """Padding rows of a replayed graph run over free slots, which hold cached prefixes: they must
    write where no cached position is. Five requests finish and stay cached; three long ones then
    decode in the graph of 4 (a padding row over slot 3); then every cached prompt is sent again
    with another ending, reusing the cache: the tokens equal the eager engine's and each alone."""
    model = build_on_cuda()
    shared = [tuple(range(10 + 7 * n, 50 + 7 * n)) for n in range(5)]  # 40 tokens each, distinct
    first = [GenerationRequest(f"c{n}", p, stopping=StoppingParams(3, ignore_eos=True)) for n, p in enumerate(shared)]
    long = [GenerationRequest(f"l{n}", tuple(PROMPTS[n]), stopping=StoppingParams(60, ignore_eos=True)) for n in range(3)]
    again = [GenerationRequest(f"a{n}", p + (7, 8), stopping=StoppingParams(10, ignore_eos=True)) for n, p in enumerate(shared)]

    def three_waves(cuda_graphs: bool):
        engine = Engine(model, IdTokenizer(), SchedulerConfig(max_batch_size=8, max_total_tokens=512),
                        cuda_graphs=cuda_graphs).start()
        try:
            waves = []
            for wave in (first, long, again):
                streams = [engine.submit(r) for r in wave]
                waves.append([[e.token.id for e in s] for s in streams])
            return waves, engine.stats()
        finally:
            engine.stop()

    eager, _ = three_waves(False)
    graphed, stats = three_waves(True)
    assert stats.cuda_graphs > 0 and stats.prefix_hit_tokens > 0
    assert graphed == eager
    assert graphed[2] == [alone(model.cpu(), list(r.input_ids), 10) for r in again]


def test_graph_replay_with_lora_adapters_gives_the_eager_tokens():
    """Rows on two LoRA adapters and on none, replayed from graphs (each row's adapter index in
    the graphs' static buffer, the gathered kernel), give the tokens of the eager grouped steps."""
    from engine.lora_files import LoraAdapter, LoraWeights

    model = build_on_cuda()
    generator = torch.Generator().manual_seed(5)
    adapters = []
    for name in ("a", "b"):
        modules = {}
        for module_name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and module_name.rsplit(".", 1)[-1] in ("q_proj", "v_proj", "down_proj"):
                modules[module_name] = LoraWeights(torch.randn(8, module.in_features, generator=generator) * 0.3,
                                                   torch.randn(module.out_features, 8, generator=generator) * 0.3, 2.0)
        adapters.append(LoraAdapter(name, modules))
    names = [None, "a", "b", "a", None, "b", "b"]
    lora_requests = [GenerationRequest(f"l{n}", tuple(PROMPTS[n % 4]), stopping=StoppingParams(16 + 3 * n, ignore_eos=True),
                                       adapter=names[n]) for n in range(7)]
    results = {}
    for graphs in (False, True):
        engine = Engine(model, IdTokenizer(), SchedulerConfig(max_batch_size=8, max_total_tokens=512),
                        cuda_graphs=graphs, adapters=adapters).start()
        try:
            streams = [engine.submit(r) for r in lora_requests]
            results[graphs] = [[e.token.id for e in s] for s in streams]
            assert (engine.stats().cuda_graphs > 0) == graphs
        finally:
            engine.stop()
            engine.runner.lora.remove()
    assert results[True] == results[False]
