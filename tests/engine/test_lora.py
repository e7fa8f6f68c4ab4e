"""LoRA adapters in the engine: each request under its adapter gives exactly what peft's merged
model gives, alone or in a batch mixing adapters and the base model."""
from __future__ import annotations

import json
import threading

import pytest
import torch

from engine.engine import Engine
from engine.lora import GroupedStep, LoraLayers, RowsStep, TokensStep, adapter_groups
from engine.lora_files import AdapterError, load_adapter
from engine.outputs import EngineError
from engine.params import GenerationRequest, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig
from tests.lora_adapters import build_adapter, greedy, merged_model

PROMPTS = ["The capital of France is", "Hello", "Once upon a time there was a queue, a worker and a stream",
           "Numbers: 0 1 2 3"]


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {name: build_adapter(tiny_model_dir, root / name, seed=seed) for name, seed in (("alpha", 1), ("beta", 2))}


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def expected(tiny_model_dir, adapter_dirs, base):
    """Greedy tokens of every prompt under the base model and under each adapter merged by peft."""
    _, tokenizer = base
    models = {None: base[0], **{name: merged_model(tiny_model_dir, d) for name, d in adapter_dirs.items()}}
    return {(name, text): greedy(model, tokenizer(text).input_ids, 10)
            for name, model in models.items() for text in PROMPTS}


@pytest.fixture(scope="module")
def lora_engine(base, adapter_dirs):
    model, tokenizer = base
    adapters = [load_adapter(name, d, model) for name, d in adapter_dirs.items()]
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=8, max_batch_total_tokens=8 * 256,
                                                      max_total_tokens=256), adapters=adapters).start()
    yield engine
    engine.stop()
    engine.runner.lora.remove()  # the module's model is shared with nothing else, but leave it clean


def req(tokenizer, rid, text, adapter=None, max_new_tokens=10):
    return GenerationRequest(rid, tuple(tokenizer(text).input_ids), SamplingParams(),
                             StoppingParams(max_new_tokens=max_new_tokens, ignore_eos=True), adapter=adapter)


def tokens(stream) -> list[int]:
    return [event.token.id for event in stream]


def test_adapters_change_the_output(expected):
    for text in PROMPTS:
        assert expected[("alpha", text)] != expected[(None, text)]
        assert expected[("beta", text)] != expected[("alpha", text)]


def test_each_adapter_alone_equals_peft_merged_generate(lora_engine, base, expected):
    tokenizer = base[1]
    for name in (None, "alpha", "beta"):
        for n, text in enumerate(PROMPTS):
            assert tokens(lora_engine.submit(req(tokenizer, f"{name}-{n}", text, name))) == expected[(name, text)]


