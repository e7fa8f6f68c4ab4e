"""Tokens/s of 32 streams with half of them under a JSON schema, against 32 free streams.

The engine is called directly on the default model. Every stream generates exactly
`--new-tokens` tokens (free rows ignore EOS; the schema asks for a long array, so the grammar
rows reach `length` too), so both runs do the same work apart from the grammar masks.
Target (the structured-output issue): constrained ≥ 0.8 × free.

    PYTHONPATH=$PWD python -m bench.grammar_throughput [--new-tokens 48] [--device cpu]
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from bench.common import default_model_dir, equal_length_prompts
from engine.engine import Engine
from engine.params import GenerationRequest, Grammar, StoppingParams
from engine.scheduler import SchedulerConfig
from engine.weights import load_model

LONG_SCHEMA = {  # many items required: the output cannot complete before max_new_tokens
    "type": "array",
    "minItems": 100,
    "items": {
        "type": "object",
        "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    },
}


def run(engine: Engine, prompts: list[list[int]], new_tokens: int, constrained: int, tag: str) -> dict:
    """All streams at once; `constrained` of them under LONG_SCHEMA."""
    grammar = Grammar("json", LONG_SCHEMA)
    started = time.perf_counter()
    streams = [engine.submit(GenerationRequest(
        f"{tag}-{n}", tuple(prompt), stopping=StoppingParams(new_tokens, ignore_eos=True),
        grammar=grammar if n < constrained else None)) for n, prompt in enumerate(prompts)]
    finishes = [list(stream)[-1].finish for stream in streams]
    seconds = time.perf_counter() - started
    tokens = sum(f.generated_tokens for f in finishes)
    return {"streams": len(prompts), "constrained": constrained, "tokens": tokens, "seconds": seconds,
            "tokens_per_s": tokens / seconds, "sample": finishes[0].generated_text[:60]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, torch.device(args.device), None)
    prompts = equal_length_prompts(tokenizer, args.streams, args.prompt_tokens)
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=args.streams)).start()
    half = args.streams // 2
    try:
        run(engine, prompts, 4, half, "warm")  # the grammar library reads the vocabulary once
        results = {"free": [], "half-json": []}
        for repeat in range(args.repeats):  # interleaved, so that the host's load hits both alike
            results["free"].append(run(engine, prompts, args.new_tokens, 0, f"free{repeat}"))
            results["half-json"].append(run(engine, prompts, args.new_tokens, half, f"json{repeat}"))
    finally:
        engine.stop()
    best = {mode: max(runs, key=lambda r: r["tokens_per_s"]) for mode, runs in results.items()}
    print(f"{args.streams} streams × {args.new_tokens} tokens on {args.device}, best of {args.repeats}")
    for mode, r in best.items():
        print(f"{mode:<10} {r['tokens_per_s']:8.1f} tok/s  ({r['tokens']} tokens in {r['seconds']:.2f} s)")
    ratio = best["half-json"]["tokens_per_s"] / best["free"]["tokens_per_s"]
    print(f"half-json / free = {ratio:.2f} (target >= 0.8: {'met' if ratio >= 0.8 else 'NOT met'})")
    print("a constrained output:", json.dumps(best["half-json"]["sample"]))


if __name__ == "__main__":
    main()
