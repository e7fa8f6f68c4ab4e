"""Grammar libraries compared on the default model's tokenizer (SmolLM2-135M, 49k tokens).

For llguidance, xgrammar and outlines-core: the time to compile a realistic JSON schema and a
regex, and per decode step at batch 32 (32 matchers, each advanced every step by a token its
grammar allows) the time to fill the 32 allowed-token bitmasks, to apply them to the logits,
and to advance the matchers; then three ways of applying the masks. The logits are random, so the tokens chosen wander through the
grammar as a sampling model would. Prints one table; takes well under a minute.

    PYTHONPATH=$PWD python -m bench.grammar_masks [--steps 40] [--batch 32]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from blitzscale.cli import prepare
from common.settings import Settings
from engine.grammar import apply_token_bitmask

ORDER_SCHEMA = {
    "type": "object",
    "properties": {
        "order_id": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{6}$"},
        "customer": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 40},
                "email": {"type": "string", "format": "email"},
                "vip": {"type": "boolean"},
            },
            "required": ["name", "email"],
            "additionalProperties": False,
        },
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 10,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string"},
                    "quantity": {"type": "integer", "minimum": 1, "maximum": 100},
                    "price": {"type": "number"},
                },
                "required": ["sku", "quantity", "price"],
                "additionalProperties": False,
            },
        },
        "status": {"enum": ["pending", "paid", "shipped", "cancelled"]},
        "notes": {"type": ["string", "null"]},
    },
    "required": ["order_id", "customer", "items", "status"],
    "additionalProperties": False,
}
DATE_REGEX = r"(Mon|Tues|Wednes|Thurs|Fri|Satur|Sun)day, [A-Z][a-z]{2,8} [0-9]{1,2}, (19|20)[0-9]{2}"


def default_tokenizer():
    """The default model's tokenizer, taken out of its GGUF file once per host (no weights)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(prepare(Settings.from_env(), tokenizer_only=True))


@dataclass
class Library:
    """One library behind four calls: compile(kind, value) → compiled; matcher(compiled);
    fill(matchers, bitmask) for rows 0..n-1; accept(matcher, token) → still running."""

    name: str
    compile: Callable
    matcher: Callable
    fill: Callable
    accept: Callable