def test_staggered_batch_on_two_adapters_and_the_base(lora_engine, base, expected):
    """Rows on alpha, beta and none join a running batch at different times; every row decodes
    in the same steps as the others and still gets exactly its own tokens."""
    tokenizer = base[1]
    names = [None, "alpha", "beta"]
    jobs = [(f"mix{n}", PROMPTS[n % len(PROMPTS)], names[n % 3]) for n in range(9)]
    results, steps_seen = {}, []
    stepped = threading.Condition()

    def run(rid, text, name, after_steps):
        # Row n joins once the engine has run n forwards: staggered by the engine's own steps, not
        # by the clock (a faster engine would finish a row before the next one came).
        with stepped:
            stepped.wait_for(lambda: len(steps_seen) >= after_steps, timeout=60)
        results[rid] = tokens(lora_engine.submit(req(tokenizer, rid, text, name)))

    lora = lora_engine.runner.lora
    own_tokens = lora.tokens

    def recording(token_adapters):  # which adapters each step's forward mixed
        with stepped:
            steps_seen.append(set(token_adapters))
            stepped.notify_all()
        return own_tokens(token_adapters)

    lora.tokens = recording
    threads = [threading.Thread(target=run, args=(*job, n)) for n, job in enumerate(jobs)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        del lora.tokens
    assert any(seen == {0, 1, 2} for seen in steps_seen)  # base, alpha and beta rows in one forward
    for rid, text, name in jobs:
        assert results[rid] == expected[(name, text)], (rid, name)


def test_unknown_adapter_is_refused_naming_the_known_ones(lora_engine, base):
    with pytest.raises(EngineError, match="unknown LoRA adapter 'gamma'; this replica serves: alpha, beta"):
        lora_engine.submit(req(base[1], "unknown", "Hello", "gamma"))


def test_rows_and_tokens_kernels_agree(base, adapter_dirs):
    """The gathered kernel (what CUDA graphs replay) and the grouped one (eager steps) add the
    same update, including for rows without an adapter and non-contiguous groups."""
    model, _ = base
    adapters = [load_adapter(name, d, model) for name, d in adapter_dirs.items()]
    layers = LoraLayers(model, adapters)
    try:
        module = model.model.layers[0].self_attn.q_proj
        stacked = layers._stack(module, "model.layers.0.self_attn.q_proj", adapters)
        x = torch.randn(7, module.in_features)
        index = [2, 0, 1, 1, 2, 0, 2]
        rows_out, tokens_out, grouped_out = (torch.zeros(7, module.out_features) for _ in range(3))
        groups = adapter_groups(index)
        assert groups == {2: [0, 4, 6], 1: [2, 3]} and GroupedStep.fits(groups)
        RowsStep(torch.tensor(index)).apply(x, rows_out, stacked)
        TokensStep(groups, torch.device("cpu")).apply(x, tokens_out, stacked)
        GroupedStep(groups, torch.device("cpu")).apply(x, grouped_out, stacked)  # adapter 1's group padded
        weights = adapters[0].modules["model.layers.0.self_attn.q_proj"]
        by_hand = x[2] @ weights.a.T @ weights.b.T * weights.scale
        torch.testing.assert_close(tokens_out, rows_out)
        torch.testing.assert_close(grouped_out, rows_out)
        torch.testing.assert_close(tokens_out[2], by_hand)
        assert tokens_out[1].abs().sum() == 0 and grouped_out[5].abs().sum() == 0
    finally:
        layers.remove()


def test_decode_forward_under_rows_index_matches_eager(base, adapter_dirs):
    """The decode step with a device-side adapter index (the CUDA graph path) gives the logits of
    the eager grouped path."""
    model, tokenizer = base
    adapters = [load_adapter(name, d, model) for name, d in adapter_dirs.items()]
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=4, max_batch_total_tokens=1024,
                                                      max_total_tokens=256), adapters=adapters)
    try:
        for n, name in enumerate([None, "alpha", "beta"]):
            engine.submit(req(tokenizer, f"r{n}", PROMPTS[n], name, max_new_tokens=4))
        engine.step()  # prefill all three
        runner = engine.runner
        ids = torch.tensor([5, 6, 7])
        positions = torch.tensor([s.kv_len for s in engine.scheduler.running])
        length = int(positions.max()) + 1
        with torch.inference_mode():
            with runner.lora.tokens([0, 1, 2]):
                eager = runner.decode_forward(ids, positions, length)
            gathered = runner.decode_forward(ids, positions, length, torch.tensor([0, 1, 2]))
        torch.testing.assert_close(gathered, eager, rtol=1e-4, atol=1e-4)
    finally:
        engine.runner.lora.remove()


def test_shapes_that_do_not_fit_name_the_module(base, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = base
    directory = build_adapter(tiny_model_dir, tmp_path / "wide", seed=3, targets=["q_proj"])
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"
    tensors[key] = torch.randn(8, 32)  # the base model's q_proj takes 64 inputs
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"LoRA adapter 'wide': module model\.layers\.1\.self_attn\.q_proj: "
                                           r"the adapter's shapes .* do not fit"):
        load_adapter("wide", directory, model)


def test_config_is_checked_against_the_model(base, tiny_model_dir, tmp_path):
    model, _ = base
    directory = build_adapter(tiny_model_dir, tmp_path / "a", seed=4, targets=["q_proj"])
    config_path = directory / "adapter_config.json"
    config = json.loads(config_path.read_text())
    for change, message in [({"r": 4}, "not rank 4"), ({"use_dora": True}, "DoRA"),
                            ({"target_modules": ["q_proj", "c_attn"]}, "'c_attn' matches no linear module"),
                            ({"target_modules": ["k_proj"]}, "is not in target_modules")]:
        config_path.write_text(json.dumps({**config, **change}))
        with pytest.raises(AdapterError, match=message):
            load_adapter("a", directory, model)
    with pytest.raises(AdapterError, match="not a PEFT LoRA adapter directory"):
        load_adapter("a", tmp_path, model)


def test_an_adapter_on_q_proj_and_lm_head_gives_peft_tokens_in_a_batch_with_base_rows(base, tiny_model_dir,
                                                                                      tmp_path):
    """lm_head sees only the kept logits rows: its adapter is applied per kept row. Rows on the
    adapter and on none, admitted together (every step mixes them, prompt chunks included), each
    get their solo tokens: peft's merged model's and the base model's."""
    model, tokenizer = base
    directory = build_adapter(tiny_model_dir, tmp_path / "head", seed=5, targets=["q_proj", "lm_head"])
    adapter = load_adapter("head", directory, model)
    assert "lm_head" in adapter.modules
    merged = merged_model(tiny_model_dir, directory)
    expected = {(name, text): greedy(merged if name else model, tokenizer(text).input_ids, 10)
                for name in (None, "head") for text in PROMPTS}
    assert all(expected[(None, text)] != expected[("head", text)] for text in PROMPTS)
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=8, max_batch_total_tokens=8 * 256,
                                                      max_total_tokens=256), adapters=[adapter])
    streams = {key: engine.submit(req(tokenizer, f"{key[0]}-{n}", key[1], key[0])) for n, key in enumerate(expected)}
    engine.start()  # after every submit: all are admitted in the first step and decode together
    try:
        assert {key: tokens(stream) for key, stream in streams.items()} == expected
    finally:
        engine.stop()
        engine.runner.lora.remove()


