"""The CUDA device a thread's implicit work goes to.

Streams, events and graph captures that name no device use the calling thread's current one,
which is `cuda:0` in a new thread whatever device the model is on. Every thread that issues the
engine's work (its loop, the graph capture) runs under the engine's own device instead.
"""
from __future__ import annotations

import contextlib

import torch


def device_context(device: torch.device):
    """`device` current for the block, on CUDA; nothing to do on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
