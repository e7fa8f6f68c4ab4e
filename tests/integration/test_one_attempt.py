"""At most one live attempt per request, through the real service (web, Celery, Redis, two
replica processes of the tiny model): a replica that looked dead (frozen past its heartbeat's
TTL) while it ran a request, whose job the web therefore sent again, stops that older run within
one engine step once it runs again. Each replica takes only the steps the test grants it
(tests.integration.stepped_worker), so nothing here depends on the machine's speed."""
from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from common.keys import replica_key
from common.replica_records import live_records
from tests.integration.stepped_worker import grant, granted
from tests.stepped_service import SteppedService


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one-attempt")
    env = {"XDG_CACHE_HOME": str(workdir / "cache"), "HEARTBEAT_TTL": "2", "PREFIX_AFFINITY": "false"}
    with SteppedService(str(tiny_model_dir), workdir, env=env, replicas=2).running(active_replicas=2) as service:
        yield service


def records(connection: redis.Redis) -> dict[str, dict]:
    return {r["name"]: r for r in live_records(connection)}


def wait_until(condition, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {what}")


def rows(record: dict | None) -> int:
    return int(record["running"]) + int(record["waiting"]) if record else 0


def fresh_record(connection: redis.Redis, name: str, since: float) -> dict | None:
    """The replica's record as its heartbeat published it after `since` (time.time())."""
    raw = connection.get(replica_key(name))
    record = json.loads(raw) if raw else None
    return record if record and record["updated_at"] > since else None


# TGI's best_of runs `best_of` engine rows for one job (`<id>/<n>`): every one of them stops.
@pytest.mark.parametrize("parameters, held_rows", [({}, 1), ({"best_of": 2, "do_sample": True}, 2)],
                         ids=["one row", "best_of 2"])
def test_an_older_attempt_that_runs_stops_within_one_step_when_a_newer_one_starts(svc, parameters, held_rows):
    connection = redis.Redis.from_url(svc.env["REDIS_URL"])
    for slot in svc.replicas:
        grant(svc.steps(slot), 0)  # every engine waits for the test from now on
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(requests.post, f"{svc.base_url}/generate",
                             json={"inputs": "one live attempt", "parameters": {"max_new_tokens": 30, **parameters}},
                             timeout=120)
        holder = wait_until(lambda: next((n for n, r in records(connection).items() if rows(r) == held_rows), None),
                            "a replica holds the request")
        slot = int(holder[len("replica"):].split("@")[0])
        other = next(s for s in svc.replicas if s != slot)
        grant(svc.steps(slot), 3)  # its prefill and two decode steps: the older attempt runs
        wait_until(lambda: granted(svc.steps(slot)) == 0, "the holder took its steps")
        stepped = time.time()
        assert wait_until(lambda: fresh_record(connection, holder, stepped), "a heartbeat")["running"] == held_rows

        # Frozen past its heartbeat's TTL, it looks dead: the web sends the job again (attempt 1),
        # and the other replica starts it.
        os.kill(svc.replicas[slot].pid, signal.SIGSTOP)
        try:
            wait_until(lambda: rows(records(connection).get(_name(svc, other, connection))) == held_rows,
                       "the other replica holds the newer attempt")
        finally:
            os.kill(svc.replicas[slot].pid, signal.SIGCONT)

        log = svc.workdir / f"replica{slot}.log"
        wait_until(lambda: "superseded by attempt 1; cancelling it" in log.read_text(errors="replace"),
                   "the holder's relay saw the newer attempt")
        grant(svc.steps(slot), 1)
        wait_until(lambda: granted(svc.steps(slot)) == 0, "the holder took one more step")
        after_step = time.time()
        record = wait_until(lambda: fresh_record(connection, holder, after_step), "a heartbeat after that step")
        assert (record["running"], record["waiting"]) == (0, 0)  # one step, and the older attempt is gone

        svc.steps(other).unlink()  # the newer attempt runs freely
        response = answer.result(timeout=120)
    assert response.status_code == 200, response.text
    assert response.json()["generated_text"]
    answered = time.time()
    assert granted(svc.steps(slot)) == 0  # the holder, still held, had nothing left to run
    assert rows(wait_until(lambda: fresh_record(connection, holder, answered), "a heartbeat")) == 0


def _name(svc: SteppedService, slot: int, connection: redis.Redis) -> str:
    return next(n for n, r in records(connection).items() if r["slot"] == slot)
