"""Attention over the KV slots for one packed step, as a transformers attention function.

A step's tokens go through the model as one packed row `[1, N]`: first the decode rows (row i =
slot i, one token each), then the prompt chunks. Every projection and MLP runs once over all N
tokens, so a mixed step reads the weights once; only attention is split by span:
- the decode rows attend their slots' view `[:rows, :, :length]` (no gather), queries grouped
  by KV head so grouped-query attention needs no repeated keys;
- fresh prompts of one length attend to themselves, causally, in one batched call;
- a prompt continuing in chunks attends its slot's earlier columns and itself.
`SlotKVCache.update` has already written the step's keys and values at their (slot, column)
when attention runs. See docs/engine.md.

The model runs with this function only inside `slot_attention(model)` (it names the function
in the model's config for the call, so `generate` on the same model is untouched), and gets
the cache through the forward's `slot_cache` keyword, which transformers hands to attention.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

SLOT_ATTENTION = "blitzscale_slots"


@dataclass(frozen=True)
class DecodeSpan:
    """The first `rows` × `width` packed tokens: slots 0..rows-1, `width` tokens each in turn (1
    in a plain step; a padded verify step's last token and drafts: `verify_mask`)."""

    rows: int
    length: int  # columns attended: more than every row's position
    mask: torch.Tensor  # [rows, 1, width × G, length] bool (G: query heads per KV head; [rows, 1, 1, L] at width 1)
    width: int = 1


@dataclass(frozen=True)
class PromptGroup:
    """`count` prompts of `length` tokens each, from position 0, packed one after another."""

    offset: int
    count: int
    length: int


@dataclass(frozen=True)
class ContinuedPrompt:
    """A prompt chunk at positions start..end-1 of slot `slot`, after earlier chunks."""

    offset: int
    slot: int
    start: int
    end: int
    mask: torch.Tensor  # [1, 1, end - start, end] bool


@dataclass(frozen=True)
class StepPlan:
    """Where each packed token's key and value are written, and what each span attends."""

    slots: torch.Tensor  # [N] long
    columns: torch.Tensor  # [N] long: the token's position
    decode: DecodeSpan | None
    prompts: tuple[PromptGroup | ContinuedPrompt, ...] = ()


def decode_mask(positions: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """[B, 1, 1, L] for `columns` = arange(L): row b sees columns 0..positions[b]."""
    return (columns.view(1, -1) <= positions.view(-1, 1)).view(positions.shape[0], 1, 1, -1)


def verify_mask(positions: torch.Tensor, columns: torch.Tensor, group: int) -> torch.Tensor:
    """[B, 1, W × G, L] for `positions` [B, W] and `columns` = arange(L): token (b, w) sees
    columns 0..positions[b, w], for each of the G query heads that share a KV head (`_decode`
    lays them out that way). Shape ops only: capturable in a CUDA graph."""
    rows, width = positions.shape
    seen = columns.view(1, 1, 1, -1) <= positions.view(rows, width, 1, 1)  # [B, W, 1, L]
    return seen.expand(rows, width, group, columns.shape[0]).reshape(rows, 1, width * group, -1)


def continuation_mask(start: int, end: int, device: torch.device) -> torch.Tensor:
    """[1, 1, C, end]: the chunk's query i (position start + i) sees columns 0..start + i."""
    columns = torch.arange(end, device=device)
    return (columns.view(1, -1) <= torch.arange(start, end, device=device).view(-1, 1)).view(1, 1, end - start, end)


def attend(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, slot_cache=None, **_):
    """transformers' attention signature: query [1, Hq, N, D], key/value [1, Hkv, N, D] (this
    step's, already in the cache) → ([1, N, Hq, D], None)."""
    plan: StepPlan = slot_cache.plan
    keys, values = slot_cache.keys[module.layer_idx], slot_cache.values[module.layer_idx]
    tokens = query[0].transpose(0, 1)  # [N, Hq, D]
    parts = []
    if plan.decode is not None:
        parts.append(_decode(tokens[: plan.decode.rows * plan.decode.width], keys, values, plan.decode, scaling))
    for span in plan.prompts:
        if isinstance(span, PromptGroup):
            parts.append(_fresh_prompts(tokens, key[0], value[0], span, scaling))
        else:
            parts.append(_continued_prompt(tokens, keys, values, span, scaling))
    out = parts[0] if len(parts) == 1 else torch.cat(parts)
    return out.unsqueeze(0), None


def _decode(queries, keys, values, span: DecodeSpan, scaling):
    """queries [rows × W, Hq, D] against slots 0..rows-1; the W tokens × G query heads of a KV
    head become its W × G query 'positions', so one KV head's keys serve them without being
    repeated (the mask tells each token its own last column)."""
    tokens, heads, dim = queries.shape
    rows, width, kv_heads = span.rows, span.width, keys.shape[1]
    group = heads // kv_heads
    grouped = queries.reshape(rows, width, kv_heads, group, dim)
    if width > 1:
        grouped = grouped.transpose(1, 2)
    grouped = grouped.reshape(rows, kv_heads, width * group, dim)
    out = F.scaled_dot_product_attention(grouped, keys[:rows, :, : span.length], values[:rows, :, : span.length],
                                         attn_mask=span.mask, scale=scaling)
    if width > 1:
        out = out.reshape(rows, kv_heads, width, group, dim).transpose(1, 2)
    return out.reshape(tokens, heads, dim)


def _fresh_prompts(tokens, key, value, span: PromptGroup, scaling):
    """`count` prompts of `length`: one causal call over their own keys [Hkv, N, D]."""
    count, length, heads, dim = span.count, span.length, tokens.shape[1], tokens.shape[2]
    packed = slice(span.offset, span.offset + count * length)
    queries = tokens[packed].reshape(count, length, heads, dim).transpose(1, 2)  # [k, Hq, C, D]
    own_keys = key[:, packed].reshape(key.shape[0], count, length, dim).transpose(0, 1)  # [k, Hkv, C, D]
    own_values = value[:, packed].reshape(value.shape[0], count, length, dim).transpose(0, 1)
    out = F.scaled_dot_product_attention(queries, own_keys, own_values, is_causal=True, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2).reshape(count * length, heads, dim)


def _continued_prompt(tokens, keys, values, span: ContinuedPrompt, scaling):
    queries = tokens[span.offset : span.offset + span.end - span.start].transpose(0, 1).unsqueeze(0)  # [1, Hq, C, D]
    slot = slice(span.slot, span.slot + 1)
    out = F.scaled_dot_product_attention(queries, keys[slot, :, : span.end], values[slot, :, : span.end],
                                         attn_mask=span.mask, scale=scaling, enable_gqa=True)
    return out[0].transpose(0, 1)  # [C, Hq, D]


AttentionInterface.register(SLOT_ATTENTION, attend)


@contextmanager
def slot_attention(model) -> Iterator[None]:
    """Run `model` with `attend` for the duration: transformers builds no mask for an
    attention function it has no mask builder for, and every span above masks itself."""
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = SLOT_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous
