"""A job for another model that reaches a replica (the web's and the workers' `--models` differ:
another order shifts every slot's and queue's model) fails naming both models; the replica never
answers it with its own model. Through a real replica worker, Celery and Redis."""
from __future__ import annotations

import uuid

import redis

from common.keys import GENERATION_QUEUE, stream_channel
from common.protocol import EVENT_ERROR, FailureReason, Job, SamplingParameters, StoppingParameters, StreamEvent
from common.settings import Settings
from tasks.queue.celery_app import GENERATE_TASK, make_celery


def test_a_job_for_another_model_is_refused_not_answered(service):
    connection = redis.Redis.from_url(service.redis.url)
    job = Job(uuid.uuid4().hex, [1, 2, 3], SamplingParameters(), StoppingParameters(max_new_tokens=2),
              model="some-other-model")
    listener = connection.pubsub()
    listener.subscribe(stream_channel(job.request_id))
    assert listener.get_message(timeout=5)["type"] == "subscribe"
    make_celery(Settings(redis_url=service.redis.url)).send_task(
        GENERATE_TASK, args=[job.to_dict()], queue=GENERATION_QUEUE, task_id=job.request_id)
    events = []
    while not events or events[-1].kind not in ("final", "error"):
        message = listener.get_message(timeout=30)
        assert message is not None, f"no answer after {events}"
        if message["type"] == "message":
            events.append(StreamEvent.decode(message["data"]))
    assert events[-1].kind == EVENT_ERROR and events[-1].reason == FailureReason.MALFORMED_JOB, events
    assert "some-other-model" in events[-1].error
    assert not any(event.kind in ("token", "final") for event in events)
    listener.close()
