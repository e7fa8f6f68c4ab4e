"""The weight data plane never takes the API key: its secret is `--weights-secret`, else derived
from the admin key, else the cluster's random one; a replica whose data plane other machines can
reach under a secret an API user knows refuses to start with one line."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import redis
import requests

from blitzscale.redis_server import EmbeddedRedis
from common.settings import Settings
from tasks.runtime.peer_weights import ReplicaWeights
from tasks.weights.manifest import build_manifest
from tasks.weights.server import KEY_HEADER
from tasks.weights.secret import exposure, weights_secret

API_KEY, ADMIN = "api-k3y", "admin-k3y"
SHA = "ab" * 32


@pytest.fixture
def connection():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(os.urandom(10_000))
    return tmp_path


@pytest.mark.parametrize("keys", [{"api_key": API_KEY}, {"api_key": API_KEY, "admin_api_key": ADMIN},
                                  {"api_key": API_KEY, "weights_secret": "w-secret"}])
def test_the_data_plane_answers_401_to_the_api_key(connection, model_dir, keys):
    weights = ReplicaWeights(Settings(**keys), slot=0, name="replica0@test", connection=connection).start()
    try:
        weights.server.hold(build_manifest(model_dir, SHA, 4096), model_dir)
        url = f"{weights.server.address}/weights/{SHA}/manifest"
        assert requests.get(url, headers={KEY_HEADER: API_KEY}, timeout=10).status_code == 401
        assert requests.get(url, headers={KEY_HEADER: ADMIN}, timeout=10).status_code == 401
        assert requests.get(url, timeout=10).status_code == 401
        ok = requests.get(url, headers={KEY_HEADER: weights.secret}, timeout=10)
        assert ok.status_code == 200 and ok.json()["sha"] == SHA
    finally:
        weights.stop()


def test_each_source_of_the_secret(connection):
    assert weights_secret(Settings(weights_secret="w", admin_api_key=ADMIN, api_key=API_KEY), connection) == "w"
    derived = weights_secret(Settings(admin_api_key=ADMIN, api_key=API_KEY), connection)
    assert derived not in (ADMIN, API_KEY) and len(derived) == 64
    assert derived == weights_secret(Settings(admin_api_key=ADMIN), connection)  # every replica agrees
    random_one = weights_secret(Settings(api_key=API_KEY), connection)
    assert random_one != API_KEY and random_one == weights_secret(Settings(), connection)  # one per cluster


@pytest.mark.parametrize("keys", [{"weights_secret": API_KEY}, {"admin_api_key": API_KEY}])
def test_a_routable_data_plane_under_the_api_key_refuses_to_start(keys):
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:1", "API_KEY": API_KEY,
           **{name.upper(): value for name, value in keys.items()}}
    result = subprocess.run([sys.executable, "-m", "blitzscale.cli", "worker", "--weights-host", "0.0.0.0"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refusing to start: the weights data plane listens on 0.0.0.0")
    assert API_KEY not in result.stderr


@pytest.mark.parametrize("settings", [
    Settings(api_key=API_KEY, weights_host="0.0.0.0"),  # the cluster's random secret
    Settings(api_key=API_KEY, admin_api_key=ADMIN, weights_host="0.0.0.0"),
    Settings(api_key=API_KEY, weights_secret=API_KEY, weights_host="127.0.0.1"),  # loopback: no peer can ask
    Settings(weights_host="0.0.0.0"),
])
def test_starts_when_the_secret_is_not_the_api_key(settings):
    assert exposure(settings) is None


@pytest.mark.parametrize("keys", [{"weights_secret": "tenant-k3y"}, {"admin_api_key": "tenant-k3y"}])
def test_a_tenants_key_is_an_api_key_too(tmp_path, keys):
    """Adversarial review: only --api-key was compared, so a data plane whose secret was (or was
    derived from) a tenant's key in --tenants-file started, and that tenant could download the model."""
    import hashlib
    path = tmp_path / "tenants.yaml"
    path.write_text(f"tenants: {{acme: {{key_sha256: {hashlib.sha256(b'tenant-k3y').hexdigest()}}}}}\n")
    line = exposure(Settings(tenants_file=str(path), weights_host="0.0.0.0", **keys))
    assert line is not None and line.startswith("refusing to start: the weights data plane listens on 0.0.0.0")
    assert "tenant-k3y" not in line
    assert exposure(Settings(tenants_file=str(path), weights_host="0.0.0.0", weights_secret="w-secret")) is None
