"""The decode step replayed as CUDA graphs (CUDA only).

An eager decode step of a 30-layer model launches ~1,300 small kernels, ~7 µs of host time
each; replayed from a graph each costs ~1 µs, so the step stops being bound by the host.

One graph per (batch bucket, KV-length bucket), captured at start, largest first, sharing one
memory pool (as nano-vllm does). Every number a captured kernel sees is either part of that key
(the batch size, the attended length) or read from a static device buffer (token ids,
positions, each row's LoRA adapter index): a replay with new values computes with them, never with values from the capture.
Only steps without a prompt chunk replay (a mixed step is one eager packed forward), so the
rows past the live batch are all over free slots, which may hold prefix cache: they write at
the slot's last column, which no request ever writes (a request of `slot_length` positions
writes KV for all but its last token), and are dropped.
Shapes without a graph (a length over the largest bucket) run eagerly.
Sampling runs after the replay, eagerly, on the graph's logits; an overlapped step's input ids
are the previous step's sampled ids, copied on the device into the static buffer.
"""
from __future__ import annotations

import logging
import time

import torch

from engine.host_transfer import to_device

log = logging.getLogger(__name__)


def batch_buckets(slots: int) -> list[int]:
    small = [b for b in (1, 2, 4, 8) if b < slots]
    return small + list(range(16, slots, 16)) + [slots]


def length_buckets(slot_length: int) -> list[int]:
    lengths, length = [], 256
    while length < slot_length:
        lengths.append(length)
        length *= 2
    return lengths + [slot_length]


