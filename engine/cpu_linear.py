"""The model's linear layers on a CPU: a forward of several tokens multiplies by weights packed
once for oneDNN, instead of handing MKL a plain weight to pack again at every call.

A step of one token is a matrix-vector product, which MKL does at the speed of reading the
weights. A step of a few tokens (a verify step's k + 1, a small batch, a prompt) is a matrix
product, and there MKL packs the whole weight first, every call: on the 2-core AMD host of
docs/engine.md ("Where a verify step's time goes") the 49k-row output projection took 24 ms for
9 rows against 11 ms for one, and a 9-token forward 1.8 one-token ones, so a verify step cost
two plain steps whatever its drafts. oneDNN with a weight packed at load time (the layout
PyTorch's own CPU compiler uses, `torch.ops.mkldnn._reorder_linear_weight`) takes 9 ms and
1.14 (`python -m bench.verify_profile`). One-token forwards keep MKL's matrix-vector product.

The packed copy is made once per layer and kept beside the weight (the weight still serves the
one-token steps and anything else that reads it): a CPU replica holds its linear weights twice,
unless the copy would take more than half the free memory (then nothing is packed, and logged).
A copy is made again when its weight changes (in place, replaced, or its storage swapped), and
dropped when the layer is moved off the CPU or cast.
Both products give the same values up to float rounding (~1e-6), as any two batch shapes do.
"""
from __future__ import annotations

import logging
import os
from functools import partial

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def can_prepack() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def prepack_linears(model: torch.nn.Module) -> int:
    """Give each float32 CPU `nn.Linear` of `model` its packed weight (once: a model shared by
    several engines is packed by the first); how many layers were packed now."""
    if not can_prepack():
        return 0
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and getattr(m, "packed_weight", None) is None
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32]
    size = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    available = free_memory()
    if size > available // 2:  # the copy must leave room for the KV cache and everything else
        log.warning("linear weights not packed for oneDNN: their %.1f GB copy would take more than half the "
                    "%.1f GB of free memory (multi-token CPU forwards stay slower)", size / 1e9, available / 1e9)
        return 0
    for module in linears:
        _pack(module)
        module.forward = partial(_forward, module)  # an instance attribute: LoRA's forward hooks still run
    if linears:
        log.info("packed %d linear layers for oneDNN (%.2f GB): multi-token CPU forwards skip MKL's per-call "
                 "packing", len(linears), size / 1e9)
    return len(linears)


def free_memory() -> int:
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


class PackedWeight:
    """A layer's packed copy and what it was made of. A deep copy of the model (a draft model made
    from the target, a test's reference) gets none: oneDNN's opaque tensor cannot be copied, and
    the copy packs its own weight at its first multi-token forward."""

    def __init__(self, weight: torch.Tensor):
        with torch.no_grad():
            self.tensor = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
        # Its storage too, held: `weight.data = ...` (a cast and back, some loaders) swaps that
        # without a version bump, and while held its address cannot be reused by the new one.
        self.source, self.version, self.storage = weight, weight._version, weight.untyped_storage()

    def __deepcopy__(self, memo) -> None:
        return None

    def stale(self, weight: torch.Tensor) -> bool:
        """The weights were loaded or changed since it was packed."""
        return (self.source is not weight or self.version != weight._version
                or self.storage.data_ptr() != weight.untyped_storage().data_ptr())


def _pack(module: torch.nn.Linear) -> None:
    module.packed_weight = PackedWeight(module.weight)


def _forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    features, weight = x.shape[-1], module.weight
    if (x.numel() == features or torch.is_grad_enabled() or x.dtype != torch.float32 or weight.dtype != torch.float32
            or x.device.type != "cpu" or weight.device.type != "cpu"):
        # One token (MKL's matrix-vector product), training, or a model since moved or cast.
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            module.packed_weight = None  # moved or cast for good: its CPU copy (and the old storage) freed
        return F.linear(x, weight, module.bias)
    if module.packed_weight is None:  # a deep copy's layer, or one cast away and back: a new copy, if there is room
        if weight.numel() * weight.element_size() > free_memory() // 2:
            return F.linear(x, weight, module.bias)
        _pack(module)
    elif module.packed_weight.stale(weight):  # weights changed: the new copy replaces the old one
        _pack(module)
    bias = None if module.bias is None else module.bias.detach()
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, features), module.packed_weight.tensor, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])
