"""The whole service against a real redis-server that requires a password (`REDIS_URL` with
it): web, Celery replica and pub/sub streams all authenticate; without the password Redis
refuses, so a pod that reaches Redis cannot read the prompts on the stream channels.

TLS (`rediss://`): tests/integration/test_redis_tls.py."""
from __future__ import annotations

import pytest
import redis
import requests

from tests.service import Service

PASSWORD = "pw-!@#:/ with symbols"  # URL-quoted into REDIS_URL


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("redis-auth")
    with Service(str(tiny_model_dir), workdir, env={"XDG_CACHE_HOME": str(workdir / "cache")},
                 redis_password=PASSWORD).running() as service:
        yield service


def test_generates_and_streams_through_a_password_protected_redis(svc):
    assert "@" in svc.env["REDIS_URL"]
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    answer = requests.post(f"{svc.base_url}/generate", json=body, timeout=60)
    assert answer.status_code == 200 and answer.json()["generated_text"]
    stream = requests.post(f"{svc.base_url}/generate_stream", json=body, timeout=60)
    assert stream.status_code == 200 and stream.text.count("data:") == 3
    assert requests.get(f"{svc.base_url}/health", timeout=10).status_code == 200


def test_without_the_password_redis_refuses(svc):
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(svc.redis.public_url).ping()
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(svc.redis.url.replace("pw-", "wrong-")).ping()
