"""One OpenAI request end to end on the web side, on the same path as TGI's routes: admission,
validation (TGI's rules and messages), one job per choice on the queue (each with its own
failover), then one JSON body or a stream of chunks ending in `data: [DONE]`.

A request with several choices (`n`, or several completions prompts) enqueues them all at once,
so replicas batch them; it holds one admission slot, and counts once in `tgi_request_*`.
Completions' `best_of` enqueues that many candidates per prompt and keeps the best `n`.
"""
from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from flask import Response, jsonify, request

from common.logs import request_id_bound
from common.protocol import (
    EVENT_ERROR, EVENT_FINAL, EVENT_RETRY, EVENT_STARTED, EVENT_TOKEN, FailureReason, StreamEvent, derived_seed,
)
from web import sse
from web.admission import Slot
from web.errors import ApiError, ContextLengthError, GenerationError, IncompleteGeneration, from_event
from web.disconnect import ClientDisconnected, disconnect_watch
from web.generation import admit, client_went_away, log_outcome, wait_for_final
from web.openai.chunks import Chunker
from web.openai.errors import context_length_exceeded, error_body
from web.openai.params import GenerationPlan
from web.openai.responses import (ChoiceResult, Envelope, best_of, cached_prompt_tokens, chat_completion, completion,
                                  finish_reason)
from web.replay import RerunDiverged, SentTokens
from web.request_id import request_id
from web.responses import Outcome, RequestClock
from web.service import Service, current_service
from web.tokenizer import TokenizerUnavailable
from web.validation import ValidRequest

log = logging.getLogger(__name__)

DONE = "data: [DONE]\n\n"
EVENT_STREAM = sse.MIMETYPE + "; charset=utf-8"  # OpenAI's: clients decode the events as UTF-8
_PUMP_TICK = 0.5  # seconds: how soon a choice's reader thread notices the stream was closed


@dataclass(frozen=True)
class Choice:
    index: int  # prompt * samples + sample (OpenAI's index, unless best_of keeps fewer)
    valid: ValidRequest


@dataclass(frozen=True)
class Admitted:
    plan: GenerationPlan
    choices: list[Choice]

    @property
    def prompt_tokens(self) -> int:
        samples = self.plan.options.samples
        return sum(c.valid.input_length for c in self.choices if c.index % samples == 0)


def respond(kind: str, make_plan: Callable[[Service], GenerationPlan]) -> Response:
    """`kind`: "chat" or "completion"; `make_plan` turns the body into a plan (may raise 422)."""
    service, clock = current_service(), RequestClock()
    slot, admitted = admit(service, clock, lambda: _validate(service, make_plan))
    service.metrics.tgi.request_validated(admitted.prompt_tokens)
    envelope = Envelope.new(kind, admitted.plan.options.model)
    first = admitted.choices[0].valid.job
    log.info("enqueuing %s %s: %d choice(s), %d prompt tokens, max_new_tokens %s, stream %s", kind, envelope.id,
             len(admitted.choices), admitted.prompt_tokens, first.stopping.max_new_tokens, first.stream)
    if admitted.plan.options.stream:
        return _stream(service, admitted, slot, clock, envelope)
    return _json(service, admitted, slot, clock, envelope)


def _validate(service: Service, make_plan: Callable[[Service], GenerationPlan]) -> Admitted:
    try:
        plan = make_plan(service)
    except TokenizerUnavailable as error:
        raise GenerationError(f"the tokenizer is not available yet: {error}",
                              reason=FailureReason.TOKENIZER_UNAVAILABLE) from error
    choices = []
    for prompt in plan.prompts:
        try:
            valid = service.validate({"inputs": prompt.text, "parameters": plan.parameters}, stream=plan.options.stream,
                                     full_text_default=False, add_special_tokens=plan.add_special_tokens,
                                     cap_new_tokens=True, input_ids=prompt.ids, samples=plan.options.samples)
        except ContextLengthError as error:
            asked = 0 if plan.options.prompt_only else plan.parameters["max_new_tokens"]
            raise context_length_exceeded(error, asked, request.path) from error
        valid.job.sampling = dataclasses.replace(valid.job.sampling, **plan.openai)
        valid.job.trace_id = request_id()
        valid.job.token_logprobs = plan.options.token_logprobs
        if plan.options.prompt_logprobs:  # the engine scores the prompt (as for decoder_input_details)
            valid.job.decoder_input_details = True
            valid.job.prefill_top_n_tokens = plan.options.top_logprobs
        for sample in range(plan.options.samples):
            choices.append(Choice(len(choices), _sample(valid, sample)))
    return Admitted(plan, choices)


