"""/modify_cluster_state and /cluster_state at the web edge (replica records written by hand)."""
from __future__ import annotations

from tests.web.fake_replica import register_replica
from web.app import create_app

UP = {"type": "TriggerNormalUp", "data": {"old_stub_indices": [0], "new_stub_indices": [1]}}


def test_manual_scaling_off_is_an_error(client):
    response = client.post("/modify_cluster_state", json=UP)
    assert response.status_code == 400
    assert response.get_json()["error_type"] == "scaling" and "manual scaling is off" in response.get_json()["error"]


def test_a_body_that_does_not_parse_is_422(client):
    response = client.post("/modify_cluster_state", json={"type": "TriggerNormalUp", "data": {"new_stub_indices": "x"}})
    assert response.status_code == 422 and set(response.get_json()) == {"error", "error_type"}


def test_up_without_agent_or_standby_is_an_error(settings, redis_url):
    register_replica(redis_url, slot=0)
    client = create_app(settings.replace(manually_scale=True, max_replicas=2)).test_client()
    response = client.post("/modify_cluster_state", json=UP)
    assert response.status_code == 400 and "no host agent" in response.get_json()["error"]


def test_cluster_state_lists_replicas(client, redis_url):
    register_replica(redis_url, slot=0, running=4, max_batch_size=8, weight_source="host-cache", load_seconds=1.5)
    register_replica(redis_url, slot=1, state="standby")
    state = client.get("/cluster_state?celery=false").get_json()
    assert state["counts"]["active"] == 1 and state["counts"]["standby"] == 1
    first = state["replicas"][0]
    assert (first["slot"], first["state"], first["batch_occupancy"], first["weight_source"]) == (0, "active", 0.5, "host-cache")
    assert "celery" not in first


def test_routes_are_documented(client):
    paths = client.get("/api-doc/openapi.json").get_json()["paths"]
    post = paths["/modify_cluster_state"]["post"]
    assert {"200", "400", "422"} <= set(post["responses"])
    assert "get" in paths["/cluster_state"]


def test_a_replica_that_cannot_load_shows_why_and_the_autoscaler_backs_off(client, settings, redis_url):
    """What `/cluster_state` shows of a configuration error: the slot `dead` with its reason, and
    the autoscaler holding new processes back (docs/failure-policy.md)."""
    import json
    import time

    import redis

    from common.keys import SLOTS_KEY
    from tasks.control.autoscaler import Autoscaler

    reason = "LoRA adapter 'ft': module model.embed_tokens: LoRA on the input embeddings is not supported"
    redis.Redis.from_url(redis_url).hset(SLOTS_KEY, "0", json.dumps({
        "slot": 0, "state": "dead", "by": "replica", "updated_at": time.time(), "error": reason, "cannot_load": True}))
    Autoscaler(settings.replace(min_replicas=1)).tick()
    state = client.get("/cluster_state?celery=false").get_json()
    assert (state["replicas"][0]["state"], state["replicas"][0]["error"]) == ("dead", reason)
    backoff = state["autoscaler"]["backoff"]
    assert (backoff["failures"], backoff["reason"]) == (1, reason) and 0 < backoff["retry_in_s"] <= 5
