"""Tenants through the real service (web, Celery, Redis, a replica of the tiny model), keys from a
`--tenants-file`: a cached prompt prefix is reused only within its tenant and `cache_salt`, so
`cached_tokens` never tells one tenant what another sent; the file is reloaded on SIGHUP."""
from __future__ import annotations

import hashlib
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests
import yaml

from tests.service import Service

LIMITS = {"MAX_INPUT_TOKENS": "1800", "MAX_TOTAL_TOKENS": "2048"}
SYSTEM = " ".join(f"Rule {n}: a queue, a worker and a stream of tokens meet in the city number {n}." for n in range(30))
KEYS = {"acme": "acme-key-1", "globex": "globex-key-2"}


def write_tenants(path, names, **limits):
    path.write_text(yaml.safe_dump({"tenants": {
        name: {"key_sha256": hashlib.sha256(KEYS[name].encode()).hexdigest(), **limits} for name in names}}))


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tenants") / "tenants.yaml"
    write_tenants(path, ["acme", "globex"])
    return path


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory, tenants_file):
    workdir = tmp_path_factory.mktemp("tenants-svc")
    env = {"XDG_CACHE_HOME": str(workdir / "cache"), "TENANTS_FILE": str(tenants_file), **LIMITS}
    with Service(str(tiny_model_dir), workdir, env=env).running() as service:
        yield service


def chat(svc: Service, tenant: str, question: str, **extra):
    client = openai.OpenAI(base_url=f"{svc.base_url}/v1", api_key=KEYS[tenant], timeout=120, max_retries=0)
    return client.chat.completions.create(
        model="tiny", max_tokens=4, temperature=0, extra_body=extra or None,
        messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])


def cached(answer) -> int:
    return answer.usage.prompt_tokens_details.cached_tokens


def test_a_prefix_is_cached_for_its_tenant_only(svc):
    first = chat(svc, "acme", "What is a queue?")
    assert first.usage.prompt_tokens > 1000
    assert cached(chat(svc, "globex", "Who is the worker?")) == 0  # acme's system prompt stays unseen
    assert cached(chat(svc, "acme", "Where is the stream?")) >= 1000
    assert cached(chat(svc, "globex", "Which city?")) >= 1000  # globex's own copy, now cached


def test_cache_salt_separates_within_a_tenant(svc):
    chat(svc, "acme", "Salted once?", cache_salt="user-1")
    assert cached(chat(svc, "acme", "Salted twice?", cache_salt="user-2")) == 0
    assert cached(chat(svc, "acme", "Salted thrice?", cache_salt="user-1")) >= 1000


def test_cache_salt_on_the_tgi_route(svc):
    headers = {"Authorization": f"Bearer {KEYS['globex']}"}
    body = {"inputs": SYSTEM + " One?", "parameters": {"max_new_tokens": 2, "cache_salt": "tgi-salt"}}
    assert requests.post(f"{svc.base_url}/generate", json=body, headers=headers, timeout=120).status_code == 200
    client = openai.OpenAI(base_url=f"{svc.base_url}/v1", api_key=KEYS["globex"], timeout=120, max_retries=0)
    same = client.completions.create(model="tiny", prompt=SYSTEM + " Two?", max_tokens=2,
                                     extra_body={"cache_salt": "tgi-salt"})
    other = client.completions.create(model="tiny", prompt=SYSTEM + " Three?", max_tokens=2,
                                      extra_body={"cache_salt": "another"})
    assert same.usage.prompt_tokens_details.cached_tokens >= 1000
    assert other.usage.prompt_tokens_details.cached_tokens == 0


def test_a_bad_cache_salt_is_each_routes_error(svc):
    headers = {"Authorization": f"Bearer {KEYS['acme']}"}
    tgi = requests.post(f"{svc.base_url}/generate", headers=headers, timeout=30,
                        json={"inputs": "hi", "parameters": {"cache_salt": ""}})
    assert tgi.status_code == 422 and "cache_salt" in tgi.json()["error"] and "error_type" in tgi.json()
    v1 = requests.post(f"{svc.base_url}/v1/completions", headers=headers, timeout=30,
                       json={"model": "tiny", "prompt": "hi", "cache_salt": "x" * 300})
    assert v1.status_code == 400 and v1.json()["error"]["param"] == "cache_salt"


def test_unknown_keys_are_refused_and_sighup_reloads_the_file(svc, tenants_file):
    body = {"inputs": "hi", "parameters": {"max_new_tokens": 1}}
    refused = requests.post(f"{svc.base_url}/generate", json=body, timeout=30, headers={"Authorization": "Bearer nope"})
    assert refused.status_code == 401 and refused.json()["error_type"] == "unauthorized"
    write_tenants(tenants_file, ["acme"])  # globex removed
    svc.web.send_signal(signal.SIGHUP)  # gunicorn's master: new workers read the file again
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        status = requests.post(f"{svc.base_url}/generate", json=body, timeout=30,
                               headers={"Authorization": f"Bearer {KEYS['globex']}"}).status_code
        if status == 401:
            break
        time.sleep(0.3)
    assert status == 401
    assert requests.post(f"{svc.base_url}/generate", json=body, timeout=60,
                         headers={"Authorization": f"Bearer {KEYS['acme']}"}).status_code == 200
    write_tenants(tenants_file, ["acme", "globex"])
    svc.web.send_signal(signal.SIGHUP)


@pytest.fixture(scope="module")
def limited(tiny_model_dir, tmp_path_factory):
    """Two web processes (`--web-workers 2`) and a tenant allowed 10 requests per minute."""
    workdir = tmp_path_factory.mktemp("tenants-limited")
    path = workdir / "tenants.yaml"
    write_tenants(path, ["acme"], requests_per_minute=10)
    env = {"XDG_CACHE_HOME": str(workdir / "cache"), "TENANTS_FILE": str(path), "WEB_WORKERS": "2", **LIMITS}
    with Service(str(tiny_model_dir), workdir, env=env).running() as service:
        yield service


def test_requests_per_minute_shared_by_two_web_processes(limited):
    body = {"inputs": "hello", "parameters": {"max_new_tokens": 1}}

    def send(_):
        return requests.post(f"{limited.base_url}/generate", json=body, timeout=120,
                             headers={"Authorization": f"Bearer {KEYS['acme']}"})

    with ThreadPoolExecutor(6) as pool:  # both gunicorn workers take some
        responses = list(pool.map(send, range(30)))
    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] * 10 + [429] * 20
    refused = [r for r in responses if r.status_code == 429]
    assert all(1 <= int(r.headers["Retry-After"]) <= 60 and r.json()["error_type"] == "rate_limit" for r in refused)
    remaining = sorted(int(r.headers["x-ratelimit-remaining-requests"]) for r in responses if r.status_code == 200)
    assert remaining == list(range(10))  # one count for both processes
