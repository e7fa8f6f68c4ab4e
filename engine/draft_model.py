"""Drafts from a small model of the target's tokenizer (`--speculative-model`), for every
drafting row of a decode step at once.

The draft model keeps its own KV cache in the engine's slot layout (same slot numbers, same
copies applied, `DraftModel.apply_copies`), and each row's draft state remembers how much of the
row the draft KV holds. A step with k drafts a row costs the draft model k packed forwards:
1. catch-up: each drafting row feeds the tokens its draft KV has not seen (the whole prompt
   on its first step, then what it accepted since), ending with its last token, as one span
   of one packed forward; the last position's logits give draft 1;
2. k - 1 decode forwards over the batch's slots, each feeding every drafting row its previous
   draft (rows not drafting write nothing anyone reads, just past their draft KV).
Drafts are the draft model's greedy argmax (over the ids the target scores too). A deterministic drafter keeps the verify rule of
engine/speculative.py exact for sampled and seeded rows too: a row accepts a draft when the
target's own draw at that position equals it, so each emitted token is the target's draw and
the target distribution is kept exactly (acceptance is lower than with rejection sampling
against the draft's probabilities, never the output).

Rollback is a number: after a verify, the draft KV of a row is valid up to the drafts the row
accepted; the state keeps the draft tokens it fed, and the next catch-up keeps the longest
prefix of them the row really took (no copy; the rest is overwritten). A row that finishes
leaves its draft KV with its slot, as the target's KV. LoRA rows draft with the base draft
model (acceptance may be lower; outputs stay exact). See docs/engine.md ("Speculative decoding").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from engine.host_transfer import device_longs
from engine.model_runner import ModelRunner, slot_path_refusal
from engine.outputs import EngineError
from engine.sequence import Sequence
from engine.slot_attention import ContinuedPrompt, PromptGroup, StepPlan, continuation_mask
from engine.slot_table import SlotCopy

log = logging.getLogger(__name__)


def vocabulary_refusal(target, draft, target_tokenizer=None, draft_tokenizer=None) -> str | None:
    """Why `draft` cannot draft for `target` (None: it can): its token ids must be the target's,
    so the tokenizers' vocabularies, when given, must agree. Output widths may differ (embeddings
    padded to a multiple: Qwen2.5's 0.5B and 7B): drafts come from the ids both score
    (`shared_vocabulary`)."""
    if target_tokenizer is not None and draft_tokenizer is not None and \
            target_tokenizer.get_vocab() != draft_tokenizer.get_vocab():
        return "its tokenizer's vocabulary differs from the target's"
    return None


def shared_vocabulary(target, draft) -> int:
    """The token ids [0, n) both models score: a draft never proposes a padding id of its own."""
    return min(target.config.get_text_config().vocab_size, draft.config.get_text_config().vocab_size)


@dataclass
class DraftRow:
    """A row's draft KV: positions [0, seen) hold its tokens; `fed` are the drafts written after
    them at the last drafting step, whose prefix the row accepted is confirmed at the next one."""

    seen: int = 0
    fed: list[int] = field(default_factory=list)

    def settle(self, tokens: list[int], kv_len: int) -> int:
        """Confirm the fed drafts the row took (the rollback), and return `seen`."""
        agreed = 0
        while agreed < len(self.fed) and self.seen + agreed < len(tokens) and \
                tokens[self.seen + agreed] == self.fed[agreed]:
            agreed += 1
        # Never past the target's KV: slot copies (compaction) move that many columns.
        self.seen, self.fed = min(self.seen + agreed, kv_len), []
        return self.seen

    @property
    def written(self) -> int:
        """One past the last position its draft KV holds anything of its own."""
        return self.seen + len(self.fed)


class DraftRunner(ModelRunner):
    """The draft model over its own slotted KV cache: no LoRA, no CUDA graphs (yet)."""

    def catch_up(self, spans: list[tuple[int, int, list[int]]], budget: int) -> torch.Tensor:
        """Spans (slot, first position, tokens), packed into forwards of at most `budget` tokens
        (a long prompt in chunks, as the target prefills it); each span's last position's logits
        [spans, V], in the order given."""
        pieces, last = [], {}
        for index, (slot, start, tokens) in enumerate(spans):
            for offset in range(0, len(tokens), budget):
                pieces.append((index, slot, start + offset, tokens[offset : offset + budget]))
        logits, batch, size = [], [], 0
        for piece in pieces + [None]:
            if piece is None or (batch and size + len(piece[3]) > budget):
                out = self._packed(batch)
                for row, (index, slot, start, tokens) in enumerate(batch):
                    if start + len(tokens) == spans[index][1] + len(spans[index][2]):  # the span's end
                        last[index] = len(logits)
                        logits.append(out[row])
                batch, size = [], 0
            if piece is not None:
                batch.append(piece)
                size += len(piece[3])
        return torch.stack([logits[last[index]] for index in range(len(spans))])

    def _packed(self, pieces: list[tuple[int, int, int, list[int]]]) -> torch.Tensor:
        """Pieces (span index, slot, first position, tokens) in one packed forward; the logits of
        each piece's last position [pieces, V], in the order given."""
        order = sorted(range(len(pieces)), key=lambda i: (pieces[i][2] > 0, len(pieces[i][3])))
        ids, positions, slots, keep, last = [], [], [], [], {}
        plan_spans: list[PromptGroup | ContinuedPrompt] = []
        for i in order:
            _, slot, start, tokens = pieces[i]
            offset, end = len(ids), start + len(tokens)
            ids += tokens
            positions += range(start, end)
            slots += [slot] * len(tokens)
            last[i] = len(keep)
            keep.append(offset + len(tokens) - 1)
            if start:
                plan_spans.append(ContinuedPrompt(offset, slot, start, end, continuation_mask(start, end, self.device)))
            elif plan_spans and isinstance(plan_spans[-1], PromptGroup) and plan_spans[-1].length == len(tokens):
                plan_spans[-1] = PromptGroup(plan_spans[-1].offset, plan_spans[-1].count + 1, len(tokens))
            else:
                plan_spans.append(PromptGroup(offset, 1, len(tokens)))
        self.cache.ensure_capacity(max(positions) + 1)
        packed = device_longs(ids + positions + slots + keep, self.device)
        ids_t, positions_t, slots_t, keep_t = packed.split([len(ids)] * 3 + [len(keep)])
        logits = self._forward(ids_t, positions_t, StepPlan(slots_t, positions_t, None, tuple(plan_spans)), keep_t)
        return logits[[last[i] for i in range(len(pieces))]]

    def step(self, ids: list[int], positions: list[int]) -> torch.Tensor:
        """One decode forward over slots 0..len(ids)-1: logits [rows, V]."""
        length = max(positions) + 1
        self.cache.ensure_capacity(length)
        return self.decode_forward(device_longs(ids, self.device), device_longs(positions, self.device), length)


