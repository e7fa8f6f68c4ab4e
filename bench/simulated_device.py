"""A stand-in for the engine's model runner that behaves like a GPU, on a CPU.

Every forward is instant on the host (it hands back fixed logits), and its results count as
ready `seconds` after it was launched, one launch after another as on a GPU's stream; a device
thread marks each step's fence done at that time. So an engine step measured over it shows
how much of the host's work is hidden behind the device's (`seconds=0`: the host time alone).
"""
from __future__ import annotations

import queue
import threading
import time

import torch

from engine.model_runner import StepOutput


class SimulatedFence:
    def __init__(self):
        self._done = threading.Event()

    def wait(self) -> None:
        self._done.wait()


class SimulatedDevice:
    graphs = None

    def __init__(self, runner, logits: torch.Tensor, seconds: float):
        """`logits` [rows, V]: what every forward returns for its decode rows and prompt chunks."""
        self.runner = runner
        self.logits = logits
        self.seconds = seconds
        self._ready_at = 0.0  # when the last launched forward completes
        self.forwards: list[tuple[float, float]] = []  # (launched at, ready at) of every forward
        self._fences: queue.SimpleQueue = queue.SimpleQueue()
        if seconds:
            threading.Thread(target=self._device, name="simulated-device", daemon=True).start()

    def __getattr__(self, name):  # the cache, copies, reset: the real runner's
        return getattr(self.runner, name)

    def forward(self, batch) -> StepOutput:
        now = time.perf_counter()
        self._ready_at = max(now, self._ready_at) + self.seconds
        self.forwards.append((now, self._ready_at))
        rows, chunks = len(batch.decode), len(batch.prefill)
        return StepOutput(self.logits[:rows] if rows else None, self.logits[:chunks] if chunks else None,
                          [None] * chunks)

    def fence(self) -> SimulatedFence:
        """Done when every forward launched so far is (at once for an instant device)."""
        fence = SimulatedFence()
        if self.seconds == 0:
            fence._done.set()
        else:
            self._fences.put((self._ready_at, fence))
        return fence

    def _device(self) -> None:
        while True:
            ready_at, fence = self._fences.get()
            delay = ready_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            fence._done.set()
