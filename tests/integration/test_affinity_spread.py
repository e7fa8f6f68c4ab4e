"""Affinity that spreads, through the real service (web, Celery, Redis, two replica processes of
the tiny model): a burst of chats sharing a long system prompt, sent while both engines are held
(tests.integration.stepped_worker), lands on both replicas, not all on the one whose cache holds
the prompt; every chat is answered once the engines run."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from common.keys import affinity_key
from tasks.client.affinity import own_queue_bound, prefix_keys
from tests.integration.stepped_worker import grant
from tests.integration.test_one_attempt import records, rows, wait_until
from tests.stepped_service import SteppedService

SYSTEM = " ".join(f"Rule {n}: a queue, a worker and a stream of tokens meet in the city number {n}." for n in range(40))
CHATS = 12


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("affinity-spread")
    env = {"XDG_CACHE_HOME": str(workdir / "cache"), "MAX_INPUT_TOKENS": "1800", "MAX_TOTAL_TOKENS": "2048",
           "MAX_BATCH_SIZE": str(CHATS)}
    with SteppedService(str(tiny_model_dir), workdir, env=env, replicas=2).running(active_replicas=2) as service:
        yield service


def chat(svc, question: str) -> requests.Response:
    return requests.post(f"{svc.base_url}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "max_tokens": 4, "temperature": 0,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]})


def test_a_burst_sharing_a_system_prompt_runs_on_both_replicas(svc):
    connection = redis.Redis.from_url(svc.env["REDIS_URL"])
    assert chat(svc, "Which rule comes first?").status_code == 200  # one replica now holds the prompt
    ids = [t["id"] for t in requests.post(f"{svc.base_url}/chat_tokenize", timeout=10, json={
        "model": "tiny", "messages": [{"role": "system", "content": SYSTEM}]}).json()["tokenize_response"]]
    holder = connection.get(affinity_key(prefix_keys(ids)[0])).decode()
    for slot in svc.replicas:
        grant(svc.steps(slot), 0)  # both engines hold what they are given
    with ThreadPoolExecutor(CHATS) as pool:
        answers = [pool.submit(chat, svc, f"Question {n}: which rule matters?") for n in range(CHATS)]
        held = wait_until(lambda: (r := records(connection)) and sum(rows(v) for v in r.values()) == CHATS and r,
                          f"the {CHATS} chats in the engines", timeout=90)
        for slot in list(svc.replicas):
            svc.steps(slot).unlink()
        responses = [a.result(timeout=120) for a in answers]
    by_replica = {name: rows(record) for name, record in held.items()}
    print(f"\n{CHATS} chats sharing a system prompt, held in the engines: {by_replica} ({holder} held the prompt)")
    assert all(n > 0 for n in by_replica.values()) and len(by_replica) == 2  # both replicas have work
    assert by_replica[holder] < CHATS
    assert [r.status_code for r in responses] == [200] * CHATS
    assert own_queue_bound(held[holder]["kv_slots"]) < CHATS
