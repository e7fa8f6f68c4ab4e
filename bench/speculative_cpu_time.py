"""`bench.speculative`'s prompts timed in the thread's CPU time, one thread: a ratio that other
jobs on a shared machine barely move (their wall-clock ratios swing 0.4..2× run to run there).

Plain and speculated engines stepped by hand on this thread, each prompt plain then speculated,
greedy, 96 new tokens, then 32 streams of 32; the gate decides as in service (on wall-clock step
times). Prints per prompt: CPU seconds, steps, the plain / speculated CPU ratio, equal tokens.

    python -m bench.speculative_cpu_time [--speculate 8]
"""
from __future__ import annotations

import argparse
import time

import torch

from bench.common import default_model_dir, save
from bench.speculative import GROUNDED, OPEN_ENDED, chat


def generate(engine, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float, int]:
    from engine.params import GenerationRequest, StoppingParams

    streams = [engine.submit(GenerationRequest(f"c{time.monotonic_ns()}-{n}", tuple(ids),
                                               stopping=StoppingParams(max_new_tokens=new_tokens)))
               for n, ids in enumerate(prompts)]
    started, steps = time.thread_time(), 0
    engine._take_inbox()  # stepped by hand: the submitted requests join now
    while engine.scheduler.has_work:
        engine.step()
        steps += 1
    seconds = time.thread_time() - started
    return [[event.token.id for event in stream] for stream in streams], seconds, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speculate", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=96)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from transformers import AutoTokenizer

    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig
    from engine.speculative import SpeculativeConfig
    from engine.weights import load_model

    directory = default_model_dir()
    model, tokenizer = load_model(directory, torch.device("cpu"), None), AutoTokenizer.from_pretrained(directory)
    config = SchedulerConfig(max_batch_size=32, max_batch_total_tokens=32 * 1024, max_total_tokens=1024)
    engines = [Engine(model, tokenizer, config, speculative=SpeculativeConfig(k, 2, 4)) for k in (0, args.speculate)]
    for engine in engines:
        generate(engine, [chat(tokenizer, "Hello")], 8)
    texts = list(OPEN_ENDED.values()) + list(GROUNDED.values())
    workloads = [(name, [chat(tokenizer, text)], args.new_tokens) for name, text in {**GROUNDED, **OPEN_ENDED}.items()]
    workloads.append(("32 streams", [chat(tokenizer, f"{texts[n % len(texts)]} (#{n})") for n in range(32)], 32))
    rows = []
    for name, prompts, new_tokens in workloads:
        (plain, plain_s, plain_steps), (spec, spec_s, spec_steps) = (generate(e, prompts, new_tokens) for e in engines)
        rows.append({"workload": name, "tokens": sum(map(len, plain)), "plain_cpu_s": plain_s, "plain_steps": plain_steps,
                     "spec_cpu_s": spec_s, "spec_steps": spec_steps, "ratio": plain_s / spec_s, "same_tokens": plain == spec})
        print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in rows[-1].items()),
              flush=True)
    gate = engines[1].speculator.gate.ratios()
    print(f"measured cost of a verify step in plain steps: {gate}")
    print(f"saved {save('speculative-cpu-time', {'args': vars(args), 'rows': rows, 'gate': gate})}")


if __name__ == "__main__":
    main()
