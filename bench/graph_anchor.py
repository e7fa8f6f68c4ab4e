"""The graph anchor: transformers' own forward over a `StaticCache`, one CUDA graph per step.

The model code of a step is the same as ours; only the host work differs. Prefill is eager,
each decode step is one replay of a graph captured once (greedy argmax inside the graph), so
this is what the hardware gives for this model code when the host is out of the way. On CPU
the same steps run eagerly (used by the tests to check the anchor's tokens).
"""
from __future__ import annotations

import time

import torch
from transformers import StaticCache


@torch.inference_mode()
def anchor_generate(model, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], float]:
    """Greedy tokens of equal-length prompts, and the seconds the generation took."""
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

    torch.cuda.synchronize() if device.type == "cuda" else None
    started = time.perf_counter()
    prompt = torch.tensor(prompts, device=device)
    prefill_mask = torch.ones((batch, length), dtype=torch.long, device=device)
    first = model(input_ids=prompt, attention_mask=prefill_mask, past_key_values=cache, use_cache=True,
                  cache_position=torch.arange(length, device=device)).logits[:, -1].argmax(-1)
    replay = _capture(step, cache, length) if device.type == "cuda" else step
    out = [first]
    for t in range(new_tokens - 1):
        ids.copy_(out[-1].view(-1, 1))
        position.fill_(length + t)
        out.append(replay().clone())
    tokens = torch.stack(out, dim=1).tolist()
    torch.cuda.synchronize() if device.type == "cuda" else None
    return tokens, time.perf_counter() - started


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
    for layer in cache.layers:  # transformers 5.2x counts written columns on the device: rewind it
        if isinstance(getattr(layer, "cumulative_length", None), torch.Tensor):
            layer.cumulative_length.fill_(written)

    def replay() -> torch.Tensor:
        graph.replay()
        return output

    return replay