def _sample(valid: ValidRequest, sample: int) -> ValidRequest:
    """Choice `sample` of a prompt: its own job; sampled with a seed derived from the request's."""
    if sample == 0:
        return valid
    sampling = valid.job.sampling
    if sampling.seed is not None:
        sampling = dataclasses.replace(sampling, seed=derived_seed(sampling.seed, sample))
    job = dataclasses.replace(valid.job, request_id=uuid.uuid4().hex, sampling=sampling)
    return dataclasses.replace(valid, job=job, parameters={**valid.parameters, "seed": sampling.seed})


def _submit_all(service: Service, choices: list[Choice]) -> list:
    streams = []
    try:
        for choice in choices:
            streams.append(service.submit(choice.valid.job))
    except BaseException:
        for stream in streams:
            stream.close()
        raise
    return streams


def _json(service: Service, admitted: Admitted, slot: Slot, clock: RequestClock, envelope: Envelope) -> Response:
    tgi = service.metrics.tgi
    gone = disconnect_watch()
    try:
        with slot:
            streams = _submit_all(service, admitted.choices)
            try:
                # Each choice on its own copy of the clock: its queue and inference times are its own.
                outcomes = [wait_for_final(service, stream, dataclasses.replace(clock), gone) for stream in streams]
            finally:
                for stream in streams:
                    stream.close()
    except ApiError as error:
        tgi.request_failed(error)
        raise
    except ClientDisconnected:
        return client_went_away()
    slowest = max(outcomes, key=lambda outcome: outcome.total_time)  # the request ends with its last choice
    tgi.request_succeeded(slowest)
    log_outcome(slowest)
    plan = admitted.plan
    results = [ChoiceResult.of(c.index, o.final.details or {}, o.generated_tokens, plan.options)
               for c, o in zip(admitted.choices, outcomes)]
    completion_tokens = sum(r.generated_tokens for r in results)  # every candidate was generated
    results = best_of(results, plan.options)
    cached = cached_prompt_tokens([o.final.cached_tokens or 0 for o in outcomes], plan.options.samples)
    raw_bytes = service.tokens.token_bytes
    if envelope.kind == "chat":
        body = chat_completion(envelope, plan.options, results, admitted.prompt_tokens, completion_tokens, raw_bytes,
                               cached)
    else:
        body = completion(envelope, plan.options, results, plan.prompts, admitted.prompt_tokens, completion_tokens,
                          raw_bytes, cached)
    return jsonify(body)


def _stream(service: Service, admitted: Admitted, slot: Slot, clock: RequestClock, envelope: Envelope) -> Response:
    try:
        streams = _submit_all(service, admitted.choices)
    except BaseException as error:
        slot.release()
        if isinstance(error, ApiError):
            service.metrics.tgi.request_failed(error)
        raise
    chunker = Chunker(envelope, admitted.plan.options, admitted.plan.prompts, service.tokens.token_bytes)
    session = OpenAIStreamSession(service, admitted, streams, slot, clock, chunker)
    response = Response(session.frames(), content_type=EVENT_STREAM, headers=sse.HEADERS)
    response.headers["x-prompt-tokens"] = str(admitted.prompt_tokens)
    response.call_on_close(session.close)  # also when the body was never iterated
    return response


class ChoiceProgress:
    """One choice of a stream: the tokens sent (a re-run after failover must repeat them)."""

    def __init__(self):
        self.sent = SentTokens()
        self.generated_tokens = 0
        self.cached_tokens = 0
        self.finished = False


