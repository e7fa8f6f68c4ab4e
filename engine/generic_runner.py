"""The generic path: any causal LM transformers can run with its own cache, one request at a time.

Architectures the slotted KV cache does not cover (see `model_runner.SLOT_FAMILIES`) still run:
each slot keeps a transformers `DynamicCache`, prompts and decode rows go through the model one
by one. Correct and slow; the engine logs when a model takes this path, and runs it without the
prefix cache (its slots are caches of their own, which are moved, never copied). Models whose
RoPE changes with the sequence's length (longrope, dynamic NTK) take it too: each forward is one
request's, so its factors are its own; a dynamic RoPE's state is reset before each, as a fresh
model's first `generate` would see it.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from engine.model_runner import StepOutput, cache_kwarg
from engine.scheduler import PrefillChunk, ScheduledBatch
from engine.slot_table import SlotCopy


class GenericRunner:
    graphs = None
    verify_graphs = None

    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        self._caches: dict[int, DynamicCache] = {}  # slot -> that request's cache
        self._cache_kwarg = cache_kwarg(model)
        self._dynamic_ropes = [m for m in model.modules()
                               if isinstance(getattr(m, "rope_type", None), str) and "dynamic" in m.rope_type
                               and hasattr(m, "original_inv_freq")]

    def apply_copies(self, copies: list[SlotCopy]) -> None:
        for copy in copies:  # without prefix caching, only compaction: a request's cache moves down
            self._caches[copy.target] = self._caches.pop(copy.source)

    def reset(self) -> None:
        self._caches.clear()

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> StepOutput:
        return StepOutput(self._decode(batch) if batch.decode else None, *self._prefill(batch.prefill))

    def _decode(self, batch: ScheduledBatch) -> torch.Tensor:
        rows = []
        for slot, sequence in enumerate(batch.decode):
            if sequence is None:
                rows.append(None)
                continue
            rows.append(self._forward(slot, [batch.decode_ids[slot]], batch.decode_positions[slot], False)[0, -1])
        width = next(r for r in rows if r is not None).shape[-1]
        return torch.stack([r if r is not None else torch.zeros(width, device=self.device) for r in rows])

    def _prefill(self, chunks: list[PrefillChunk]) -> tuple[torch.Tensor | None, list[torch.Tensor | None]]:
        last, prompt = [], []
        for chunk in chunks:
            if chunk.start == 0:
                self._caches[chunk.sequence.slot] = DynamicCache()
            wanted = chunk.sequence.request.prefill_logprobs
            logits = self._forward(chunk.sequence.slot, list(chunk.token_ids), chunk.start, wanted)[0]
            last.append(logits[-1])
            prompt.append(logits if wanted else None)
        return (torch.stack(last) if last else None), prompt

    def _forward(self, slot: int, ids: list[int], start: int, all_logits: bool) -> torch.Tensor:
        for rope in self._dynamic_ropes:  # not another request's longer length: this one's own
            rope.inv_freq = rope.original_inv_freq.to(rope.inv_freq.device)
            rope.max_seq_len_cached = rope.original_max_seq_len
        positions = torch.arange(start, start + len(ids), device=self.device).view(1, -1)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=positions,
            **{self._cache_kwarg: self._caches[slot]},
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        return out.logits.float()
