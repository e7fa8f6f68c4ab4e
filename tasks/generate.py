"""The generate task: run one job on this replica's engine and publish its events.

Runs on a task thread of a replica (Celery `--pool threads`); the engine batches every
task thread's request. The task is safe to run twice (a redelivered job regenerates with the
same seed and publishes on the same channel).
"""
from __future__ import annotations

import logging
import time

from engine.outputs import EngineError, RequestCancelled
from tasks.celery_app import GENERATE_TASK, app
from tasks.job_params import engine_requests
from tasks.protocol import Job
from tasks.publisher import StreamPublisher
from tasks.replica import current_replica
from tasks.results import Generation, best_of, final_details

log = logging.getLogger(__name__)


class ClientGone(Exception):
    """Nobody listens on the request's channel any more."""


@app.task(name=GENERATE_TASK, ignore_result=True)
def generate(job_dict: dict) -> None:
    job = Job.from_dict(job_dict)
    replica = current_replica()
    publisher = StreamPublisher(replica.redis, job.request_id)
    started = time.time()
    if not publisher.started(replica.name, queue_time=max(0.0, started - job.enqueued_at)):
        log.info("request %s: client already gone, skipped", job.request_id)
        return
    streams = []
    try:
        requests = engine_requests(job)
        generations = [Generation(seed=r.sampling.seed) for r in requests]
        streams = [replica.engine.submit(r) for r in requests]
        for stream, generation in zip(streams, generations):
            for event in stream:
                generation.add(event)
                if job.stream and not publisher.token(
                    event.index, event.token.to_dict(), [t.to_dict() for t in event.top_tokens]
                ):
                    stream.close()  # cancels the request in the engine: its slot is freed
                    raise ClientGone
    except ClientGone:
        log.info("request %s: client went away, cancelled", job.request_id)
        return
    except (EngineError, ValueError) as error:
        if not isinstance(error, RequestCancelled):
            publisher.error(f"Request failed during generation: {error}")
        return
    finally:
        for stream in streams:
            stream.close()
    winner, losers = best_of(generations)
    timings = {"queue": max(0.0, started - job.enqueued_at), "inference": time.time() - started}
    publisher.final(
        winner.finish.generated_tokens,
        winner.finish.generated_text,
        final_details(winner, losers, with_tokens=not job.stream),
        timings,
    )
