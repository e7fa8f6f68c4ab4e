"""The generate task: run one job on this replica's engine and publish its outcome.

Runs on a task thread of a replica (Celery `--pool threads`); the engine batches every task
thread's request. Tokens of streaming jobs are published by the replica's stream relay, step by
step; the task thread sleeps until its request ends, then publishes the final event. The task is
safe to run twice (a redelivered job regenerates with the same seed on the same channel).
"""
from __future__ import annotations

import logging
import time

from engine.outputs import EngineError, RequestCancelled
from tasks.celery_app import GENERATE_TASK, app
from tasks.job_params import engine_requests
from tasks.protocol import EVENT_ERROR, EVENT_FINAL, EVENT_STARTED, Job, StreamEvent
from tasks.replica import current_replica
from tasks.results import Generation, best_of, final_details

log = logging.getLogger(__name__)


@app.task(name=GENERATE_TASK, ignore_result=True)
def generate(job_dict: dict) -> None:
    job = Job.from_dict(job_dict)
    replica = current_replica()
    started = time.time()
    queue_time = max(0.0, started - job.enqueued_at)
    started_event = StreamEvent(kind=EVENT_STARTED, replica=replica.name, timings={"queue": queue_time})
    if not replica.relay.publish_now(job.request_id, started_event):
        log.info("request %s: client already gone, skipped", job.request_id)
        return
    try:
        requests = engine_requests(job)
    except ValueError as error:
        replica.relay.send(job.request_id, _error(f"Request failed during generation: {error}"))
        return
    if job.stream:
        replica.relay.register(job.request_id)
    streams = []
    try:
        streams = [replica.engine.submit(r) for r in requests]
        generations = [_collect(stream, Generation(seed=r.sampling.seed), replica.settings.request_timeout)
                       for stream, r in zip(streams, requests)]
    except RequestCancelled:
        return  # the client went away; nobody is listening for an error
    except EngineError as error:
        replica.relay.send(job.request_id, _error(f"Request failed during generation: {error}"))
        return
    finally:
        for stream in streams:
            stream.close()
    winner, losers = best_of(generations)
    timings = {"queue": queue_time, "inference": time.time() - started}
    replica.relay.send(job.request_id, StreamEvent(
        kind=EVENT_FINAL,
        index=winner.finish.generated_tokens,
        generated_text=winner.finish.generated_text,
        details=final_details(winner, losers, with_tokens=not job.stream),
        timings=timings,
    ))


def _collect(stream, generation: Generation, timeout: float) -> Generation:
    """Sleep until the request ends (one wake-up, not one per token), then read its events."""
    if not stream.wait(timeout):
        raise EngineError(f"generation did not finish within {timeout:.0f} s")
    for event in stream:
        generation.add(event)
    return generation


def _error(message: str) -> StreamEvent:
    return StreamEvent(kind=EVENT_ERROR, error=message, error_type="generation")
