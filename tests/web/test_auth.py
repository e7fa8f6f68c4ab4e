"""Optional API keys (web/auth.py): 401 without the key on generation routes, a separate admin
key on /modify_cluster_state, open routes stay open, and keys never reach the logs."""
from __future__ import annotations

import logging

import pytest

from tests.web.fake_replica import FakeReplica, register_replica, reply
from web.app import create_app

KEY, ADMIN = "s3cret-key", "admin-k3y"
GENERATION = ["/generate", "/generate_stream", "/", "/invocations"]
SCALE = {"type": "TriggerNormalUp", "data": {"old_stub_indices": [0], "new_stub_indices": [1]}}


@pytest.fixture
def keyed(settings):
    return create_app(settings.replace(api_key=KEY, admin_api_key=ADMIN)).test_client()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("route", GENERATION)
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), bearer(KEY + "x"), {"Authorization": KEY},
                                     {"Authorization": f"Basic {KEY}"}, bearer(ADMIN)])
def test_generation_needs_the_key(keyed, route, headers):
    response = keyed.post(route, json={"inputs": "hello"}, headers=headers)
    assert response.status_code == 401
    assert response.get_json()["error_type"] == "unauthorized"


def test_the_key_checked_before_the_body(keyed):
    response = keyed.post("/generate", data=b"not json", content_type="text/plain")
    assert response.status_code == 401


@pytest.mark.parametrize("route", GENERATION)
def test_with_the_key_it_generates(keyed, redis_url, route):
    with FakeReplica(redis_url, reply([" world"])):
        response = keyed.post(route, json={"inputs": "hello"}, headers={"Authorization": f"bearer  {KEY} "})
    assert response.status_code == 200, response.get_data()


@pytest.mark.parametrize("path", ["/health", "/info", "/metrics", "/api-doc/openapi.json"])
def test_open_routes_stay_open(keyed, redis_url, path):
    assert keyed.get(path).status_code in (200, 503)


@pytest.mark.parametrize("headers", [{}, bearer(KEY), bearer("wrong")])
def test_scaling_needs_the_admin_key(keyed, headers):
    response = keyed.post("/modify_cluster_state", json=SCALE, headers=headers)
    assert response.status_code == 401


def test_with_the_admin_key_scaling_is_let_through(keyed):
    response = keyed.post("/modify_cluster_state", json=SCALE, headers=bearer(ADMIN))
    assert response.status_code != 401  # manual scaling is off here: a 400, but past the key


def test_without_an_admin_key_the_api_key_protects_scaling(settings):
    client = create_app(settings.replace(api_key=KEY)).test_client()
    assert client.post("/modify_cluster_state", json=SCALE).status_code == 401
    assert client.post("/modify_cluster_state", json=SCALE, headers=bearer(KEY)).status_code != 401


def test_without_keys_everything_is_open(client, redis_url):
    with FakeReplica(redis_url, reply([" world"])):
        assert client.post("/generate", json={"inputs": "hello"}).status_code == 200


def test_keys_are_never_logged(settings, keyed, caplog, redis_url):
    caplog.set_level(logging.DEBUG)
    with FakeReplica(redis_url, reply([" world"])):
        keyed.post("/generate", json={"inputs": "hello"}, headers=bearer(KEY))
    keyed.post("/generate", json={"inputs": "hello"}, headers=bearer("wrong-guess"))
    keyed.post("/modify_cluster_state", json=SCALE, headers=bearer(ADMIN))
    logged = caplog.text + repr(settings.replace(api_key=KEY, admin_api_key=ADMIN))
    assert KEY not in logged and ADMIN not in logged and "wrong-guess" not in logged


def _publishes(connection) -> int:
    """PUBLISH commands Redis has run: Celery's broadcast `inspect` is one each."""
    return int(connection.info("commandstats").get("cmdstat_publish", {}).get("calls", 0))


@pytest.mark.parametrize("headers", [{}, bearer(KEY), bearer("wrong")])
def test_cluster_state_needs_the_admin_key_and_inspects_nothing_before(keyed, redis_client, redis_url, headers):
    register_replica(redis_url, slot=0, alive=True)
    before = _publishes(redis_client)
    response = keyed.get("/cluster_state", headers=headers)
    assert response.status_code == 401 and response.get_json()["error_type"] == "unauthorized"
    assert "replica0@test" not in response.get_data(as_text=True)
    assert _publishes(redis_client) == before  # no Celery broadcast for an anonymous caller


def test_cluster_state_with_the_admin_key_lists_and_inspects(keyed, redis_client, redis_url):
    register_replica(redis_url, slot=0, alive=True)
    before = _publishes(redis_client)
    response = keyed.get("/cluster_state", headers=bearer(ADMIN))
    assert response.status_code == 200 and response.get_json()["replicas"][0]["name"] == "replica0@test"
    assert _publishes(redis_client) > before  # the inspect the anonymous test proves absent


def test_cluster_state_takes_the_api_key_without_an_admin_key(settings, redis_url):
    register_replica(redis_url, slot=0)
    client = create_app(settings.replace(api_key=KEY)).test_client()
    assert client.get("/cluster_state?celery=false").status_code == 401
    assert client.get("/cluster_state?celery=false", headers=bearer(KEY)).status_code == 200


def test_probe_routes_stay_open_with_keys(keyed):
    for path in ("/health", "/ping", "/"):
        assert keyed.get(path).status_code in (200, 503)  # 503: no replica, but never 401
