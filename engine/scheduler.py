"""Which requests run in the next step, in which KV slot; the scheduler owns the batch.

State: `waiting` (a queue) and the slot table (`engine/slot_table.py`): `running` in slot order
(`running[i].slot == i`), the prefix cache held by the free slots, and the copies between slots.
Each step (`schedule`) runs every decoding request for one token, plus at most
`max_batch_prefill_tokens` prompt tokens:
- a new request starts from the longest prefix of its prompt that a slot holds (a finished
  request's, or a running one's prompt), so only the rest is prefilled;
- a prompt longer than that budget is prefilled alone, one chunk per step (chunked prefill), so
  a running stream never waits more than one step for a newcomer, however long its prompt;
- shorter prompts are prefilled together while their tokens fit the budget (packed, no padding);
- a request takes a slot only when one is free: `slots = max_batch_total_tokens // max_total_tokens`
  (at most `max_batch_size`), each slot holding one request of up to `max_total_tokens`
  positions, so the batch can never run out of KV memory; what does not fit waits, in order.
When requests leave, the highest occupied slots move into the holes (`SlotCopy`), so the occupied
slots stay `0..n-1` and the decode step needs no gather.
See docs/engine.md.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import cached_property

from engine.sequence import Sequence, SequenceStatus
from engine.slot_table import SlotCopy, SlotTable


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    max_batch_total_tokens: int = 65536
    max_batch_prefill_tokens: int = 4096
    max_total_tokens: int | None = None  # one slot's length; None: min(2048, max_batch_total_tokens)
    prefix_caching: bool = True  # free slots keep their KV; a new request reuses its longest cached prefix

    def __post_init__(self):
        if self.max_batch_size <= 0 or self.max_batch_total_tokens <= 0 or self.max_batch_prefill_tokens <= 0:
            raise ValueError("batch limits must be strictly positive")
        if self.max_total_tokens is not None and not 0 < self.max_total_tokens <= self.max_batch_total_tokens:
            raise ValueError("max_total_tokens must be in (0, max_batch_total_tokens]")

    @property
    def slot_length(self) -> int:
        return self.max_total_tokens or min(2048, self.max_batch_total_tokens)

    @property
    def slots(self) -> int:
        return max(1, min(self.max_batch_size, self.max_batch_total_tokens // self.slot_length))


@dataclass(frozen=True)
class PrefillChunk:
    sequence: Sequence
    start: int  # first prompt position of the chunk
    end: int  # one past its last

    @property
    def token_ids(self) -> tuple[int, ...]:
        return self.sequence.request.input_ids[self.start : self.end]

    @property
    def completes_prompt(self) -> bool:
        return self.end == self.sequence.prompt_len


@dataclass
class ScheduledBatch:
    copies: list[SlotCopy] = field(default_factory=list)  # apply before the forward, in order
    decode: list[Sequence | None] = field(default_factory=list)  # row i = slot i; None: a padding row
    prefill: list[PrefillChunk] = field(default_factory=list)
    decode_ids: list[int] = field(default_factory=list)  # row i's input token
    decode_positions: list[int] = field(default_factory=list)  # the column row i writes

    @cached_property  # read several times a step; `decode` is set once, when the batch is scheduled
    def decoding(self) -> list[Sequence]:
        return [s for s in self.decode if s is not None]

    @property
    def is_empty(self) -> bool:
        return not self.decode and not self.prefill


class Scheduler:
    def __init__(self, config: SchedulerConfig, slots: int | None = None):
        self.config = config
        self.slots = slots or config.slots
        self.waiting: deque[Sequence] = deque()
        self.table = SlotTable(self.slots, config.prefix_caching)

    @property
    def running(self) -> list[Sequence]:
        """running[i] holds KV slot i."""
        return self.table.running

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def fits_ever(self, sequence: Sequence) -> bool:
        """A request that could not run even alone must be refused, not queued forever."""
        return sequence.request.max_total_tokens <= self.config.slot_length

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def prompt_tokens_to_prefill(self) -> int:
        """The waiting prompts' positions and the rest of a prompt being prefilled in chunks. Read
        from other threads: one C-level copy of each collection under the GIL, not an iteration
        over the loop thread's."""
        waiting, running = list(self.waiting), list(self.running)
        return sum(s.prompt_len - s.kv_len for s in waiting + running if s.kv_len < s.prompt_len)

    @property
    def kv_tokens(self) -> int:
        """KV positions the running requests hold now."""
        return sum(s.kv_len for s in self.running)

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._schedule_decode(batch)
        batch.prefill = self._schedule_prefill()
        batch.copies = self.table.take_copies()  # compaction's, then the new requests'
        self._place_padding_rows(batch)
        return batch

    def _schedule_decode(self, batch: ScheduledBatch) -> None:
        """Rows 0..B-1 are slots 0..B-1, up to the last decoding one; a slot in between whose
        prompt is still being prefilled is a padding row (see `_place_padding_rows`)."""
        rows = [s if s.is_decoding else None for s in self.running]
        while rows and rows[-1] is None:
            rows.pop()
        batch.decode = rows
        batch.decode_ids = [s.last_token_id if s is not None else 0 for s in rows]
        batch.decode_positions = [s.kv_len if s is not None else 0 for s in rows]

    @staticmethod
    def _place_padding_rows(batch: ScheduledBatch) -> None:
        """A padding row's slot has this step's chunk (one prompt is prefilled at a time, a chunk
        every step); the row writes its junk at the column just past that chunk, which no query
        of this step reads and the slot's next chunk or first decoded token overwrites."""
        ends = {chunk.sequence.slot: chunk.end for chunk in batch.prefill}
        for row, sequence in enumerate(batch.decode):
            if sequence is None:
                batch.decode_positions[row] = ends[row]

    def _schedule_prefill(self) -> list[PrefillChunk]:
        budget = self.config.max_batch_prefill_tokens
        for sequence in self.running:  # a long prompt being prefilled goes on alone
            if sequence.is_prefilling:
                return [PrefillChunk(sequence, sequence.kv_len, min(sequence.prompt_len, sequence.kv_len + budget))]
        chunks: list[PrefillChunk] = []
        tokens = 0
        while self.waiting and self.table.can_allocate():
            candidate = self.waiting[0]
            match = self.table.lookup(candidate)
            if match.waits:  # its prefix is being written by this step: copied at the next
                break
            if chunks and tokens + candidate.prompt_len - match.length > budget:
                break
            self.table.allocate(self.waiting.popleft(), match)
            candidate.status = SequenceStatus.RUNNING
            chunks.append(PrefillChunk(candidate, match.length, min(candidate.prompt_len, match.length + budget)))
            tokens += chunks[-1].end - chunks[-1].start
            if not chunks[-1].completes_prompt:
                break
        return chunks

    def postprocess(self, batch: ScheduledBatch, read: list[Sequence] | None = None) -> None:
        """Account for what the forward wrote: one position per decode row whose token was `read`
        (None: every row's; a row dropped from it keeps its length), each chunk's prompt part."""
        kept = set(batch.decoding if read is None else read)
        for sequence in batch.decoding:
            if sequence in kept:
                sequence.kv_len += 1
        for chunk in batch.prefill:
            chunk.sequence.kv_len = chunk.end

    def cancel(self, request_ids: set[str]) -> list[Sequence]:
        """Take the named requests out of the queue; return them and the named running ones."""
        hit = [s for s in self.waiting if s.request_id in request_ids]
        for sequence in hit:
            self.waiting.remove(sequence)
        return hit + [s for s in self.running if s.request_id in request_ids and not s.status.is_finished]

    def release_finished(self) -> list[Sequence]:
        """Free the slots of finished requests (they keep their KV as cache); the highest
        survivors move into the holes."""
        finished = [s for s in self.running if s.status.is_finished]
        self.table.release(finished)
        return finished

    def drain(self) -> list[Sequence]:
        """Every request still queued or running (the engine is failing them all)."""
        everything = list(self.waiting) + self.running
        self.waiting.clear()
        self.table.clear()
        return everything
