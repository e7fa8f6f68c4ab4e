"""Per-tenant limits (web/rate_limits.py) in real Redis, shared by two apps as two web processes
share them: requests per minute, tokens per minute (prompt + what may be generated) and
concurrent requests; over one, 429 in the route's own shape with Retry-After and OpenAI's
x-ratelimit-* headers."""
from __future__ import annotations

import hashlib

import pytest

from tests.web.fake_replica import FakeReplica, reply
from web.app import create_app

KEY = "acme-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def tenants_file(tmp_path, **limits):
    path = tmp_path / "tenants.yaml"
    fields = ", ".join(f"{name}: {value}" for name, value in limits.items())
    path.write_text(f"tenants:\n  acme: {{key_sha256: {hashlib.sha256(KEY.encode()).hexdigest()}, {fields}}}\n")
    return str(path)


def apps(settings, path, count=2):
    return [create_app(settings.replace(tenants_file=path)).test_client() for _ in range(count)]


def test_requests_per_minute_across_two_apps(settings, tmp_path, redis_url):
    first, second = apps(settings, tenants_file(tmp_path, requests_per_minute=3))
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 1}}
    with FakeReplica(redis_url, reply([" world"])):
        responses = [(first if n % 2 else second).post("/generate", json=body, headers=AUTH) for n in range(5)]
    assert [r.status_code for r in responses] == [200, 200, 200, 429, 429]
    assert responses[0].headers["x-ratelimit-limit-requests"] == "3"
    assert responses[0].headers["x-ratelimit-remaining-requests"] == "2"
    refused = responses[3]
    assert refused.get_json() == {"error": refused.get_json()["error"], "error_type": "rate_limit"}
    assert "3 requests per minute" in refused.get_json()["error"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")


def test_openai_routes_answer_rate_limit_exceeded(settings, tmp_path, redis_url):
    (client,) = apps(settings, tenants_file(tmp_path, requests_per_minute=1), count=1)
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 1}
    with FakeReplica(redis_url, reply([" world"])):
        assert client.post("/v1/completions", json=body, headers=AUTH).status_code == 200
        refused = client.post("/v1/completions", json=body, headers=AUTH)
    assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1
    assert refused.get_json()["error"]["code"] == "rate_limit_exceeded"


def test_tokens_per_minute_count_prompt_and_what_may_be_generated(settings, tmp_path, redis_url):
    first, second = apps(settings, tenants_file(tmp_path, tokens_per_minute=30))
    body = {"inputs": "hello world", "parameters": {"max_new_tokens": 10}}  # 2 + 10 tokens
    with FakeReplica(redis_url, reply([" world"])):
        statuses = [c.post("/generate", json=body, headers=AUTH) for c in (first, second, first)]
    assert [r.status_code for r in statuses] == [200, 200, 429]
    assert statuses[1].headers["x-ratelimit-remaining-tokens"] == "6"
    assert "30 tokens per minute" in statuses[2].get_json()["error"]
    assert int(statuses[2].headers["Retry-After"]) >= 1


def test_concurrent_requests_are_leases_released_when_the_response_closes(settings, tmp_path, redis_url):
    first, second = apps(settings, tenants_file(tmp_path, max_concurrent_requests=1))
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    with FakeReplica(redis_url, reply([" a", " b"])):
        streaming = first.post("/generate_stream", json=body, headers=AUTH, buffered=False)
        assert streaming.status_code == 200
        refused = second.post("/generate", json=body, headers=AUTH)
        assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
        assert "1 concurrent requests" in refused.get_json()["error"]
        streaming.get_data()
        streaming.close()
        assert second.post("/generate", json=body, headers=AUTH).status_code == 200


def test_a_tenant_without_limits_is_not_limited(settings, tmp_path, redis_url):
    path = tmp_path / "t.yaml"
    path.write_text(f"tenants:\n  acme: {{key_sha256: {hashlib.sha256(KEY.encode()).hexdigest()}}}\n")
    client = create_app(settings.replace(tenants_file=str(path))).test_client()
    with FakeReplica(redis_url, reply([" world"])):
        responses = [client.post("/generate", json={"inputs": "hello"}, headers=AUTH) for _ in range(5)]
    assert {r.status_code for r in responses} == {200}
    assert "x-ratelimit-limit-requests" not in responses[0].headers


def test_the_tenant_labels_request_metrics_and_log_lines(settings, tmp_path, redis_url, caplog):
    import logging

    from common import logs
    caplog.set_level(logging.INFO)
    caplog.handler.addFilter(logs.RequestIdFilter())  # as every process's handler has it (common/logs.py)
    (client,) = apps(settings, tenants_file(tmp_path, requests_per_minute=1), count=1)
    with FakeReplica(redis_url, reply([" world"])):
        assert client.post("/generate", json={"inputs": "hello"}, headers=AUTH).status_code == 200
        assert client.post("/generate", json={"inputs": "hello"}, headers=AUTH).status_code == 429
    page = client.get("/metrics").get_data(as_text=True)
    assert 'blitz_tenant_requests_total{status="200",tenant="acme"} 1.0' in page
    assert 'blitz_tenant_requests_total{status="429",tenant="acme"} 1.0' in page
    refusal = next(r for r in caplog.records if "over its limit" in r.getMessage())
    assert refusal.tenant == "acme" and refusal.tenant_suffix == " tenant=acme"
    assert '"tenant": "acme"' in logs.JsonFormatter().format(refusal)
    assert KEY not in caplog.text


def test_tokens_per_minute_count_every_openai_choice(settings, tmp_path, redis_url):
    """Adversarial review: `n` choices are n generations of up to `max_tokens` each, but only one
    was charged, so `n: 2` generated twice a tenant's tokens per minute."""
    first, second = apps(settings, tenants_file(tmp_path, tokens_per_minute=30))
    body = {"model": "tiny", "prompt": "hello world", "max_tokens": 10, "n": 2}  # 2 + 2 × 10 tokens
    with FakeReplica(redis_url, reply([" world"])):
        admitted = first.post("/v1/completions", json=body, headers=AUTH)
        refused = second.post("/v1/completions", json=body, headers=AUTH)
    assert admitted.status_code == 200 and len(admitted.get_json()["choices"]) == 2
    assert admitted.headers["x-ratelimit-remaining-tokens"] == "8"
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "rate_limit_exceeded"
