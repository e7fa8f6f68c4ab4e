"""The running batch's model-side state: a left-padded KV cache and its attention mask.

Rows are sequences; columns are cache positions, right-aligned so that every row's newest
token sits in the last column (TGI's CausalLMBatch layout). Requests join by `concat` (the
shorter cache is padded on the left) and leave by `filter` (rows dropped, then the padding
columns no remaining row needs are trimmed, freeing memory at once).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.kv_cache import GrowableCache


@dataclass
class KVBatch:
    cache: GrowableCache
    attention_mask: torch.Tensor  # [B, L] long, 0 = padding
    positions: torch.Tensor  # [B] long, position id of each row's next input token

    @property
    def size(self) -> int:
        return self.attention_mask.shape[0]

    @property
    def length(self) -> int:
        return self.attention_mask.shape[1]

    def filter(self, keep: list[int]) -> None:
        """Keep only rows `keep` (in that order), then trim all-padding columns on the left."""
        index = torch.tensor(keep, dtype=torch.long, device=self.attention_mask.device)
        mask = self.attention_mask.index_select(0, index)
        start = int(mask.any(dim=0).long().argmax())  # first column some row still uses
        self.attention_mask = mask[:, start:]
        self.positions = self.positions.index_select(0, index)
        for layer in self.cache.layers:
            layer.assign(layer.keys.index_select(0, index)[:, :, start:], layer.values.index_select(0, index)[:, :, start:])

    @classmethod
    def concat(cls, first: "KVBatch", second: "KVBatch") -> "KVBatch":
        length = max(first.length, second.length)
        mask = torch.cat([_pad_left(first.attention_mask, length, dim=1), _pad_left(second.attention_mask, length, dim=1)])
        cache = first.cache  # reused: its layers get the concatenated tensors
        for mine, theirs in zip(cache.layers, second.cache.layers):
            mine.assign(
                torch.cat([_pad_left(mine.keys, length, dim=2), _pad_left(theirs.keys, length, dim=2)]),
                torch.cat([_pad_left(mine.values, length, dim=2), _pad_left(theirs.values, length, dim=2)]),
            )
        return cls(cache, mask, torch.cat([first.positions, second.positions]))

    def extend_mask(self) -> torch.Tensor:
        """The mask for the next decode step: one more real column for every row."""
        ones = torch.ones((self.size, 1), dtype=self.attention_mask.dtype, device=self.attention_mask.device)
        self.attention_mask = torch.cat([self.attention_mask, ones], dim=1)
        return self.attention_mask


def _pad_left(tensor: torch.Tensor, length: int, dim: int) -> torch.Tensor:
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
