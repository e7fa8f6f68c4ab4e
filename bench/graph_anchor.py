"""The graph anchor: transformers' own forward over a `StaticCache`, one CUDA graph per step.

The model code of a step is the same as ours; only the host work differs. Prefill is eager,
each decode step is one replay of a graph captured once (greedy argmax inside the graph), so
this is what the hardware gives for this model code when the host is out of the way. On CPU
the same steps run eagerly (used by the tests to check the anchor's tokens).

The clock of the decode rate starts at the first replay after the capture: prefill, warm-up and
capture are timed apart, so the anchor's rate is the replays' alone. Warm-up and capture run
with the inputs of the first decode step (its token, its position), so the key/value they write
is exactly what the first replay writes again, whichever way the cache counts its positions
(`cache_position` on transformers 5.1x, a device counter on 5.2x, rewound after the capture).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import StaticCache


@dataclass
class AnchorRun:
    tokens: list[list[int]]  # each prompt's greedy tokens: the prefill's, then one per replay
    prefill_seconds: float
    capture_seconds: float  # warm-up and capture (0 on CPU)
    decode_seconds: float  # from the first replay to the last token on the host

    @property
    def replayed_tokens(self) -> int:
        return sum(len(t) - 1 for t in self.tokens)


@torch.inference_mode()
def anchor_generate(model, prompts: list[list[int]], new_tokens: int) -> AnchorRun:
    """Greedy tokens of equal-length prompts, and the time each phase took."""
    device = next(model.parameters()).device
    batch, length = len(prompts), len(prompts[0])
    total = length + new_tokens
    cache = StaticCache(config=model.config, max_cache_len=total)
    columns = torch.arange(total, device=device)
    position = torch.zeros(1, dtype=torch.long, device=device)  # static: the column being written
    ids = torch.zeros((batch, 1), dtype=torch.long, device=device)

    def step() -> torch.Tensor:
        mask = (columns <= position).view(1, 1, 1, total).expand(batch, 1, 1, total)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=position.expand(batch, 1),
                       cache_position=position, past_key_values=cache, use_cache=True).logits
        return logits[:, -1].argmax(-1)

    started = _now(device)
    prompt = torch.tensor(prompts, device=device)
    prefill_mask = torch.ones((batch, length), dtype=torch.long, device=device)
    first = model(input_ids=prompt, attention_mask=prefill_mask, past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(length, device=device)).logits[:, -1].argmax(-1)
    ids.copy_(first.view(-1, 1))
    position.fill_(length)
    prefilled = _now(device)
    replay = _capture(step, cache, length) if device.type == "cuda" else _warmed_up(step, cache, length)
    captured = _now(device)
    out = [first]
    for t in range(new_tokens - 1):
        ids.copy_(out[-1].view(-1, 1))
        position.fill_(length + t)
        out.append(replay().clone())
    tokens = torch.stack(out, dim=1).tolist()  # waits for the last replay
    return AnchorRun(tokens, prefilled - started, captured - prefilled, time.perf_counter() - captured)


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


def _capture(step, cache, written: int):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step()
    _rewind(cache, written)

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay


def _warmed_up(step, cache, written: int):
    """The CPU's stand-in for the capture: the same warm-up steps, eagerly (so the tests check
    that they leave the cache as the first decode step needs it)."""
    for _ in range(3):
        step()
    _rewind(cache, written)
    return step


def _rewind(cache, written: int) -> None:
    for layer in cache.layers:  # transformers 5.2x counts written columns on the device: rewind it
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(written)
