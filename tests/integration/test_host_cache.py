"""O(1) host caching, end to end on two simulated hosts: the model is in host B's cache only (no
replica of it runs anywhere, host A's cache is empty); a cold start on host A takes the weights
from B's agent over its data plane, reports source `host-cache` from B (not `source`), and
answers with the model's own tokens. With no cache anywhere, a cold start reads the source and its
host keeps a copy; a hub model found in B's cache is never downloaded. Real Redis, agent, Celery
worker and web (and a stand-in hub)."""
from __future__ import annotations

import hashlib
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis
import requests

from common import model_files
from common.fleet import read_agents
from common.processes import stop_process
from common.settings import Settings
from tasks.weights.host_cache import keep_copy
from tests.hub_server import StandInHub, commit_of
from tests.service import Service

CHUNK = 32 << 10  # the tiny model is ~540 kB: 17 chunks
HOST_A = {"HOST_NAME": "host-a", "WEIGHTS_HOST": "127.0.0.1"}
HOST_B = {"HOST_NAME": "host-b", "WEIGHTS_HOST": "127.0.0.2"}


def files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".")}


@contextmanager
def model_only_in_b(model_id: str, sha: str, files_of: Path, workdir: Path, env: dict | None = None):
    """Redis and host B's agent (its cache holds the model `sha`, made from `files_of`; it starts no
    replica), then one replica on host A (empty cache) and the web."""
    svc = Service(model_id, workdir, replicas=0, env={
        "WEIGHTS_CHUNK_SIZE": str(CHUNK), "HEARTBEAT_TTL": "2", "MANUALLY_SCALE": "true",
        "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024", "XDG_CACHE_HOME": str(workdir / "home-cache"),
        "WEIGHT_CACHE_DIR": str(workdir / "cache-a"), **HOST_A, **(env or {})})
    settings = Settings(weights_chunk_size=CHUNK)
    svc.sha = sha
    svc.entry_a = model_files.cache_entry(settings.replace(weight_cache_dir=str(workdir / "cache-a")), sha)
    entry_b = model_files.cache_entry(settings.replace(weight_cache_dir=str(workdir / "cache-b")), sha)
    assert keep_copy(files_of, entry_b, sha, CHUNK, settings.weights_checksum)
    svc.agent_b = None
    try:
        svc.redis.start()
        svc.env["REDIS_URL"] = svc.redis.url
        env_a, svc.env = svc.env, {**svc.env, "WEIGHT_CACHE_DIR": str(workdir / "cache-b"), **HOST_B}
        svc.agent_b = svc._spawn("agent-host-b", ["agent", "--host-name", "host-b", "--devices", "cpu"])
        svc.env = env_a
        connection = redis.Redis.from_url(svc.redis.url)
        svc_wait(lambda: any(a.serves_model(sha) for a in read_agents(connection)), svc, "host-b serving its cache")
        svc.start_replica(0)
        svc.web = svc._spawn("web", ["web"])
        svc.wait_healthy(120)
        yield svc
    finally:
        if svc.agent_b is not None:
            stop_process(svc.agent_b, grace=10)
        svc.stop()


@pytest.fixture(scope="module")
def only_in_b(tiny_model_dir, tmp_path_factory):
    sha = model_files.resolve(Settings(model_id=str(tiny_model_dir))).sha
    env = {"WEIGHT_PEERS": "prefer"}  # the tiny model is a plain directory: treat it as a slow source
    with model_only_in_b(str(tiny_model_dir), sha, tiny_model_dir, tmp_path_factory.mktemp("host-cache"), env) as svc:
        yield svc


