"""TGI's watermark (Kirchenbauer et al., "A Watermark for Large Language Models", 2023,
https://arxiv.org/abs/2301.10226): before each token is chosen, a "green list" of
`int(vocab × gamma)` tokens, drawn from the previous token alone, gets `delta` added to its logits.
Text generated so holds far more green tokens than chance; `z_score` counts them.

The green list is TGI's (text_generation_server/utils/watermark.py): a torch generator seeded
with `15485863 × previous token` draws `randperm(vocab)`, whose first `int(vocab × gamma)` ids are
green. We draw it on the CPU whatever the device (TGI draws on the logits' device, and CUDA's
generator gives other permutations), so a text scores the same wherever it was generated, and as
under TGI on a CPU. `vocab` is the width of the model's logits (its config's `vocab_size`).
Drawn once per previous token and kept on the logits' device (`GreenLists`), so a step's
watermarked rows read their lists there by index; text repeats its tokens, so most rows draw none.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from engine.host_transfer import device_longs, to_device

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


GREEN_LISTS_KEPT = 512  # green masks kept on the device between steps (engine/kv_budget.py counts them)


class GreenLists:
    """The green masks of the previous tokens seen lately, on the device ([capacity, V] bool, the
    least recently used row given to a new token; more rows when one step's previous tokens
    outnumber them). A step's lookup is host bookkeeping and one
    pinned index copy; a token's first lookup draws its list on the CPU and copies it, pinned."""

    def __init__(self, vocab_size: int, gamma: float, device: torch.device, capacity: int = GREEN_LISTS_KEPT):
        self.vocab_size, self.gamma, self.device = vocab_size, gamma, device
        self.masks = torch.zeros(capacity, vocab_size, dtype=torch.bool, device=device)  # [capacity, V]
        self._rows: OrderedDict[int, int] = OrderedDict()  # token -> its row of `masks`, least recent first

    def of(self, previous_tokens: Sequence[int]) -> Tensor:
        """The green masks after `previous_tokens`: [W, V] bool on the device."""
        distinct = len(set(previous_tokens))
        if distinct > self.masks.shape[0]:  # a batch wider than the lists kept: keep more, never fail the step
            grown = torch.zeros(distinct - self.masks.shape[0], self.vocab_size, dtype=torch.bool, device=self.device)
            self.masks = torch.cat([self.masks, grown])
        capacity = self.masks.shape[0]
        index, drawn_tokens, drawn_rows = [], [], []
        for token in previous_tokens:
            row = self._rows.get(token)
            if row is None:  # this step's tokens are the most recent: never the one evicted
                row = len(self._rows) if len(self._rows) < capacity else self._rows.popitem(last=False)[1]
                drawn_tokens.append(token)
                drawn_rows.append(row)
            self._rows[token] = row
            self._rows.move_to_end(token)
            index.append(row)
        if drawn_tokens:
            drawn = torch.stack([green_mask(t, self.vocab_size, self.gamma) for t in drawn_tokens])
            self.masks.index_copy_(0, device_longs(drawn_rows, self.device), to_device(drawn, self.device))
        return self.masks[device_longs(index, self.device)]


@dataclass(frozen=True)
class Watermark:
    """The engine's watermark settings (TGI's `--watermark-gamma`, `--watermark-delta`), and the
    green lists drawn under them so far."""

    gamma: float = DEFAULT_GAMMA
    delta: float = DEFAULT_DELTA
    _lists: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # (device, V) -> GreenLists

    def __post_init__(self):
        if not 0.0 < self.gamma < 1.0:
            raise ValueError("watermark gamma must be in (0, 1)")
        if not math.isfinite(self.delta) or self.delta < 0:
            raise ValueError("watermark delta must be finite and >= 0")

    def apply(self, logits: Tensor, rows: Tensor, previous_tokens: Sequence[int]) -> Tensor:
        """`logits` [B, V] with `delta` added to the green tokens of each row in `rows` [W],
        whose previous tokens are `previous_tokens` [W]; the other rows untouched."""
        key = (logits.device, logits.shape[1])
        lists = self._lists.get(key)
        if lists is None:
            lists = self._lists[key] = GreenLists(logits.shape[1], self.gamma, logits.device)
        bias = lists.of(previous_tokens).to(logits.dtype) * self.delta  # [W, V]
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
