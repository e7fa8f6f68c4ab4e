"""The engine's device: the one a thread's implicit work goes to, and what it can hold.

Streams, events and graph captures that name no device use the calling thread's current one,
which is `cuda:0` in a new thread whatever device the model is on. Every thread that issues the
engine's work (its loop, the graph capture) runs under the engine's own device instead.
"""
from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING

import torch

from engine.kv_slots import KVGeometry
from engine.outputs import EngineError

if TYPE_CHECKING:
    from engine.scheduler import SchedulerConfig

log = logging.getLogger(__name__)


def device_context(device: torch.device):
    """`device` current for the block, on CUDA; nothing to do on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def affordable_slots(model, device: torch.device, config: SchedulerConfig) -> int:
    """On a GPU the slots are allocated at once: no more than 90% of the free memory holds."""
    if device.type != "cuda":
        return config.slots
    per_position = KVGeometry.of(model).bytes_per_position
    free, _total = torch.cuda.mem_get_info(device)
    affordable = int(0.9 * free) // (per_position * config.slot_length)
    if affordable < 1:
        raise EngineError("not enough GPU memory for one KV slot")
    if affordable < config.slots:
        log.warning("GPU memory holds %d KV slots of %d positions, not %d", affordable, config.slot_length, config.slots)
    return min(config.slots, affordable)
