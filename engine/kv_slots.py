"""The KV cache as slots: one row per request, allocated once, written in place.

Every layer holds keys and values as `[slots, kv_heads, capacity, head_dim]`. A request owns a
slot from its first prefill chunk to its end; its token at position p lives at column p of its
row. A leaving request's row is swapped with the highest occupied row (`copy`), so the occupied
slots are always `0..n-1` and a decode step attends over the view `[:n, :, :length]` without
gathering anything; a free row keeps its KV as prefix cache, which a new request may copy from
(engine/slot_table.py decides every copy).

The transformers model calls `update(key, value, layer_idx)` in every attention layer; where
each token's key and value go is set for the whole forward by `plan` (a `StepPlan` of device
tensors, so a captured CUDA graph replays with new positions), and attention then reads the
slots (`engine/slot_attention.py`). Unused columns stay finite (zeros or an earlier request's
values): masked positions still enter SDPA's weighted sum as 0 × value, and a NaN there would
poison the row.

Capacity (columns) grows geometrically up to `slot_length` when `growable` (CPU: memory is
taken as requests need it); a captured graph needs fixed addresses, so CUDA allocates it all.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, DynamicLayer

from engine.slot_attention import StepPlan


@dataclass(frozen=True)
class KVGeometry:
    """What one position of the model's KV cache is made of."""

    layers: int
    kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> "KVGeometry":
        config = model.config.get_text_config()
        heads = config.num_attention_heads
        return cls(config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads,
                   getattr(config, "head_dim", None) or config.hidden_size // heads, next(model.parameters()).dtype)

    @property
    def bytes_per_position(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.dtype.itemsize  # keys and values


class SlotLayer(DynamicLayer):
    def __init__(self, cache: "SlotKVCache", index: int):
        super().__init__()
        self._cache = cache
        self._index = index
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._cache.write(self._index, key_states, value_states)

    def get_seq_length(self) -> int:
        return 0  # positions come from position_ids and the attention plan, never from the cache

    def get_mask_sizes(self, query_length, *args, **kwargs):
        return query_length, 0


class SlotKVCache(Cache):
    def __init__(self, geometry: KVGeometry, slots: int, slot_length: int, device: torch.device, growable: bool):
        num_layers = geometry.layers
        super().__init__(layers=[SlotLayer(self, i) for i in range(num_layers)])
        self.slots = slots
        self.slot_length = slot_length
        self.growable = growable
        shape = (slots, geometry.kv_heads, 0 if growable else slot_length, geometry.head_dim)
        self.keys = [torch.zeros(shape, dtype=geometry.dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=geometry.dtype, device=device) for _ in range(num_layers)]
        self.plan: StepPlan | None = None

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def ensure_capacity(self, columns: int) -> None:
        """Make room for `columns` positions per slot (a copy, a few times per slot length)."""
        if columns <= self.capacity:
            return
        if not self.growable or columns > self.slot_length:
            raise ValueError(f"{columns} positions do not fit a slot of {self.slot_length}")
        grown = min(self.slot_length, max(columns, 2 * self.capacity, 64))
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros((old.shape[0], old.shape[1], grown, old.shape[3]))
                new[:, :, : old.shape[2]] = old
                store[i] = new

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's packed keys/values [1, H, N, D] at their (slot, column)."""
        plan = self.plan
        self.keys[layer][plan.slots, :, plan.columns] = key[0].transpose(0, 1)  # [N, H, D]
        self.values[layer][plan.slots, :, plan.columns] = value[0].transpose(0, 1)
        return key, value

    def copy(self, source: int, target: int, length: int, swap: bool = False) -> None:
        """Copy slot `source`'s first `length` columns into slot `target` (compaction, a cached
        prefix); `swap`: exchange them. In place: captured graphs keep their addresses. Views and
        copies only: an index list would go to the device by a copy the host waits for."""
        for store in (self.keys, self.values):
            for tensor in store:
                moving = tensor[source, :, :length]
                if swap:
                    moving = moving.clone()
                    tensor[source, :, :length] = tensor[target, :, :length]
                tensor[target, :, :length] = moving

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0
