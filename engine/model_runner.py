"""The model's forward over the slotted KV cache: one packed forward per step.

A step's decode rows and prompt chunks go through the transformers model (unchanged) as one
packed row of tokens with their `position_ids`; `SlotKVCache` writes each new key/value at its
own (slot, position) and `engine/slot_attention.py` attends each span over the slots. On CUDA a
step with no prompt is replayed from captured graphs (`engine/cuda_graphs.py`).
"""
from __future__ import annotations

import inspect
import logging
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass

import torch

from engine.cpu_linear import prepack_linears
from engine.host_transfer import device_longs
from engine.kv_slots import KVGeometry, SlotKVCache
from engine.lora import LoraLayers
from engine.scheduler import ScheduledBatch
from engine.slot_table import SlotCopy
from engine.slot_attention import (
    ContinuedPrompt,
    DecodeSpan,
    PromptGroup,
    StepPlan,
    continuation_mask,
    decode_mask,
    slot_attention,
    verify_mask,
)

log = logging.getLogger(__name__)

# Families whose transformers attention goes through `Cache.update` and the attention interface,
# with RoPE from per-token position_ids; tests check each against `generate`. Others take the
# generic path.
SLOT_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "gemma", "phi", "phi3"})


@dataclass
class StepOutput:
    decode_logits: torch.Tensor | None  # [rows, V] float32: row i = slot i (padding rows too)
    last_logits: torch.Tensor | None  # [chunks, V] float32: each prompt chunk's last position
    prompt_logits: list[torch.Tensor | None]  # a chunk's [C, V] when its request wants prefill logprobs


def cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); speak whichever it knows."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


# RoPE whose factors follow the forward's longest sequence (transformers takes the max of its
# position_ids): in one packed forward a short row would get a long row's factors.
POSITION_DEPENDENT_ROPE = ("longrope", "dynamic")


def rope_types(model) -> set[str]:
    """The model's RoPE types (`rope_parameters`, per layer type in some models; older
    transformers: `rope_scaling`)."""
    config = model.config.get_text_config()
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    nested = [p for p in params.values() if isinstance(p, dict)] or [params]
    return {p.get("rope_type") or p.get("type") or "default" for p in nested}


def slot_path_refusal(model, slot_length: int) -> str | None:
    """Why the model cannot take the slot path (None: it can)."""
    config = model.config.get_text_config()
    if config.model_type not in SLOT_FAMILIES:
        return f"{config.model_type} is not among the slot-cache families"
    dependent = sorted(t for t in rope_types(model) if any(kind in t for kind in POSITION_DEPENDENT_ROPE))
    if dependent:
        return (f"{config.model_type}'s RoPE ({', '.join(dependent)}) changes with each sequence's length, which "
                "one packed forward (or a CUDA graph) cannot give each row")
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    if window is not None and window < slot_length:  # the slot path ignores sliding windows
        return f"its sliding window ({window}) is shorter than a slot ({slot_length} positions)"
    return None


def supports_slots(model, slot_length: int) -> bool:
    return slot_path_refusal(model, slot_length) is None


