"""The web's pub/sub connection lost while Redis stays up (killed for its output buffer, by an
operator, cut by the network): the subscriber connects again at once, but what a replica
published in between reached nobody. Its relay, seeing no Redis error, dropped such a final (and
takes a token or tick that reaches nobody as the client gone, and cancels). The request must not
wait in vain and fail: silent past its deadline since the connection came back, it is sent again.

The fake replica's first run takes the job, then kills the web's pub/sub connection and publishes
its final in one MULTI/EXEC: nobody can have subscribed again in between, whatever the timing."""
from __future__ import annotations

import redis

from common.keys import stream_channel
from tests.web.fake_replica import FakeReplica, register_replica, reply


def final_lost_on_first_run(redis_url: str, published: list):
    answer = reply([" Paris", "."])
    connection = redis.Redis.from_url(redis_url)

    def script(job):
        if job.attempt:  # a re-run's events carry its attempt, as a replica's do
            for event in answer(job):
                event.attempt = job.attempt
                yield event
            return
        *events, final = list(answer(job))
        yield from events
        pipe = connection.pipeline(transaction=True)
        pipe.client_kill_filter(_type="pubsub")
        pipe.publish(stream_channel(job.request_id), final.encode())
        published.append(pipe.execute()[1])  # receivers of the final

    return script


def test_a_final_published_while_the_subscriber_reconnects_is_not_lost(client, redis_url):
    register_replica(redis_url)
    published: list[int] = []
    with FakeReplica(redis_url, final_lost_on_first_run(redis_url, published)) as replica:
        response = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}})
    assert published == [0]  # the first run's final reached nobody
    assert response.status_code == 200, response.get_json()
    assert response.get_json()["generated_text"] == " Paris."
    assert [job.attempt for job in replica.jobs] == [0, 1]
