"""The engine's device: the one a thread's implicit work goes to, and what it can hold.

Streams, events and graph captures that name no device use the calling thread's current one,
which is `cuda:0` in a new thread whatever device the model is on. Every thread that issues the
engine's work (its loop, the graph capture) runs under the engine's own device instead.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence

import torch

from engine.kv_budget import kv_budget
from engine.lora_files import LoraAdapter
from engine.outputs import EngineError
from engine.scheduler import SchedulerConfig

log = logging.getLogger(__name__)


class DeviceError(ValueError):
    """A `--device` this process cannot run on; the message says why in one line."""


def resolve_device(spelling: str | None, default_index: int, cuda_count: int, visible: str | None = None) -> torch.device:
    """The device a replica runs on, with an index on CUDA (`torch.cuda.set_device` refuses
    `cuda` without one). None or `cuda`: `cuda:<default_index mod GPUs>` (cpu without CUDA, for
    None); `cuda:N`: N when this process sees more than N GPUs, else the position of GPU N in
    `visible` (CUDA_VISIBLE_DEVICES: `cuda:3` pinned by `CUDA_VISIBLE_DEVICES=3` is `cuda:0` here).
    Any case (`CUDA:1`)."""
    if spelling is None and not cuda_count:
        return torch.device("cpu")
    # Blanks (a quoted environment variable), capitals, a bare index: meant as torch means them
    # (torch.device(0) is cuda:0), which its parser of strings refuses.
    spelled = (spelling or "cuda").strip().lower()
    try:
        device = torch.device(f"cuda:{spelled}" if spelled.isdigit() else spelled)
    except RuntimeError as error:
        raise DeviceError(f"--device {spelling!r} is not a device torch knows") from error
    if device.type != "cuda":
        return device
    if not cuda_count:
        raise DeviceError(f"--device {spelling}: this process sees no CUDA device")
    if device.index is None:
        return torch.device("cuda", default_index % cuda_count)
    if device.index < cuda_count:
        return device
    pinned = [part.strip() for part in (visible or "").split(",") if part.strip()]
    if str(device.index) in pinned:
        return torch.device("cuda", pinned.index(str(device.index)))
    raise DeviceError(f"--device {spelling}: this process sees {cuda_count} GPU(s) "
                      f"(CUDA_VISIBLE_DEVICES={visible if visible is not None else 'unset'})")


def device_context(device: torch.device):
    """`device` current for the block, on CUDA; nothing to do on CPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def affordable_slots(model, device: torch.device, config: SchedulerConfig, adapters: Sequence[LoraAdapter] = (),
                     cuda_graphs: bool = False, draft_model=None, verify_drafts: int = 0) -> int:
    """On a GPU the slots are allocated at once: as many as the free memory holds once the margin
    and what the engine allocates besides them are set aside (engine/kv_budget.py), logged."""
    if device.type != "cuda":
        return config.slots
    free, _total = torch.cuda.mem_get_info(device)
    budget = kv_budget(model, free, config.slots, config.slot_length, adapters, cuda_graphs, draft_model,
                       verify_drafts)
    log.info("%s on %s", budget.describe(), device)
    if budget.slots < 1:
        raise EngineError(f"not enough GPU memory for one KV slot ({budget.describe()})")
    if budget.slots < config.slots:
        log.warning("GPU memory holds %d KV slots of %d positions, not %d", budget.slots, config.slot_length, config.slots)
    return min(config.slots, budget.slots)