def svc_wait(predicate, svc: Service, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached in {timeout} s; logs:\n{svc.logs()}")


def replica_view(svc: Service, slot: int) -> dict:
    state = requests.get(f"{svc.base_url}/cluster_state", params={"celery": "false"}, timeout=10).json()
    return next((r for r in state["replicas"] if r["slot"] == slot), {"state": None, "pid": None})


def test_a_cold_start_takes_the_model_from_another_hosts_cache(only_in_b, tiny_model_dir, tiny_reference):
    svc = only_in_b
    replica = svc_wait(lambda: (v := replica_view(svc, 0))["state"] == "active" and v, svc, "replica 0 active")
    assert replica["host"] == "host-a"
    assert (replica["weight_origin"], replica["weight_host"], replica["weight_source"]) == (
        "host-cache", "host-b", "host-cache")
    transfer = replica["transfer"]
    assert transfer["state"] == "done" and transfer["sources"] == {"host-cache@host-b": transfer["total"]}
    assert model_files.entry_complete(svc.entry_a) and files(svc.entry_a) == files(tiny_model_dir)
    assert "weights: host-cache from host-b" in (svc.workdir / "replica0.log").read_text()

    state = requests.get(f"{svc.base_url}/cluster_state", params={"celery": "false"}, timeout=10).json()
    host_b = next(h for h in state["hosts"] if h["host"] == "host-b")
    assert host_b["cache_shas"] == [svc.sha] and host_b["cache_addr"].startswith("http://127.0.0.2:")

    body = {"inputs": "The capital of France", "parameters": {"max_new_tokens": 12, "details": True}}
    response = requests.post(f"{svc.base_url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    tokens = [t["id"] for t in response.json()["details"]["tokens"]]
    assert tokens == tiny_reference("The capital of France", 12)[:len(tokens)]


def test_with_no_cache_anywhere_the_cold_start_reads_the_source_and_keeps_a_copy(only_in_b, tiny_model_dir):
    """Host B's agent gone, host A's cache emptied, no replica left: the next cold start reads the
    model's source, and its host keeps a copy, so that the cluster holds the model again."""
    svc = only_in_b
    stop_process(svc.agent_b, grace=10)
    svc.agent_b = None
    svc.kill_replica(0)
    shutil.rmtree(svc.entry_a)
    connection = redis.Redis.from_url(svc.redis.url)
    svc_wait(lambda: not read_agents(connection), svc, "host-b's agent gone")
    restarted = svc.start_replica(0)
    replica = svc_wait(lambda: (v := replica_view(svc, 0))["state"] == "active" and v["pid"] == restarted.pid and v,
                       svc, "replica 0 active again", timeout=120)
    assert (replica["weight_origin"], replica["weight_host"], replica["weight_source"]) == (
        "source", "host-a", "directory")
    assert replica["transfer"] is None
    svc_wait(lambda: model_files.entry_complete(svc.entry_a), svc, "host A's cache keeping a copy")
    assert files(svc.entry_a) == files(tiny_model_dir)


def test_a_hub_model_in_another_hosts_cache_is_not_downloaded(tiny_model_dir, tiny_reference, tmp_path):
    """A hub model this host never downloaded is named by its commit (asked of the hub): host B's
    cache has that commit, so the weights come from B and the hub sends no weight file (the web
    downloads the tokenizer files it needs, as always)."""
    model = "blitz-test/tiny-llama"
    with StandInHub({model: tiny_model_dir}) as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0",
               "HF_HUB_DISABLE_TELEMETRY": "1"}
        with model_only_in_b(model, commit_of(model), tiny_model_dir, tmp_path, env) as svc:
            replica = svc_wait(lambda: (v := replica_view(svc, 0))["state"] == "active" and v, svc, "replica active")
            assert (replica["weight_origin"], replica["weight_host"]) == ("host-cache", "host-b")
            body = {"inputs": "The capital of France", "parameters": {"max_new_tokens": 8, "details": True}}
            answer = requests.post(f"{svc.base_url}/generate", json=body, timeout=60).json()
            tokens = [t["id"] for t in answer["details"]["tokens"]]
            assert tokens == tiny_reference("The capital of France", 8)[:len(tokens)]
        assert hub.downloads("model.safetensors") == []
