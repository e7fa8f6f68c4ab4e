"""Prefix affinity across replicas: how often a conversation's next turn finds its earlier turns in
the cache of the replica it reaches, with the web's affinity routing and without (part of
`python -m bench.prefix_cache`).

`blitzscale serve` with two replicas of the default model (manual scaling: the count stays 2),
and a second web process on the same cluster started with `--prefix-affinity false`; the same
number of conversations, each with its own opening, goes through each web concurrently. A turn
after the first is a hit when its replica found the whole previous prompt cached (OpenAI's
`usage.prompt_tokens_details.cached_tokens` >= the previous turn's `prompt_tokens`).
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.cluster import Cluster
from blitzscale.redis_server import free_port
from common.processes import stop_process


def chat(base_url: str, messages: list[dict], new_tokens: int) -> dict:
    response = requests.post(f"{base_url}/v1/chat/completions", timeout=600, json={
        "model": "bench", "messages": messages, "max_tokens": new_tokens, "temperature": 0})
    response.raise_for_status()
    return response.json()


def conversation(base_url: str, opening: str, turns: int, new_tokens: int) -> list[bool]:
    messages, hits, previous = [{"role": "user", "content": opening}], [], None
    for turn in range(turns):
        answer = chat(base_url, messages, new_tokens)
        usage = answer["usage"]
        if previous is not None:
            hits.append(usage["prompt_tokens_details"]["cached_tokens"] >= previous)
        previous = usage["prompt_tokens"]
        messages += [{"role": "assistant", "content": answer["choices"][0]["message"]["content"]},
                     {"role": "user", "content": f"Tell me more about point {turn + 2}, briefly."}]
    return hits


def hit_rate(base_url: str, tag: str, conversations: int, turns: int, new_tokens: int) -> float:
    results: dict[int, list[bool]] = {}

    def run(n: int) -> None:
        opening = (f"Conversation {tag}{n}. Here are my notes: " +
                   " ".join(f"Point {k}: the {tag}{n} project needs {k + 2} more reviewers." for k in range(10)) +
                   " What should I do first?")
        results[n] = conversation(base_url, opening, turns, new_tokens)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(conversations)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hits = [hit for n in sorted(results) for hit in results[n]]
    if len(results) < conversations:
        raise RuntimeError("a conversation failed")
    return sum(hits) / len(hits)


def second_web(cluster: Cluster, log, **env) -> tuple[subprocess.Popen, str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", "web"],
                               env={**cluster.env, "PORT": str(port), **env}, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{base_url}/health", timeout=5).status_code == 200:
                return process, base_url
        except requests.ConnectionError:
            time.sleep(0.3)
    raise TimeoutError("the second web did not start")


def measure_affinity(conversations: int = 8, turns: int = 4, new_tokens: int = 16) -> dict:
    log_path = Path(tempfile.gettempdir()) / "bench-prefix-affinity.log"
    cluster = Cluster(log_path, num_replicas=2, manually_scale=True)
    web = None
    try:
        cluster.wait_ready(2)
        with open(log_path, "ab") as log:
            web, plain_url = second_web(cluster, log, PREFIX_AFFINITY="false")
            with_affinity = hit_rate(cluster.base_url, "a", conversations, turns, new_tokens)
            without = hit_rate(plain_url, "b", conversations, turns, new_tokens)
    finally:
        if web is not None:
            stop_process(web, grace=20)
        cluster.close()
    return {"conversations": conversations, "turns": turns, "replicas": 2,
            "hit_rate_with_affinity": with_affinity, "hit_rate_without_affinity": without}
