"""The continuous-batching engine: one loop thread owns the model and the KV cache.

Each step: schedule → run the model (prefill of new requests, or one decode step for all
running ones) → post-process (sample, detokenize, stop, emit) → collect finished rows.
Requests join between steps and leave the step they finish.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kv_batch import KVBatch
from engine.metrics import EngineMetrics
from engine.model_runner import ModelRunner
from engine.outputs import EngineError, RequestCancelled, Token, TokenEvent
from engine.params import GenerationRequest
from engine.sampling import BatchSampler, SampleOutput
from engine.scheduler import Scheduler, SchedulerConfig
from engine.sequence import RequestStream, Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    batch_tokens: int  # padded KV positions held now (rows × columns)
    max_batch_size: int
    max_batch_total_tokens: int


class Engine:
    def __init__(self, model, tokenizer, scheduler_config: SchedulerConfig, metrics: EngineMetrics | None = None,
                 step_listener: Callable[[list[TokenEvent]], None] | None = None):
        """`step_listener`, when given, is called on the loop thread with every event of a step
        (keep it quick: hand the events to another thread). It sees a request's last event
        before that request's stream ends."""
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.runner = ModelRunner(model, self.device)
        self.scheduler = Scheduler(scheduler_config)
        self.metrics = metrics or EngineMetrics()
        self.step_listener = step_listener
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self._kv: KVBatch | None = None
        self._sampler: BatchSampler | None = None  # rebuilt whenever the batch's rows change
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)

    # ---- the submitter's side (any thread) -------------------------------------------------
    def start(self) -> "Engine":
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its stream yields token events (the last one carries `finish`) and
        raises EngineError (RequestCancelled after `cancel`). Closing it early cancels."""
        sequence = Sequence(request, self.tokenizer, self.eos_token_ids, self.device, on_abandon=self.cancel)
        if not self.scheduler.fits_ever(sequence):
            raise EngineError(
                f"request needs {request.max_total_tokens} tokens, more than the batch budget "
                f"({self.scheduler.config.max_batch_total_tokens})"
            )
        self._inbox.put(sequence)
        self._wake.set()
        return sequence.stream

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step boundary; its KV rows are freed then."""
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        kv = self._kv
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + self._inbox.qsize(),
            batch_tokens=kv.size * kv.length if kv is not None else 0,
            max_batch_size=self.scheduler.config.max_batch_size,
            max_batch_total_tokens=self.scheduler.config.max_batch_total_tokens,
        )

    # ---- the loop thread --------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._take_inbox()
            if not self.scheduler.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                self.step()
            except Exception as error:  # a failed forward fails its batch, not the replica
                log.exception("engine step failed")
                self._fail_all(EngineError(f"{type(error).__name__}: {error}"))
        self._fail_all(EngineError("the engine is shutting down"))

    def step(self) -> None:
        self._apply_cancellations()
        new = self.scheduler.schedule_prefill(self._kv.length if self._kv else 0)
        if new:
            events = self._prefill(new)
        elif self.scheduler.running:
            events = self._decode()
        else:
            events = []
        self.scheduler.last_step_was_prefill = bool(new)
        if events and self.step_listener is not None:
            self.step_listener(events)
        self._collect_finished()
        kv = self._kv
        self.metrics.set_batch(len(self.scheduler.running), kv.size * kv.length if kv else 0)

    def _prefill(self, sequences: list[Sequence]) -> None:
        now = time.time()
        for s in sequences:  # the end of their queue time, the start of their inference time
            s.stream.started_at = s.stream.started_at or now
        started = time.perf_counter()
        want_prefill = any(s.request.prefill_logprobs for s in sequences)
        kv, logits = self.runner.prefill([list(s.request.input_ids) for s in sequences], want_prefill)
        forward_done = time.perf_counter()
        prefills = [self._prefill_tokens(s, logits[row]) if s.request.prefill_logprobs else None
                    for row, s in enumerate(sequences)]
        last_logits = logits[:, -1] if want_prefill else logits  # [b, V]
        sampled = BatchSampler([s.sampler for s in sequences], self.device)(
            last_logits, self._history(sequences), _top_n(sequences)
        )
        self._kv = kv if self._kv is None else KVBatch.concat(self._kv, kv)
        for s in sequences:
            s.status = SequenceStatus.RUNNING
        self.scheduler.allocate(sequences)
        self._sampler = None
        events = self._emit(sequences, sampled, prefills)
        self.metrics.observe_batch("prefill", len(sequences), forward_done - started, time.perf_counter() - started)
        return events

    def _decode(self) -> None:
        started = time.perf_counter()
        running = self.scheduler.running
        input_ids = torch.tensor([s.last_token_id for s in running], dtype=torch.long, device=self.device)
        logits = self.runner.decode(self._kv, input_ids)  # [B, V]
        forward_done = time.perf_counter()
        if self._sampler is None:
            self._sampler = BatchSampler([s.sampler for s in running], self.device)
        sampled = self._sampler(logits, self._history(running), _top_n(running))
        events = self._emit(running, sampled, None)
        self.metrics.observe_batch("decode", len(running), forward_done - started, time.perf_counter() - started)
        return events

    def _emit(self, sequences: list[Sequence], sampled: SampleOutput, prefills) -> list[TokenEvent]:
        ids = sampled.next_ids.tolist()
        logprobs = sampled.logprobs.tolist()
        top_ids = sampled.top_ids.tolist() if sampled.top_ids is not None else None
        top_logprobs = sampled.top_logprobs.tolist() if sampled.top_logprobs is not None else None
        events = []
        for row, sequence in enumerate(sequences):
            token_id = ids[row]
            special = token_id in self.special_ids
            text = sequence.detokenizer.step(token_id)
            shown = self.tokenizer.decode([token_id]) if special else text
            top = []
            if top_ids is not None and sequence.request.top_n_tokens:
                n = sequence.request.top_n_tokens
                top = [self._token(i, lp) for i, lp in zip(top_ids[row][:n], top_logprobs[row][:n])]
            prefill = prefills[row] if prefills else None
            events.append(sequence.append(Token(token_id, shown, logprobs[row], special), "" if special else text, top, prefill))
        return events

    def _prefill_tokens(self, sequence: Sequence, logits: torch.Tensor) -> tuple[Token, ...]:
        """decoder_input_details: each prompt token with the logprob the model gave it."""
        ids = list(sequence.request.input_ids)
        own = logits[-len(ids):]  # [n, V], the row's real (non-padding) positions
        logprobs = torch.log_softmax(own[:-1], dim=-1).gather(1, torch.tensor(ids[1:], device=own.device).view(-1, 1))
        values = [None] + logprobs.view(-1).tolist()
        return tuple(Token(i, self.tokenizer.decode([i]), lp, i in self.special_ids) for i, lp in zip(ids, values))

    def _token(self, token_id: int, logprob: float) -> Token:
        return Token(token_id, self.tokenizer.decode([token_id]), logprob, token_id in self.special_ids)

    def _history(self, sequences: list[Sequence]) -> list[list[int]]:
        return [s.token_ids for s in sequences]

    def _collect_finished(self) -> None:
        for sequence in self.scheduler.running:
            if sequence.status is SequenceStatus.FINISHED:
                sequence.stream.end()
        keep = self.scheduler.deallocate_finished()
        if keep is None:
            return
        self._sampler = None
        if keep:
            self._kv.filter(keep)
        else:
            self._kv = None

    # ---- cancellation and failure -----------------------------------------------------------
    def _take_inbox(self) -> None:
        while True:
            try:
                self.scheduler.add(self._inbox.get_nowait())
            except queue.Empty:
                return

    def _apply_cancellations(self) -> None:
        with self._lock:
            cancelled, self._cancelled = self._cancelled, set()
        if not cancelled:
            return
        for sequence in list(self.scheduler.waiting):
            if sequence.request_id in cancelled:
                self.scheduler.waiting.remove(sequence)
                self._cancel(sequence)
        for sequence in self.scheduler.running:
            if sequence.request_id in cancelled and not sequence.status.is_finished:
                self._cancel(sequence)
        self._collect_finished()

    def _cancel(self, sequence: Sequence) -> None:
        sequence.cancel_requested = True
        sequence.fail(RequestCancelled(f"request {sequence.request_id} was cancelled"))

    def _fail_all(self, error: EngineError) -> None:
        self._take_inbox()
        for sequence in list(self.scheduler.waiting) + self.scheduler.running:
            if not sequence.status.is_finished:
                sequence.fail(error)
        self.scheduler.waiting.clear()
        self.scheduler.running.clear()
        self._kv, self._sampler = None, None
        self.metrics.set_batch(0, 0)


def _top_n(sequences: list[Sequence]) -> int:
    return max(s.request.top_n_tokens for s in sequences)


def _eos_token_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
