"""The generate task: run one job on this replica's engine and publish its outcome.

Runs on a task thread of a replica (Celery `--pool threads`); the engine batches every task
thread's request. Tokens of streaming jobs are published by the replica's stream relay, step by
step; the task thread sleeps until its request ends, then publishes the final event. The task is
safe to run twice: a re-enqueued job (`attempt` > 0, see tasks.client.event_stream) regenerates with the
same seed on the same channel, its events marked with its attempt, and a job whose request was
re-enqueued since (an older attempt, e.g. redelivered by Celery later) is skipped.
"""
from __future__ import annotations

import logging
import time

import redis
from celery import Celery

from common.keys import attempt_key
from common.logs import request_id_bound
from common.protocol import EVENT_ERROR, EVENT_FINAL, EVENT_STARTED, FailureReason, Job, StreamEvent
from engine.outputs import EngineError, RequestCancelled
from tasks.queue.celery_app import GENERATE_TASK
from tasks.runtime.job_params import engine_request_id, engine_requests
from tasks.runtime.replica import current_replica
from tasks.runtime.results import Generation, best_of, final_details
from tasks.runtime.stream_relay import publish_failed

log = logging.getLogger(__name__)


def register(app: Celery) -> None:
    """Make `generate` the task that the web enqueues by name (GENERATE_TASK), on this worker's app."""
    app.task(name=GENERATE_TASK, ignore_result=True, shared=False)(generate)


def generate(job_dict: dict) -> None:
    try:
        job = Job.from_dict(job_dict)
    except (KeyError, TypeError, ValueError) as error:  # e.g. from a web of another version
        _refuse(job_dict, error)
        return
    with request_id_bound(job.trace_id or job.request_id):  # this thread's log lines name the request
        _generate(job)


def _generate(job: Job) -> None:
    replica = current_replica()
    if _superseded(replica, job):
        log.info("request %s: attempt %d was superseded by a newer one, skipped", job.request_id, job.attempt)
        return
    if job.model is not None and job.model != replica.settings.served_model:
        _wrong_model(replica, job)
        return
    started = time.time()
    queue_time = max(0.0, started - job.enqueued_at)
    device_type = replica.facts.get("device_type")
    started_event = StreamEvent(kind=EVENT_STARTED, replica=replica.name, device_type=device_type,
                                timings={"queue": queue_time}, attempt=job.attempt or None)
    try:
        listening = replica.relay.publish_now(job.request_id, started_event)
    except redis.RedisError as error:  # the relay retries the error event until the web can hear it
        log.error("request %s: could not announce the job (%s); failing it", job.request_id, error)
        # Pending as long as the web waits for a job no replica has announced yet.
        replica.relay.send(job.request_id, publish_failed(job.attempt or None),
                           keep_for=replica.settings.queue_timeout)
        return
    if not listening:
        log.info("request %s: client already gone, skipped", job.request_id)
        return
    log.info("job %s taken by %s after %.3f s in the queue", job.request_id, replica.name, queue_time)
    try:
        requests = engine_requests(job)
    except ValueError as error:
        replica.relay.send(job.request_id, _error(job, f"Request failed during generation: {error}",
                                                  FailureReason.MALFORMED_JOB))
        return
    replica.relay.register(engine_request_id(job), job.request_id, job.attempt, stream=job.stream,
                           rows=tuple(r.request_id for r in requests))
    streams = []
    try:
        streams = [replica.engine.submit(r) for r in requests]
        generations = [_collect(stream, Generation(seed=r.sampling.seed), replica.settings.request_timeout)
                       for stream, r in zip(streams, requests)]
    except RequestCancelled:  # the client went away, or the relay failed the request
        replica.relay.forget(engine_request_id(job))
        return
    except EngineError as error:
        replica.relay.send(job.request_id, _error(job, f"Request failed during generation: {error}"),
                           engine_request_id(job))
        return
    finally:
        for stream in streams:
            stream.close()
    winner, losers = best_of(generations)
    timings = _timings(job, streams, started)
    log.info("job %s done: %d tokens (%s), queue %.3f s, inference %.3f s", job.request_id,
             winner.finish.generated_tokens, winner.finish.reason.value, timings["queue"], timings["inference"])
    replica.relay.send(job.request_id, StreamEvent(
        kind=EVENT_FINAL,
        index=winner.finish.generated_tokens,
        generated_text=winner.finish.generated_text,
        details=final_details(winner, losers, with_tokens=not job.stream),
        timings=timings,
        device_type=device_type,
        attempt=job.attempt or None,
        cached_tokens=generations[0].finish.cached_tokens,  # of the job's prompt, when its first request began
        skipped_tokens=winner.finish.skipped_tokens or None,
    ), engine_request_id(job))


def _refuse(job_dict: dict, error: Exception) -> None:
    """A job this replica cannot read fails at once, not after the web's queue deadline."""
    request_id = job_dict.get("request_id") if isinstance(job_dict, dict) else None
    log.error("request %s: malformed job, refused: %r", request_id, error)
    if isinstance(request_id, str):
        current_replica().relay.send(request_id, StreamEvent(
            kind=EVENT_ERROR, error=f"Request failed during generation: malformed job ({error!r})",
            error_type="generation", reason=FailureReason.MALFORMED_JOB, attempt=job_dict.get("attempt") or None))


def _wrong_model(replica, job: Job) -> None:
    """A job for another model (the web's and this worker's `--models` differ, e.g. in order: each
    slot's and queue's model shifts) fails saying so; answering it with this model would look right."""
    message = (f"Request failed during generation: the job is for model {job.model!r} but reached replica "
               f"{replica.name} of model {replica.settings.served_model!r}: the web's and the workers' "
               "--models / --models-file differ")
    log.error("request %s: %s", job.request_id, message)
    replica.relay.send(job.request_id, StreamEvent(kind=EVENT_ERROR, error=message, error_type="generation",
                                                   reason=FailureReason.MALFORMED_JOB, attempt=job.attempt or None))


def _superseded(replica, job: Job) -> bool:
    """Whether the web re-enqueued this request as a newer attempt than this job."""
    try:
        current = replica.redis.get(attempt_key(job.request_id))
    except redis.RedisError as error:  # run it: the web drops events of stale attempts anyway
        log.warning("request %s: could not read its current attempt (%s); running it", job.request_id, error)
        return False
    return current is not None and int(current) > job.attempt


def _timings(job: Job, streams, picked_up: float) -> dict:
    """TGI's split: queue time until the engine began the request's prefill, inference after."""
    began = min((s.started_at for s in streams if s.started_at), default=picked_up)
    return {"queue": max(0.0, began - job.enqueued_at), "inference": max(0.0, time.time() - began)}


def _collect(stream, generation: Generation, timeout: float) -> Generation:
    """Sleep until the request ends (one wake-up, not one per token), then read its events."""
    if not stream.wait(timeout):
        raise EngineError(f"generation did not finish within {timeout:.0f} s")
    for event in stream:
        generation.add(event)
    return generation


def _error(job: Job, message: str, reason: FailureReason = FailureReason.ENGINE_ERROR) -> StreamEvent:
    return StreamEvent(kind=EVENT_ERROR, error=message, error_type="generation", reason=reason,
                       attempt=job.attempt or None)