class ModelRunner:
    def __init__(self, model, device: torch.device, slots: int, slot_length: int, cuda_graphs: bool = False,
                 lora: LoraLayers | None = None, pack_cpu_linears: bool = False):
        """`pack_cpu_linears`: on a CPU, multi-token forwards (verify steps, batches, prompts) by
        weights packed once for oneDNN (engine/cpu_linear.py). Only where speculation needs its
        verify step cheap: a one-token step keeps MKL's product, so a row's logits then differ in
        the last bits between a solo step and a batched one, and logprobs are no longer the same
        alone and in any batch (which plain serving keeps)."""
        self.model = model
        if device.type == "cpu" and pack_cpu_linears:
            prepack_linears(model)
        self.lora = lora  # the replica's LoRA adapters (engine/lora.py), hooked into the model
        self.device = device
        self.cache = SlotKVCache(KVGeometry.of(model), slots, slot_length, device, growable=device.type != "cuda")
        self._rows = torch.arange(slots, device=device)
        self._columns = torch.arange(slot_length, device=device)
        self._cache_kwarg = cache_kwarg(model)
        self._group = model.config.get_text_config().num_attention_heads // self.cache.keys[0].shape[1]  # per KV head
        self.graphs = None
        self.verify_graphs = None  # `capture_verify_graphs`, when speculation is on
        if cuda_graphs:
            from engine.cuda_graphs import DecodeGraphs  # CUDA only; never imported on CPU

            self.graphs = DecodeGraphs(self)

    def capture_verify_graphs(self, most_drafts: int) -> None:
        """With CUDA graphs on: verify steps of up to `most_drafts` drafts a row replay graphs too
        (captured with the decode graphs, at `Engine.start`)."""
        if self.graphs is not None and most_drafts > 0:
            from engine.cuda_graphs import VerifyGraphs  # CUDA only

            self.verify_graphs = VerifyGraphs(self, most_drafts)

    def apply_copies(self, copies: list[SlotCopy]) -> None:
        for copy in copies:
            self.cache.copy(copy.source, copy.target, copy.length, copy.swap)

    def reset(self) -> None:
        """Zero the cache (after a failed step, so nothing it left can reach a later request)."""
        for tensor in self.cache.keys + self.cache.values:
            tensor.zero_()

    @torch.inference_mode()
    def forward(self, batch: ScheduledBatch) -> StepOutput:
        """Every decode row and every prompt chunk of the step, in one forward."""
        adapters = self._adapters(batch.decode)
        if not batch.prefill:
            return StepOutput(self._decode(batch.decode_ids, batch.decode_positions, adapters), None, [])
        step = PackedStep(batch, self.device)
        self.cache.ensure_capacity(step.columns_needed)
        if adapters is not None:
            for i in step.order:  # each chunk's tokens, in packed order, under its request's adapter
                chunk = step.chunks[i]
                adapters += self._adapters([chunk.sequence]) * (chunk.end - chunk.start)
        kept = [adapters[k] for k in step.kept_tokens] if adapters is not None else None
        with self._lora_tokens(adapters, kept):
            logits = self._forward(step.ids, step.positions, step.plan(self._columns), step.keep).float()
        return step.split(logits)

    @torch.inference_mode()
    def verify(self, batch: ScheduledBatch, drafts: list[tuple[int, ...]]) -> torch.Tensor:
        """A decode batch whose rows carry draft tokens, in one forward: [Σ (k_r + 1), V] float32
        logits, row r's k_r + 1 positions in turn (engine/speculative.py reads them)."""
        adapters = self._adapters(batch.decode)
        if self.verify_graphs is not None:
            layout = PaddedVerify.of(batch, drafts, self.verify_graphs.widths, self.cache.slot_length)
            logits = None if layout is None else self.verify_graphs.replay(layout, adapters)
            if logits is not None:
                return logits.index_select(0, device_longs(layout.order, self.device))
        step = VerifyStep(batch, drafts, self.device)
        self.cache.ensure_capacity(step.columns_needed)
        if adapters is not None:  # each draft token under its row's adapter, in packed order
            adapters += [adapters[row] for row, own in enumerate(drafts) for _ in own]
        with self._lora_tokens(adapters):
            logits = self._forward(step.ids, step.positions, step.plan(self._columns), 0)
        return (logits if step.in_order else logits.index_select(0, step.order)).float()

    def verify_forward(self, ids: torch.Tensor, positions: torch.Tensor, width: int, length: int,
                       adapters: torch.Tensor | None = None) -> torch.Tensor:
        """The capturable verify step (`PaddedVerify`): B rows of `width` tokens each, ids and
        positions [B × width] device tensors, row-major; logits [B × width, V] (model dtype).
        Python numbers reaching kernels: B, `width` and `length`, all part of a graph's key.
        `adapters` ([B × width] long): each token's LoRA adapter index."""
        rows = ids.shape[0] // width
        mask = verify_mask(positions.view(rows, width), self._columns[:length], self._group)
        span = DecodeSpan(rows, length, mask, width)
        slots = self._rows[:rows].view(-1, 1).expand(rows, width).reshape(-1)  # no repeat_interleave: no sync
        with self.lora.rows(adapters) if adapters is not None else nullcontext():
            return self._forward(ids, positions, StepPlan(slots, positions, span), 0)

    def _decode(self, ids: list[int] | torch.Tensor, positions: list[int],
                adapters: list[int] | None) -> torch.Tensor:
        """`ids`: host ints, or the previous step's sampled ids still on the device (overlap)."""
        length = max(positions) + 1
        self.cache.ensure_capacity(length)
        if self.graphs is not None:
            logits = self.graphs.replay(ids, positions, length, adapters)
            if logits is not None:
                return logits
        ids_t = ids if isinstance(ids, torch.Tensor) else device_longs(ids, self.device)
        positions_t = device_longs(positions, self.device)
        with self._lora_tokens(adapters):
            return self.decode_forward(ids_t, positions_t, length).float()

    def decode_forward(self, ids: torch.Tensor, positions: torch.Tensor, length: int,
                       adapters: torch.Tensor | None = None) -> torch.Tensor:
        """The capturable decode step: device tensors in, logits [B, V] (model dtype) out.
        Python numbers reaching kernels: B (ids' shape) and `length`, both part of a graph's key.
        `adapters` ([B] long on the device): each row's LoRA adapter index, gathered on the device."""
        rows = ids.shape[0]
        span = DecodeSpan(rows, length, decode_mask(positions, self._columns[:length]))
        with self.lora.rows(adapters) if adapters is not None else nullcontext():
            return self._forward(ids, positions, StepPlan(self._rows[:rows], positions, span), 0)

    def _adapters(self, sequences) -> list[int] | None:
        """Each row's LoRA adapter index (0: none; a padding row has none); None without adapters."""
        if self.lora is None:
            return None
        return [self.lora.index(s.request.adapter) if s is not None else 0 for s in sequences]

    def _lora_tokens(self, adapters: list[int] | None, kept: list[int] | None = None):
        """The packed tokens' adapters, and the kept logits rows' (default: every token is kept)
        for an adapter on the output projection, which sees only those rows."""
        if adapters is None:
            return nullcontext()
        stack = ExitStack()
        stack.enter_context(self.lora.tokens(adapters))
        if self.lora.targets_output:
            stack.enter_context(self.lora.kept_rows(adapters if kept is None else kept))
        return stack

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, plan: StepPlan, keep) -> torch.Tensor:
        """The packed forward: ids and positions [N]; logits [kept, V]."""
        self.cache.plan = plan
        with slot_attention(self.model):
            out = self.model(
                input_ids=ids.view(1, -1),
                position_ids=positions.view(1, -1),
                **{self._cache_kwarg: self.cache},
                use_cache=True,
                logits_to_keep=keep,
                slot_cache=self.cache,
            )
        return out.logits[0]


