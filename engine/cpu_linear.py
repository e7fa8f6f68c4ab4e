"""The model's linear layers on a CPU: a forward of several tokens multiplies by weights packed
once for oneDNN, instead of handing MKL a plain weight to pack again at every call.

A step of one token is a matrix-vector product, which MKL does at the speed of reading the
weights. A step of a few tokens (a verify step's k + 1, a small batch, a prompt) is a matrix
product, and there MKL packs the whole weight first, every call: on the 2-core AMD host of
docs/engine.md ("Where a verify step's time goes") a 576 x 1536 layer took 2.5 ms for 9 rows
against 0.07 ms for one, and the 49k-row output projection 106 ms against 11 ms, so a verify
step cost two plain steps whatever its drafts. oneDNN with a weight packed at load time (the
layout PyTorch's own CPU compiler uses, `torch.ops.mkldnn._reorder_linear_weight`) multiplies
the 9 rows in 0.2 ms and 28 ms. One-token forwards keep MKL's matrix-vector product.

The packed copy is made once per layer and kept beside the weight (the weight still serves the
one-token steps and anything else that reads it): a CPU replica holds its linear weights twice.
Both products give the same values up to float rounding (~1e-6), as any two batch shapes do.
"""
from __future__ import annotations

import logging
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
    packed = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (type(module) is not torch.nn.Linear or getattr(module, "packed_weight", None) is not None
                or weight.device.type != "cpu" or weight.dtype != torch.float32):
            continue
        _pack(module)
        module.forward = partial(_forward, module)  # an instance attribute: LoRA's forward hooks still run
        packed += 1
    if packed:
        log.info("packed %d linear layers for oneDNN: multi-token CPU forwards skip MKL's per-call packing", packed)
    return packed


def _pack(module: torch.nn.Linear) -> None:
    weight = module.weight
    with torch.no_grad():
        module.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), None)
    module.packed_from = (weight, weight._version)  # what the packed copy was made of


def _forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    features, weight = x.shape[-1], module.weight
    if x.numel() == features or x.dtype != weight.dtype or weight.dtype != torch.float32 or torch.is_grad_enabled():
        return F.linear(x, weight, module.bias)  # one token (MKL's matrix-vector product), or training
    source, version = module.packed_from
    if source is not weight or version != weight._version:  # weights loaded or changed since: pack them again
        _pack(module)
    bias = None if module.bias is None else module.bias.detach()
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, features), module.packed_weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], out.shape[-1])
