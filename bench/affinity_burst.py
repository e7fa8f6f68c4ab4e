"""A burst of chats sharing one long system prompt over two replicas, through a web with prefix
affinity and one without: TTFT p50/p99 and each replica's share of the prompt tokens, side by side.

Prefix affinity sends a job to the replica that served its prompt's prefix; a burst that shares
its system prompt must not all herd onto that replica while the other idles (tasks/client/
affinity.py counts what it routed and bounds it). `blitzscale serve` with two replicas (manual
scaling: the count stays 2) and a second web process on the same cluster with
`--prefix-affinity false`; one warm-up chat through each web, then the burst, every chat
streamed, through one web and then the other. A replica's share is its prompt tokens looked up
(prefix cache hits + misses in /cluster_state) during the burst.

    python -m bench.affinity_burst [--chats 64] [--system-tokens 1000] [--model DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import requests

from bench.cluster import Cluster
from bench.common import save
from bench.prefix_affinity import second_web
from common.processes import stop_process


def system_prompt(base_url: str, tokens: int) -> tuple[str, int]:
    """About `tokens` tokens of rules, as the served model's tokenizer counts them (and the count)."""
    def text(rules: int) -> str:
        return " ".join(f"Rule {n}: the queue, the worker and the stream of tokens meet in city {n}."
                        for n in range(rules))

    def count(rules: int) -> int:
        return len(requests.post(f"{base_url}/tokenize", json={"inputs": text(rules)}, timeout=60).json())

    rules = max(1, round(10 * tokens / count(10)))
    return text(rules), count(rules)


def first_token_seconds(base_url: str, messages: list[dict], new_tokens: int) -> float:
    """One streamed chat: seconds from sending it until its first content chunk."""
    sent = time.perf_counter()
    body = {"model": "bench", "messages": messages, "max_tokens": new_tokens, "temperature": 0, "stream": True}
    first = None
    with requests.post(f"{base_url}/v1/chat/completions", json=body, stream=True, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if first is None and line.startswith(b"data:") and b'"content"' in line:
                first = time.perf_counter() - sent
    if first is None:
        raise RuntimeError("a chat streamed no content")
    return first


def tokens_by_replica(base_url: str) -> dict[str, int]:
    replicas = requests.get(f"{base_url}/cluster_state?celery=false", timeout=30).json()["replicas"]
    return {r["name"]: (r.get("prefix_cache") or {}).get("hit_tokens", 0) + (r.get("prefix_cache") or {}).get(
        "miss_tokens", 0) for r in replicas if r.get("name")}


def burst(base_url: str, system: str, tag: str, chats: int, new_tokens: int) -> dict:
    before = tokens_by_replica(base_url)
    ttfts, errors, lock = [], [], threading.Lock()

    def chat(n: int) -> None:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": f"Question {tag}{n}: why?"}]
        try:
            seconds = first_token_seconds(base_url, messages, new_tokens)
            with lock:
                ttfts.append(seconds)
        except (requests.RequestException, RuntimeError) as error:
            with lock:
                errors.append(str(error))

    threads = [threading.Thread(target=chat, args=(n,)) for n in range(chats)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    time.sleep(2.5)  # the replicas' records (a heartbeat) show the last prefills
    after = tokens_by_replica(base_url)
    work = {name: after[name] - before.get(name, 0) for name in after}
    ttfts.sort()
    return {"chats": chats, "errors": errors, "seconds": round(seconds, 3),
            "ttft_p50_s": round(statistics.median(ttfts), 3) if ttfts else None,
            "ttft_p99_s": round(ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))], 3) if ttfts else None,
            "prompt_tokens_by_replica": work,
            "replicas_that_worked": sum(1 for tokens in work.values() if tokens > 0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chats", type=int, default=64)
    parser.add_argument("--system-tokens", type=int, default=1000)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--model", default=None, help="a model directory or hub id (default: the default model)")
    args = parser.parse_args()
    # In the environment, so that the second web reads the same limits.
    env = {"MAX_INPUT_TOKENS": "3000", "MAX_TOTAL_TOKENS": "3100", **({"MODEL_ID": args.model} if args.model else {})}
    log_path = Path(tempfile.gettempdir()) / "bench-affinity-burst.log"
    cluster = Cluster(log_path, env=env, num_replicas=2, manually_scale=True)
    web, results = None, {}
    try:
        cluster.wait_ready(2)
        with open(log_path, "ab") as log:
            web, plain_url = second_web(cluster, log, PREFIX_AFFINITY="false")
            system, results["system_tokens"] = system_prompt(cluster.base_url, args.system_tokens)
            for name, url in (("with_affinity", cluster.base_url), ("without_affinity", plain_url)):
                first_token_seconds(url, [{"role": "system", "content": system},
                                          {"role": "user", "content": f"Warm-up {name}."}], args.new_tokens)
                results[name] = burst(url, system, name[:2], args.chats, args.new_tokens)
                r = results[name]
                print(f"{name:17s} {args.chats} chats: TTFT p50 {r['ttft_p50_s']} s, p99 {r['ttft_p99_s']} s; "
                      f"prompt tokens by replica {r['prompt_tokens_by_replica']}; errors {len(r['errors'])}",
                      flush=True)
    finally:
        if web is not None:
            stop_process(web, grace=20)
        cluster.close()
    results.update(args=vars(args), device_name=f"{os.cpu_count()}-core CPU", load_average=os.getloadavg())
    print(f"results: {save('affinity_burst', results)}")


if __name__ == "__main__":
    main()