class PackedStep:
    """A mixed step laid out as one row: the decode rows (slot order), then the prompt chunks,
    fresh prompts of equal length side by side so their attention is one call."""

    def __init__(self, batch: ScheduledBatch, device: torch.device):
        self.device = device
        self.rows = len(batch.decode)
        self.decode_length = max(batch.decode_positions) + 1 if self.rows else 0
        chunks = batch.prefill
        # Fresh prompts first, grouped by length; then the continued one(s).
        self.order = sorted(range(len(chunks)), key=lambda i: (chunks[i].start > 0, chunks[i].end - chunks[i].start))
        ids, positions, slots = list(batch.decode_ids), list(batch.decode_positions), list(range(self.rows))
        self.offsets: dict[int, int] = {}  # chunk index -> its first packed token
        for i in self.order:
            chunk = chunks[i]
            self.offsets[i] = len(ids)
            ids += chunk.token_ids
            positions += range(chunk.start, chunk.end)
            slots += [chunk.sequence.slot] * (chunk.end - chunk.start)
        self.chunks = chunks
        self.columns_needed = max(positions) + 1
        # The logits kept: every decode row, each chunk's last position or all of them.
        keep = list(range(self.rows))
        self.kept_from: dict[int, int] = {}  # chunk index -> its first kept logits row
        for i in self.order:
            chunk, offset = chunks[i], self.offsets[i]
            self.kept_from[i] = len(keep)
            if chunk.sequence.request.prefill_logprobs:
                keep += range(offset, offset + chunk.end - chunk.start)
            else:
                keep.append(offset + chunk.end - chunk.start - 1)
        self.kept_tokens = keep  # the packed token behind each kept logits row
        # One host tensor, one pinned non-blocking copy: the host never waits for its inputs.
        packed = device_longs(ids + positions + slots + keep, device)
        self.ids, self.positions, self.slots, self.keep = packed.split([len(ids)] * 3 + [len(keep)])

    def plan(self, columns: torch.Tensor) -> StepPlan:
        decode = None
        if self.rows:
            positions = self.positions[: self.rows]
            decode = DecodeSpan(self.rows, self.decode_length, decode_mask(positions, columns[: self.decode_length]))
        spans: list[PromptGroup | ContinuedPrompt] = []
        for i in self.order:
            chunk, offset = self.chunks[i], self.offsets[i]
            length = chunk.end - chunk.start
            if chunk.start > 0:
                mask = continuation_mask(chunk.start, chunk.end, self.device)
                spans.append(ContinuedPrompt(offset, chunk.sequence.slot, chunk.start, chunk.end, mask))
            elif spans and isinstance(spans[-1], PromptGroup) and spans[-1].length == length:
                spans[-1] = PromptGroup(spans[-1].offset, spans[-1].count + 1, length)
            else:
                spans.append(PromptGroup(offset, 1, length))
        return StepPlan(self.slots, self.positions, decode, tuple(spans))

    def split(self, logits: torch.Tensor) -> StepOutput:
        """The kept logits [K, V] back in batch order."""
        decode = logits[: self.rows] if self.rows else None
        last, prompt = [], []
        for i, chunk in enumerate(self.chunks):
            first = self.kept_from[i]
            if chunk.sequence.request.prefill_logprobs:
                own = logits[first : first + chunk.end - chunk.start]
                prompt.append(own)
                last.append(own[-1])
            else:
                prompt.append(None)
                last.append(logits[first])
        return StepOutput(decode, torch.stack(last), prompt)


