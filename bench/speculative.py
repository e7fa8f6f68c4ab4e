"""Speculative decoding (`--speculate`): tokens/s with and without n-gram drafts, side by side.

On the default model (SmolLM2-135M-Instruct from its GGUF file), greedy, in one process:
- batch 1 on input-grounded prompts (copy a passage, edit code, answer from a document), where
  the answer repeats the prompt and drafts are accepted, and on open-ended prompts, where they
  seldom are and speculation must step aside;
- 32 streams at once (the gate decides per batch size whether drafting pays);
- batch 1 beside llama-cpp-python on the same GGUF file and prompts, when it is installed (the
  `bench` extra; llama.cpp on 2 cores is what a CPU user compares us with).
With `--speculative-model ID` a third engine drafts with that model (`layers:K`: the default
model cut to its first K layers, `bench/truncated_draft.py`), on the batch-1 prompts only (a
draft model's catch-up of 32 prompts is a prefill of them all again): its tokens/s beside plain
and n-gram drafting, and each drafter's acceptance, in one run.
Runs alternate (plain, speculated, plain, ...) so that a noisy machine slows both alike; each
row reports the median of its rounds and the spread (min..max of the per-round ratios).
Outputs of the plain and speculated runs are compared token for token (they must be equal).
The engines share one model, whose CPU linear weights the speculating engine packs for oneDNN
(engine/cpu_linear.py, on only with `--speculate`): plain runs here use them too, so each ratio is
speculation's alone (a replica without `--speculate` keeps MKL's weights).

    python -m bench.speculative [--speculate 4] [--rounds 3] [--quick] [--speculative-model layers:6]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import default_model_dir, print_table, save

PASSAGE = (
    "The river rose in the night and by morning the lower streets of the town were under water. "
    "The baker carried his flour sacks to the upper floor, the schoolteacher moved the children's "
    "drawings from the walls, and the old ferryman, who had seen three floods before this one, "
    "tied his boat to the church railing and waited for the water to go down."
)
CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        subtotal = subtotal + item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax


def average_price(items):
    if not items:
        return 0
    return sum(item.price for item in items) / len(items)
'''
DOCUMENT = (
    "Meeting notes, 4 March. Attendees: Ana, Bruno, Chen. Decisions: the release moves to 18 March "
    "because the payment tests failed on the staging server. Bruno will fix the currency rounding "
    "bug in the invoice module. Chen will update the deployment guide with the new database "
    "migration steps. Ana will tell the customers about the new date by email on 6 March."
)
GROUNDED = {
    "copy": f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
    "edit-code": f"Rename the variable `subtotal` to `net_total` in this code and show the whole code:\n\n{CODE}",
    "document-qa": f"{DOCUMENT}\n\nQuote the sentences of these notes that say who will do what, exactly as written.",
}
OPEN_ENDED = {
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "advice": "What are some good habits for learning a new language?",
}


def chat(tokenizer, text: str) -> list[int]:
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                             tokenize=False)
    return tokenizer(rendered, add_special_tokens=False).input_ids


def make_engine(model, tokenizer, speculate: int, ngram_min: int, ngram_max: int, draft=None, draft_name=""):
    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig
    from engine.speculative import SpeculativeConfig

    config = SchedulerConfig(max_batch_size=32, max_batch_total_tokens=32 * 1024, max_total_tokens=1024)
    return Engine(model, tokenizer, config, speculative=SpeculativeConfig(speculate, ngram_min, ngram_max),
                  draft_model=draft, draft_name=draft_name).start()


def draft_directory(model_id: str, default_dir: Path, scratch: str) -> Path:
    """`layers:K`: the default model's first K layers, written under `scratch`; else a model id as
    `--model-id` takes it, prepared on this host."""
    if model_id.startswith("layers:"):
        from bench.truncated_draft import truncate

        layers = int(model_id.split(":", 1)[1])
        return truncate(default_dir, layers, Path(scratch) / f"first-{layers}-layers")
    from blitzscale.cli import prepare
    from common.settings import Settings

    return prepare(Settings.from_env(model_id=model_id))


def acceptance(engine) -> tuple[int, int]:
    stats = engine.stats()
    return stats.spec_accepted_tokens, stats.spec_draft_tokens


def generate(engine, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """Every prompt at once, greedy; (their tokens, wall seconds)."""
    from engine.params import GenerationRequest, StoppingParams

    started = time.perf_counter()
    streams = [engine.submit(GenerationRequest(f"b{time.monotonic_ns()}-{n}", tuple(ids),
                                               stopping=StoppingParams(max_new_tokens=new_tokens)))
               for n, ids in enumerate(prompts)]
    outputs = [[event.token.id for event in stream] for stream in streams]
    return outputs, time.perf_counter() - started


def llama_cpp_model(path: str):
    """llama-cpp-python on the GGUF file itself, or None when it is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    return Llama(model_path=path, n_ctx=2048, n_threads=torch.get_num_threads(), verbose=False)


def llama_generate(llama, prompt: list[int], new_tokens: int) -> tuple[int, float]:
    started = time.perf_counter()
    tokens = 0
    llama.reset()
    for token in llama.generate(prompt, temp=0.0, top_k=1, reset=True):
        if token == llama.token_eos() or tokens >= new_tokens:
            break
        tokens += 1
    return tokens, time.perf_counter() - started


