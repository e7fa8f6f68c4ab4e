"""The tenants file (common/tenants.py) and the prefix cache's namespace (web/tenancy.py): keys
found by their sha256, a plain key accepted with a warning, a broken file refused with the
tenant and field named; several keys each open the generation routes as their own tenant."""
from __future__ import annotations

import hashlib
import logging

import pytest

from common.tenants import TenantsError, load
from tests.web.fake_replica import FakeReplica, reply
from web.app import create_app
from web.tenancy import cache_namespace

ACME, GLOBEX = "acme-key", "globex-key"


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@pytest.fixture
def tenants_file(tmp_path):
    path = tmp_path / "tenants.yaml"
    path.write_text(f"tenants:\n  acme: {{key_sha256: {digest(ACME)}, requests_per_minute: 600, "
                    f"tokens_per_minute: 200000, max_concurrent_requests: 32}}\n  globex: {{key: {GLOBEX}}}\n")
    return path


def test_keys_are_found_by_their_digest(tenants_file, caplog):
    caplog.set_level(logging.WARNING)
    tenants = load(tenants_file)
    acme = tenants.identify(ACME)
    assert (acme.name, acme.requests_per_minute, acme.tokens_per_minute, acme.max_concurrent_requests) == \
        ("acme", 600, 200000, 32)
    assert tenants.identify(GLOBEX).name == "globex" and tenants.identify(GLOBEX).requests_per_minute is None
    assert tenants.identify("nope") is None and tenants.identify(None) is None
    assert "tenant globex" in caplog.text and "key_sha256" in caplog.text and GLOBEX not in caplog.text


@pytest.mark.parametrize("text, named", [
    ("tenants: {}\n", "expected `tenants:`"),
    ("tenants: {acme: {key_sha256: abc}}\n", "tenant acme: `key_sha256`"),
    (f"tenants: {{acme: {{key: k, requests_per_minute: 0}}}}\n", "`requests_per_minute` must be a positive"),
    (f"tenants: {{acme: {{key: k, rpm: 5}}}}\n", "unknown field(s) rpm"),
    (f"tenants: {{a: {{key: k}}, b: {{key: k}}}}\n", "have the same key"),
    ("tenants: {'a b': {key: k}}\n", "tenant a b: a name is"),
    ("tenants: [\n", "tenants.yaml"),
])
def test_a_broken_file_is_refused_with_what_is_wrong(tmp_path, text, named):
    (tmp_path / "tenants.yaml").write_text(text)
    with pytest.raises(TenantsError, match=named.replace("(", r"\(").replace(")", r"\)")):
        load(tmp_path / "tenants.yaml")


def test_each_tenant_key_opens_the_generation_routes(settings, tenants_file, redis_url):
    client = create_app(settings.replace(tenants_file=str(tenants_file))).test_client()
    with FakeReplica(redis_url, reply([" world"])):
        for key in (ACME, GLOBEX):
            response = client.post("/generate", json={"inputs": "hello"}, headers={"Authorization": f"Bearer {key}"})
            assert response.status_code == 200, response.get_data()
    assert client.post("/generate", json={"inputs": "hello"}).status_code == 401
    assert client.get("/cluster_state?celery=false", headers={"Authorization": f"Bearer {ACME}"}).status_code == 401


def test_the_cache_namespace():
    acme, globex = load_two()
    assert cache_namespace("tenant", acme, "") != cache_namespace("tenant", globex, "")
    assert cache_namespace("tenant", acme, "s") != cache_namespace("tenant", acme, "t")
    assert cache_namespace("shared", acme, "s") == cache_namespace("shared", globex, "s")
    assert cache_namespace("shared", acme, "") == cache_namespace("tenant", None, "") == ""  # as before tenants


def load_two():
    from common.tenants import Tenant
    return Tenant("acme", digest(ACME)), Tenant("globex", digest(GLOBEX))


def test_affinity_keys_follow_the_namespace():
    """Affinity routing must not send one tenant's probe to the replica holding another's prefix."""
    from tasks.client.affinity import KEY_BLOCK, job_salt, prefix_keys
    acme, globex = load_two()
    ids = list(range(2 * KEY_BLOCK))
    keys = {name: prefix_keys(ids, job_salt(cache_namespace("tenant", tenant, ""), None))
            for name, tenant in (("acme", acme), ("globex", globex))}
    assert keys["acme"] and set(keys["acme"]).isdisjoint(keys["globex"])
    assert prefix_keys(ids, job_salt("", "lora1")) == prefix_keys(ids, "lora1")  # no namespace: as before


