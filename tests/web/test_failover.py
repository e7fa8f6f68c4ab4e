"""Failover seen from the web (tasks/client/event_stream.py), with scripted replicas on real Redis: a
replica whose heartbeat record vanishes mid-request is replaced, each request answered once."""
from __future__ import annotations

import threading

import pytest
import redis

from common.keys import GENERATION_QUEUE, attempt_key, replica_key, stream_channel
from common.protocol import EVENT_STARTED, StreamEvent
from tests.web.fake_replica import FakeReplica, decode_job, register_replica, reply, token
from web.app import create_app


def dying_replica(redis_url: str, tokens: int) -> threading.Thread:
    """Takes one job, publishes `started` and a few tokens, then dies (its record vanishes)."""
    connection = redis.Redis.from_url(redis_url)
    register_replica(redis_url, slot=0)

    def run():
        _, raw = connection.brpop([GENERATION_QUEUE], timeout=10)
        thread.taken.set()
        job = decode_job(raw)
        channel = stream_channel(job.request_id)
        connection.publish(channel, StreamEvent(kind=EVENT_STARTED, replica="replica0@test").encode())
        for index in range(1, tokens + 1):
            connection.publish(channel, token(index, f" t{index}").encode())
        connection.delete(replica_key("replica0@test"))

    thread = threading.Thread(target=run, daemon=True)
    thread.taken = threading.Event()
    thread.start()
    return thread


def post_after_the_dying_replica_took_it(client, dying, path: str, body: dict, survivor: FakeReplica):
    """The survivor starts consuming only once the dying replica holds the job."""
    result = {}

    def send():
        result["response"] = response = client.post(path, json=body)
        response.get_data()  # a stream's body is produced while it is read

    worker = threading.Thread(target=send)
    worker.start()
    assert dying.taken.wait(5)
    with survivor:
        worker.join(20)
    return result["response"]


def rerun(words: list[str], first_id: int = 11):
    """A replica that serves re-runs: its events carry the job's attempt."""
    def script(job):
        for event in reply(words)(job):
            if isinstance(event, StreamEvent):
                event.attempt = job.attempt or None
                if event.kind == EVENT_STARTED:
                    event.replica = "replica1@test"
                if event.token:
                    event.token["id"] = first_id + event.index - 1
            yield event
    return script


@pytest.fixture
def fast(settings):
    return create_app(settings.replace(replica_check_interval=0.1, queue_timeout=5)).test_client()


def test_a_request_is_rerun_on_another_replica(fast, redis_url, redis_client):
    dying = dying_replica(redis_url, tokens=2)
    survivor = FakeReplica(redis_url, rerun([" t1", " t2", " t3"]), name="replica1@test")
    response = post_after_the_dying_replica_took_it(fast, dying, "/generate", {"inputs": "hello"}, survivor)
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["generated_text"] == " t1 t2 t3"
    assert [job.attempt for job in survivor.jobs] == [1]
    assert redis_client.get(attempt_key(survivor.jobs[0].request_id)) == b"1"


def test_a_stream_resumes_without_repeating_tokens(fast, redis_url):
    dying = dying_replica(redis_url, tokens=2)
    survivor = FakeReplica(redis_url, rerun([" t1", " t2", " t3"]), name="replica1@test")
    response = post_after_the_dying_replica_took_it(fast, dying, "/generate_stream", {"inputs": "hello"}, survivor)
    text = response.get_data(as_text=True)
    events = [e for e in text.split("\n\n") if e.startswith("data:")]
    assert len(events) == 3, text
    assert '"generated_text":" t1 t2 t3"' in events[-1]


def test_a_stream_whose_rerun_differs_ends_with_one_error(fast, redis_url):
    dying = dying_replica(redis_url, tokens=2)
    survivor = FakeReplica(redis_url, rerun([" x1", " x2", " x3"], first_id=90), name="replica1@test")
    text = post_after_the_dying_replica_took_it(fast, dying, "/generate_stream", {"inputs": "hello"},
                                                survivor).get_data(as_text=True)
    events = [e for e in text.split("\n\n") if e.startswith("data:")]
    assert sum('"error"' in e for e in events) == 1 and '"error"' in events[-1]
    assert "generated other tokens" in events[-1]


def test_no_replica_to_take_over_fails_at_once(fast, redis_url):
    dying = dying_replica(redis_url, tokens=1)
    response = fast.post("/generate", json={"inputs": "hello"})
    dying.join(5)
    assert response.status_code == 424
    assert response.get_json()["error"] == ("Request failed during generation: replica replica0@test stopped and "
                                            "no replica is available to serve the request")
