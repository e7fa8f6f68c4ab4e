"""How many KV slots a GPU holds, once what the engine allocates besides the cache is set aside.

The KV cache is allocated at start, from the memory free after the model loaded; what the
engine allocates after it would otherwise eat the margin (16 rank-64 adapters on every
projection of an 8B model are ~5.7 GB: an OOM at start or at the first step). So the budget is
the free memory, less a 10% margin, less each part, every part logged:

- LoRA stacks: exact (engine/lora.py's layout: [K+1, in, r] and [K+1, r, out] per projection);
- CUDA graph outputs: exact (each captured graph keeps its [batch, V] logits in the pool, a
  verify graph its [batch × width, V]), plus its activations, estimated as 8 hidden-sized rows
  per token for the largest graph;
- sampler buffers: estimated as six float32 [rows, V] tensors (the logits in float32, scaled,
  softmax, penalties' counts and two processed copies), rows being the slots, or with
  `--speculate k` the positions a verify step samples, (k + 1) per slot;
- watermark green lists: exact, [rows, V] bool, rows being the lists kept between steps or, when
  every slot's previous token differs in one step, one per slot (engine/watermark.py grows to it);
- a draft model (`--speculative-model`): its weights are loaded before the budget is taken, so
  they are out of the free memory already; its KV has a row in every slot (engine/draft_model.py),
  so a slot costs the target's and the draft's keys and values, and its logits buffer (one [slots,
  V] row per draft forward) is a part.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.kv_slots import KVGeometry
from engine.lora import stack_bytes
from engine.lora_files import LoraAdapter
from engine.watermark import GREEN_LISTS_KEPT

log = logging.getLogger(__name__)

MARGIN = 0.1  # of the free memory, left to what no part names (allocator slack, other kernels' workspaces)
SAMPLER_BUFFERS = 6
GRAPH_ACTIVATION_ROWS = 8


@dataclass(frozen=True)
class KVBudget:
    free: int  # bytes free on the device before the KV cache
    slot_bytes: int  # one slot's keys and values
    parts: dict[str, int] = field(default_factory=dict)  # what else the engine allocates, bytes

    @property
    def kv_bytes(self) -> int:
        return max(0, int((1 - MARGIN) * self.free) - sum(self.parts.values()))

    @property
    def slots(self) -> int:
        return self.kv_bytes // self.slot_bytes

    def describe(self) -> str:
        parts = "".join(f" - {name} {_gib(size)}" for name, size in self.parts.items())
        return (f"KV budget: {_gib(self.free)} free - {MARGIN:.0%} margin{parts} = {_gib(self.kv_bytes)}: "
                f"{self.slots} slots of {_gib(self.slot_bytes)}")


def kv_budget(model, free: int, slots: int, slot_length: int, adapters: Sequence[LoraAdapter] = (),
              cuda_graphs: bool = False, draft_model=None, verify_drafts: int = 0) -> KVBudget:
    """The budget for up to `slots` slots of `slot_length` positions, `free` bytes free now
    (with `draft_model` loaded already: its KV shares each slot; `verify_drafts`: `--speculate`,
    whose verify steps get graphs too)."""
    per_position = KVGeometry.of(model).bytes_per_position
    parts = engine_parts(model, slots, slot_length, adapters, cuda_graphs, verify_drafts)
    if draft_model is not None:
        per_position += KVGeometry.of(draft_model).bytes_per_position
        element = next(draft_model.parameters()).element_size()
        parts["draft model logits"] = slots * draft_model.config.get_text_config().vocab_size * element
    return KVBudget(free, per_position * slot_length, parts)


def engine_parts(model, slots: int, slot_length: int, adapters: Sequence[LoraAdapter], cuda_graphs: bool,
                 verify_drafts: int = 0) -> dict[str, int]:
    """The bytes the engine allocates besides the KV cache, by part, for `slots` slots."""
    config = model.config.get_text_config()
    element = next(model.parameters()).element_size()
    vocab = config.vocab_size
    parts = {"LoRA stacks": stack_bytes(model, adapters) if adapters else 0}
    if cuda_graphs:
        from engine.cuda_graphs import batch_buckets, length_buckets, verify_shapes  # only with graphs

        rows = batch_buckets(slots) + [b * w for b, w in (verify_shapes(slots, verify_drafts) if verify_drafts else ())]
        outputs = sum(rows) * len(length_buckets(slot_length)) * vocab * element
        width = max(config.hidden_size, getattr(config, "intermediate_size", 0) or 0)
        parts["CUDA graph pool"] = outputs + max(rows) * GRAPH_ACTIVATION_ROWS * width * element
    # A verify step samples every position it scores: each slot's last token and its drafts.
    parts["sampler buffers"] = SAMPLER_BUFFERS * slots * (1 + verify_drafts) * vocab * 4
    parts["watermark green lists"] = max(GREEN_LISTS_KEPT, slots) * vocab  # any request may ask for one
    return {name: size for name, size in parts.items() if size}


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"
