"""Running the next decode step while the host turns the previous one into events.

On a GPU the host's work after a step (tokens to text, stop checks, events, the next schedule)
would leave the device idle for a millisecond or more every step. So when nothing about the
batch changes, the engine launches step N+1 before it turns step N's tokens into events:
N+1's input ids are N's sampled ids, still on the device, its positions N's plus one, and its
sampling state (draw counters, penalty counts) was advanced in place by N. The host then waits
for N's tokens while the device runs N+1 (vLLM v1's async scheduling, SGLang's overlap
scheduler). A row that finished at N has computed one more token at N+1; that token is dropped
(its key/value was written past what the slot keeps as cache) and the batch changes after it.

A batch runs ahead only when the next step is the same rows again: no prompt chunk, no row that
ends or joins. A row whose sampling reads host state that N's token changes (a grammar's next
mask, a watermark's green list) lets N+1's forward run ahead, and its sampling is launched once
N's tokens have reached the host. Otherwise the engine waits for N first and the step is the
synchronous one. See docs/engine.md ("Overlapping host and device").
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from engine.host_transfer import HostCopy
from engine.model_runner import StepOutput
from engine.sampling import BatchSampler
from engine.scheduler import ScheduledBatch
from engine.sequence import Sequence


@dataclass
class LaunchedStep:
    """A step whose forward (then sampling) is queued on the device, its results on their way."""

    batch: ScheduledBatch
    sequences: list[Sequence]  # the rows sampled, in the sampler's order
    next_ids: torch.Tensor | None = None  # [rows] on the device: the successor's input ids
    results: HostCopy | None = None  # ids, logprobs, top ids, top logprobs
    sampler: BatchSampler | None = None
    output: StepOutput | None = None  # the forward's logits, until its sampling is queued
    drafts: list[tuple[int, ...]] | None = None  # a verify step's drafts per row (engine/speculative.py)
    started: float = field(default_factory=time.perf_counter)

    def read(self) -> tuple[list[Sequence], list[list | None]]:
        """The rows still running and their results on the host (ids, logprobs, top ids, top
        logprobs). The overlap's one rule: a row that finished at the step before this one (this
        step was launched before that row's last token was read) computed a token too many; it is
        dropped here: no event, no KV position (what it wrote lies past what its slot keeps)."""
        if self.results is None:
            return [], []
        host = [t.tolist() if t is not None else None for t in self.results.wait()]
        running = [row for row, s in enumerate(self.sequences) if not s.status.is_finished]
        if len(running) < len(self.sequences):
            host = [None if column is None else [column[row] for row in running] for column in host]
        return [self.sequences[row] for row in running], host

    @property
    def may_run_ahead(self) -> bool:
        """Whether the next step's forward could be launched before this one's results are read."""
        return (not self.batch.prefill and self.sampler is not None and self.drafts is None
                and len(self.sequences) == len(self.batch.decode))

    @property
    def has_finished_rows(self) -> bool:
        return any(s.status.is_finished for s in self.sequences)


def successor(step: LaunchedStep) -> ScheduledBatch:
    """The same rows one position further, fed the tokens `step` sampled (on the device)."""
    batch = step.batch
    return ScheduledBatch(decode=batch.decode, decode_ids=step.next_ids,
                          decode_positions=[p + 1 for p in batch.decode_positions])
