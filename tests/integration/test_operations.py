"""Operations, on a cluster of its own: two gunicorn workers, two replicas, JSON logs.

One /metrics for the whole cluster (counts match the requests sent), TGI's timing headers against
what the client measured, request ids in the web's and the replica's logs, Celery's own tools.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.sse import sse_events
from tests.service import Service

CONTRACT_COUNTERS = ["tgi_request_count", "tgi_request_success", "tgi_request_failure",
                     "tgi_batch_inference_count", "tgi_batch_inference_success"]
CONTRACT_GAUGES = ["tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens"]
CONTRACT_HISTOGRAMS = ["tgi_request_duration", "tgi_request_validation_duration", "tgi_request_queue_duration",
                       "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration",
                       "tgi_request_input_length", "tgi_request_generated_tokens", "tgi_batch_inference_duration",
                       "tgi_batch_forward_duration"]
PROMPTS = ["The capital of France is", "Hello, world!", "Once upon a time", "Continuous batching lets"]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ops-cluster")
    svc = Service(str(tiny_model_dir), workdir, replicas=2, env={
        "WEB_WORKERS": "2", "LOG_FORMAT": "json", "XDG_CACHE_HOME": str(workdir / "cache"),
        "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024",
        "PROMETHEUS_MULTIPROC_DIR": str(_mkdir(workdir / "prometheus")),
    })
    try:
        svc.start()
        _wait_for_replicas(svc, 2)
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="module")
def traffic(cluster):
    """Real traffic through both gunicorn workers: /generate, streams and a validation error.
    Returns what the client saw."""
    sent = {"success": 0, "failure": 0, "generated": 0, "prompt_tokens": 0, "web_pids": set()}

    def generate(i):
        body = {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": 3 + i % 4, "details": True}}
        response = requests.post(f"{cluster.base_url}/generate", json=body, timeout=60)
        assert response.status_code == 200, response.text
        return int(response.headers["x-prompt-tokens"]), response.json()["details"]["generated_tokens"]

    def stream(i):
        body = {"inputs": PROMPTS[i % len(PROMPTS)], "parameters": {"max_new_tokens": 4, "details": True}}
        with requests.post(f"{cluster.base_url}/generate_stream", json=body, stream=True, timeout=60) as response:
            final = sse_events(response)[-1]
        return final["details"]["input_length"], final["details"]["generated_tokens"]

    with ThreadPoolExecutor(8) as pool:
        for _ in range(5):  # bursts until both web workers have served requests (usually the first)
            results = list(pool.map(generate, range(8))) + list(pool.map(stream, range(4)))
            for prompt_tokens, generated in results:
                sent["success"] += 1
                sent["prompt_tokens"] += prompt_tokens
                sent["generated"] += generated
            sent["web_pids"] = _web_pids(cluster)
            if len(sent["web_pids"]) >= 2:
                break
    assert requests.post(f"{cluster.base_url}/generate", json={"inputs": ""}).status_code == 422
    sent["failure"] += 1
    return sent


def test_metrics_count_the_cluster_traffic(cluster, traffic):
    assert len(traffic["web_pids"]) == 2, "both gunicorn workers should have served requests"
    samples = _wait_for(lambda: _batch_metrics_caught_up(scrape(cluster), traffic), scrape, cluster)
    total = traffic["success"] + traffic["failure"]
    assert value(samples, "tgi_request_count_total") == total
    assert value(samples, "tgi_request_success_total") == traffic["success"]
    assert value(samples, "tgi_request_failure_total", err="validation", reason="validation") == traffic["failure"]
    for name in ("tgi_request_duration", "tgi_request_validation_duration", "tgi_request_queue_duration",
                 "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration",
                 "tgi_request_generated_tokens", "tgi_request_input_length"):
        assert value(samples, f"{name}_count") == traffic["success"], name
    assert value(samples, "tgi_request_generated_tokens_sum") == traffic["generated"]
    assert value(samples, "tgi_request_input_length_sum") == traffic["prompt_tokens"]
    mean_duration = value(samples, "tgi_request_duration_sum") / traffic["success"]
    assert 0 < mean_duration < 30  # seconds, not milliseconds
    assert value(samples, "tgi_request_inference_duration_sum") <= value(samples, "tgi_request_duration_sum")
    assert value(samples, "tgi_queue_size") == 0


def test_every_contract_metric_is_present_and_replicas_are_labelled(cluster, traffic):
    samples = _wait_for(lambda: _batch_metrics_caught_up(scrape(cluster), traffic), scrape, cluster)
    names = {name for name, _ in samples}
    for name in CONTRACT_COUNTERS:
        assert f"{name}_total" in names, name
    for name in CONTRACT_GAUGES:
        assert name in names, name
    for name in CONTRACT_HISTOGRAMS:
        assert {f"{name}_bucket", f"{name}_sum", f"{name}_count"} <= names, name
    replicas = {dict(labels)["replica"] for name, labels in samples if name == "tgi_batch_current_size"}
    assert len(replicas) == 2 and all(r.startswith(("replica0@", "replica1@")) for r in replicas)
    prefills = sum(v for (name, labels), v in samples.items()
                   if name == "tgi_batch_inference_count_total" and dict(labels)["method"] == "prefill")
    assert 1 <= prefills <= traffic["success"]  # a prefill batch holds one or more requests
    assert value(samples, "blitz_replicas", state="active") == 2
    assert value(samples, "blitz_replicas", state="loading") == 0
    states = [dict(labels) for name, labels in samples if name == "blitz_replica_state"]
    assert sorted(s["replica"] for s in states) == sorted(replicas)
    assert any(name == "flask_http_request_total" for name, _ in samples)


def test_every_metric_of_the_dashboard_is_exported(cluster, traffic):
    from tests.ops.test_deploy import dashboard_metrics

    text = requests.get(f"{cluster.base_url}/metrics", timeout=10).text
    families = {family.name for family in text_string_to_metric_families(text)}
    assert dashboard_metrics() <= families, dashboard_metrics() - families


def test_timing_headers_against_the_client_clock(cluster):
    body = {"inputs": "The capital of France is", "parameters": {"max_new_tokens": 6, "details": True}}
    started = time.perf_counter()
    response = requests.post(f"{cluster.base_url}/generate", json=body, timeout=60)
    client_ms = (time.perf_counter() - started) * 1000
    assert response.status_code == 200
    h, details = response.headers, response.json()["details"]
    total, validation = int(h["x-total-time"]), int(h["x-validation-time"])
    queue, inference = int(h["x-queue-time"]), int(h["x-inference-time"])
    assert 0 < total <= client_ms
    assert float(h["x-compute-time"]) * 1000 <= client_ms and int(float(h["x-compute-time"]) * 1000) == total
    assert inference <= total and validation + queue + inference <= total + 2  # whole ms, measured apart
    assert int(h["x-generated-tokens"]) == details["generated_tokens"] == 6
    assert abs(int(h["x-time-per-token"]) - inference / 6) <= 1
    assert h["x-compute-type"] == "cpu" and h["x-compute-characters"] == str(len(body["inputs"]))
    with requests.post(f"{cluster.base_url}/generate_stream", json=body, stream=True, timeout=60) as stream:
        final = sse_events(stream)[-1]
    assert int(h["x-prompt-tokens"]) == final["details"]["input_length"] > 0
    assert stream.headers["x-prompt-tokens"] == h["x-prompt-tokens"]


def test_request_id_is_echoed_and_logged_by_the_web_and_the_replica(cluster):
    given = f"ops-{uuid.uuid4().hex[:12]}"
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 2}}
    response = requests.post(f"{cluster.base_url}/generate", json=body, headers={"X-Request-Id": given})
    assert response.status_code == 200 and response.headers["x-request-id"] == given
    with requests.post(f"{cluster.base_url}/generate_stream", json=body, stream=True,
                       headers={"X-Request-Id": given + "-s"}) as stream:
        sse_events(stream)
    assert stream.headers["x-request-id"] == given + "-s"
    generated = requests.post(f"{cluster.base_url}/generate", json=body).headers["x-request-id"]
    assert len(generated) == 32  # none given: a new one
    unusable = requests.get(f"{cluster.base_url}/health", headers={"X-Request-Id": "two words"})
    assert unusable.headers["x-request-id"] != "two words"
    for request_id in (given, given + "-s", generated):
        web, replica = _wait_for(lambda: _logged(cluster, request_id, all_sides=True),
                                 lambda c: _logged(c, request_id), cluster)
        assert any("generated" in line["message"] for line in web), request_id
        assert any("done" in line["message"] for line in replica), request_id


def test_celery_tools_see_the_replicas(cluster):
    events = subprocess.Popen(_celery_argv("events", "--dump"), env=_celery_env(cluster), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(events.stdout), daemon=True)
    reader.start()

    def received() -> bool:
        output = "".join(lines)
        return "task received" in output.lower() or "task-received" in output

    try:
        # Both at once, while the dump starts: an `inspect` waits its whole --timeout for replies.
        with ThreadPoolExecutor(2) as pool:
            ping, queues = pool.map(lambda command: _celery(cluster, "inspect", command, "--timeout", "5"),
                                    ("ping", "active_queues"))
        assert ping.returncode == 0, ping.stderr
        assert "replica0@" in ping.stdout and "replica1@" in ping.stdout
        assert queues.stdout.count("* {'name': 'generation'") == 2, queues.stdout  # each replica consumes it
        # A request each half second until the dump shows one received: the dump listens only
        # once it has bound its queue, a moment after it says it is capturing.
        deadline = time.monotonic() + 30
        while not received() and time.monotonic() < deadline:
            requests.post(f"{cluster.base_url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
            time.sleep(0.5)
    finally:
        events.send_signal(signal.SIGINT)
        try:
            events.wait(timeout=10)
        except subprocess.TimeoutExpired:
            events.kill()
            events.wait()
        reader.join(10)
    output = "".join(lines)
    assert received(), output[-2000:]
    assert "replica" in output


def test_celery_control_moves_a_replica_and_metrics_follow(cluster):
    name = next(dict(labels)["replica"] for name, labels in scrape(cluster)
                if name == "blitz_replica_state" and dict(labels)["slot"] == "1")
    cancel = _celery(cluster, "control", "cancel_consumer", "generation", "-d", name, "--timeout", "5")
    assert cancel.returncode == 0 and "no longer consuming" in cancel.stdout, cancel.stdout + cancel.stderr
    _wait_for(lambda: value(scrape(cluster), "blitz_replicas", state="standby") == 1, scrape, cluster)
    add = _celery(cluster, "control", "add_consumer", "generation", "-d", name, "--timeout", "5")
    assert add.returncode == 0 and "add consumer generation" in add.stdout, add.stdout + add.stderr
    _wait_for(lambda: value(scrape(cluster), "blitz_replicas", state="active") == 2, scrape, cluster)


# ---- helpers ------------------------------------------------------------------------------------

def scrape(cluster) -> dict:
    text = requests.get(f"{cluster.base_url}/metrics", timeout=10).text
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def _batch_metrics_caught_up(samples: dict, traffic: dict) -> dict | None:
    """The replicas publish their metrics and records with each heartbeat: wait until their steps
    show and their last records say idle (no batch, nothing waiting)."""
    steps = {method: sum(v for (name, labels), v in samples.items()
                         if name == "tgi_batch_inference_count_total" and dict(labels)["method"] == method)
             for method in ("prefill", "decode")}
    batch = sum(v for (name, _), v in samples.items() if name == "tgi_batch_current_size")
    idle = batch == 0 and value(samples, "tgi_queue_size") == 0
    return samples if steps["prefill"] >= 1 and steps["decode"] >= 1 and idle else None


def _wait_for(check, describe, cluster, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.3)
    raise AssertionError(f"timed out; last: {str(describe(cluster))[:2000]}\n{cluster.logs(20)}")


def _json_lines(path) -> list[dict]:
    lines = []
    for raw in path.read_text(errors="replace").splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue  # e.g. a library's print()
    return [line for line in lines if isinstance(line, dict)]


def _logged(cluster, request_id: str, all_sides: bool = False):
    web = [line for line in _json_lines(cluster.workdir / "web.log") if line.get("request_id") == request_id]
    replica = [line for path in cluster.workdir.glob("replica*.log") for line in _json_lines(path)
               if line.get("request_id") == request_id]
    if all_sides and not (web and replica):
        return None
    return web, replica


def _web_pids(cluster) -> set[int]:
    return {line["process"] for line in _json_lines(cluster.workdir / "web.log")
            if line.get("logger") == "web.generation" and "generated" in line.get("message", "")}


def _wait_for_replicas(svc: Service, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value(scrape(svc), "blitz_replicas", state="active") == count:
            return
        time.sleep(0.3)
    raise TimeoutError(f"{count} replicas not active; logs:\n{svc.logs()}")


def _celery_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "tasks.queue.cli_app", *args]


def _celery_env(cluster) -> dict:
    return {**os.environ, "REDIS_URL": cluster.env["REDIS_URL"], "PYTHONUNBUFFERED": "1"}


def _celery(cluster, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(_celery_argv(*args), env=_celery_env(cluster), capture_output=True, text=True, timeout=30)


def _mkdir(path):
    path.mkdir(parents=True, exist_ok=True)
    return path
