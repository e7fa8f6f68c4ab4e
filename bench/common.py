"""Shared pieces of the benchmarks: the default model's files, prompts, percentiles, output."""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

from common.settings import Settings

RESULTS_DIR = Path(os.environ.get("BENCH_RESULTS") or Path(__file__).parent / "results")  # a GPU check writes to $OUT


def default_model_dir() -> Path:
    """The default model, converted into the host weight cache (once per host)."""
    from blitzscale.cli import prepare

    return prepare(Settings.from_env())


def equal_length_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """`count` different prompts of exactly `length` tokens (a static batch needs no padding)."""
    words = ("river", "mountain", "city", "forest", "ocean", "desert", "village", "island")
    prompts = []
    for n in range(count):
        text = f"Story {n}: once upon a time in a {words[n % len(words)]} far away there lived a"
        ids = tokenizer(text).input_ids
        ids = (ids * (length // len(ids) + 1))[:length] if len(ids) < length else ids[-length:]
        prompts.append(ids)
    return prompts


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def latency_summary(ttfts: list[float], itls: list[float]) -> dict:
    return {
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(itls, 50), "itl_p99_s": percentile(itls, 99),
        "ttft_mean_s": statistics.fmean(ttfts) if ttfts else float("nan"),
    }


class Stopwatch:
    def __enter__(self):
        self.started = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.started


def save(name: str, results: dict) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for row in rows:
        print("  ".join(_fmt(row.get(c)).ljust(widths[c]) for c in columns))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def prebooted_ready(hosts: list[dict], preboot: int) -> bool:
    """Every host agent (its /cluster_state record) has its pre-booted processes ready: one per
    place (free or held) up to `preboot` (docs/scaling.md, "Pre-booted processes"). A fleet bench waits for
    this before it times a start, so no start shares the CPU with an interpreter still importing
    and every policy starts replicas the same way: the comparison stays about the weights."""
    return all(h.get("prebooted", 0) >= min(preboot, len(h.get("places", []))) for h in hosts)


def preboot_setting(env: dict) -> int:
    """The agents' pre-booted processes per host, from the environment they run with."""
    return Settings.from_env(env).preboot_processes

