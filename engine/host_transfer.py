"""Copies between host and device that never stall the host.

To the device: host tensors go through pinned memory with a non-blocking copy (the caching
host allocator keeps the pinned block until the copy has run). To the host: the step's
results are copied without blocking into pinned memory and one fence marks the end of the
step's work; the host waits on it only when it needs the values (`HostCopy.wait`), so the next
step can be launched first. A `.tolist()` per tensor would synchronize once each.
"""
from __future__ import annotations

from collections.abc import Callable

import torch


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`host` on `device` without a host-side wait (pinned, non-blocking on CUDA)."""
    if device.type != "cuda":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def device_longs(values, device: torch.device) -> torch.Tensor:
    """Host ints as a long tensor on `device`, copied without a host-side wait."""
    return to_device(torch.tensor(values, dtype=torch.long), device)


class Fence:
    """Marks the work queued so far; `wait` blocks until the device has done it."""

    def __init__(self, device: torch.device):
        self._event = None
        if device.type == "cuda":
            self._event = torch.cuda.Event()
            self._event.record()

    def wait(self) -> None:
        if self._event is not None:
            self._event.synchronize()


class HostCopy:
    """Tensors on their way to the host; `wait()` returns them there."""

    def __init__(self, tensors: tuple[torch.Tensor | None, ...], fence: Callable[[], Fence]):
        self._copies = [_start_copy(t) for t in tensors]
        self._fence = fence()

    def wait(self) -> list[torch.Tensor | None]:
        self._fence.wait()
        return self._copies


def _start_copy(tensor: torch.Tensor | None) -> torch.Tensor | None:
    if tensor is None or not tensor.is_cuda:
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host


def to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The tensors on the host, now (one wait for all)."""
    device = next((t.device for t in tensors if t is not None), torch.device("cpu"))
    return HostCopy(tensors, lambda: Fence(device)).wait()
