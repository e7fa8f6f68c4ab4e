"""Replay a trace against the service over HTTP, as its clients would: each arrival, at its time,
streams TGI's `/generate_stream` for its model (SageMaker's multi-model header), and the time from
its arrival to its first token is measured. Meanwhile a sampler reads `/cluster_state` for the
replicas each model has (for replica-seconds, the plot, and the cold starts they made).

Bounded: every request has a timeout, at most `max_in_flight` run at once (a late one waits, and
the wait counts in its TTFT, as a client's would), and the replay ends `timeout_s` after the last
arrival.
"""
from __future__ import annotations

import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from bench.serverless.trace import Arrival

TARGET_MODEL_HEADER = "X-Amzn-SageMaker-Target-Model"


@dataclass(frozen=True)
class Outcome:
    at: float  # its arrival, seconds from the start
    model: str
    status: int | None  # HTTP status (None: no answer)
    ttft: float | None  # arrival → first token, seconds (None: no token)
    seconds: float  # arrival → the end of its stream
    tokens: int
    error: str | None = None

    @property
    def served(self) -> bool:
        return self.status == 200 and self.error is None and self.tokens > 0


def send(base_url: str, arrival: Arrival, arrived: float, timeout_s: float) -> Outcome:
    """One streamed request; `arrived` is its arrival on the monotonic clock."""
    body = {"inputs": arrival.prompt, "parameters": {"max_new_tokens": arrival.max_new_tokens}}
    first, tokens, status, error = None, 0, None, None
    try:
        with requests.post(f"{base_url}/generate_stream", json=body, stream=True, timeout=timeout_s,
                           headers={TARGET_MODEL_HEADER: arrival.model}) as response:
            status = response.status_code
            if status != 200:
                error = _error_of(response.text)
            else:
                for line in response.iter_lines(decode_unicode=True):
                    if not line or not line.startswith("data:"):
                        continue
                    event = json.loads(line[5:])
                    if "error" in event:
                        error = str(event["error"])
                        break
                    if event.get("token") is not None:
                        tokens += 1
                        first = first if first is not None else time.monotonic() - arrived
    except (requests.RequestException, ValueError) as failure:
        error = f"{type(failure).__name__}: {failure}"
    return Outcome(arrival.at, arrival.model, status, first, time.monotonic() - arrived, tokens, error)


def _error_of(text: str) -> str:
    try:
        return str(json.loads(text).get("error") or text)
    except ValueError:
        return text[:200]


def replay(base_url: str, arrivals: list[Arrival], timeout_s: float = 120.0, max_in_flight: int = 64,
           sampler: "Sampler | None" = None) -> list[Outcome]:
    """Every arrival's outcome, in the trace's order."""
    start = time.monotonic()
    if sampler is not None:
        sampler.start(start)
    futures = []
    try:
        with ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="replay") as pool:
            for arrival in arrivals:
                delay = start + arrival.at - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(send, base_url, arrival, start + arrival.at, timeout_s))
            return [future.result() for future in futures]
    finally:
        if sampler is not None:
            sampler.stop()


@dataclass(frozen=True)
class Sample:
    t: float  # seconds from the start
    replicas: dict  # model → live replicas (loading, active, draining)


class Sampler:
    """Reads /cluster_state every `period` seconds: live replicas per model over time, and every
    replica seen once (its model, where its weights came from, how long it took to load)."""

    LIVE = ("loading", "active", "draining", "standby")

    def __init__(self, base_url: str, period: float = 0.5):
        self.base_url = base_url
        self.period = period
        self.samples: list[Sample] = []
        self.replicas: dict[tuple, dict] = {}  # (name, pid) → its first active view
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, start: float) -> None:
        self._start = start
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            try:
                state = requests.get(f"{self.base_url}/cluster_state", params={"celery": "false"}, timeout=5).json()
            except (requests.RequestException, ValueError):
                continue
            self.record(time.monotonic() - self._start, state.get("replicas", []))

    def record(self, t: float, replicas: list[dict]) -> None:
        counts: dict[str, int] = {}
        for replica in replicas:
            if replica.get("state") in self.LIVE:
                model = replica.get("model") or "default"
                counts[model] = counts.get(model, 0) + 1
            if replica.get("state") == "active" and replica.get("pid"):
                self.replicas.setdefault((replica.get("name"), replica["pid"]), {**replica, "seen_at": t})
        self.samples.append(Sample(round(t, 3), counts))

    def cold_starts(self) -> list[dict]:
        """The replicas that became active during the replay (not those active at its start)."""
        first = self.samples[0].t if self.samples else 0.0
        return [replica for replica in self.replicas.values() if replica["seen_at"] > first]
