"""Picking a token per row from [B, V] scores in a few passes over the vocabulary.

Everything looks at the vocabulary in blocks (`[B, V / block, block]`). One pass (`summarize`)
keeps, per block, its largest score and its weight Σ exp(scale · (score − row max)); that is
enough for the greedy token (the first block holding the row's maximum, then one block), for a
sampled token (the block where the cumulative weight crosses the row's target, then one block,
its weights computed again the same way) and for every logprob (the row's log-normalizer is its
maximum plus the log of its total weight). No [B, V] probability tensor is written.

On a CPU the pass runs a few rows at a time, so the exp's scratch stays in the core's cache
(the vocabulary's exp is most of a step's sampling there), and `argmax`/`cumsum` over 49k
columns, scalar loops, are replaced by vectorized block reductions. On a GPU it is one chunk of
all rows: a few kernels. Results are exactly those of the plain operations: the first maximum's
index; the first token whose cumulative weight exceeds the target.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# The CPU pass's scratch per chunk of rows: within a core's L2 with the rows it reads.
CPU_CHUNK_BYTES = 1 << 20


def vocab_block(vocab_size: int) -> int:
    """The block width: the widest of 128..8 that divides the vocabulary (1: no blocking)."""
    return next((b for b in (128, 64, 32, 16, 8) if vocab_size % b == 0 and vocab_size > b), 1)


@dataclass
class VocabSummary:
    """What one pass over `scores` [B, V] keeps. `scale` [B, 1] (or None for 1) multiplies the
    scores first (a sampled row's 1 / temperature): the distribution is softmax(scale · scores)."""

    scores: Tensor  # [B, V], unscaled
    scale: Tensor | None  # [B, 1]
    block_max: Tensor  # [B, nb]
    block_weight: Tensor  # [B, nb]: Σ exp(scale · (score − row_max)) over the block
    row_max: Tensor  # [B, 1]

    @property
    def blocks(self) -> Tensor:
        rows, width = self.block_max.shape
        return self.scores.view(rows, width, -1)

    def log_probability(self, values: Tensor) -> Tensor:
        """log softmax(scale · scores) at scores `values` [B, k]."""
        shifted = values - self.row_max
        if self.scale is not None:
            shifted = shifted * self.scale
        return shifted - self.block_weight.sum(dim=-1, keepdim=True).log()

    def weights(self, values: Tensor, rows: Tensor) -> Tensor:
        """exp(scale · (values − row_max)) for `values` [S, k] of `rows` [S], computed as
        `summarize` computes them."""
        return _weights(values, self.row_max[rows], None if self.scale is None else self.scale[rows])


def _weights(values: Tensor, row_max: Tensor, scale: Tensor | None, out: Tensor | None = None) -> Tensor:
    shifted = torch.sub(values, row_max, out=out)
    if scale is not None:
        shifted.mul_(scale)  # (a CPU's addcmul with [B, 1] operands is 3x slower than sub + mul)
    return shifted.exp_()


def summarize(scores: Tensor, scale: Tensor | None = None) -> VocabSummary:
    """The blocks' maxima and weights of `scores` [B, V] under `scale` [B, 1] > 0."""
    scores = scores.contiguous()  # viewed in blocks
    rows, vocab = scores.shape
    block = vocab_block(vocab)
    width = vocab // block
    block_max = torch.empty((rows, width), dtype=scores.dtype, device=scores.device)
    block_weight = torch.empty_like(block_max)
    step = rows if scores.is_cuda else max(1, min(rows, CPU_CHUNK_BYTES // (vocab * scores.element_size())))
    scratch = torch.empty((step, vocab), dtype=scores.dtype, device=scores.device)
    for start in range(0, rows, step):
        end = min(rows, start + step)
        chunk = scores[start:end]
        maxima = torch.amax(chunk.view(end - start, width, block), dim=-1, out=block_max[start:end])
        weights = _weights(chunk, maxima.amax(dim=-1, keepdim=True),
                           None if scale is None else scale[start:end], out=scratch[: end - start])
        torch.sum(weights.view(end - start, width, block), dim=-1, out=block_weight[start:end])
    return VocabSummary(scores, scale, block_max, block_weight, block_max.amax(dim=-1, keepdim=True))


def first_argmax(scores: Tensor, block_max: Tensor | None = None) -> Tensor:
    """[B] index of each row's first maximum (`scores.argmax(-1)`); `block_max` [B, nb] when a
    summary already holds it."""
    rows, vocab = scores.shape
    block = vocab_block(vocab)
    if block == 1:
        return scores.argmax(dim=-1)
    blocks = scores.view(rows, vocab // block, block)
    if block_max is None:
        block_max = blocks.amax(dim=-1)
    best = block_max.argmax(dim=-1)  # [B]: the first block holding the row's maximum
    inside = blocks[torch.arange(rows, device=scores.device), best].argmax(dim=-1)
    return best * block + inside


def draw(summary: VocabSummary, rows: Tensor, uniforms: Tensor) -> Tensor:
    """[S] the token each of `rows` [S] draws for its uniform in [0, 1): the first whose
    cumulative weight exceeds `uniform × total weight`."""
    blocks = summary.blocks
    return _two_level_draw(summary.block_weight.index_select(0, rows),
                           lambda chosen: summary.weights(blocks[rows, chosen], rows), uniforms)


def _two_level_draw(sums: Tensor, block_weights, uniforms: Tensor) -> Tensor:
    """The draw over blocks' weights `sums` [S, nb], then inside the chosen block
    (`block_weights(chosen [S])` → [S, block]). A token of weight 0 is never drawn."""
    width = sums.shape[1]
    cumulative = sums.cumsum(dim=-1)
    total = cumulative[:, -1:]
    target = torch.minimum(uniforms.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    # [S, 1]: a block of weight > 0 (the clamp only guards a row of NaNs from indexing past the end)
    chosen = torch.searchsorted(cumulative, target, right=True).clamp_(max=width - 1)
    within = target - (cumulative.gather(1, chosen) - sums.gather(1, chosen))  # what is left inside it
    inner = block_weights(chosen.squeeze(1)).cumsum(dim=-1)  # [S, block]
    inner_total = inner[:, -1:]
    within = torch.minimum(within.clamp(min=0), torch.nextafter(inner_total, torch.zeros_like(inner_total)))
    inside = torch.searchsorted(inner, within, right=True).clamp_(max=inner.shape[1] - 1)
    return (chosen.squeeze(1) * inner.shape[1] + inside.squeeze(1))
