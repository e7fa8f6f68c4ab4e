"""No stranded data, through the real service (web, Celery, Redis, two replica processes of the
tiny model): after jobs were rerouted away from a replica's own queue and that replica was
SIGKILLed while it held a job, once every request has ended no job (no prompt) is left in Redis:
not in a queue list, not in kombu's `unacked` hash, not anywhere. The replica that holds the job
takes only the steps the test grants it (tests.integration.stepped_worker)."""
from __future__ import annotations

import base64
import json
import os
import signal
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from common.keys import affinity_key, replica_queue
from tasks.client.affinity import prefix_keys
from tests.integration.stepped_worker import grant
from tests.integration.test_one_attempt import records, rows, wait_until
from tests.stepped_service import SteppedService

REQUEST_TIMEOUT = 25
PROMPT = "Hygiene: " + " ".join(f"the worker {k} takes a job from the queue." for k in range(15))


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("queue-hygiene")
    # A long heartbeat TTL: a frozen replica still looks alive while jobs are routed to it.
    env = {"XDG_CACHE_HOME": str(workdir / "cache"), "HEARTBEAT_TTL": "10", "REQUEST_TIMEOUT": str(REQUEST_TIMEOUT)}
    with SteppedService(str(tiny_model_dir), workdir, env=env, replicas=2).running(active_replicas=2) as service:
        yield service


def generate(svc, text: str) -> requests.Response:
    return requests.post(f"{svc.base_url}/generate", json={"inputs": text, "parameters": {"max_new_tokens": 6}},
                         timeout=120)


def holds_a_prompt(value: bytes) -> bool:
    """A job's fields, as they are or inside a kombu message's base64 body."""
    if b"input_ids" in value:
        return True
    try:
        message = json.loads(value)
        message = message[0] if isinstance(message, list) else message
        return b"input_ids" in base64.b64decode(message["body"])
    except (ValueError, KeyError, IndexError, TypeError):
        return False


def prompts_in_redis(connection: redis.Redis) -> dict[str, int]:
    """Every key holding a job: key -> how many jobs it holds."""
    found = {}
    for key in connection.scan_iter(count=1000):
        kind = connection.type(key).decode()
        values = {"list": lambda: connection.lrange(key, 0, -1), "hash": lambda: connection.hvals(key),
                  "string": lambda: [connection.get(key) or b""], "set": lambda: connection.smembers(key)}
        count = sum(holds_a_prompt(v) for v in values.get(kind, list)())
        if count:
            found[key.decode()] = count
    return found


def test_no_job_is_left_in_redis_after_a_reroute_and_a_killed_replica(svc):
    connection = redis.Redis.from_url(svc.env["REDIS_URL"])
    assert generate(svc, PROMPT).status_code == 200
    ids = [t["id"] for t in requests.post(f"{svc.base_url}/tokenize", json={"inputs": PROMPT}, timeout=10).json()]
    holder = connection.get(affinity_key(prefix_keys(ids)[0])).decode()
    slot = int(holder[len("replica"):].split("@")[0])
    grant(svc.steps(slot), 0)  # the holder's engine takes no step from now on
    prompts = [f"{PROMPT} Question {n}?" for n in range(4)]
    with ThreadPoolExecutor(len(prompts)) as pool:
        held = pool.submit(generate, svc, prompts[0])  # routed to the holder, which takes it and holds it
        wait_until(lambda: rows(records(connection).get(holder)) == 1, "the holder holds a job")
        os.kill(svc.replicas[slot].pid, signal.SIGSTOP)  # looks alive until its record expires
        try:
            rerouted = [pool.submit(generate, svc, text) for text in prompts[1:]]
            # Sent to its own queue (one may be taken by the read it had waiting when it froze).
            wait_until(lambda: connection.llen(replica_queue(holder)) >= 1, "jobs in the frozen replica's queue")
            wait_until(lambda: all(r.done() for r in rerouted), "the rerouted jobs answered", timeout=90)
        finally:
            svc.kill_replica(slot)  # SIGKILL, holding its job in kombu's `unacked` hash
        answers = [held.result(timeout=120)] + [r.result() for r in rerouted]
    assert [a.status_code for a in answers] == [200] * len(prompts), [a.text for a in answers]
    # Every request has ended: within the request timeout (and a sweep), nothing holds its job.
    wait_until(lambda: not prompts_in_redis(connection), f"no job left (left: {prompts_in_redis(connection)})",
               timeout=REQUEST_TIMEOUT + 30)
    assert connection.hlen("unacked") == 0 and not list(connection.scan_iter(match="generation*"))