def test_the_api_key_is_tenant_default_beside_the_file(settings, tenants_file, redis_url):
    client = create_app(settings.replace(tenants_file=str(tenants_file), api_key="plain-key")).test_client()
    with FakeReplica(redis_url, reply([" world"])):
        for key in ("plain-key", ACME):
            assert client.post("/generate", json={"inputs": "hello"},
                               headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_a_file_broken_before_a_reload_refuses_every_key(settings, tmp_path, caplog):
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants: {acme: {key_sha256: nothex}}\n")
    client = create_app(settings.replace(tenants_file=str(path))).test_client()  # the web stays up
    response = client.post("/generate", json={"inputs": "hello"}, headers={"Authorization": f"Bearer {ACME}"})
    assert response.status_code == 401 and "every API key is refused" in caplog.text


def test_a_broken_file_stops_the_start_in_one_line(tmp_path):
    import os
    import subprocess
    import sys
    path = tmp_path / "tenants.yaml"
    path.write_text("tenants: {acme: {key_sha256: nothex}}\n")
    result = subprocess.run([sys.executable, "-m", "blitzscale.cli", "web", "--tenants-file", str(path),
                             "--redis-url", "redis://127.0.0.1:1"], capture_output=True, text=True, timeout=60,
                            env=os.environ)
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and len(lines) == 1 and "tenant acme: `key_sha256` must be 64 hex" in lines[0]


@pytest.mark.parametrize("content", [
    f"tenants:\n  acme: {{key_sha256: {digest(ACME)}}}  # caf\xe9\n".encode("latin-1"),  # not UTF-8
    b"tenants: " + b"[" * 100_000 + b"]" * 100_000 + b"\n",  # nested past Python's recursion limit
])
def test_a_file_that_cannot_be_parsed_is_refused_not_raised(settings, tmp_path, caplog, content):
    """Adversarial review: such files raised UnicodeDecodeError or RecursionError past TenantsError;
    at a SIGHUP reload the new gunicorn worker could not boot and gunicorn stopped the web."""
    path = tmp_path / "tenants.yaml"
    path.write_bytes(content)
    with pytest.raises(TenantsError, match="tenants.yaml"):
        load(path)
    client = create_app(settings.replace(tenants_file=str(path))).test_client()  # the web stays up
    response = client.post("/generate", json={"inputs": "hello"}, headers={"Authorization": f"Bearer {ACME}"})
    assert response.status_code == 401 and "every API key is refused" in caplog.text


def test_the_api_key_beside_the_file_is_a_tenant_key_not_an_operator_key(settings, tenants_file):
    """Adversarial review: beside a tenants file `--api-key` is tenant `default`'s key, yet it opened
    /cluster_state and /modify_cluster_state: one tenant could read the data planes and scale the fleet."""
    client = create_app(settings.replace(tenants_file=str(tenants_file), api_key="plain-key")).test_client()
    auth = {"Authorization": "Bearer plain-key"}
    assert client.get("/cluster_state?celery=false", headers=auth).status_code == 401
    response = client.post("/modify_cluster_state", json={"type": "TriggerNormalUp", "data": {
        "old_stub_indices": [0], "new_stub_indices": [1]}}, headers=auth)
    assert response.status_code == 401 and "--admin-api-key" in response.get_json()["error"]
    admin = create_app(settings.replace(tenants_file=str(tenants_file), api_key="plain-key", admin_api_key="root"))
    assert admin.test_client().get("/cluster_state?celery=false",
                                   headers={"Authorization": "Bearer root"}).status_code == 200


@pytest.mark.parametrize("admin_key", [ACME, "plain-key"])
def test_an_admin_key_that_is_also_a_tenants_key_stops_the_start(tenants_file, admin_key):
    """Adversarial review: `--admin-api-key` equal to a tenant's key (or to `--api-key`, tenant
    `default` beside a file) started, and that tenant could read /cluster_state and scale the fleet."""
    import os
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "blitzscale.cli", "web", "--tenants-file", str(tenants_file),
                             "--redis-url", "redis://127.0.0.1:1"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "API_KEY": "plain-key", "ADMIN_API_KEY": admin_key})
    last = result.stderr.strip().splitlines()[-1]  # after the file's warning about globex's plain key
    assert result.returncode != 0 and last.startswith("refusing to start: --admin-api-key is also an API key")
    assert admin_key not in result.stderr


def test_a_file_tenant_named_default_beside_the_api_key_is_refused(settings, tmp_path, caplog):
    """Adversarial review: `--api-key` is tenant `default`; a file's own `default` (another key)
    shared its name, so the two shared one prefix-cache namespace (`cached_tokens` told one what
    the other sent), their limits' counters and their metrics."""
    path = tmp_path / "tenants.yaml"
    path.write_text(f"tenants:\n  default: {{key_sha256: {digest(ACME)}}}\n")
    with pytest.raises(TenantsError, match="tenant default: the name of --api-key's tenant"):
        load(path, api_key="plain-key")
    client = create_app(settings.replace(tenants_file=str(path), api_key="plain-key")).test_client()
    for key in (ACME, "plain-key"):  # fails closed, as any broken file does
        response = client.post("/generate", json={"inputs": "hello"}, headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 401
    assert "every API key is refused" in caplog.text
