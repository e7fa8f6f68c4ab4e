"""`blitzscale serve` as a new user runs it: no REDIS_URL (it starts a private Redis), one replica,
the web. Its private Redis is killed for real; `serve` must restart it on the same port and the
service must recover by itself. And the operator's terminal shows what they need, not Celery's
banner."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import redis
import requests

from blitzscale.redis_server import free_port
from common.processes import stop_process
from tests.integration.test_faults import FAST

RECOVERY = 45  # seconds: Redis restarted, replicas and web reconnected, a request answered


@pytest.fixture(scope="module")
def serve(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("serve")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(FAST, MODEL_ID=str(tiny_model_dir), PORT=str(port), HF_HUB_OFFLINE="1",
               XDG_CACHE_HOME=str(workdir / "cache"), NUM_REPLICAS="1")
    log_path = workdir / "serve.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", "serve"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: health(base_url) == 200, 120, "serve healthy", log_path, process)
        wait_until(lambda: "ready: " in log_path.read_text(errors="replace"), 10, "the ready line", log_path, process)
        yield process, base_url, log_path
    finally:
        stop_process(process, grace=30)


def health(base_url: str) -> int | None:
    try:
        return requests.get(f"{base_url}/health", timeout=5).status_code
    except requests.ConnectionError:
        return None


def generate(base_url: str) -> int | None:
    try:
        return requests.post(f"{base_url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 4}},
                             timeout=30).status_code
    except requests.RequestException:
        return None


def wait_until(predicate, timeout: float, what: str, log_path, process) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert process.poll() is None, f"serve exited with {process.returncode}:\n{log_path.read_text()}"
        assert time.monotonic() < deadline, f"{what}: not within {timeout} s\n{log_path.read_text()[-6000:]}"
        time.sleep(0.3)


def private_redis_url(log_path) -> str:
    """As the log shows it: no password."""
    return re.search(r"private Redis at (redis://\S+)", log_path.read_text()).group(1)


def children_redis_url(process) -> str:
    """The URL with its password, as `serve` hands it to its children (their environment)."""
    for child in open(f"/proc/{process.pid}/task/{process.pid}/children").read().split():
        environ = open(f"/proc/{child}/environ", "rb").read().split(b"\0")
        for entry in environ:
            if entry.startswith(b"REDIS_URL="):
                return entry.split(b"=", 1)[1].decode()
    raise AssertionError("no child of serve has REDIS_URL")


def test_the_private_redis_has_a_password_on_loopback(serve):
    process, _, log_path = serve
    public, url = private_redis_url(log_path), children_redis_url(process)
    password = redis.connection.parse_url(url)["password"]
    assert len(password) >= 32 and password not in log_path.read_text(errors="replace")
    assert public.startswith("redis://127.0.0.1:") and url.endswith(public[len("redis://"):])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis.from_url(public).ping()
    assert redis.Redis.from_url(url).ping()


def test_operator_terminal_shows_the_service_not_celerys_banner(serve):
    _, base_url, log_path = serve
    output = log_path.read_text(errors="replace")
    assert f"serving " in output and f"ready: {base_url}" in output
    assert "private Redis at redis://" in output
    assert "-------------- " not in output and "[config]" not in output, "Celery's banner"
    assert "SecurityWarning" not in output and "superuser privileges" not in output


def test_sighup_reloads_the_web_and_serve_keeps_serving(serve):
    process, base_url, log_path = serve
    process.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: reloading the web's configuration" in log_path.read_text(errors="replace"), 10,
               "the reload line", log_path, process)
    wait_until(lambda: generate(base_url) == 200, 30, "a request after the reload", log_path, process)
    assert process.poll() is None


def test_serve_restarts_its_private_redis_and_recovers(serve):
    process, base_url, log_path = serve
    url, public = children_redis_url(process), private_redis_url(log_path)
    pid = int(redis.Redis.from_url(url).info("server")["process_id"])
    os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    wait_until(lambda: health(base_url) == 200 and generate(base_url) == 200, RECOVERY, "recovery", log_path,
               process)
    assert time.monotonic() - killed < RECOVERY
    assert int(redis.Redis.from_url(url).info("server")["process_id"]) != pid  # a new server, same port
    output = log_path.read_text(errors="replace")
    assert f"private Redis at {public} exited; restarting it" in output
    assert f"private Redis at {public} restarted" in output
    assert "Warning" not in output[output.index("exited; restarting it"):], "warnings on the operator's terminal"


def test_serve_with_an_adapter_that_cannot_load_exits_saying_why(tiny_model_dir, tmp_path):
    """A configuration error, not a crash loop: the replica cannot load its adapter, so `serve`
    stops everything and exits non-zero, the reason as its last line."""
    from tests.lora_adapters import build_adapter

    adapter = build_adapter(tiny_model_dir, tmp_path / "ft", seed=1, targets=["q_proj", "embed_tokens"])
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(FAST, MODEL_ID=str(tiny_model_dir), PORT=str(free_port()), HF_HUB_OFFLINE="1",
               XDG_CACHE_HOME=str(tmp_path / "cache"), NUM_REPLICAS="1", LORA_ADAPTERS=f"ft={adapter}")
    process = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", "serve"], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        output, _ = process.communicate(timeout=180)
    finally:
        stop_process(process, grace=10)
    lines = output.decode(errors="replace").strip().splitlines()
    assert process.returncode != 0, "\n".join(lines[-40:])
    assert lines[-1].endswith("replica0 cannot load: LoRA adapter 'ft': module model.embed_tokens: LoRA on the "
                              "input embeddings is not supported (train the adapter without embed_tokens in "
                              "target_modules)"), \
        "\n".join(lines[-40:])
