"""TGI's watermark (Kirchenbauer et al., "A Watermark for Large Language Models", 2023,
https://arxiv.org/abs/2301.10226): before each token is chosen, a "green list" of
`int(vocab × gamma)` tokens, drawn from the previous token alone, gets `delta` added to its logits.
Text generated so holds far more green tokens than chance; `z_score` counts them.

The green list is TGI's (text_generation_server/utils/watermark.py): a torch generator seeded
with `15485863 × previous token` draws `randperm(vocab)`, whose first `int(vocab × gamma)` ids are
green. We draw it on the CPU whatever the device (TGI draws on the logits' device, and CUDA's
generator gives other permutations), so a text scores the same wherever it was generated, and as
under TGI on a CPU. `vocab` is the width of the model's logits (its config's `vocab_size`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

HASH_KEY = 15485863  # TGI's: a large prime, so that the seeds of neighbouring tokens differ widely
DEFAULT_GAMMA = 0.5  # TGI's WATERMARK_GAMMA: the green share of the vocabulary
DEFAULT_DELTA = 2.0  # TGI's WATERMARK_DELTA: what a green token's logit gains


def green_ids(previous_token: int, vocab_size: int, gamma: float) -> Tensor:
    """The green list after `previous_token`: [int(vocab_size × gamma)] token ids (CPU)."""
    generator = torch.Generator().manual_seed(HASH_KEY * previous_token)
    return torch.randperm(vocab_size, generator=generator)[: int(vocab_size * gamma)]


def green_mask(previous_token: int, vocab_size: int, gamma: float) -> Tensor:
    """[vocab_size] bool: True for the green tokens after `previous_token`."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[green_ids(previous_token, vocab_size, gamma)] = True
    return mask


@dataclass(frozen=True)
class Watermark:
    """The engine's watermark settings (TGI's `--watermark-gamma`, `--watermark-delta`)."""

    gamma: float = DEFAULT_GAMMA
    delta: float = DEFAULT_DELTA

    def __post_init__(self):
        if not 0.0 < self.gamma < 1.0:
            raise ValueError("watermark gamma must be in (0, 1)")
        if not math.isfinite(self.delta) or self.delta < 0:
            raise ValueError("watermark delta must be finite and >= 0")

    def apply(self, logits: Tensor, rows: Tensor, previous_tokens: Sequence[int]) -> Tensor:
        """`logits` [B, V] with `delta` added to the green tokens of each row in `rows` [W],
        whose previous tokens are `previous_tokens` [W]; the other rows untouched."""
        vocab_size = logits.shape[1]
        green = torch.stack([green_mask(t, vocab_size, self.gamma) for t in previous_tokens])  # [W, V]
        bias = green.to(device=logits.device, dtype=logits.dtype) * self.delta
        return logits.index_add(0, rows, bias)


@dataclass(frozen=True)
class WatermarkScore:
    scored: int  # tokens scored: every token but the first (it has no previous token here)
    green: int  # how many of them are on their green list
    z: float  # (green − γ·scored) / sqrt(scored·γ·(1 − γ)): ~N(0, 1) for text written without it

    @property
    def green_fraction(self) -> float:
        return self.green / self.scored if self.scored else 0.0


def z_score(token_ids: Sequence[int], vocab_size: int, gamma: float = DEFAULT_GAMMA) -> WatermarkScore:
    """The detector (the paper's one-proportion z-test): each token after the first is green or
    not under the list its predecessor seeds."""
    scored = len(token_ids) - 1
    if scored < 1:
        return WatermarkScore(0, 0, 0.0)
    green = sum(bool(green_mask(previous, vocab_size, gamma)[token])
                for previous, token in zip(token_ids, token_ids[1:]) if 0 <= token < vocab_size)
    z = (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))
    return WatermarkScore(scored, green, z)
