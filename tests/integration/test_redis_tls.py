"""The whole service against a real redis-server that speaks only TLS and wants a password:
`REDIS_URL=rediss://:PASSWORD@host:port/0?ssl_cert_reqs=required&ssl_ca_certs=CA.pem`. Web,
Celery replica and pub/sub streams all go over TLS and check the server's certificate against
the CA in the URL; a plain-TCP client is refused.

Needs a redis-server built with TLS (`install.sh --test` unpacks Debian's into .venv/redis-tls,
scripts/install_redis_tls.sh) and the openssl command; skips without them."""
from __future__ import annotations

import shutil

import pytest
import redis
import requests

from common.settings import Settings
from tasks.queue.celery_app import make_celery
from tests.service import Service
from tests.tls_redis import TLSRedis, make_certificates, tls_redis_executable

PASSWORD = "tls-pw-!@#:/ with symbols"


@pytest.fixture(scope="module")
def svc(tiny_model_dir, tmp_path_factory):
    executable = tls_redis_executable()
    if executable is None:
        pytest.skip("no redis-server built with TLS: run `bash scripts/install_redis_tls.sh` "
                    "(install.sh --test does) or set REDIS_TLS_SERVER_BIN")
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command to make the test's certificates")
    workdir = tmp_path_factory.mktemp("redis-tls")
    server = TLSRedis(executable, make_certificates(workdir), PASSWORD)
    with Service(str(tiny_model_dir), workdir, env={"XDG_CACHE_HOME": str(workdir / "cache")},
                 redis=server).running() as service:
        yield service


def test_generates_and_streams_through_redis_over_tls(svc):
    assert svc.env["REDIS_URL"].startswith("rediss://")
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    answer = requests.post(f"{svc.base_url}/generate", json=body, timeout=60)
    assert answer.status_code == 200 and answer.json()["generated_text"]
    stream = requests.post(f"{svc.base_url}/generate_stream", json=body, timeout=60)
    assert stream.status_code == 200 and stream.text.count("data:") == 3
    assert requests.get(f"{svc.base_url}/health", timeout=10).status_code == 200


def test_a_plain_tcp_client_is_refused(svc):
    with pytest.raises(redis.ConnectionError):
        redis.Redis.from_url(svc.redis.plain_url, socket_timeout=5).ping()


def test_a_server_whose_certificate_is_not_trusted_is_refused(svc):
    """Without the test's CA in the URL, neither redis-py (the web, the replicas) nor Celery's
    broker connection accepts the server: no silent fall back to an unchecked certificate."""
    url = svc.redis.url_trusting(None)
    with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
        redis.Redis.from_url(url, socket_timeout=5).ping()
    with make_celery(Settings(redis_url=url)).connection_for_write() as connection:
        with pytest.raises(Exception, match="certificate verify failed"):
            connection.ensure_connection(max_retries=1, interval_start=0)