def compare(name: str, prompts: list[list[int]], engines: dict, args, new_tokens: int, llama=None) -> dict:
    """Alternated rounds of plain and speculated (and llama.cpp) runs of the same prompts."""
    rates = {mode: [] for mode in engines}
    llama_rates = []
    outputs = {}
    before = {mode: acceptance(engine) for mode, engine in engines.items()}
    for _ in range(args.rounds):
        for mode, engine in engines.items():
            tokens, seconds = generate(engine, prompts, new_tokens)
            rates[mode].append(sum(map(len, tokens)) / seconds)
            outputs[mode] = tokens
        if llama is not None:
            count, seconds = llama_generate(llama, prompts[0], new_tokens)
            llama_rates.append(count / seconds)
    ratios = [s / p for p, s in zip(rates["plain"], rates["speculate"])]
    row = {"workload": name, "streams": len(prompts), "tokens": sum(map(len, outputs["plain"])),
           "plain_tok_s": statistics.median(rates["plain"]), "spec_tok_s": statistics.median(rates["speculate"]),
           "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
           "same_tokens": outputs["plain"] == outputs["speculate"]}
    for mode, key in (("speculate", "ngram_accept"), ("draft", "draft_accept")):
        if mode in engines:
            accepted, drafted = (now - then for now, then in zip(acceptance(engines[mode]), before[mode]))
            row[key] = accepted / drafted if drafted else 0.0
    if "draft" in engines:
        row.update(draft_tok_s=statistics.median(rates["draft"]),
                   draft_ratio=statistics.median(d / p for p, d in zip(rates["plain"], rates["draft"])),
                   draft_vs_ngram=statistics.median(d / s for s, d in zip(rates["speculate"], rates["draft"])),
                   same_tokens=row["same_tokens"] and outputs["plain"] == outputs["draft"])
    if llama_rates:
        vs_llama = [s / l for s, l in zip(rates["speculate"], llama_rates)]
        row.update(llama_tok_s=statistics.median(llama_rates), vs_llama=statistics.median(vs_llama),
                   plain_vs_llama=statistics.median(p / l for p, l in zip(rates["plain"], llama_rates)))
    print("  " + ", ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()),
          flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--speculate", type=int, default=4)
    parser.add_argument("--ngram-min", type=int, default=2)
    parser.add_argument("--ngram-max", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--stream-tokens", type=int, default=32, help="new tokens of each of the streams")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--name", default="cpu")
    parser.add_argument("--speculative-model", default=None,
                        help="also draft with this model (an id as --model-id, or layers:K: the default model's first "
                             "K layers), at batch 1")
    args = parser.parse_args()
    if args.quick:
        args.new_tokens, args.streams, args.stream_tokens, args.rounds = 48, 8, 16, 1
    from transformers import AutoTokenizer

    from common.settings import default_model_id
    from engine.weights import load_model

    directory = default_model_dir()
    model, tokenizer = load_model(directory, torch.device("cpu"), None), AutoTokenizer.from_pretrained(directory)
    engines = {"plain": make_engine(model, tokenizer, 0, args.ngram_min, args.ngram_max),
               "speculate": make_engine(model, tokenizer, args.speculate, args.ngram_min, args.ngram_max)}
    scratch = tempfile.TemporaryDirectory(prefix="bench-draft-")
    if args.speculative_model:
        draft_dir = draft_directory(args.speculative_model, directory, scratch.name)
        draft = load_model(draft_dir, torch.device("cpu"), None)
        engines["draft"] = make_engine(model, tokenizer, args.speculate, args.ngram_min, args.ngram_max, draft,
                                       args.speculative_model)
    llama = llama_cpp_model(default_model_id())
    print(f"SmolLM2-135M-Instruct on cpu ({torch.get_num_threads()} threads), greedy, {args.new_tokens} new tokens, "
          f"--speculate {args.speculate} (n-grams {args.ngram_min}..{args.ngram_max}"
          f"{', draft model ' + args.speculative_model if args.speculative_model else ''}), {args.rounds} alternated "
          f"rounds; llama-cpp-python: {'yes' if llama is not None else 'not installed'}", flush=True)
    try:
        for engine in engines.values():  # warm them up
            generate(engine, [chat(tokenizer, "Hello")], 8)
        rows = [compare(f"batch 1 {kind}: {name}", [chat(tokenizer, text)], engines, args, args.new_tokens, llama)
                for kind, prompts in (("grounded", GROUNDED), ("open-ended", OPEN_ENDED))
                for name, text in prompts.items()]
        texts = list(OPEN_ENDED.values()) + list(GROUNDED.values())
        streams = [chat(tokenizer, f"{texts[n % len(texts)]} (#{n})") for n in range(args.streams)]
        batch1_only = {mode: engine for mode, engine in engines.items() if mode != "draft"}
        rows.append(compare(f"{args.streams} streams", streams, batch1_only, args, args.stream_tokens))
    finally:
        for engine in engines.values():
            engine.stop()
        scratch.cleanup()
    columns = ["workload", "tokens", "plain_tok_s", "spec_tok_s", "ratio", "ratio_min", "ratio_max", "same_tokens",
               "ngram_accept"]
    if "draft" in engines:
        columns += ["draft_tok_s", "draft_ratio", "draft_vs_ngram", "draft_accept"]
    if llama is not None:
        columns += ["llama_tok_s", "vs_llama", "plain_vs_llama"]
    print_table(rows, columns)
    gate = engines["speculate"].speculator.gate.ratios()
    print(f"measured cost of a verify step in plain steps (rows bucket x drafts a row): {gate}")
    results = {"args": vars(args), "rows": rows, "gate": gate}
    if "draft" in engines:
        results["draft_gate"] = engines["draft"].speculator.gate.ratios()
        print(f"with the draft model's forwards: {results['draft_gate']}")
    path = save(f"speculative-{args.name}{'-draft' if 'draft' in engines else ''}", results)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
