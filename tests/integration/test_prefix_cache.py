"""Prefix caching through the real service (web, Celery, Redis, replicas of the tiny model): a
shared system prompt is read from the cache with the answer of a service without it;
conversations return to the replica holding them; a replica killed while its own queue holds
jobs strands none of them."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import openai
import pytest
import redis
import requests

from blitzscale.redis_server import free_port
from common.keys import GENERATION_QUEUE, affinity_key, replica_queue
from common.processes import stop_processes
from tasks.client.affinity import prefix_keys
from tests.service import Service

LIMITS = {"MAX_INPUT_TOKENS": "1800", "MAX_TOTAL_TOKENS": "2048"}
SYSTEM = " ".join(f"Rule {n}: a queue, a worker and a stream of tokens meet in the city number {n}." for n in range(30))


@pytest.fixture(scope="module")
def cached(tiny_model_dir, tmp_path_factory):
    """Two replicas with prefix caching (the default) and affinity."""
    workdir = tmp_path_factory.mktemp("prefix-cached")
    with Service(str(tiny_model_dir), workdir, env={"XDG_CACHE_HOME": str(workdir / "cache"), **LIMITS},
                 replicas=2).running(active_replicas=2) as svc:
        yield svc


@pytest.fixture(scope="module")
def uncached(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("prefix-uncached")
    with Service(str(tiny_model_dir), workdir, env={"XDG_CACHE_HOME": str(workdir / "cache"),
                                                    "PREFIX_CACHING": "false", **LIMITS}).running() as svc:
        yield svc


def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="-", timeout=120, max_retries=0)


def ask(base_url: str, messages: list[dict], max_tokens: int = 8):
    return client(base_url).chat.completions.create(model="tiny", messages=messages, max_tokens=max_tokens,
                                                    temperature=0)


def test_a_shared_system_prompt_is_read_from_the_cache_with_the_same_answer(cached, uncached):
    system = {"role": "system", "content": SYSTEM}
    first = ask(cached.base_url, [system, {"role": "user", "content": "What is a queue?"}])
    second_messages = [system, {"role": "user", "content": "Who is the worker?"}]
    second = ask(cached.base_url, second_messages)
    assert first.usage.prompt_tokens > 1000
    assert second.usage.prompt_tokens_details.cached_tokens >= 1000
    without = ask(uncached.base_url, second_messages)
    assert without.usage.prompt_tokens_details.cached_tokens == 0
    assert second.choices[0].message.content == without.choices[0].message.content
    assert cluster_hit_tokens(cached) >= 1000
    metrics = requests.get(f"{cached.base_url}/metrics", timeout=10).text
    assert 'blitz_prefix_cache_tokens_total{replica=' in metrics and 'result="hit"' in metrics


def cluster_hit_tokens(svc: Service, timeout: float = 30) -> int:
    """The hit tokens /cluster_state reports, once a replica's heartbeat has published them."""
    deadline = time.monotonic() + timeout
    while True:
        replicas = requests.get(f"{svc.base_url}/cluster_state?celery=false", timeout=10).json()["replicas"]
        hits = sum((r.get("prefix_cache") or {}).get("hit_tokens", 0) for r in replicas)
        if hits or time.monotonic() > deadline:
            return hits
        time.sleep(0.2)


def converse(base_url: str, opening: str, turns: int = 4) -> list[bool]:
    """One conversation; for each turn after the first, whether its replica found the whole
    previous prompt cached."""
    messages, hits, previous = [{"role": "user", "content": opening}], [], None
    for turn in range(turns):
        answer = ask(base_url, messages, max_tokens=6)
        if previous is not None:
            hits.append(answer.usage.prompt_tokens_details.cached_tokens >= previous)
        previous = answer.usage.prompt_tokens
        messages += [{"role": "assistant", "content": answer.choices[0].message.content},
                     {"role": "user", "content": f"And then, number {turn}?"}]
    return hits


def hit_rate(base_url: str, tag: str, conversations: int = 8) -> float:
    results: dict[int, list[bool]] = {}

    def run(n: int) -> None:
        opening = f"Conversation {tag} {n}: " + " ".join(f"the queue {n} meets worker {k}." for k in range(12))
        results[n] = converse(base_url, opening)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    hits = [hit for n in range(conversations) for hit in results[n]]
    return sum(hits) / len(hits)


@pytest.fixture
def web_without_affinity(cached):
    """A second web process on the same cluster, routing every job to the shared queue."""
    port = free_port()
    log = open(cached.workdir / "web-no-affinity.log", "ab")
    process = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", "web"],
                               env={**cached.env, "PORT": str(port), "PREFIX_AFFINITY": "false"},
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if requests.get(f"{base_url}/health", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield base_url
    finally:
        stop_processes([process], grace=20)


def test_conversations_return_to_the_replica_that_holds_them(cached, web_without_affinity):
    with_affinity = hit_rate(cached.base_url, "a")
    without = hit_rate(web_without_affinity, "b")
    print(f"\nprefix cache hits on turns 2-4, 8 conversations x 4 turns, 2 replicas: "
          f"{with_affinity:.0%} with affinity, {without:.0%} without")
    assert with_affinity >= 0.8


def test_jobs_in_the_own_queue_of_a_killed_replica_are_served_by_another(cached, uncached):
    """The replica that served a prefix is frozen (it looks alive until its heartbeat expires),
    jobs with that prefix are sent to its own queue, then it is SIGKILLed: every job is answered,
    by the other replica, with the answer of a service without the cache."""
    prompt = "Frozen: " + " ".join(f"the worker {k} takes a job from the queue." for k in range(15))
    assert generate(cached.base_url, prompt)["generated_text"] is not None
    ids = [t["id"] for t in requests.post(f"{cached.base_url}/tokenize", json={"inputs": prompt}, timeout=10).json()]
    connection = redis.Redis.from_url(cached.env["REDIS_URL"])
    holder = connection.get(affinity_key(prefix_keys(ids)[0])).decode()
    slot = int(holder[len("replica"):].split("@")[0])
    process = cached.replicas[slot]
    os.kill(process.pid, signal.SIGSTOP)
    results: dict[int, dict] = {}
    prompts = [f"{prompt} Question {n}?" for n in range(3)]
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, generate(cached.base_url, prompts[n])))
               for n in range(3)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while connection.llen(replica_queue(holder)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        # Held by the frozen replica: in its own queue, the last maybe popped by the read it had
        # waiting on Redis when it froze (lost with it, as a job a dying replica fetched is).
        assert connection.llen(replica_queue(holder)) >= 2 and connection.llen(GENERATION_QUEUE) == 0
    finally:
        cached.kill_replica(slot)  # SIGKILL (a stopped process dies too)
    for thread in threads:
        thread.join(120)
    for n, text in enumerate(prompts):
        assert results[n]["generated_text"] == generate(uncached.base_url, text)["generated_text"]


def generate(base_url: str, text: str) -> dict:
    response = requests.post(f"{base_url}/generate", json={"inputs": text, "parameters": {"max_new_tokens": 6}},
                             timeout=120)
    assert response.status_code == 200, response.text
    return response.json()
