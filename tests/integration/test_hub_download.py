"""Models from the hub, against a stand-in hub (a real local HTTP server at HF_ENDPOINT serving the
tiny model's files): the replica and the web download what they need into an empty cache (the
weights resuming after a dropped connection), a second start needs no hub, and offline mode with
an empty cache fails at once, naming the model."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time

import pytest
import requests

from tests.hub_server import StandInHub
from tests.service import Service

MODEL = "blitz-test/tiny-llama"


class HubService(Service):
    replica_module = "tests.integration.small_chunks"


@pytest.fixture(scope="module")
def hub(tiny_model_dir, tmp_path_factory):
    only_bin = tmp_path_factory.mktemp("only-bin")
    for name in ("config.json", "tokenizer.json"):
        (only_bin / name).write_bytes((tiny_model_dir / name).read_bytes())
    (only_bin / "pytorch_model.bin").write_bytes(b"\0" * 1024)
    with StandInHub({MODEL: tiny_model_dir, "blitz-test/only-bin": only_bin},
                    cut_first_download={"model.safetensors"}) as server:
        yield server


def hub_env(hub: StandInHub, home, offline: bool = False) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0",
            "HF_HUB_DISABLE_TELEMETRY": "1", "XDG_CACHE_HOME": str(home / "xdg")}


def test_a_replica_downloads_into_an_empty_cache_then_starts_without_the_hub(hub, tiny_model_dir, tmp_path):
    home = tmp_path / "hf"
    first = HubService(MODEL, tmp_path / "first", env=hub_env(hub, home))
    try:
        first.start(timeout=180)
        answer = requests.post(f"{first.base_url}/generate", json={
            "inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": True}}, timeout=60).json()
        assert answer["details"]["generated_tokens"] == 4
        info = requests.get(f"{first.base_url}/info", timeout=10).json()
        assert info["model_id"] == MODEL
    finally:
        first.stop()
    gets = hub.downloads("model.safetensors")
    assert gets[0].range is None and gets[1].range.startswith("bytes=") and gets[1].range != "bytes=0-"  # resumed
    [blob] = [p for p in (home / "hub").rglob("model.safetensors")]
    assert hashlib.sha256(blob.read_bytes()).digest() == \
        hashlib.sha256((tiny_model_dir / "model.safetensors").read_bytes()).digest()
    seen = len(hub.requests)
    second = HubService(MODEL, tmp_path / "second", env=hub_env(hub, home))
    try:
        second.start(timeout=120)
        assert requests.post(f"{second.base_url}/generate", json={"inputs": "Hello"}, timeout=60).status_code == 200
    finally:
        second.stop()
    assert hub.requests[seen:] == []  # the cache had it all: not one request to the hub


def blitzscale(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blitzscale.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


def test_offline_with_an_empty_cache_fails_fast_naming_the_model(hub, tmp_path):
    seen, started = len(hub.requests), time.monotonic()
    result = blitzscale("serve", "--model-id", MODEL, "--port", "0", env=hub_env(hub, tmp_path / "hf", offline=True))
    assert result.returncode == 2 and time.monotonic() - started < 30
    assert f"model '{MODEL}' is not in the local Hugging Face cache" in result.stderr
    assert "HF_HUB_OFFLINE=1" in result.stderr and "Traceback" not in result.stderr
    assert hub.requests[seen:] == []


def test_download_weights_refuses_a_repository_with_only_bin_weights(hub, tmp_path):
    result = blitzscale("download-weights", "blitz-test/only-bin", env=hub_env(hub, tmp_path / "hf"))
    assert result.returncode == 2
    assert "has no .safetensors weights, only PyTorch .bin files (pytorch_model.bin)" in result.stderr
    assert not hub.downloads("pytorch_model.bin")
    result = blitzscale("download-weights", "blitz-test/only-bin", "--extension", ".bin",
                        env=hub_env(hub, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert len(hub.downloads("pytorch_model.bin")) == 1


def test_each_repository_of_the_stand_in_hub_has_its_own_commit(hub, tmp_path):
    """A hub model is named by its commit before it is downloaded (the host-cache key): two repos
    with one commit would share a cache entry, and a replica would serve another model's weights."""
    from huggingface_hub import HfApi  # noqa: PLC0415

    api = HfApi(endpoint=hub.url)
    commits = {repo: api.model_info(repo).sha for repo in (MODEL, "blitz-test/only-bin")}
    assert len(set(commits.values())) == 2 and all(len(sha) == 40 for sha in commits.values())
    assert commits[MODEL] == api.model_info(MODEL).sha  # stable
    head = requests.head(f"{hub.url}/{MODEL}/resolve/main/config.json", timeout=10)
    assert head.headers["X-Repo-Commit"] == commits[MODEL]
