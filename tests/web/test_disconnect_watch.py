"""A JSON request is cancelled when its client hangs up (web.disconnect), and only then: a
gunicorn process with many open connections serves some on descriptors past 1,024, which
`select.select` cannot watch (it raises ValueError). Such a client, still connected, must get its
answer, not the 499 of a hang-up. The request's socket is a real TCP connection, placed on a
descriptor past 1,024 as in such a process, and handed to the app as gunicorn hands it."""
from __future__ import annotations

import os
import resource
import socket

import pytest

from tests.web.fake_replica import FakeReplica, register_replica, reply

HIGH_FD = 1500  # past select's FD_SETSIZE (1,024)


@pytest.fixture
def connection():
    """(client end, server end on HIGH_FD) of a TCP connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= HIGH_FD:
        pytest.skip(f"the descriptor limit ({hard}) is below {HIGH_FD}")
    if soft <= HIGH_FD:
        resource.setrlimit(resource.RLIMIT_NOFILE, (HIGH_FD + 1, hard))
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    accepted, _ = listener.accept()
    listener.close()
    os.dup2(accepted.fileno(), HIGH_FD)
    accepted.close()
    server = socket.socket(fileno=HIGH_FD)
    try:
        yield client, server
    finally:
        client.close()
        server.close()
        if soft <= HIGH_FD:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_a_connected_client_on_a_high_descriptor_gets_its_answer(client, redis_url, connection):
    register_replica(redis_url)
    _, server = connection
    with FakeReplica(redis_url, reply([" Paris", "."])):
        response = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}},
                               environ_overrides={"gunicorn.socket": server})
    assert response.status_code == 200
    assert response.get_json()["generated_text"] == " Paris."


def test_a_client_that_hung_up_on_a_high_descriptor_is_cancelled(client, redis_url, connection):
    register_replica(redis_url)
    peer, server = connection
    peer.close()  # the client hangs up before its answer
    with FakeReplica(redis_url, reply([" Paris", "."])):
        response = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 2}},
                               environ_overrides={"gunicorn.socket": server})
    assert response.status_code == 499