class VerifyStep:
    """A verify step laid out as one packed row: first every decode row's last token (row i =
    slot i, the decode span as in a plain step), then each row's drafts as a span continuing
    its slot (positions kv_len + 1 ...), attending its columns up to itself, the last token's
    written by this same forward. Every packed token's logits are kept."""

    def __init__(self, batch: ScheduledBatch, drafts: list[tuple[int, ...]], device: torch.device):
        self.device = device
        self.rows = len(batch.decode)
        starts = batch.decode_positions
        ids, positions, slots = list(batch.decode_ids), list(starts), list(range(self.rows))
        self.spans: list[tuple[int, int, int, int]] = []  # (offset, slot, start, end) per drafting row
        order = []  # logits rows in verify order: row r's last token, then its drafts
        for row, own in enumerate(drafts):
            order.append(row)
            if own:
                offset, start = len(ids), starts[row] + 1
                self.spans.append((offset, row, start, start + len(own)))
                order += range(offset, offset + len(own))
                ids += own
                positions += range(start, start + len(own))
                slots += [row] * len(own)
        self.decode_length = max(starts) + 1
        self.columns_needed = max(positions) + 1
        self.in_order = order == list(range(len(order)))  # batch 1: the logits need no reordering
        packed = device_longs(ids + positions + slots + order, device)
        self.ids, self.positions, self.slots, self.order = packed.split([len(ids)] * 3 + [len(order)])

    def plan(self, columns: torch.Tensor) -> StepPlan:
        decode = DecodeSpan(self.rows, self.decode_length,
                            decode_mask(self.positions[: self.rows], columns[: self.decode_length]))
        spans = tuple(ContinuedPrompt(offset, slot, start, end, continuation_mask(start, end, self.device))
                      for offset, slot, start, end in self.spans)
        return StepPlan(self.slots, self.positions, decode, spans)


@dataclass(frozen=True)
class PaddedVerify:
    """A decode-only verify step laid out for a CUDA graph: every row `width` tokens (its last
    token, its drafts, then padding), row r in slot r. A padding token repeats the row's last
    token at the columns after its drafts: past the row's length, so its KV is garbage that the
    rollback-by-length rule already ignores and its next steps overwrite, and its logits are
    never read (`order` skips them). Fits only when every row's padded columns lie inside its
    slot; `width` is the narrowest captured one that holds the longest draft."""

    ids: list[int]  # [rows × width], row-major
    positions: list[int]
    width: int
    order: list[int]  # the logits rows in verify order: row r's last token, then its drafts

    @classmethod
    def of(cls, batch: ScheduledBatch, drafts: list[tuple[int, ...]], widths: list[int],
           slot_length: int) -> "PaddedVerify | None":
        width = next((w for w in widths if w > max(map(len, drafts))), None)
        starts = batch.decode_positions
        if width is None or max(starts) + width > slot_length:
            return None  # eager: no graph that wide, or padding would pass the end of a slot
        ids, positions, order = [], [], []
        for row, (last, start, own) in enumerate(zip(batch.decode_ids, starts, drafts)):
            ids += [last, *own] + [last] * (width - 1 - len(own))
            positions += range(start, start + width)
            order += range(row * width, row * width + len(own) + 1)
        return cls(ids, positions, width, order)
