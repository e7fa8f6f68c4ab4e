"""Picking a token per row from [B, V] scores in a few passes over the vocabulary.

Both functions look at the vocabulary in blocks (`[B, V / block, block]`): a vectorized
per-block reduction first (max, sum), then one block per row. On a CPU `argmax` and `cumsum`
over 49k columns are scalar loops, ~10x slower than a vectorized `amax` or `sum`; on a GPU the
extra kernels are a few microseconds. Results are exactly those of the plain operations: the
first maximum's index; the first token whose cumulative probability exceeds the target.
"""
from __future__ import annotations

import torch
from torch import Tensor


def vocab_block(vocab_size: int) -> int:
    """The block width: the widest of 128..8 that divides the vocabulary (1: no blocking)."""
    return next((b for b in (128, 64, 32, 16, 8) if vocab_size % b == 0 and vocab_size > b), 1)


def first_argmax(scores: Tensor) -> Tensor:
    """[B] index of each row's first maximum (`scores.argmax(-1)`)."""
    rows, vocab = scores.shape
    block = vocab_block(vocab)
    if block == 1:
        return scores.argmax(dim=-1)
    blocks = scores.view(rows, vocab // block, block)
    best = blocks.amax(dim=-1).argmax(dim=-1)  # [B]: the first block holding the row's maximum
    inside = blocks[torch.arange(rows, device=scores.device), best].argmax(dim=-1)
    return best * block + inside


def inverse_transform(probs: Tensor, uniforms: Tensor) -> Tensor:
    """[S] the token each row of `probs` [S, V] (non-negative, any total) draws for its uniform
    in [0, 1): the first token whose cumulative weight exceeds `uniform × total`. A token of
    weight 0 is never drawn, whatever the rounding."""
    rows, vocab = probs.shape
    block = vocab_block(vocab)
    blocks = probs.view(rows, vocab // block, block)
    sums = blocks.sum(dim=-1)  # [S, nb]
    cumulative = sums.cumsum(dim=-1)
    total = cumulative[:, -1:]
    target = torch.minimum(uniforms.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # [S, 1]: a block of weight > 0 (the clamp only guards a row of NaNs from indexing past the end)
    chosen = torch.searchsorted(cumulative, target, right=True).clamp_(max=vocab // block - 1)
    within = target - (cumulative.gather(1, chosen) - sums.gather(1, chosen))  # what is left inside it
    inner = blocks[torch.arange(rows, device=probs.device), chosen.squeeze(1)].cumsum(dim=-1)  # [S, block]
    inner_total = inner[:, -1:]
    within = torch.minimum(within.clamp(min=0), torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    inside = torch.searchsorted(inner, within, right=True).clamp_(max=block - 1)
    return (chosen * block + inside).squeeze(1)