class OpenAIStreamSession:
    """Relays the events of every choice's job as chunks, as they come."""

    def __init__(self, service: Service, admitted: Admitted, streams: list, slot: Slot, clock: RequestClock,
                 chunker: Chunker):
        self._service, self._admitted, self._streams = service, admitted, streams
        self._slot, self._clock, self._chunker = slot, clock, chunker
        self._trace_id = admitted.choices[0].valid.job.trace_id
        self._route = request.path  # the body is sent after the request context is gone
        self._stop = threading.Event()
        self._pumping = False  # reader threads own (and close) the streams once started
        self._closed = False

    def frames(self) -> Iterator[str]:
        with request_id_bound(self._trace_id):
            yield from self._frames()

    def _frames(self) -> Iterator[str]:
        progress = [ChoiceProgress() for _ in self._streams]
        try:
            for number, event in self._events():
                if event is None:
                    yield sse.KEEP_ALIVE
                    continue
                choice = progress[number]
                if event.kind == EVENT_RETRY:
                    self._service.metrics.tgi.request_redelivered()
                elif event.kind == EVENT_STARTED:
                    self._clock.mark("picked_up")
                elif event.kind == EVENT_TOKEN and choice.sent.replayed(event):
                    continue
                elif event.kind == EVENT_TOKEN:
                    self._clock.mark("picked_up")
                    for chunk in self._chunker.token(number, event.token or {}, event.top_tokens, event.prefill,
                                                     event.prefill_top_tokens):
                        yield sse.frame(chunk)
                elif event.kind == EVENT_FINAL:
                    outcome = Outcome.of(event, dataclasses.replace(self._clock))  # ends now, not at the first
                    choice.finished, choice.generated_tokens = True, outcome.generated_tokens
                    choice.cached_tokens = event.cached_tokens or 0
                    tgi_reason = (event.details or {}).get("finish_reason")
                    for chunk in self._chunker.finish(number, tgi_reason, finish_reason(tgi_reason)):
                        yield sse.frame(chunk)
                    if all(p.finished for p in progress):
                        yield from self._succeed(progress, outcome)
                        return
                elif event.kind == EVENT_ERROR:
                    yield from self._fail(from_event(event))
                    return
            yield from self._fail(IncompleteGeneration())
        except RerunDiverged as error:
            yield from self._fail(error)
        except Exception as error:  # e.g. an unreadable message: end the stream with an error chunk
            log.exception("stream of %s failed", self._chunker.envelope.id)
            yield from self._fail(GenerationError(str(error), reason=FailureReason.BAD_EVENT))
        finally:
            self.close()

    def _succeed(self, progress: list[ChoiceProgress], outcome: Outcome) -> Iterator[str]:
        self._service.metrics.tgi.request_succeeded(outcome)  # the duration ends with the stream
        log_outcome(outcome)
        if self._chunker.options.include_usage:
            # prompt_only: the one token generated is not the client's
            generated = 0 if self._chunker.options.prompt_only else sum(p.generated_tokens for p in progress)
            cached = cached_prompt_tokens([p.cached_tokens for p in progress], self._chunker.options.samples)
            yield sse.frame(self._chunker.usage(self._admitted.prompt_tokens, generated, cached))
        yield DONE

    def _fail(self, error: ApiError) -> Iterator[str]:
        """OpenAI's error chunk (the `openai` client raises APIError on it), then [DONE]."""
        self._service.metrics.tgi.request_failed(error, self._route)
        yield sse.frame({"error": error_body(error, self._route)})
        yield DONE

    def _events(self) -> Iterator[tuple[int, StreamEvent | None]]:
        """(choice, event) from every choice's job as they come; (0, None) when idle."""
        if len(self._streams) == 1:
            for event in self._streams[0].events():
                yield 0, event
            return
        merged: queue.SimpleQueue = queue.SimpleQueue()
        self._pumping = True
        for number, stream in enumerate(self._streams):
            threading.Thread(target=self._pump, args=(number, stream, merged), daemon=True,
                             name=f"openai-stream-{number}").start()
        running = len(self._streams)
        keep_alive = self._service.settings.keep_alive_interval
        while running:
            try:
                number, event = merged.get(timeout=keep_alive)
            except queue.Empty:
                yield 0, None
                continue
            if event is _PUMP_DONE:
                running -= 1
            else:
                yield number, event

    def _pump(self, number: int, stream, merged: queue.SimpleQueue) -> None:
        """A choice's reader thread: forwards its events; closes its stream when done or stopped."""
        with request_id_bound(self._trace_id):
            try:
                for event in stream.events(tick=_PUMP_TICK):
                    if self._stop.is_set():
                        return
                    if event is not None:
                        merged.put((number, event))
            except Exception as error:
                merged.put((number, StreamEvent(kind=EVENT_ERROR, error=str(error), error_type="generation",
                                                reason=FailureReason.BAD_EVENT)))
            finally:
                stream.close()
                merged.put((number, _PUMP_DONE))

    def close(self) -> None:
        """Stop reading (the replicas then cancel the choices) and free the admission slot."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        try:
            if not self._pumping:
                for stream in self._streams:
                    stream.close()
        finally:
            self._slot.release()


_PUMP_DONE = object()
