"""Which waiting requests join the running batch, and when.

Two queues (`waiting`, `running`) and a check/act pair on the token budget. Policy:
- a waiting request is prefilled at the next step boundary (it waits at most one decode step);
- one prefill takes at most `max_batch_prefill_tokens` tokens counted with their left padding
  (what the forward pass really computes; the first request always fits), and two prefills
  always have a decode step between them, so running streams keep at least every other step
  however many requests arrive;
- a request joins only while the padded KV cache stays within `max_batch_total_tokens` at its
  worst (every row alive until its token budget is spent), so the batch never runs out of
  memory: what does not fit waits in the replica, in arrival order.

TGI's `max_waiting_tokens` and `waiting_served_ratio` hold newcomers back until enough of them
have gathered (or enough decode steps passed) before interrupting decoding. We keep both in the
config (and in /info) but admit at every step boundary instead: the one-step admission bound is
the latency target, and the padded prefill budget plus prefill/decode alternation already keep
running streams from starving.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.sequence import Sequence


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    max_batch_total_tokens: int = 32768
    max_batch_prefill_tokens: int = 4096
    max_waiting_tokens: int = 20
    waiting_served_ratio: float = 0.3

    def __post_init__(self):
        if self.max_batch_size <= 0 or self.max_batch_total_tokens <= 0 or self.max_batch_prefill_tokens <= 0:
            raise ValueError("batch limits must be strictly positive")


class Scheduler:
    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # row i of the KV batch is running[i]
        self.last_step_was_prefill = False

    def add(self, sequence: Sequence) -> None:
        self.waiting.append(sequence)

    def fits_ever(self, sequence: Sequence) -> bool:
        """A request that could not run even alone must be refused, not queued forever."""
        return sequence.request.max_total_tokens <= self.config.max_batch_total_tokens

    def can_allocate(self, candidates: list[Sequence], cache_length: int) -> bool:
        rows = self.running + candidates
        if len(rows) > self.config.max_batch_size:
            return False
        length = max([cache_length] + [c.prompt_len for c in candidates])
        peak = len(rows) * (length + max(r.remaining_tokens for r in rows))
        return peak <= self.config.max_batch_total_tokens

    def schedule_prefill(self, cache_length: int) -> list[Sequence]:
        """Pop the requests to prefill now (possibly none: then the step decodes)."""
        if not self.waiting or (self.running and self.last_step_was_prefill):
            return []
        chosen: list[Sequence] = []
        longest = 0
        while self.waiting:
            candidate = self.waiting[0]
            padded = (len(chosen) + 1) * max(longest, candidate.prompt_len)  # [b, P] of the forward
            if chosen and padded > self.config.max_batch_prefill_tokens:
                break
            if not self.can_allocate(chosen + [candidate], cache_length):
                break
            chosen.append(self.waiting.popleft())
            longest = max(longest, candidate.prompt_len)
        return chosen

    def allocate(self, sequences: list[Sequence]) -> None:
        """The prefilled sequences join the batch (their rows are appended after the running ones)."""
        self.running.extend(sequences)

    def deallocate_finished(self) -> list[int] | None:
        """Drop finished rows; the row indices to keep, or None when nothing changed."""
        if not any(s.status.is_finished for s in self.running):
            return None
        keep = [i for i, s in enumerate(self.running) if not s.status.is_finished]
        self.running = [self.running[i] for i in keep]
        return keep

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)
