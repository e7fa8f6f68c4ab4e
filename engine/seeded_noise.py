"""Per-request random numbers that depend on (seed, draw number) only: a counter-based generator.

A request's k-th sampled token reads the uniform `uniform(seed, k)`, a hash of its seed and k
(murmur3's 32-bit finalizer, chained), computed for every row of the batch in a few integer
kernels on the device. No generator state lives anywhere, so a seeded request draws the same
numbers whatever batch it shares, whichever rows came and went, and on whichever replica; and
the draw needs no per-row loop, no host round trip, and can run ahead of the host (the
overlapped step launches the next draw before the previous tokens reach the host).

Integer products wrap in int64 (two's complement), so the low 32 bits, the only ones kept,
are exact on every backend; `uniform_reference` is the same function on Python ints (tests).
"""
from __future__ import annotations

import torch
from torch import Tensor

MASK = 0xFFFFFFFF
GOLDEN = 0x9E3779B9  # keeps draw 0 of seed 0 away from the hash's fixed point at 0
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35  # murmur3's fmix32 constants


def _mix(x: Tensor) -> Tensor:
    """murmur3's fmix32 on int64 tensors holding uint32 values."""
    x = x ^ (x >> 16)
    x = (x * _C1) & MASK
    x = x ^ (x >> 13)
    x = (x * _C2) & MASK
    return x ^ (x >> 16)


def uniform(seed_low: Tensor, seed_high: Tensor, draw: Tensor) -> Tensor:
    """[B] float32 in [0, 1): row i's number for its `draw[i]`-th token under its 64-bit seed
    (split in two uint32 halves, int64 tensors [B])."""
    mixed = _mix(seed_low ^ _mix(seed_high ^ _mix((draw + GOLDEN) & MASK)))
    return (mixed >> 8).to(torch.float32) / float(1 << 24)


def split_seed(seed: int) -> tuple[int, int]:
    """(low, high) uint32 halves of a 64-bit seed (TGI's seeds are u64)."""
    seed &= (1 << 64) - 1
    return seed & MASK, seed >> 32


def _mix_reference(x: int) -> int:
    x ^= x >> 16
    x = (x * _C1) & MASK
    x ^= x >> 13
    x = (x * _C2) & MASK
    return x ^ (x >> 16)


def uniform_reference(seed: int, draw: int) -> float:
    """`uniform` on Python ints, for one row."""
    low, high = split_seed(seed)
    mixed = _mix_reference(low ^ _mix_reference(high ^ _mix_reference((draw + GOLDEN) & MASK)))
    return (mixed >> 8) / float(1 << 24)
