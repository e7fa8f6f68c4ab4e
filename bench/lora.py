"""Many LoRA adapters in one batch, measured side by side in one run on the default model.

    .venv/bin/python -m bench.lora            # ranks 8 and 64, 2 rounds (~10 min on 2 CPU cores)
    .venv/bin/python -m bench.lora --quick    # 16 tokens per stream, 1 round

Eight random adapters (rank 8, then rank 64; on every attention and MLP projection, written in
PEFT's format and loaded as a replica loads them) on one engine; 32 greedy streams of 32-token
prompts arriving together, each generating `--new-tokens`:
- base: no engine adapters at all (the model unhooked): the reference;
- none: the adapters loaded, no stream using one;
- half-on-2: 16 streams on the base model, 8 on each of two adapters (interleaved slots);
- all-on-8: every stream on an adapter, 4 on each of eight;
- all-on-8 tokens / rows: the same, eager steps applying the adapters with the other kernels
  (engine/lora.py): a loop over the adapters present, and the per-row gather CUDA graphs replay,
  instead of the default padded groups: which eager kernel to use, measured.
Each round runs every configuration on a fresh engine, all driven from this thread one step
each in turn, so that other processes on the machine slow them alike; a configuration's
throughput is its generated tokens over the time of its own steps (prefill included), and the
ratios compare each configuration's best round with base's. `base` runs on its own copy of the
model, never hooked. torch runs
on one thread (`--threads`): on a shared 2-core machine, two OpenMP threads wait on each other
whenever another process takes a core, and a step's time then swings by 5x.
Writes bench/results/lora.json.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.common import default_model_dir, equal_length_prompts, print_table, save

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CONFIGS = ("base", "none", "half-on-2", "all-on-8", "all-on-8 tokens", "all-on-8 rows")


def write_random_adapter(model, directory: Path, rank: int, seed: int) -> Path:
    """A PEFT LoRA directory with random A and B on every projection (alpha = 2 × rank)."""
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS:
            prefix = f"base_model.model.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, module.in_features, generator=generator) * 0.02
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(module.out_features, rank, generator=generator) * 0.02
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    (directory / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(PROJECTIONS), "bias": "none"}))
    return directory


def assignment(config: str, streams: int) -> list[str | None]:
    if config in ("base", "none"):
        return [None] * streams
    if config == "half-on-2":
        return [[None, "a0", None, "a1"][n % 4] for n in range(streams)]
    return [f"a{n % 8}" for n in range(streams)]


def kernel(config: str) -> str:
    """The eager kernel a configuration runs (engine/lora.py; `grouped` is the engine's default)."""
    return config.rsplit(" ", 1)[1] if config.endswith(("tokens", "rows")) else "grouped"


def measure_round(models: dict, tokenizer, adapters, prompts, new_tokens: int) -> dict[str, dict]:
    """Every configuration on its own engine, stepped in turn (one step each, round robin), so
    that whatever else the machine runs slows them all alike; each one's time is its own steps'."""
    from engine.engine import Engine
    from engine.lora import LoraLayers
    from engine.params import GenerationRequest, StoppingParams
    from engine.scheduler import SchedulerConfig

    streams = len(prompts)
    config = SchedulerConfig(max_batch_size=streams, max_batch_total_tokens=streams * 256, max_total_tokens=256)
    lora = LoraLayers(models["lora"], adapters)  # one copy of the stacked weights, shared by the LoRA engines
    engines = {}
    for name in CONFIGS:
        engine = Engine(models["base" if name == "base" else "lora"], tokenizer, config)
        if name != "base":
            engine.runner.lora, engine.adapter_names = lora, tuple(a.name for a in adapters)
        for n, (ids, adapter) in enumerate(zip(prompts, assignment(name, streams))):
            engine.submit(GenerationRequest(f"r{n}", tuple(ids), stopping=StoppingParams(new_tokens, ignore_eos=True),
                                            adapter=adapter))
        engines[name] = engine
    seconds = dict.fromkeys(CONFIGS, 0.0)
    try:
        while any(e.scheduler.has_work or not e._inbox.empty() for e in engines.values()):
            for name, engine in engines.items():
                if engine.scheduler.has_work or not engine._inbox.empty():
                    lora.eager_kernel = kernel(name)
                    started = time.perf_counter()
                    engine.step()
                    seconds[name] += time.perf_counter() - started
    finally:
        lora.remove()
    tokens = streams * new_tokens
    return {name: {"config": name, "tokens": tokens, "seconds": seconds[name], "tokens_per_s": tokens / seconds[name]}
            for name in CONFIGS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ranks", default="8,64")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.new_tokens, args.rounds = 16, 1
    from transformers import AutoTokenizer

    from engine.lora_files import load_adapter
    from engine.weights import load_model

    directory = default_model_dir()
    models = {"base": load_model(directory, torch.device("cpu"), None),  # never hooked: the reference
              "lora": load_model(directory, torch.device("cpu"), None)}
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prompts = equal_length_prompts(tokenizer, args.streams, 32)
    rows, results = [], {"streams": args.streams, "new_tokens": args.new_tokens, "prompt_tokens": 32,
                         "rounds": args.rounds, "threads": torch.get_num_threads(), "ranks": {}}
    for rank in (int(r) for r in args.ranks.split(",")):
        with tempfile.TemporaryDirectory() as scratch:
            adapters = [load_adapter(f"a{k}", write_random_adapter(models["lora"], Path(scratch) / f"a{k}", rank, k),
                                     models["lora"]) for k in range(8)]
        best: dict[str, dict] = {}
        for round_ in range(args.rounds):
            for config, run in measure_round(models, tokenizer, adapters, prompts, args.new_tokens).items():
                print(f"rank {rank} round {round_ + 1}: {config:15s} {run['tokens_per_s']:.1f} tokens/s", flush=True)
                if config not in best or run["tokens_per_s"] > best[config]["tokens_per_s"]:
                    best[config] = run
        base = best["base"]["tokens_per_s"]
        for config in CONFIGS:
            best[config]["ratio_to_base"] = best[config]["tokens_per_s"] / base
            rows.append({"rank": rank, **best[config]})
        results["ranks"][str(rank)] = best
    print_table(rows, ["rank", "config", "tokens", "seconds", "tokens_per_s", "ratio_to_base"])
    rank8 = results["ranks"].get("8")
    if rank8:
        worst = min(rank8[c]["ratio_to_base"] for c in ("half-on-2", "all-on-8"))
        results["target"] = {"rank_8_worst_ratio": worst, "required": 0.8, "met": worst >= 0.8}
        print(f"rank 8: worst mixed ratio {worst:.2f} (target >= 0.8: {'met' if worst >= 0.8 else 'NOT met'})")
    if not args.quick:
        print(f"wrote {save('lora', results)}")


if __name__ == "__main__":
    main()
