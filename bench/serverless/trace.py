"""A bursty multi-model trace, seeded: which model each request names and when it arrives.

Popularity is Zipf (the model of rank r gets a share ∝ 1 / r^s, ranks shuffled by the seed), and
each model's traffic comes in on/off bursts (exponential on and off periods, Poisson arrivals while
on), as serverless traces are (Azure Functions, BurstGPT): a popular model is on more often; a
rare one sits idle long enough to be scaled to zero, then comes back with a burst.
"""
from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

PROMPTS = ("Tell me a story about", "The weather today is", "A list of fruits:", "Once upon a time",
           "The capital of France is", "In a distant galaxy")


@dataclass(frozen=True)
class Arrival:
    at: float  # seconds from the start of the replay
    model: str
    prompt: str
    max_new_tokens: int


@dataclass(frozen=True)
class TraceShape:
    duration_s: float = 180.0
    zipf_s: float = 1.1  # popularity skew
    rate: float = 1.0  # mean requests/s over all models
    mean_on_s: float = 12.0  # a burst's mean length
    mean_off_s: float = 40.0  # a rarest model's mean silence (a popular model's is shorter)
    max_new_tokens: int = 16


def popularity(models: list[str], zipf_s: float, rng: random.Random) -> dict[str, float]:
    """Each model's share of the requests (summing to 1), ranks in a seeded order."""
    ranked = list(models)
    rng.shuffle(ranked)
    weights = {model: 1.0 / (rank + 1) ** zipf_s for rank, model in enumerate(ranked)}
    total = sum(weights.values())
    return {model: weight / total for model, weight in weights.items()}


def make_trace(models: list[str], seed: int = 0, shape: TraceShape = TraceShape()) -> list[Arrival]:
    """Arrivals in time order. The same models, seed and shape give the same trace."""
    rng = random.Random(seed)
    shares = popularity(models, shape.zipf_s, rng)
    top = max(shares.values())
    arrivals = []
    for model in models:
        share = shares[model]
        mean_off = shape.mean_off_s * (1 - 0.8 * share / top)  # popular: short silences
        on_fraction = shape.mean_on_s / (shape.mean_on_s + mean_off)
        burst_rate = shape.rate * share / on_fraction  # its share of the mean rate, sent while on
        t, on = 0.0, rng.random() < on_fraction
        while t < shape.duration_s:
            period = rng.expovariate(1 / (shape.mean_on_s if on else mean_off))
            if on:
                at = t + rng.expovariate(burst_rate)
                while at < min(t + period, shape.duration_s):
                    arrivals.append(Arrival(round(at, 3), model, rng.choice(PROMPTS), shape.max_new_tokens))
                    at += rng.expovariate(burst_rate)
            t += period
            on = not on
    return sorted(arrivals, key=lambda a: (a.at, a.model))


def save_trace(arrivals: list[Arrival], path: Path) -> None:
    path.write_text(json.dumps([asdict(a) for a in arrivals]))


def load_trace(path: Path) -> list[Arrival]:
    return [Arrival(**item) for item in json.loads(path.read_text())]