class DraftModel:
    """The batch drafter `engine.speculative.Speculator` calls when a draft model is set."""

    def __init__(self, model, target, name: str, slots: int, slot_length: int, device: torch.device,
                 prefill_budget: int = 4096):
        refusal = slot_path_refusal(model, slot_length)
        if refusal:
            raise EngineError(f"--speculative-model {name}: {refusal}: a draft model must take the slot path")
        self.name = name
        self.vocabulary = shared_vocabulary(target, model)
        self.prefill_budget = prefill_budget  # tokens a catch-up forward takes at most (--max-batch-prefill-tokens)
        self.runner = DraftRunner(model.to(device), device, slots, slot_length)
        # Whether the last drafting caught its rows up by one step's tokens (at most the bonus
        # token and the last one): its timing is a typical step's, not a prompt's prefill.
        self.steady = True

    def new_row(self, _sequence: Sequence) -> DraftRow:
        return DraftRow()

    def apply_copies(self, copies: list[SlotCopy]) -> None:
        """The target's slot copies, applied to the draft KV: a row's draft KV moves with it."""
        self.runner.apply_copies(copies)

    def reset(self) -> None:
        self.runner.reset()

    @torch.inference_mode()
    def propose(self, rows: list[Sequence], counts: list[int]) -> list[tuple[int, ...]]:
        """Up to counts[r] greedy drafts for each row r of a decode batch (row r in slot r)."""
        drafting = [r for r, count in enumerate(counts) if count > 0]
        if not drafting:
            return [()] * len(rows)
        states: list[DraftRow] = [sequence.speculation.drafter for sequence in rows]
        spans = []
        for r in drafting:
            sequence = rows[r]
            assert sequence.slot == r, "a decode batch's row r is slot r"
            seen = states[r].settle(sequence.token_ids, sequence.kv_len)
            spans.append((r, seen, sequence.token_ids[seen : sequence.kv_len + 1]))
        self.steady = all(len(tokens) <= 2 for _, _, tokens in spans)
        first = self.runner.catch_up(spans, self.prefill_budget)[:, : self.vocabulary].argmax(-1).tolist()
        drafts = {r: [token] for r, token in zip(drafting, first)}
        for j in range(1, max(counts)):
            active = [r for r in drafting if counts[r] > j]
            if not active:
                break
            width = active[-1] + 1
            # A row not drafting this position writes junk just past what its draft KV holds
            # (a drafting row's: past its last draft), which its next catch-up overwrites.
            ids = [0] * width
            positions = [rows[r].kv_len + counts[r] if counts[r] > 0 else states[r].written for r in range(width)]
            for r in active:
                ids[r], positions[r] = drafts[r][-1], rows[r].kv_len + j
            picked = self.runner.step(ids, positions)[active, : self.vocabulary].argmax(-1).tolist()
            for r, token in zip(active, picked):
                drafts[r].append(token)
        for r in drafting:
            states[r].seen = rows[r].kv_len + 1  # its last token is now in the draft KV
            states[r].fed = drafts[r][:-1]  # the last draft was never fed
        return [tuple(drafts.get(r, ())) for r in range(len(rows))]
