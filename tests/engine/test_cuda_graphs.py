"""Decode steps replayed from CUDA graphs give the tokens of the eager step (CUDA only)."""
from __future__ import annotations

import pytest
import torch
import transformers

from tests.engine.test_families import FAMILIES, PROMPTS, SMALL, IdTokenizer, alone
from engine.engine import Engine
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig
from bench.graph_anchor import anchor_generate

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


def lockstep(model, requests: list[GenerationRequest], configurations: list[dict]) -> list[dict]:
    """Engines stepped by hand, one step each in turn, all requests submitted before the first
    step: every engine sees the same batches (no thread decides when a request joins). Per
    engine: its tokens, each decode step's input ids and logits [rows, V] float32, and how many
    steps ran ahead (overlapped)."""
    runs = []
    for options in configurations:
        engine = Engine(model, IdTokenizer(), SchedulerConfig(max_batch_size=8, max_total_tokens=512), **options)
        if engine.runner.graphs is not None:
            engine.runner.graphs.capture()
        run = {"engine": engine, "steps": [], "ahead": 0, "streams": [engine.submit(r) for r in requests]}
        forward = engine.runner.forward

        def spy(batch, forward=forward, run=run, steps=run["steps"]):
            out = forward(batch)
            run["ahead"] += isinstance(batch.decode_ids, torch.Tensor)  # fed the previous step's device ids
            if not batch.prefill:
                ids = batch.decode_ids.tolist() if isinstance(batch.decode_ids, torch.Tensor) else list(batch.decode_ids)
                steps.append((ids, out.decode_logits.float().clone()))
            return out

        engine.runner.forward = spy
        runs.append(run)
    for _ in range(1000):
        if all(s.wait(0) for run in runs for s in run["streams"]):
            break
        for run in runs:
            run["engine"].step()
    for run in runs:
        run["tokens"] = [[e.token.id for e in s] for s in run["streams"]]
    return runs


def requests() -> list[GenerationRequest]:
    out = []
    for n in range(7):  # 7 rows: replayed in the graph of 8 with a padding row
        sampling = SamplingParams(do_sample=True, seed=n, temperature=0.7, top_k=50) if n % 3 == 0 else SamplingParams()
        out.append(GenerationRequest(f"g{n}", tuple(PROMPTS[n % 4]), sampling, StoppingParams(20 + 5 * n, ignore_eos=True)))
    return out


def test_graph_replay_gives_the_eager_tokens():
    """Overlapped graph replays (ids fed from the device) against the synchronous eager step."""
    model = build_on_cuda()
    eager, graphed = lockstep(model, requests(), [dict(cuda_graphs=False, overlap=False),
                                                 dict(cuda_graphs=True, overlap=True)])
    assert eager["engine"].stats().cuda_graphs == 0
    assert graphed["engine"].stats().cuda_graphs > 0
    assert graphed["tokens"] == eager["tokens"]
    assert eager["ahead"] == 0 and graphed["ahead"] > 20


def test_bf16_graph_replay_matches_the_eager_step():
    """The served path (bf16): every decode step's graph logits against the eager step's, row by
    row while the two runs have fed a row the same tokens; a token may differ only where the
    eager step's two best logits were within bf16's error of each other."""
    model = build_on_cuda(torch.bfloat16)
    greedy = [GenerationRequest(f"b{n}", tuple(PROMPTS[2][: 3 + n]), stopping=StoppingParams(40, ignore_eos=True))
              for n in range(8)]  # 8 rows: the graph of 8, no padding row
    eager, graphed = lockstep(model, greedy, [dict(cuda_graphs=False, overlap=False),
                                             dict(cuda_graphs=True, overlap=True)])
    assert graphed["engine"].stats().cuda_graphs > 0
    same, compared = [True] * len(greedy), 0
    for (eager_ids, eager_logits), (graph_ids, graph_logits) in zip(eager["steps"], graphed["steps"]):
        scale = eager_logits.abs().max().item()
        for row in range(len(eager_ids)):
            same[row] = same[row] and eager_ids[row] == graph_ids[row]
            if not same[row]:
                continue
            compared += 1
            difference = (graph_logits[row] - eager_logits[row]).abs().max().item()
            assert difference <= 0.02 * scale + 1e-2, (row, difference, scale)
            top2 = eager_logits[row].topk(2).values
            if graph_logits[row].argmax() != eager_logits[row].argmax():
                assert (top2[0] - top2[1]).item() <= 2 * difference + 1e-3
    assert compared >= len(greedy) * len(eager["steps"]) // 2


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


def test_the_anchor_replays_give_the_tokens_of_generate_on_cuda():
    """The anchor's warm-up and capture write the first decode step's own key/value (on every
    transformers version), so its replayed tokens are `generate`'s."""
    model = build_on_cuda()
    prompts = [list(PROMPTS[0][:6]), list(PROMPTS[2][:6])]
    run = anchor_generate(model, prompts, 16)
    expected = model.generate(torch.tensor(prompts, device="cuda"), attention_mask=torch.ones(2, 6, dtype=torch.long,
                              device="cuda"), max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert run.tokens == expected[:, 6:].tolist()
    assert run.capture_seconds > 0 and run.decode_seconds > 0


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
