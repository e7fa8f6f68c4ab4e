"""One generation request, end to end on the web side: admit (concurrency limit), validate,
enqueue, then wait for the final event (JSON) or relay the events (server-sent events)."""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from flask import Response, jsonify, request

from common.logs import request_id_bound
from common.protocol import (
    EVENT_ERROR,
    EVENT_FINAL,
    EVENT_RETRY,
    EVENT_STARTED,
    EVENT_TOKEN,
    FailureReason,
    StreamEvent,
)
from web import sse
from web.admission import Slot
from web.disconnect import CHECK_EVERY, ClientDisconnected, disconnect_watch
from web.errors import ApiError, GenerationError, IncompleteGeneration, from_event
from web.replay import RerunDiverged, SentTokens
from web.request_id import request_id
from web.responses import (
    Outcome,
    RequestClock,
    generate_response,
    last_token_of,
    stream_last,
    stream_token,
    timing_headers,
)
from web.service import Service, current_service
from web.validation import ValidRequest

log = logging.getLogger(__name__)
T = TypeVar("T")


def generate_json(body: dict, *, full_text_default: bool, as_list: bool = False) -> Response:
    """TGI's /generate (and `/` with stream=false, whose body is a one-element list)."""
    service, clock = current_service(), RequestClock()
    slot, valid = _admit(service, body, clock, stream=False, full_text_default=full_text_default)
    try:
        with slot:
            outcome = wait_for_final(service, service.submit(valid.job), clock, disconnect_watch())
    except ApiError as error:
        service.metrics.tgi.request_failed(error)
        raise
    except ClientDisconnected:
        return client_went_away()
    service.metrics.tgi.request_succeeded(outcome)
    log_outcome(outcome)
    payload = generate_response(valid, outcome.final)
    response = jsonify([payload] if as_list else payload)
    # The serving replica's device; a replica that does not say: the cluster's.
    compute_type = outcome.final.device_type or service.cluster.compute_type()
    response.headers.update(timing_headers(valid, outcome, compute_type))
    return response


def generate_stream(body: dict, *, full_text_default: bool) -> Response:
    """TGI's /generate_stream. Errors before the stream starts are plain JSON responses."""
    service, clock = current_service(), RequestClock()
    slot, valid = _admit(service, body, clock, stream=True, full_text_default=full_text_default)
    try:
        events = service.submit(valid.job)
    except BaseException as error:
        slot.release()
        if isinstance(error, ApiError):
            service.metrics.tgi.request_failed(error)
        raise
    session = StreamSession(service, valid, events, slot, clock)
    response = Response(session.frames(), content_type=sse.MIMETYPE, headers=sse.HEADERS)
    response.headers.update({
        "x-compute-type": service.cluster.compute_type(),
        "x-compute-characters": str(len(valid.inputs)),
        "x-prompt-tokens": str(valid.input_length),
    })
    response.call_on_close(session.close)  # also when the body was never iterated
    return response


def admit(service: Service, clock: RequestClock, validate: Callable[[], T]) -> tuple[Slot, T]:
    """Count the request, take an admission slot (429 when none is left), then validate;
    every failure is counted under its error type."""
    tgi = service.metrics.tgi
    tgi.request_received()
    try:
        slot = service.admission.acquire()
    except ApiError as error:
        tgi.request_failed(error)
        raise
    try:
        valid = validate()
    except BaseException as error:
        slot.release()
        if isinstance(error, ApiError):
            tgi.request_failed(error)
        raise
    clock.mark("validated")
    return slot, valid


def _admit(service: Service, body: dict, clock: RequestClock, **how) -> tuple[Slot, ValidRequest]:
    slot, valid = admit(service, clock, lambda: service.validate(body, **how))
    service.metrics.tgi.request_validated(valid.input_length)
    valid.job.trace_id = request_id()
    log.info("enqueuing job %s: %d prompt tokens, max_new_tokens %s, stream %s", valid.job.request_id,
             valid.input_length, valid.parameters.get("max_new_tokens"), valid.job.stream)
    return slot, valid