class DecodeGraphs:
    def __init__(self, runner):
        self.runner = runner
        cache = runner.cache
        self.batches = batch_buckets(cache.slots)
        self.lengths = length_buckets(cache.slot_length)
        self.ids = torch.zeros(cache.slots, dtype=torch.long, device=runner.device)  # [S] static inputs
        self.positions = torch.zeros(cache.slots, dtype=torch.long, device=runner.device)
        self.adapters = torch.zeros(cache.slots, dtype=torch.long, device=runner.device)  # LoRA index per row
        self._unused_column = cache.slot_length - 1  # where padding rows write (see the module doc)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}  # [b, V] logits each graph writes
        self.capture_seconds = 0.0
        self.pool = None

    def capture(self) -> None:
        with torch.cuda.device(self.runner.device):  # warm-up streams and graphs on our device, whoever calls
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        started = time.perf_counter()
        pool = None
        for batch in reversed(self.batches):
            for length in reversed(self.lengths):
                graph = torch.cuda.CUDAGraph()
                self._warm_up(batch, length)
                with torch.cuda.graph(graph, pool=pool):
                    self.outputs[(batch, length)] = self._step(batch, length)
                pool = graph.pool() if pool is None else pool
                self.graphs[(batch, length)] = graph
        self.pool = pool  # the verify graphs share it
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        log.info("captured %d decode CUDA graphs (batch %s × KV length %s) in %.1f s",
                 len(self.graphs), self.batches, self.lengths, self.capture_seconds)

    def _warm_up(self, batch: int, length: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(batch, length)
        torch.cuda.current_stream().wait_stream(stream)

    def _step(self, batch: int, length: int) -> torch.Tensor:
        adapters = self.adapters[:batch] if self.runner.lora is not None else None
        return self.runner.decode_forward(self.ids[:batch], self.positions[:batch], length, adapters)

    def replay(self, ids: list[int] | torch.Tensor, positions: list[int], length: int,
               adapters: list[int] | None = None) -> torch.Tensor | None:
        """Logits [B, V] float32 for the B = len(ids) live rows, or None when no graph fits.
        `ids` may be the previous step's sampled ids on the device (an overlapped step): they go
        straight into the static buffer, with no trip through the host. `adapters`: each row's
        LoRA adapter index (engine/lora.py; 0 or None: none)."""
        rows = len(ids)
        batch = next((b for b in self.batches if b >= rows), None)
        bucket = next((n for n in self.lengths if n >= length), None)
        if batch is None or bucket is None or (batch, bucket) not in self.graphs:
            return None  # eager: too large, or not captured (an engine stepped by hand before `capture`)
        # A fresh pinned block each step (the caching host allocator frees it once its copy has
        # run), so an overlapped step never overwrites inputs the device has not read yet.
        staging = torch.zeros((3, self.ids.shape[0]), dtype=torch.long)  # ids, positions, adapters
        staging[1].fill_(self._unused_column)  # padding rows over free slots write at their unused last column
        staging[1, :rows] = torch.tensor(positions, dtype=torch.long)
        if adapters is not None:  # padding rows: 0, no adapter
            staging[2, :rows] = torch.tensor(adapters, dtype=torch.long)
        on_device = isinstance(ids, torch.Tensor)
        if not on_device:
            staging[0, :rows] = torch.tensor(ids, dtype=torch.long)
        staged = to_device(staging, self.ids.device)
        self.positions.copy_(staged[1])
        self.adapters.copy_(staged[2])
        if on_device:
            self.ids[:rows].copy_(ids)  # the padding rows keep earlier (valid) ids
        else:
            self.ids.copy_(staged[0])
        self.graphs[(batch, bucket)].replay()
        return self.outputs[(batch, bucket)][:rows].float()


def verify_widths(most_drafts: int) -> list[int]:
    """Tokens a row in the verify graphs: its last token and 1, 2, 4, ... drafts, up to the most."""
    drafts = [n for n in (1 << i for i in range(most_drafts.bit_length())) if n < most_drafts]
    return [n + 1 for n in drafts + [most_drafts]]


# A verify graph's most tokens (rows × width): a larger step is bound by the device's arithmetic,
# not by kernel launches, and runs eagerly.
MAX_VERIFY_GRAPH_TOKENS = 256


def verify_shapes(slots: int, most_drafts: int) -> list[tuple[int, int]]:
    """(batch bucket, width) of each verify graph, for every KV-length bucket (largest first)."""
    return [(b, w) for b in reversed(batch_buckets(slots)) for w in reversed(verify_widths(most_drafts))
            if b * w <= MAX_VERIFY_GRAPH_TOKENS]


class VerifyGraphs:
    """The verify step of a decode-only batch (`engine.model_runner.PaddedVerify`) replayed as
    graphs: one per (batch bucket, width, KV-length bucket), width = 1 + drafts a row (bucketed:
    a row with fewer is padded), captured after the decode graphs into their memory pool. As in
    `DecodeGraphs`, every number a kernel sees is part of the key or read from a static buffer;
    padding rows past the live batch lie over free slots and write only their unused last column."""

    def __init__(self, runner, most_drafts: int):
        self.runner = runner
        cache = runner.cache
        self.widths = verify_widths(most_drafts)
        self.lengths = length_buckets(cache.slot_length)
        self.shapes = verify_shapes(cache.slots, most_drafts)
        self.batches = sorted({b for b, _ in self.shapes})
        tokens = max(b * w for b, w in self.shapes)
        self.ids = torch.zeros(tokens, dtype=torch.long, device=runner.device)
        self.positions = torch.zeros(tokens, dtype=torch.long, device=runner.device)
        self.adapters = torch.zeros(tokens, dtype=torch.long, device=runner.device)
        self._unused_column = cache.slot_length - 1
        self.graphs: dict[tuple[int, int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int, int], torch.Tensor] = {}  # [b × width, V]
        self.capture_seconds = 0.0

    def keys(self) -> list[tuple[int, int, int]]:
        return [(b, w, n) for b, w in self.shapes for n in reversed(self.lengths)]

    def capture(self, pool=None) -> None:
        with torch.cuda.device(self.runner.device):
            self._capture(pool)

    @torch.inference_mode()
    def _capture(self, pool) -> None:
        started = time.perf_counter()
        for key in self.keys():
            graph = torch.cuda.CUDAGraph()
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # warm-up, as `DecodeGraphs._warm_up`
                for _ in range(2):
                    self._step(*key)
            torch.cuda.current_stream().wait_stream(stream)
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[key] = self._step(*key)
            pool = graph.pool() if pool is None else pool
            self.graphs[key] = graph
        torch.cuda.synchronize()
        self.capture_seconds = time.perf_counter() - started
        log.info("captured %d verify CUDA graphs (batch %s × width %s × KV length %s) in %.1f s",
                 len(self.graphs), self.batches, self.widths, self.lengths, self.capture_seconds)

    def _step(self, batch: int, width: int, length: int) -> torch.Tensor:
        tokens = batch * width
        adapters = self.adapters[:tokens] if self.runner.lora is not None else None
        return self.runner.verify_forward(self.ids[:tokens], self.positions[:tokens], width, length, adapters)

    def replay(self, layout, adapters: list[int] | None = None) -> torch.Tensor | None:
        """Logits [rows × width, V] float32 of `layout` (a `PaddedVerify`), or None when no graph
        fits. `adapters`: each row's LoRA adapter index (None: none)."""
        width = layout.width
        tokens = len(layout.ids)
        rows = tokens // width
        batch = next((b for b in self.batches if b >= rows), None)
        bucket = next((n for n in self.lengths if n >= max(layout.positions) + 1), None)
        if batch is None or bucket is None or (batch, width, bucket) not in self.graphs:
            return None
        staging = torch.zeros((3, self.ids.shape[0]), dtype=torch.long)  # fresh each step, as `DecodeGraphs.replay`
        staging[1].fill_(self._unused_column)
        staging[0, :tokens] = torch.tensor(layout.ids, dtype=torch.long)
        staging[1, :tokens] = torch.tensor(layout.positions, dtype=torch.long)
        if adapters is not None:
            staging[2, :tokens] = torch.tensor([a for a in adapters for _ in range(width)], dtype=torch.long)
        staged = to_device(staging, self.ids.device)
        self.ids.copy_(staged[0])
        self.positions.copy_(staged[1])
        self.adapters.copy_(staged[2])
        self.graphs[(batch, width, bucket)].replay()
        return self.outputs[(batch, width, bucket)][:tokens].float()
