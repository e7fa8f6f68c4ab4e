"""One device-to-host transfer per step: the sampled tokens and their logprobs.

On CUDA every tensor is copied without blocking into pinned host memory and the step waits
once, on one event; a `.tolist()` per tensor would synchronize once each.
"""
from __future__ import annotations

import torch


def to_host(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    if not any(t is not None and t.is_cuda for t in tensors):
        return list(tensors)
    copies = []
    for tensor in tensors:
        if tensor is None or not tensor.is_cuda:
            copies.append(tensor)
            continue
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        host.copy_(tensor, non_blocking=True)
        copies.append(host)
    done = torch.cuda.Event()
    done.record()
    done.synchronize()
    return copies
