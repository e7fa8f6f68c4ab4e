"""TGI's watermark: detect it in a text, check the detector on the default model, and measure what
it costs the engine.

    python -m bench.watermark detect "some text"      # or the text on stdin: its z-score
    python -m bench.watermark quality                 # 200 tokens at temperature 0.7, with and without
    python -m bench.watermark throughput              # tok/s of 32 streams, half watermarked, vs none

`detect` tokenizes with the served model's tokenizer (`MODEL_ID`, default the default model) and
counts green tokens under `--watermark-gamma` (0.5): z > 4 says watermarked (a plain text is
~N(0, 1)). The engine is called directly (no service) for `quality` and `throughput`, whose runs
are interleaved so that the host's load hits both alike; they report z-scores and a ratio.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from bench.common import default_model_dir, equal_length_prompts, save
from engine.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, Watermark, WatermarkScore, z_score

QUALITY_PROMPTS = [
    "Once upon a time, in a small village by the sea,",
    "Write an essay about the history of computing.\n\n",
    "The best way to learn a new language is",
    "Here is a recipe for a simple tomato soup:",
]


def detect(text: str, model_dir: Path, gamma: float = DEFAULT_GAMMA) -> WatermarkScore:
    """The z-score of `text`, tokenized as the model's tokenizer does (no special tokens added),
    over the green lists of the model's vocabulary (the width of its logits)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    return z_score(tokenizer.encode(text, add_special_tokens=False).ids, vocab_size, gamma)


def _engine(model_dir: Path, streams: int, watermark: Watermark, device: str = "cpu"):
    import torch
    from transformers import AutoTokenizer

    from engine.engine import Engine
    from engine.scheduler import SchedulerConfig
    from engine.weights import load_model

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_model(model_dir, torch.device(device), None)
    return Engine(model, tokenizer, SchedulerConfig(max_batch_size=streams), watermark=watermark).start(), tokenizer


def _generate(engine, prompts: list[list[int]], new_tokens: int, watermarked: int, tag: str, *,
              temperature: float = 1.0, ignore_eos: bool = True) -> list:
    """Every prompt at once, sampled; the first `watermarked` under the watermark. Their finishes."""
    from engine.params import GenerationRequest, SamplingParams, StoppingParams

    streams = [engine.submit(GenerationRequest(
        f"{tag}-{n}", tuple(prompt),
        SamplingParams(do_sample=True, seed=n + 1, temperature=temperature, watermark=n < watermarked),
        StoppingParams(new_tokens, ignore_eos=ignore_eos))) for n, prompt in enumerate(prompts)]
    return [list(stream)[-1].finish for stream in streams]


def quality(model_dir: Path, watermark: Watermark, new_tokens: int) -> dict:
    engine, tokenizer = _engine(model_dir, 2 * len(QUALITY_PROMPTS), watermark)
    prompts = [tokenizer(p).input_ids for p in QUALITY_PROMPTS]
    try:
        finishes = _generate(engine, prompts * 2, new_tokens, len(prompts), "quality", temperature=0.7,
                             ignore_eos=False)
    finally:
        engine.stop()
    rows = [{"watermarked": n < len(prompts), "tokens": f.generated_tokens,
             "z": round(detect(f.generated_text, model_dir, watermark.gamma).z, 2), "text": f.generated_text[:60]}
            for n, f in enumerate(finishes)]
    for row in rows:
        print(f"watermark {str(row['watermarked']):<5}  {row['tokens']:>3} tokens  z = {row['z']:6.2f}  "
              f"{json.dumps(row['text'])}")
    return {"new_tokens": new_tokens, "temperature": 0.7, "rows": rows}


def throughput(model_dir: Path, watermark: Watermark, streams: int, new_tokens: int, repeats: int) -> dict:
    engine, tokenizer = _engine(model_dir, streams, watermark)
    prompts = equal_length_prompts(tokenizer, streams, 32)
    half = streams // 2
    runs: dict[str, list[float]] = {"none": [], "half": []}
    try:
        _generate(engine, prompts, 4, half, "warm")
        for repeat in range(repeats):  # interleaved: the host's load hits both alike
            for mode, watermarked in (("none", 0), ("half", half)):
                started = time.perf_counter()
                finishes = _generate(engine, prompts, new_tokens, watermarked, f"{mode}{repeat}")
                runs[mode].append(sum(f.generated_tokens for f in finishes) / (time.perf_counter() - started))
    finally:
        engine.stop()
    best = {mode: max(values) for mode, values in runs.items()}
    # Each half run against the none run just before it: the host's load changes slowly.
    ratio = statistics.median(half / none for none, half in zip(runs["none"], runs["half"]))
    print(f"{streams} streams × {new_tokens} tokens, best of {repeats}: none {best['none']:.1f} tok/s, "
          f"half watermarked {best['half']:.1f} tok/s; half / none (median of side-by-side pairs) = {ratio:.3f}")
    return {"streams": streams, "new_tokens": new_tokens, "tokens_per_s": runs, "best": best,
            "ratio_half_over_none": ratio}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("detect", "quality", "throughput"))
    parser.add_argument("text", nargs="?", help="detect: the text (default: stdin)")
    parser.add_argument("--watermark-gamma", type=float, default=DEFAULT_GAMMA)
    parser.add_argument("--watermark-delta", type=float, default=DEFAULT_DELTA)
    parser.add_argument("--new-tokens", type=int, default=None, help="quality: 200; throughput: 32")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    watermark = Watermark(args.watermark_gamma, args.watermark_delta)
    model_dir = default_model_dir()  # --model-id / MODEL_ID via the environment
    if args.command == "detect":
        score = detect(args.text if args.text is not None else sys.stdin.read(), model_dir, watermark.gamma)
        print(f"z = {score.z:.2f} ({score.green} of {score.scored} tokens green, "
              f"{score.green_fraction:.0%}; gamma {watermark.gamma}): "
              f"{'watermarked' if score.z > 4 else 'no watermark detected'}")
        return
    if args.command == "quality":
        results = quality(model_dir, watermark, args.new_tokens or 200)
    else:
        results = throughput(model_dir, watermark, args.streams, args.new_tokens or 32, args.repeats)
    print("saved", save(f"watermark-{args.command}", results))


if __name__ == "__main__":
    main()
