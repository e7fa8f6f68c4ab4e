"""The two forward passes of continuous batching: prefill new prompts, decode one token."""
from __future__ import annotations

import inspect

import torch

from engine.kv_batch import KVBatch
from engine.kv_cache import GrowableCache


class ModelRunner:
    def __init__(self, model, device: torch.device):
        self.model = model
        self.device = device
        # transformers renamed `past_key_values` to `cache` (5.2x); speak whichever it knows.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], all_logits: bool) -> tuple[KVBatch, torch.Tensor]:
        """Run left-padded prompts. Returns their KV batch and logits: [b, V] for the last
        position, or [b, P, V] for every position when `all_logits` (prefill logprobs)."""
        length = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), length), dtype=torch.long)  # [b, P]
        mask = torch.zeros((len(prompts), length), dtype=torch.long)  # [b, P]
        for row, prompt in enumerate(prompts):
            ids[row, length - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, length - len(prompt):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # [b, P]
        cache = GrowableCache(self.model.config.get_text_config().num_hidden_layers)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids,
            **{self._cache_kwarg: cache},
            use_cache=True,
            logits_to_keep=0 if all_logits else 1,
        )
        logits = out.logits.float()
        batch = KVBatch(cache, mask, mask.sum(dim=1))
        return batch, (logits if all_logits else logits[:, -1])

    @torch.inference_mode()
    def decode(self, batch: KVBatch, input_ids: torch.Tensor) -> torch.Tensor:
        """One step for every row: input_ids [B] → next-token logits [B, V]."""
        mask = batch.extend_mask()
        out = self.model(
            input_ids=input_ids.view(-1, 1),
            attention_mask=mask,
            position_ids=batch.positions.view(-1, 1),
            **{self._cache_kwarg: batch.cache},
            use_cache=True,
            logits_to_keep=1,
        )
        batch.positions = batch.positions + 1
        return out.logits[:, -1].float()
