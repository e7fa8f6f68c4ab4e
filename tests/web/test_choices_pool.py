"""A request with many choices holds one Redis pub/sub connection per choice until they all end
(4 completions prompts x `n` 2 = 8), and one admission slot. The web's connection pool must hold
that for every thread at once: before, it had room for one pub/sub per thread, so two such
requests waited on each other's connections (each held some, waited for more) until the pool's
timeout failed them. Real Redis, the web's own app; a stand-in replica starts every job and
finishes none until the test has seen them all."""
from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import redis

from common.keys import stream_channel
from common.protocol import EVENT_STARTED, StreamEvent
from tests.web.fake_replica import FakeReplica, reply
from web.app import create_app

PROMPTS = ["one two", "three four", "five six", "seven eight"]


def started(job):
    yield StreamEvent(kind=EVENT_STARTED, replica="replica0@test")


def test_requests_with_many_choices_on_every_thread_all_succeed(settings, redis_url):
    threads = 2
    settings = dataclasses.replace(settings, web_threads=threads, max_concurrent_requests=threads)
    app = create_app(settings)
    body = {"prompt": PROMPTS, "n": 2, "temperature": 1.0, "max_tokens": 1}
    connection = redis.Redis.from_url(redis_url)
    with FakeReplica(redis_url, started) as replica, ThreadPoolExecutor(threads) as pool:
        answers = [pool.submit(app.test_client().post, "/v1/completions", json=body) for _ in range(threads)]
        every_job = threads * len(PROMPTS) * 2
        for _ in range(200):  # every choice of every request enqueued (each subscribed first)
            if len(replica.jobs) == every_job or any(a.done() for a in answers):
                break
            time.sleep(0.05)
        assert len(replica.jobs) == every_job, [a.result().get_json() for a in answers if a.done()]
        for job in replica.jobs:
            for event in reply([" x"])(job):
                if event.kind != EVENT_STARTED:
                    connection.publish(stream_channel(job.request_id), event.encode())
        responses = [a.result(timeout=30) for a in answers]
    for response in responses:
        assert response.status_code == 200, response.get_json()
        assert len(response.get_json()["choices"]) == len(PROMPTS) * 2
