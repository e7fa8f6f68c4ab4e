"""Drive the real service over HTTP: start `blitzscale serve`, send concurrent streams."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import requests

from bench.common import Stopwatch, latency_summary
from blitzscale.redis_server import free_port
from common.processes import stop_process


class ServeProcess:
    """`blitzscale serve` in its own process (private Redis, replicas, gunicorn)."""

    def __init__(self, **settings):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.args = ["--port", str(self.port)]
        for name, value in settings.items():
            self.args += [f"--{name.replace('_', '-')}", str(value)]

    def __enter__(self) -> "ServeProcess":
        env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.process = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", "serve", *self.args], env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"blitzscale serve exited with {self.process.returncode}")
            try:
                if requests.get(f"{self.base_url}/health", timeout=2).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError("the service did not become healthy")

    def __exit__(self, *exc) -> None:
        stop_process(self.process, grace=60)


def stream_once(base_url: str, prompt: str, new_tokens: int, timeout: float = 600) -> tuple[list[float], str | None, bool]:
    """One streaming request: the arrival time (perf_counter) of each token event, the error
    event if one came, and whether the final event (with `generated_text`) came."""
    times, error, finished = [], None, False
    body = {"inputs": prompt, "parameters": {"max_new_tokens": new_tokens}}
    with requests.post(f"{base_url}/generate_stream", json=body, stream=True, timeout=timeout) as response:
        for line in response.iter_lines():
            if not line.startswith(b"data:"):
                continue
            if b'"error"' in line[:20]:
                error = line.decode()
                break
            times.append(time.perf_counter())
            finished = finished or b'"generated_text":"' in line
    return times, error, finished


def stream_requests(base_url: str, prompts: list[str], new_tokens: int | list[int]) -> dict:
    """All prompts at once, each a streaming client; TTFT and inter-token latency per token."""
    budgets = new_tokens if isinstance(new_tokens, list) else [new_tokens] * len(prompts)
    ttfts, itls, counts, errors = [], [], [], []
    lock = threading.Lock()

    def client(prompt: str, budget: int) -> None:
        sent = time.perf_counter()
        times, error, _ = stream_once(base_url, prompt, budget)
        with lock:
            if times:
                ttfts.append(times[0] - sent)
            itls.extend(b - a for a, b in zip(times, times[1:]))
            counts.append(len(times))
            if error:
                errors.append(error)

    threads = [threading.Thread(target=client, args=pb) for pb in zip(prompts, budgets)]
    with Stopwatch() as watch:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    tokens = sum(counts)
    return {"requests": len(prompts), "tokens": tokens, "seconds": watch.seconds,
            "tokens_per_s": tokens / watch.seconds, "errors": len(errors), **latency_summary(ttfts, itls)}
