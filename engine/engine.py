"""The continuous-batching engine: one loop thread owns the model and the KV cache.

Each step reads schedule → launch → complete: the scheduler picks the batch (every decoding
request, plus prompt chunks within the prefill budget), the runner runs them all in one forward
and the batch sampler picks every row's token on the device (`launch`); then the tokens reach
the host, where each request detokenizes, checks its stop conditions and emits one event
(`engine/token_events.py`), and finished requests end their streams and give their KV slot back
(`complete`). With overlap on (CUDA), a decode step whose batch is unchanged is launched before
the previous step completes (`engine/overlap.py`). With `--speculate`, a decode step whose rows
have drafts (n-grams, or a draft model's: `engine/draft_model.py`) verifies them all in its one
forward and each row emits what it accepted (`engine/speculative.py`, `_verify` and `_accept`).
See docs/engine.md.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from engine.devices import affordable_slots, device_context
from engine.draft_model import DraftModel
from engine.generic_runner import GenericRunner
from engine.host_transfer import Fence, HostCopy
from engine.lora import LoraLayers
from engine.lora_files import LoraAdapter
from engine.metrics import EngineMetrics
from engine.model_runner import ModelRunner, StepOutput, slot_path_refusal, supports_slots
from engine.outputs import EngineError, RequestCancelled, TokenEvent
from engine.overlap import LaunchedStep, successor
from engine.params import GenerationRequest
from engine.sampling import BatchSampler
from engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from engine.sequence import RequestStream, Sequence, SequenceStatus
from engine.speculative import SpeculativeConfig, Speculator, accepted_tokens
from engine.token_events import TokenEvents
from engine.watermark import Watermark

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    running: int
    waiting: int
    batch_tokens: int  # KV positions the running requests hold now
    max_batch_size: int
    max_batch_total_tokens: int
    kv_slots: int = 0
    cuda_graphs: int = 0  # decode (and verify) graphs captured
    graph_capture_seconds: float = 0.0
    prefix_caching: bool = False
    prefix_hit_tokens: int = 0  # prompt positions taken from the prefix cache, since start
    prefix_miss_tokens: int = 0  # prompt positions prefilled, since start
    prefix_cached_tokens: int = 0  # KV positions the free slots hold as cache now
    prefix_cached_slots: int = 0  # free slots holding a cached prefix now
    waiting_tokens: int = 0  # prompt positions yet to prefill, a long prompt's chunks included (the SLO autoscaler's demand)
    speculate: int = 0  # draft tokens per row per step (0: no speculation)
    spec_drafter: str = ""  # what drafts: "ngram" or the draft model's id ("": no speculation)
    spec_drafts: int = 0  # rows verified with drafts, since start
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0


class Engine:
    def __init__(self, model, tokenizer, scheduler_config: SchedulerConfig, metrics: EngineMetrics | None = None,
                 step_listener: Callable[[list[TokenEvent]], None] | None = None, cuda_graphs: bool | None = None,
                 watermark: Watermark | None = None, overlap: bool | None = None,
                 adapters: tuple[LoraAdapter, ...] | list[LoraAdapter] = (),
                 speculative: SpeculativeConfig | None = None, draft_model=None, draft_name: str = ""):
        """`step_listener`, when given, is called on the loop thread with every event of a step
        (keep it quick: hand the events to another thread). It sees a request's last event
        before that request's stream ends. `cuda_graphs`: on CUDA, replay decode steps from graphs unless False (never on CPU).
        `watermark`: gamma and delta for the requests that ask for it (TGI's defaults when None).
        `overlap`: launch a decode step before the previous one's tokens become events (default: on
        CUDA, where the device runs while the host works; a CPU's forward and host work share the cores).
        `adapters`: the LoRA adapters requests may name (`GenerationRequest.adapter`), checked
        against the model already (engine/lora_files.py); many of them run in one batch.
        `speculative`: n-gram drafts verified in the batch (engine/speculative.py); its steps are
        synchronous, so it turns overlap off. `draft_model`: a small model of the same tokenizer
        drafts instead of n-grams (`--speculative-model`, engine/draft_model.py), shown as
        `draft_name`; its KV takes slots as the model's does."""
        self.device = next(model.parameters()).device
        self.tokenizer = tokenizer
        self.adapter_names = tuple(adapter.name for adapter in adapters)
        slots = affordable_slots(model, self.device, scheduler_config, adapters,  # set aside before the KV cache
                                 self.device.type == "cuda" and cuda_graphs is not False, draft_model,
                                 speculative.tokens if speculative is not None else 0)
        if supports_slots(model, scheduler_config.slot_length):
            use_graphs = self.device.type == "cuda" and cuda_graphs is not False
            lora = LoraLayers(model, adapters) if adapters else None
            self.runner = ModelRunner(model, self.device, slots, scheduler_config.slot_length, use_graphs, lora,
                                      pack_cpu_linears=speculative is not None and speculative.enabled)
        elif adapters:
            raise EngineError(f"LoRA adapters need the slot path, which {model.config.get_text_config().model_type} "
                              "models do not take")
        else:
            log.warning("%s: it runs on the generic (slower) path, one request per forward, without prefix "
                        "caching or CUDA graphs", slot_path_refusal(model, scheduler_config.slot_length))
            self.runner = GenericRunner(model, self.device)
            scheduler_config = replace(scheduler_config, prefix_caching=False)
            overlap = False
        self.speculator = None
        if speculative is not None and speculative.enabled:
            if isinstance(self.runner, GenericRunner):
                log.warning("speculative decoding needs the slot path: off")
            else:
                self.speculator = Speculator(speculative, scheduler_config.slot_length)
                if draft_model is not None:
                    self.speculator.draft_with(DraftModel(draft_model, model, draft_name or draft_model.name_or_path,
                                                          slots, scheduler_config.slot_length, self.device,
                                                          scheduler_config.max_batch_prefill_tokens))
                self.runner.capture_verify_graphs(speculative.tokens)  # with CUDA graphs on (engine/cuda_graphs.py)
                overlap = False  # a verify step's successor depends on how many drafts were accepted
        self.overlap = self.device.type == "cuda" if overlap is None else overlap
        self._pending: LaunchedStep | None = None  # launched, its tokens not yet events
        self._unsettled: deque[str] = deque()  # methods of the forwards run, not yet completed or dropped
        self.scheduler = Scheduler(scheduler_config, slots)
        self.metrics = metrics or EngineMetrics()
        self.metrics.watch_prefix_cache(self.scheduler.table)
        self.step_listener = step_listener
        self.eos_token_ids = _eos_token_ids(model, tokenizer)
        self.events = TokenEvents(tokenizer)
        self.watermark = watermark or Watermark()
        self._sampler: BatchSampler | None = None
        self._sampler_rows: tuple[str, ...] = ()  # the request ids `_sampler` was built for
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self._cancelled: set[str] = set()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop_on_device, name="engine-loop", daemon=True)

    # ---- the submitter's side (any thread) -------------------------------------------------
    def start(self) -> "Engine":
        if self.runner.graphs is not None:
            self.runner.graphs.capture()
        if self.runner.verify_graphs is not None:
            self.runner.verify_graphs.capture(self.runner.graphs.pool)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the loop after its step: every request not finished ends with an error."""
        self._stopping.set()
        self._wake.set()
        if self._thread.ident is None:  # never started (stepped by hand): nothing else runs it
            self._fail_all(EngineError("the engine is shutting down"))
        else:
            self._thread.join(timeout)

    def submit(self, request: GenerationRequest) -> RequestStream:
        """Queue a request; its stream yields token events (the last one carries `finish`) and
        raises EngineError (RequestCancelled after `cancel`). Closing it early cancels."""
        if request.adapter is not None and request.adapter not in self.adapter_names:
            raise EngineError(f"unknown LoRA adapter {request.adapter!r}; this replica serves: "
                              f"{', '.join(self.adapter_names) or 'none'}")
        sequence = Sequence(request, self.tokenizer, self.eos_token_ids, self.device, on_abandon=self.cancel)
        if not self.scheduler.fits_ever(sequence):
            raise EngineError(
                f"request needs {request.max_total_tokens} tokens, more than a KV slot of the batch budget "
                f"holds ({self.scheduler.config.slot_length})"
            )
        self._inbox.put(sequence)
        self._wake.set()
        return sequence.stream

    def cancel(self, request_id: str) -> None:
        """Stop a request at the next step boundary; its KV slot is freed then."""
        with self._lock:
            self._cancelled.add(request_id)
        self._wake.set()

    def stats(self) -> EngineStats:
        graphs, verify_graphs = self.runner.graphs, self.runner.verify_graphs
        table = self.scheduler.table
        return EngineStats(
            running=len(self.scheduler.running),
            waiting=len(self.scheduler.waiting) + self._inbox.qsize(),
            batch_tokens=self.scheduler.kv_tokens,
            max_batch_size=self.scheduler.config.max_batch_size,
            max_batch_total_tokens=self.scheduler.slots * self.scheduler.config.slot_length,
            kv_slots=self.scheduler.slots,
            cuda_graphs=sum(len(g.graphs) for g in (graphs, verify_graphs) if g is not None),
            graph_capture_seconds=sum(g.capture_seconds for g in (graphs, verify_graphs) if g is not None),
            prefix_caching=table.caching,
            prefix_hit_tokens=table.hit_tokens,
            prefix_miss_tokens=table.miss_tokens,
            prefix_cached_tokens=table.cached_tokens,
            prefix_cached_slots=table.cached_slots,
            waiting_tokens=self.scheduler.prompt_tokens_to_prefill(),  # the inbox's join at the next step
            speculate=self.speculator.config.tokens if self.speculator else 0,
            spec_drafter=self.speculator.drafter_name if self.speculator else "",
            spec_drafts=self.speculator.drafts if self.speculator else 0,
            spec_draft_tokens=self.speculator.draft_tokens if self.speculator else 0,
            spec_accepted_tokens=self.speculator.accepted if self.speculator else 0,
        )

    # ---- the loop thread --------------------------------------------------------------------
    def _loop_on_device(self) -> None:
        with device_context(self.device):  # its events and streams on our device, not cuda:0
            self._loop()

    @torch.inference_mode()
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
                for method in self._unsettled:
                    self.metrics.count_failure(method)
                self._fail_all(EngineError(f"{type(error).__name__}: {error}"))
        self._fail_all(EngineError("the engine is shutting down"))

    @torch.inference_mode()
    def step(self) -> None:
        """One step: launch a batch, complete the step launched before it, release the finished.
        With overlap, a decode batch whose rows continue is launched before the previous step is
        completed (docs/engine.md, "Overlapping host and device")."""
        self._take_inbox()
        previous, self._pending = self._pending, None
        if previous is not None and not self._continues(previous):
            self._complete(previous, release=True)
            previous = None
        launched = self._launch_next(previous)
        if launched is None:
            return
        if self.overlap and launched.may_run_ahead:
            self._pending = launched  # completed at the next step, after its successor is launched
        else:
            self._complete(launched, release=True)

    def _continues(self, pending: LaunchedStep) -> bool:
        """Whether the next step is `pending`'s rows again, with nothing for the host to decide first."""
        return (pending.may_run_ahead and not pending.has_finished_rows and not self._cancelled
                and not (self.scheduler.waiting and self.scheduler.table.can_allocate()))

    def _launch_next(self, previous: LaunchedStep | None) -> LaunchedStep | None:
        """The scheduler's next batch; or, launched before `previous` is completed, its rows one
        position further. A batch whose sampling reads what `previous`'s tokens change on the host
        (a grammar's mask, a watermark's previous token) runs its forward first and is sampled once
        `previous` is completed, unless a row ended there: then its forward is dropped (nothing of
        it is recorded; the next step writes those positions again) and the finished rows leave."""
        if previous is None:
            self._apply_cancellations()
            batch = self.scheduler.schedule()
            if batch.is_empty:
                return None
            drafter = self.speculator.batch_drafter if self.speculator is not None else None
            if drafter is not None:
                drafter.apply_copies(batch.copies)  # its KV follows the slots, drafting or not
            started = time.perf_counter()  # a verify step's cost includes its drafting
            drafts = self._drafts(batch)
            return self._verify(batch, drafts, started) if drafts else self._sample(self._run(batch))
        sample_later = previous.sampler.needs_host
        try:
            launched = self._run(successor(previous))  # on the device while `previous` completes
            if not sample_later:
                launched = self._sample(launched)
        finally:  # `previous`'s tokens stand even if this step could not be launched
            self._complete(previous, release=False)
        if not sample_later:
            return launched
        if previous.has_finished_rows:
            self._unsettled.pop()  # the dropped forward: neither a success nor a failure
            self._release_finished()
            return None
        return self._sample(launched)

    def _sample(self, launched: LaunchedStep) -> LaunchedStep:
        """The step's sampling queued on the device after its forward; its tokens start for the host."""
        sequences, logits = self._rows_to_sample(launched.batch, launched.output)
        if not sequences:  # a prompt chunk that does not end its prompt
            return replace(launched, output=None)
        sampler = self._sampler_for(sequences)
        sampled = sampler(logits, [s.token_ids for s in sequences], _top_n(sequences))
        results = HostCopy((sampled.next_ids, sampled.logprobs, sampled.top_ids, sampled.top_logprobs), self._fence)
        return replace(launched, sequences=sequences, next_ids=sampled.next_ids, results=results, sampler=sampler,
                       output=None)

    def _drafts(self, batch: ScheduledBatch) -> list[tuple[int, ...]] | None:
        """Each decode row's draft tokens, when speculation is on and the step is decode only."""
        if self.speculator is None or batch.prefill or None in batch.decode:
            return None
        return self.speculator.propose(batch.decode)

    def _verify(self, batch: ScheduledBatch, drafts: list[tuple[int, ...]], started: float) -> LaunchedStep:
        """A decode step whose rows carry drafts: one forward scores every position, each sampled
        as plain decoding would sample it (engine/speculative.py); accepted in `_accept`."""
        self.runner.apply_copies(batch.copies)
        self._unsettled.append("decode")
        forward_started = time.perf_counter()
        logits = self.runner.verify(batch, drafts)
        self.metrics.observe_forward("decode", time.perf_counter() - forward_started)
        samplers, histories = self.speculator.verify_rows(batch.decode, drafts)
        sampler = BatchSampler(samplers, self.device, self.watermark)
        self._sampler, self._sampler_rows = None, ()  # the batch's own sampler missed these tokens
        sampled = sampler(logits, histories, _top_n(batch.decode))
        results = HostCopy((sampled.next_ids, sampled.logprobs, sampled.top_ids, sampled.top_logprobs), self._fence)
        return LaunchedStep(batch, list(batch.decode), results=results, sampler=sampler, started=started,
                            drafts=drafts)

    def _accept(self, launched: LaunchedStep) -> list[TokenEvent]:
        """A verify step's tokens: each row emits its accepted drafts and the token after them,
        one position at a time (a row that stops on one emits nothing after it); its KV length
        grows by what it emitted, leaving the rejected drafts' columns to be overwritten."""
        ids, *columns = [t.tolist() if t is not None else None for t in launched.results.wait()]
        self._unsettled.popleft()
        rows, offset = [], 0
        for sequence, own in zip(launched.sequences, launched.drafts):
            tokens = accepted_tokens(ids[offset : offset + len(own) + 1], own)
            rows.append((sequence, own, range(offset, offset + len(tokens))))
            offset += len(own) + 1
        events, emitted = [], [0] * len(rows)
        for position in range(max(len(taken) for _, _, taken in rows)):
            wave = [row for row, (sequence, _, taken) in enumerate(rows)
                    if position < len(taken) and not sequence.status.is_finished]
            indices = [rows[row][2][position] for row in wave]
            picked = [None if column is None else [column[i] for i in indices] for column in columns]
            for row in wave:
                sequence = rows[row][0]
                sequence.kv_len += 1  # the token it was fed at this position stands
                sequence.skipped_tokens += 1 if position else 0  # a drafted token (counted before its final)
                emitted[row] += 1
            events += self.events.emit([rows[row][0] for row in wave], [ids[i] for i in indices], *picked)
        for (sequence, own, taken), count in zip(rows, emitted):
            self.speculator.record(sequence, len(own), len(taken) - 1, count)
        self.metrics.observe_drafts(sum(1 for _, own, _ in rows if own), sum(len(own) for _, own, _ in rows),
                                    sum(len(taken) - 1 for _, own, taken in rows if own))
        return events

    def _fence(self) -> Fence:
        fence = getattr(self.runner, "fence", None)  # a simulated device brings its own (bench/)
        return fence() if fence is not None else Fence(self.device)

    def _complete(self, launched: LaunchedStep, release: bool) -> None:
        """The step's tokens on the host: positions written, one event per row still running, the
        finished requests' streams ended. `release`: their slots are given back now (else after
        the step launched meanwhile, which still computes their rows)."""
        batch = launched.batch
        if launched.drafts is None:
            sequences, host = launched.read()
            self.scheduler.postprocess(batch, sequences)
            self._unsettled.popleft()
            events = self.events.emit(sequences, *host) if sequences else []
        else:
            sequences, events = launched.sequences, self._accept(launched)
        size = len(batch.decoding) + len(batch.prefill)
        seconds = time.perf_counter() - launched.started
        self.metrics.observe_step(_method(batch), size, seconds)
        if self.speculator is not None and not batch.prefill and (launched.drafts is None or
                                                                  self.speculator.timing_is_typical):
            self.speculator.gate.observe(size, seconds, sum(map(len, launched.drafts or ())))
        if events and self.step_listener is not None:
            self.step_listener(events)
        if release:
            self._release_finished()
        else:
            self.metrics.set_batch(len(self.scheduler.running), self.scheduler.kv_tokens)
        _end_finished(sequences)  # the listener has seen their last event

    def _run(self, batch: ScheduledBatch) -> LaunchedStep:
        """The step's one forward, queued: the running rows' next tokens and the prompt chunks."""
        self.runner.apply_copies(batch.copies)
        if batch.prefill:
            now = time.time()
            for chunk in batch.prefill:  # the end of their queue time, the start of their inference time
                chunk.sequence.stream.started_at = chunk.sequence.stream.started_at or now
        method = _method(batch)
        self._unsettled.append(method)
        started = time.perf_counter()
        output = self.runner.forward(batch)
        self.metrics.observe_forward(method, time.perf_counter() - started)
        return LaunchedStep(batch, [], output=output, started=started)

    def _rows_to_sample(self, batch: ScheduledBatch, output: StepOutput) -> tuple[list[Sequence], torch.Tensor | None]:
        """Every decode row and every prompt that was completed, and their logits [n, V]."""
        decoding = batch.decoding
        completed = [row for row, c in enumerate(batch.prefill) if c.completes_prompt]
        for chunk, logits in zip(batch.prefill, output.prompt_logits):
            if logits is not None:
                self.events.gather_prompt_logprobs(chunk, logits)
        parts = []
        if decoding:
            live = [s.slot for s in decoding]
            decode_logits = output.decode_logits
            parts.append(decode_logits if len(live) == decode_logits.shape[0] else decode_logits[live])
        if completed:
            parts.append(output.last_logits[completed])
        sequences = decoding + [batch.prefill[row].sequence for row in completed]
        if not sequences:
            return [], None
        return sequences, parts[0] if len(parts) == 1 else torch.cat(parts)

    def _sampler_for(self, sequences: list[Sequence]) -> BatchSampler:
        """The batch's sampling tensors, rebuilt only when its rows change."""
        rows = tuple(s.request_id for s in sequences)
        if self._sampler is None or rows != self._sampler_rows:
            self._sampler = BatchSampler([s.sampler for s in sequences], self.device, self.watermark)
            self._sampler_rows = rows
        return self._sampler

    def _release_finished(self) -> None:
        """Give the finished requests' slots back (their streams ended when they finished)."""
        self.scheduler.release_finished()
        self.metrics.set_batch(len(self.scheduler.running), self.scheduler.kv_tokens)  # what is left

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
        for sequence in self.scheduler.cancel(cancelled):
            sequence.cancel_requested = True
            sequence.fail(RequestCancelled(f"request {sequence.request_id} was cancelled"))
        self._release_finished()

    @torch.inference_mode()  # resets the cache, an inference tensor
    def _fail_all(self, error: EngineError) -> None:
        self._take_inbox()
        drained = self.scheduler.drain()
        for sequence in drained:
            if not sequence.status.is_finished:
                sequence.fail(error)
        _end_finished(drained)  # whose final is out: never silence
        self.runner.reset()
        if self.speculator is not None and self.speculator.batch_drafter is not None:
            self.speculator.batch_drafter.reset()
        self._pending = None
        self._unsettled.clear()
        self._sampler, self._sampler_rows = None, ()
        self.metrics.set_batch(0, 0)


def _method(batch: ScheduledBatch) -> str:
    """TGI's forward label: a step that carries prompt tokens is a prefill (its running rows
    decode in the same forward, as in TGI's chunked prefill), one with none a decode."""
    return "prefill" if batch.prefill else "decode"


def _end_finished(sequences: list[Sequence]) -> None:
    """End the streams of the requests that finished (their final is out; cancelled and failed
    ones ended when they failed)."""
    for sequence in sequences:
        if sequence.status is SequenceStatus.FINISHED:
            sequence.stream.end()


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
