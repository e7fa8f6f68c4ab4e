"""Copies and swaps between KV slots (compaction, prefix reuse): exact, and on CUDA without a host
sync (they run before every forward that follows a request's end; run by scripts/gpu_check.sh)."""
from __future__ import annotations

import contextlib

import pytest
import torch

from engine.kv_slots import KVGeometry, SlotKVCache

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@contextlib.contextmanager
def no_host_sync(device: str):
    """Any operation that makes the host wait for the device raises (CUDA's sync debug mode)."""
    if device != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device", DEVICES)
def test_copies_and_swaps_move_exactly_the_columns_asked_without_a_host_sync(device):
    cache = SlotKVCache(KVGeometry(layers=3, kv_heads=2, head_dim=4, dtype=torch.float32), slots=5, slot_length=16,
                        device=torch.device(device), growable=False)
    for store in (cache.keys, cache.values):
        for tensor in store:
            tensor.copy_(torch.randn(tensor.shape, device=device))
    before = [t.clone() for t in cache.keys + cache.values]
    with no_host_sync(device):
        cache.copy(4, 1, 10, swap=True)  # a leaving request's slot 1 and the highest one, 4
        cache.copy(0, 3, 7)  # a cached prefix copied for a newcomer
    for old, new in zip(before, cache.keys + cache.values):
        expected = old.clone()
        expected[1, :, :10], expected[4, :, :10] = old[4, :, :10], old[1, :, :10]
        expected[3, :, :7] = old[0, :, :7]
        assert torch.equal(new, expected)
