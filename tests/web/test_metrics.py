"""/metrics: TGI's request metrics, Flask's HTTP metrics and the replicas' own metrics."""
from __future__ import annotations

import logging

import redis
from prometheus_client.parser import text_string_to_metric_families

from blitzscale.redis_server import EmbeddedRedis
from common.keys import replica_metrics_key
from common.settings import Settings
from web.app import create_app
from tests.web.fake_replica import FakeReplica, reply


def scrape(client) -> dict:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.mimetype == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(response.get_data(as_text=True)):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))))


def test_tgi_metrics(client, redis_url, redis_client):
    with FakeReplica(redis_url, reply([" a", " b"])):
        assert client.post("/generate", json={"inputs": "hello world"}).status_code == 200
        response = client.post("/generate_stream", json={"inputs": "hello"})
        response.get_data()
    client.post("/generate", json={"inputs": "hello", "parameters": {"top_k": 0}})
    redis_client.lpush("generation", b"x", b"y")
    samples = scrape(client)
    assert value(samples, "tgi_request_count_total") == 3
    assert value(samples, "tgi_request_success_total") == 2
    assert value(samples, "tgi_request_failure_total", err="validation", reason="validation") == 1
    assert value(samples, "tgi_queue_size") == 2
    assert value(samples, "tgi_request_duration_count") == 2
    assert value(samples, "tgi_request_queue_duration_sum") == 0.5
    assert value(samples, "tgi_request_inference_duration_sum") == 1.0
    assert value(samples, "tgi_request_generated_tokens_sum") == 4
    assert value(samples, "tgi_request_input_length_sum") == 3
    for name in ("tgi_request_validation_duration_count", "tgi_request_mean_time_per_token_duration_count"):
        assert value(samples, name) == 2
    assert any(name == "flask_http_request_total" for name, _ in samples)


def test_skipped_tokens_are_the_final_events_speculated_tokens(client, redis_url):
    """TGI's tgi_request_skipped_tokens: per request, its tokens that came from accepted drafts."""
    with FakeReplica(redis_url, reply([" a", " b", " c"], skipped_tokens=2)):
        assert client.post("/generate", json={"inputs": "hello"}).status_code == 200
    with FakeReplica(redis_url, reply([" a"])):  # a replica without speculation sends none
        assert client.post("/generate", json={"inputs": "hello"}).status_code == 200
    samples = scrape(client)
    assert value(samples, "tgi_request_skipped_tokens_count") == 2
    assert value(samples, "tgi_request_skipped_tokens_sum") == 2


def test_replica_metrics_are_merged_with_a_replica_label(client, redis_client):
    text = "# HELP tgi_batch_current_size Batch size\n# TYPE tgi_batch_current_size gauge\ntgi_batch_current_size 3\n"
    redis_client.set(replica_metrics_key("replica0@a"), text)
    redis_client.set(replica_metrics_key("replica1@a"), text.replace(" 3\n", " 5\n"))
    redis_client.set(replica_metrics_key("replica2@a"), "not { prometheus")
    samples = scrape(client)
    assert value(samples, "tgi_batch_current_size", replica="replica0@a") == 3
    assert value(samples, "tgi_batch_current_size", replica="replica1@a") == 5