def llguidance_library(tokenizer, vocab_size: int) -> Library:
    import llguidance
    import llguidance.hf
    import llguidance.torch

    lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
    executor = llguidance.LLExecutor()

    def compile_(kind, value):
        grammar = (llguidance.LLMatcher.grammar_from_json_schema(value) if kind == "json"
                   else llguidance.LLMatcher.grammar_from_regex(value))
        matcher = llguidance.LLMatcher(lltok, grammar)  # compiles; copies share the compiled grammar
        assert not matcher.is_error(), matcher.get_error()
        return matcher

    def fill(matchers, bitmask):
        llguidance.torch.fill_next_token_bitmask_par(executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(matcher, token):
        matcher.consume_token(token)
        return not matcher.is_stopped()

    return Library("llguidance", compile_, lambda compiled: compiled.deep_copy(), fill, accept)


def xgrammar_library(tokenizer, vocab_size: int) -> Library:
    import xgrammar

    info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
    batch = xgrammar.BatchGrammarMatcher(max_threads=2)

    def compile_(kind, value):
        return compiler.compile_json_schema(json.dumps(value)) if kind == "json" else compiler.compile_regex(value)

    def accept(matcher, token):
        matcher.accept_token(token)
        return not matcher.is_terminated()

    return Library("xgrammar", compile_, xgrammar.GrammarMatcher,
                   lambda matchers, bitmask: batch.batch_fill_next_token_bitmask(matchers, bitmask), accept)


def outlines_core_library(tokenizer, vocab_size: int) -> Library:
    import outlines_core
    from outlines_core.json_schema import build_regex_from_schema

    vocabulary = outlines_core.Vocabulary(tokenizer.eos_token_id, _byte_vocabulary(tokenizer))

    def compile_(kind, value):
        regex = build_regex_from_schema(json.dumps(value)) if kind == "json" else value
        return outlines_core.Index(regex, vocabulary)

    def fill(matchers, bitmask):
        width = bitmask.shape[1]
        for i, guide in enumerate(matchers):
            guide.write_mask_into(bitmask[i].data_ptr(), width, 4)

    def accept(guide, token):
        guide.advance(token, return_tokens=False)
        return not guide.is_finished()

    return Library("outlines-core", compile_, outlines_core.Guide, fill, accept)


def _byte_vocabulary(tokenizer) -> dict[bytes, list[int]]:
    """Token bytes → ids, for a byte-level BPE tokenizer (what outlines-core's Vocabulary wants);
    special tokens left out."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    special = set(tokenizer.all_special_ids)
    vocabulary: dict[bytes, list[int]] = {}
    for token, token_id in tokenizer.get_vocab().items():
        if token_id in special or any(char not in byte_of for char in token):
            continue
        vocabulary.setdefault(bytes(byte_of[char] for char in token), []).append(token_id)
    return vocabulary


def timed(fn, *args):
    started = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - started


def measure(library: Library, kind: str, value, batch: int, steps: int, vocab_size: int) -> dict:
    compiled, compile_s = timed(library.compile, kind, value)
    matchers = [library.matcher(compiled) for _ in range(batch)]
    bitmask = torch.zeros(batch, (vocab_size + 31) // 32, dtype=torch.int32)
    generator = torch.Generator().manual_seed(0)
    fill_s, apply_s, accept_s = [], [], []
    for _ in range(steps):
        logits = torch.randn(batch, vocab_size, generator=generator)
        _, seconds = timed(library.fill, matchers, bitmask)
        fill_s.append(seconds)
        logits, seconds = timed(apply_token_bitmask, logits, bitmask)
        apply_s.append(seconds)
        tokens = logits.argmax(dim=-1).tolist()
        started = time.perf_counter()
        for i, token in enumerate(tokens):
            if not library.accept(matchers[i], token):  # finished: start that row over
                matchers[i] = library.matcher(compiled)
        accept_s.append(time.perf_counter() - started)
    # Medians: the host is shared, and a mean would mostly measure the neighbours.
    return {"compile_ms": compile_s * 1000, "fill_ms": statistics.median(fill_s) * 1000,
            "apply_ms": statistics.median(apply_s) * 1000, "accept_ms": statistics.median(accept_s) * 1000}


def compare_apply(batch: int, vocab_size: int, repeats: int = 30) -> None:
    """Three ways to mask [batch, V] logits with a full bitmask: median ms each."""
    import xgrammar

    generator = torch.Generator().manual_seed(0)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, (vocab_size + 31) // 32), dtype=torch.int32, generator=generator)
    logits = torch.randn(batch, vocab_size, generator=generator)
    shifts = torch.arange(32, dtype=torch.int32)

    def unpack_and_masked_fill():
        allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).view(batch, -1)[:, :vocab_size].bool()
        return logits.masked_fill(~allowed, -float("inf"))

    def xgrammar_cpu_kernel():
        out = logits.clone()
        xgrammar.apply_token_bitmask_inplace(out, bitmask, backend="cpu")
        return out

    ways = {"bits + masked_fill": unpack_and_masked_fill, "xgrammar C++ kernel (+ copy)": xgrammar_cpu_kernel,
            "ours: byte table + add": lambda: apply_token_bitmask(logits, bitmask)}
    reference = unpack_and_masked_fill()
    for name, way in ways.items():
        assert torch.equal(way(), reference), name
        times = [timed(way)[1] for _ in range(repeats)]
        print(f"apply {name:<30} {statistics.median(times) * 1000:6.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)  # the engine's CPU share on a small shared host
    tokenizer = default_tokenizer()
    vocab_size = len(tokenizer)
    print(f"tokenizer: {len(tokenizer)} tokens; batch {args.batch}, {args.steps} steps; median times per step in ms")
    header = f"{'library':<14} {'grammar':<8} {'compile ms':>10} {'fill ms':>8} {'apply ms':>8} {'accept ms':>9} {'step ms':>8}"
    print(header)
    print("-" * len(header))
    for make in (llguidance_library, xgrammar_library, outlines_core_library):
        library, setup_s = timed(make, tokenizer, vocab_size)
        for name, kind, value in (("schema", "json", ORDER_SCHEMA), ("any-json", "json", {}),
                                  ("regex", "regex", DATE_REGEX)):
            r = measure(library, kind, value, args.batch, args.steps, vocab_size)
            step = r["fill_ms"] + r["apply_ms"] + r["accept_ms"]
            print(f"{library.name:<14} {name:<8} {r['compile_ms']:>10.1f} {r['fill_ms']:>8.2f} "
                  f"{r['apply_ms']:>8.2f} {r['accept_ms']:>9.2f} {step:>8.2f}")
        print(f"{'':<14} (tokenizer setup {setup_s * 1000:.0f} ms)")
    compare_apply(args.batch, vocab_size)


if __name__ == "__main__":
    main()