def test_lm_head_adapter_under_a_rows_index_matches_eager(base, tiny_model_dir, tmp_path):
    """The decode step a CUDA graph replays (one device index for every row, all rows kept) adds
    lm_head's update as the eager step does with its kept rows."""
    model, tokenizer = base
    adapter = load_adapter("head", build_adapter(tiny_model_dir, tmp_path / "head", seed=6,
                                                 targets=["q_proj", "lm_head"]), model)
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=4, max_batch_total_tokens=1024,
                                                      max_total_tokens=256), adapters=[adapter])
    try:
        for n, name in enumerate([None, "head", "head"]):
            engine.submit(req(tokenizer, f"r{n}", PROMPTS[n], name, max_new_tokens=4))
        engine.step()  # prefill all three
        runner = engine.runner
        ids = torch.tensor([5, 6, 7])
        positions = torch.tensor([s.kv_len for s in engine.scheduler.running])
        length = int(positions.max()) + 1
        with torch.inference_mode():
            with runner.lora.tokens([0, 1, 1]), runner.lora.kept_rows([0, 1, 1]):
                eager = runner.decode_forward(ids, positions, length)
            with runner.lora.tokens([0, 0, 0]), runner.lora.kept_rows([0, 0, 0]):
                plain = runner.decode_forward(ids, positions, length)
            gathered = runner.decode_forward(ids, positions, length, torch.tensor([0, 1, 1]))
        torch.testing.assert_close(gathered, eager, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gathered[0], plain[0], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(gathered[1:], plain[1:], rtol=1e-3, atol=1e-3)
    finally:
        engine.runner.lora.remove()


def test_lora_on_the_input_embeddings_or_a_tied_lm_head_is_refused_naming_the_module(base, tiny_model_dir,
                                                                                     tmp_path):
    """Refused at load in one line naming the adapter and the module, never a failed batch later."""
    from transformers import AutoModelForCausalLM

    model, _ = base
    directory = build_adapter(tiny_model_dir, tmp_path / "embed", seed=5, targets=["q_proj", "embed_tokens"])
    with pytest.raises(AdapterError) as refused:
        load_adapter("ft", directory, model)
    assert str(refused.value) == ("LoRA adapter 'ft': module model.embed_tokens: LoRA on the input embeddings is "
                                  "not supported (train the adapter without embed_tokens in target_modules)")
    tied = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tied.lm_head.weight = tied.model.embed_tokens.weight  # as a tie_word_embeddings model holds them
    directory = build_adapter(tiny_model_dir, tmp_path / "head", seed=5, targets=["q_proj", "lm_head"])
    with pytest.raises(AdapterError) as refused:
        load_adapter("ft", directory, tied)
    assert str(refused.value) == ("LoRA adapter 'ft': module lm_head: LoRA on an output projection tied to the input "
                                  "embeddings is not supported (train the adapter without lm_head in target_modules)")


def test_an_lm_head_adapter_saved_over_another_vocabulary_is_refused(base, tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    model, _ = base
    directory = build_adapter(tiny_model_dir, tmp_path / "head", seed=5, targets=["lm_head"])
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.base_layer.weight"] += 1.0  # trained (or resized) with the adapter
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    with pytest.raises(AdapterError, match=r"^LoRA adapter 'head': module lm_head: the adapter's saved base weight "
                                           r"is not this model's"):
        load_adapter("head", directory, model)


def test_a_prefix_computed_under_one_adapter_is_never_reused_under_another(lora_engine, base, tiny_model_dir,
                                                                            adapter_dirs):
    """The same long prompt under alpha, the base, beta, then alpha again: only the second alpha
    request reads cached KV, and every one gets its own model's tokens."""
    tokenizer = base[1]
    text = " ".join(PROMPTS) * 2  # several 16-token blocks
    ids = tokenizer(text).input_ids
    references = {None: base[0], **{name: merged_model(tiny_model_dir, d) for name, d in adapter_dirs.items()}}
    hits = []
    for n, name in enumerate(["alpha", None, "beta", "alpha"]):
        before = lora_engine.stats().prefix_hit_tokens
        got = tokens(lora_engine.submit(req(tokenizer, f"prefix{n}", text, name, max_new_tokens=6)))
        hits.append(lora_engine.stats().prefix_hit_tokens - before)
        assert got == greedy(references[name], ids, 6), name
    assert hits[:3] == [0, 0, 0] and hits[3] >= len(ids) - 1 - 16
