"""The model's forward passes over the slotted KV cache: one decode step, one prefill chunk.

The transformers model runs unchanged: we hand it `position_ids`, a 4D boolean mask (used as
given) and our `SlotKVCache`, which writes each new key/value at its own (slot, position).
On CUDA the decode step is replayed from captured graphs (`engine/cuda_graphs.py`).
"""
from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass

import torch

from engine.kv_slots import DecodePlan, KVGeometry, PrefillPlan, SlotKVCache
from engine.scheduler import PrefillChunk, ScheduledBatch, SlotMove

log = logging.getLogger(__name__)

# Families whose transformers attention goes through `Cache.update` and honours a 4D mask and
# per-row position_ids; tests check each against `generate`. Others take the generic path.
SLOT_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3"})


@dataclass
class PrefillOutput:
    last_logits: torch.Tensor  # [b, V] float32: each chunk's last position
    all_logits: torch.Tensor | None  # [b, P, V] float32 left-padded, when prefill logprobs were asked


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); speak whichever it knows."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def supports_slots(model, slot_length: int) -> bool:
    """The slot path ignores sliding windows: fine while a whole slot fits in the window."""
    config = model.config.get_text_config()
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    return config.model_type in SLOT_FAMILIES and (window is None or window >= slot_length)


class ModelRunner:
    def __init__(self, model, device: torch.device, slots: int, slot_length: int, cuda_graphs: bool = False):
        self.model = model
        self.device = device
        self.cache = SlotKVCache(KVGeometry.of(model), slots, slot_length, device, growable=device.type != "cuda")
        self._rows = torch.arange(slots, device=device)
        self._columns = torch.arange(slot_length, device=device)
        self._cache_kwarg = cache_kwarg(model)
        self.graphs = None
        if cuda_graphs:
            from engine.cuda_graphs import DecodeGraphs  # CUDA only; never imported on CPU

            self.graphs = DecodeGraphs(self)

    def apply_moves(self, moves: list[SlotMove]) -> None:
        for move in moves:
            self.cache.move(move.source, move.target, move.length)

    def reset(self) -> None:
        """Zero the cache (after a failed step, so nothing it left can reach a later request)."""
        for tensor in self.cache.keys + self.cache.values:
            tensor.zero_()

    # ---- decode ---------------------------------------------------------------------------
    @torch.inference_mode()
    def decode(self, batch: ScheduledBatch) -> torch.Tensor:
        """One token for each row (row i = slot i): next-token logits [B, V] float32."""
        ids, positions = batch.decode_ids, batch.decode_positions
        length = max(positions) + 1
        self.cache.ensure_capacity(length)
        if self.graphs is not None:
            logits = self.graphs.replay(ids, positions + batch.idle_positions, length)
            if logits is not None:
                return logits
        ids_t = torch.tensor(ids, dtype=torch.long, device=self.device)
        positions_t = torch.tensor(positions, dtype=torch.long, device=self.device)
        return self.decode_forward(ids_t, positions_t, length).float()

    def decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, length: int) -> torch.Tensor:
        """The capturable decode step: device tensors in, logits [B, V] (model dtype) out.
        Python numbers reaching kernels: B (ids' shape) and `length`, both part of a graph's key."""
        batch = ids.shape[0]
        mask = self._columns[:length].view(1, -1) <= positions.view(-1, 1)  # [B, L]: own past and self
        self.cache.plan = DecodePlan(self._rows[:batch], length, positions)
        out = self.model(
            input_ids=ids.view(-1, 1),
            attention_mask=mask.view(batch, 1, 1, length),
            position_ids=positions.view(-1, 1),
            **{self._cache_kwarg: self.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    # ---- prefill --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, chunks: list[PrefillChunk], all_logits: bool) -> PrefillOutput:
        """Run prompt chunks: several prompts from position 0 (left-padded to one length), or one
        chunk continuing a prompt whose earlier chunks are in its slot."""
        if chunks[0].start > 0:
            return self._prefill_continuation(chunks[0], all_logits)
        lengths = [c.end - c.start for c in chunks]
        width = max(lengths)
        ids = torch.zeros((len(chunks), width), dtype=torch.long)  # [b, P]
        real = torch.zeros((len(chunks), width), dtype=torch.bool)  # [b, P]
        for row, chunk in enumerate(chunks):
            ids[row, width - lengths[row]:] = torch.tensor(chunk.token_ids, dtype=torch.long)
            real[row, width - lengths[row]:] = True
        pad = torch.tensor([width - n for n in lengths]).view(-1, 1)  # [b, 1]
        index = torch.arange(width).view(1, -1)  # [1, P]
        # Real tokens go to columns 0..n-1 of their slot; padding to the columns after them.
        columns = (index - pad) % width  # [b, P]
        causal = index.view(1, -1, 1) >= index.view(1, 1, -1)  # [1, P, P] query i sees key j <= i
        # Padding queries see themselves only: a fully masked row would come out NaN.
        mask = (causal & real.view(len(chunks), 1, width)) | torch.eye(width, dtype=torch.bool).view(1, width, width)
        slots = torch.tensor([c.sequence.slot for c in chunks]).view(-1, 1)
        self.cache.ensure_capacity(width)
        plan = PrefillPlan(slots.to(self.device), columns.to(self.device))
        return self._prefill_forward(ids, (index - pad).clamp(min=0), mask.unsqueeze(1), plan, all_logits)

    def _prefill_continuation(self, chunk: PrefillChunk, all_logits: bool) -> PrefillOutput:
        count, end = chunk.end - chunk.start, chunk.end
        ids = torch.tensor([chunk.token_ids], dtype=torch.long)  # [1, C]
        positions = torch.arange(chunk.start, end).view(1, -1)  # [1, C]
        mask = torch.arange(end).view(1, -1) <= positions.view(-1, 1)  # [C, end]
        self.cache.ensure_capacity(end)
        slot = chunk.sequence.slot
        plan = PrefillPlan(torch.tensor([[slot]], device=self.device), positions.to(self.device), continuing=(slot, end))
        return self._prefill_forward(ids, positions, mask.view(1, 1, count, end), plan, all_logits)

    def _prefill_forward(self, ids, positions, mask, plan: PrefillPlan, all_logits: bool) -> PrefillOutput:
        self.cache.plan = plan
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            **{self._cache_kwarg: self.cache},
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        logits = out.logits.float()
        return PrefillOutput(logits[:, -1], logits if all_logits else None)