def client_went_away() -> Response:
    """Nobody reads it: the client hung up, and its job was cancelled (nginx's 499)."""
    log.info("request cancelled: the client closed its connection")
    return Response(b"", status=499)


def log_outcome(outcome: Outcome) -> None:
    log.info("generated %d tokens in %.3f s (validation %.3f s, queue %.3f s, inference %.3f s)",
             outcome.generated_tokens, outcome.total_time, outcome.validation_time, outcome.queue_time,
             outcome.inference_time)


def wait_for_final(service: Service, events, clock: RequestClock, gone=lambda: False) -> Outcome:
    """The outcome of a submitted job (its `EventStream`, closed on return). Raises
    ClientDisconnected when `gone()` says the client hung up (web.disconnect)."""
    try:
        for event in events.events(tick=CHECK_EVERY):
            if gone():
                raise ClientDisconnected()
            if event is None:
                continue
            if event.kind in (EVENT_STARTED, EVENT_TOKEN):
                clock.mark("picked_up")
            elif event.kind == EVENT_FINAL:
                return Outcome.of(event, clock)
            elif event.kind == EVENT_ERROR:
                raise from_event(event)
            elif event.kind == EVENT_RETRY:
                service.metrics.tgi.request_redelivered()
        raise IncompleteGeneration()
    finally:
        events.close()


class StreamSession:
    """Relays one request's events as SSE. Each token is held back until the next token or
    the final event arrives, so that the last one carries `generated_text` and `details`."""

    def __init__(self, service: Service, valid: ValidRequest, events, slot: Slot, clock: RequestClock):
        self._service, self._valid, self._events, self._slot, self._clock = service, valid, events, slot, clock
        self._route = request.path  # the body is sent after the request context is gone
        self._closed = False

    def frames(self):
        """Runs after the view returned (the WSGI server iterates it): binds the request id again."""
        with request_id_bound(self._valid.job.trace_id):
            yield from self._frames()

    def _frames(self):
        pending: StreamEvent | None = None
        sent = SentTokens()
        try:
            for event in self._events.events():
                if event is None:
                    yield sse.KEEP_ALIVE
                elif event.kind == EVENT_RETRY:
                    self._service.metrics.tgi.request_redelivered()
                elif event.kind == EVENT_STARTED:
                    self._clock.mark("picked_up")
                elif event.kind == EVENT_TOKEN and sent.replayed(event):
                    continue
                elif event.kind == EVENT_TOKEN:
                    self._clock.mark("picked_up")
                    if pending is not None:
                        yield sse.frame(stream_token(self._valid, pending))
                    pending = event
                elif event.kind == EVENT_FINAL:
                    yield self._finish(pending or last_token_of(event), event)
                    return
                elif event.kind == EVENT_ERROR:
                    yield from self._fail(pending, from_event(event))
                    return
            yield from self._fail(pending, IncompleteGeneration())
        except RerunDiverged as error:
            yield from self._fail(pending, error)
        except Exception as error:  # e.g. an unreadable message: end the stream the TGI way
            log.exception("stream %s failed", self._valid.job.request_id)
            yield from self._fail(pending, GenerationError(str(error), reason=FailureReason.BAD_EVENT))
        finally:
            self.close()

    def _finish(self, last: StreamEvent | None, final: StreamEvent) -> str:
        if last is None:
            return "".join(self._fail(None, IncompleteGeneration()))
        outcome = Outcome.of(final, self._clock)
        self._service.metrics.tgi.request_succeeded(outcome)  # the duration ends with the stream
        log_outcome(outcome)
        return sse.frame(stream_last(self._valid, last, final))

    def _fail(self, pending: StreamEvent | None, error: ApiError):
        if pending is not None:
            yield sse.frame(stream_token(self._valid, pending))
        self._service.metrics.tgi.request_failed(error, self._route)
        yield sse.frame(error.to_dict())

    def close(self) -> None:
        """Unsubscribe (the replica then cancels the request) and free the admission slot."""
        if self._closed:
            return
        self._closed = True
        try:
            self._events.close()
        finally:
            self._slot.release()