def test_multiprocess_mode(model_dir, redis_url, tmp_path):
    """With PROMETHEUS_MULTIPROC_DIR (gunicorn with several workers) the page reads the shared files."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "from common.settings import Settings\n"
        "from web.app import create_app\n"
        f"app = create_app(Settings(model_id={str(model_dir)!r}, redis_url={redis_url!r}))\n"
        "client = app.test_client()\n"
        "client.post('/generate', json={'inputs': ''})\n"
        "print(client.get('/metrics').get_data(as_text=True))\n"
    )
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert 'tgi_request_failure_total{err="validation",reason="validation"} 1.0' in result.stdout
    assert "tgi_request_count_total 1.0" in result.stdout
    assert "flask_http_request_total" in result.stdout


def test_a_stream_is_timed_to_its_end_not_to_the_view_return(client, redis_url):
    with FakeReplica(redis_url, reply([" a", " b", " c"], delay=0.2)):
        response = client.post("/generate_stream", json={"inputs": "hello"})
        assert scrape(client).get(("tgi_request_duration_count", ())) == 0  # the view has returned
        response.get_data()  # the client reads the stream to its end
    samples = scrape(client)
    assert value(samples, "tgi_request_duration_count") == 1
    assert value(samples, "tgi_request_duration_sum") >= 0.6


def test_each_failure_is_logged_once_with_the_status_the_client_got(client, caplog):
    with caplog.at_level(logging.WARNING, logger="web.metrics"):
        tgi = client.post("/generate", json={"inputs": "hello", "parameters": {"top_k": 0}})
        openai = client.post("/v1/completions", json={"prompt": "hello", "top_p": 2})
    assert (tgi.status_code, openai.status_code) == (422, 400)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request failed")]
    assert len(lines) == 2
    assert lines[0].startswith("request failed: /generate answered 422 validation (validation): ")
    assert lines[1].startswith("request failed: /v1/completions answered 400 validation (validation): ")


def test_metrics_answer_through_a_redis_outage_with_stale_cluster_figures(model_dir):
    """A real Redis server stopped and started again on its port: /metrics answers 200 throughout,
    the cluster figures of the last read kept and marked stale while Redis is down."""
    with EmbeddedRedis() as server:
        redis.Redis.from_url(server.url).lpush("generation", b"x", b"y")
        client = create_app(Settings(model_id=str(model_dir), redis_url=server.url)).test_client()
        before = scrape(client)
        assert value(before, "tgi_queue_size") == 2
        assert value(before, "blitz_cluster_figures_stale", source="cluster") == 0
        server.halt()
        during = scrape(client)
        assert value(during, "tgi_queue_size") == 2  # the last figures read
        for source in ("cluster", "scaling", "replica_metrics", "weight_transfers"):
            assert value(during, "blitz_cluster_figures_stale", source=source) == 1
        server.start()  # empty: nothing is persisted
        after = scrape(client)
        assert value(after, "tgi_queue_size") == 0
        assert value(after, "blitz_cluster_figures_stale", source="cluster") == 0


def test_requests_refused_before_any_view_are_counted_and_logged_once(settings, caplog):
    """Auth, body parsing, body size, content type and schema errors happen before the views: each
    is still one tgi_request_count, one tgi_request_failure and one WARNING line."""
    client = create_app(settings.replace(api_key="k")).test_client()
    auth = {"Authorization": "Bearer k"}
    as_json = {**auth, "Content-Type": "application/json"}
    with caplog.at_level(logging.WARNING, logger="web.metrics"):
        statuses = [
            client.post("/generate", json={"inputs": "hello"}).status_code,  # no key
            client.post("/generate", data="{not json", headers=as_json).status_code,
            client.post("/generate", data="x" * 2_000_001, headers=as_json).status_code,
            client.post("/generate", data="hello", headers={**auth, "Content-Type": "text/plain"}).status_code,
            client.post("/v1/completions", json={"model": "tgi", "prompt": 3.5}, headers=auth).status_code,
            client.post("/generate", json={"inputs": "hello", "parameters": {"top_k": 0}}, headers=auth).status_code,
        ]
    assert statuses == [401, 400, 413, 415, 400, 422]
    samples = scrape(client)
    assert value(samples, "tgi_request_count_total") == 6
    failures = {labels: v for (name, labels), v in samples.items() if name == "tgi_request_failure_total"}
    assert sum(failures.values()) == 6, failures
    assert failures[(("err", "unauthorized"), ("reason", "unauthorized"))] == 1
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("request failed")]
    assert [int(line.split(" answered ")[1].split()[0]) for line in lines] == statuses


def test_reads_of_stored_responses_and_token_counts_are_not_generation_requests(client, caplog):
    """GET and DELETE /v1/responses/{id} and /v1/messages/count_tokens generate nothing: their
    errors (an unknown id, a bad body) are no tgi_request_* failure and no `request failed` line,
    as their successes are no tgi_request_* success (a client polling an expired id would
    otherwise raise the generation failure rate)."""
    with caplog.at_level(logging.WARNING, logger="web.metrics"):
        statuses = [
            client.get("/v1/responses/resp_unknown").status_code,
            client.delete("/v1/responses/resp_unknown").status_code,
            client.post("/v1/messages/count_tokens", json={"messages": "x"}).status_code,
        ]
    assert statuses == [404, 404, 400]
    samples = scrape(client)
    assert not value(samples, "tgi_request_count_total")
    assert not [name for name, _ in samples if name == "tgi_request_failure_total"]
    assert not [r for r in caplog.records if r.getMessage().startswith("request failed")]
