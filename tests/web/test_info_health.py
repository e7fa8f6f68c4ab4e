"""/info and the health checks."""
from __future__ import annotations

import pytest

import common
from common.settings import Settings
from tests.web.fake_replica import register_replica
from web.app import create_app

INFO_FIELDS = [
    "model_id", "model_sha", "model_dtype", "model_device_type", "model_pipeline_tag", "max_concurrent_requests",
    "max_best_of", "max_stop_sequences", "max_input_tokens", "max_total_tokens", "waiting_served_ratio",
    "max_batch_total_tokens", "max_waiting_tokens", "max_batch_size", "validation_workers", "max_client_batch_size",
    "router", "version", "sha", "docker_label",
    "lora_adapters",  # ours, after TGI's: the names `adapter_id` may take (--lora-adapters)
]
HEALTH_ROUTES = ["/health", "/ping", "/"]


def test_info_without_replicas(client, settings):
    info = client.get("/info").get_json()
    assert list(info) == INFO_FIELDS
    assert info["model_id"] == settings.model_id
    assert info["model_sha"] is None and info["model_pipeline_tag"] == "text-generation"
    assert info["router"] == "blitzscale" and info["version"] == common.__version__
    assert info["sha"] is None and info["docker_label"] is None
    assert (info["max_input_tokens"], info["max_total_tokens"]) == (10, 20)
    assert info["max_concurrent_requests"] == settings.max_concurrent_requests
    assert info["max_best_of"] == 2 and info["max_stop_sequences"] == 4


def test_info_from_the_first_active_replica(client, redis_url):
    register_replica(redis_url, slot=1, model_sha="sha-one", dtype="bfloat16", device_type="cuda")
    register_replica(redis_url, slot=0, state="starting", model_sha="sha-zero")
    info = client.get("/info").get_json()
    assert (info["model_sha"], info["model_dtype"], info["model_device_type"]) == ("sha-one", "bfloat16", "cuda")


@pytest.mark.parametrize("route", HEALTH_ROUTES)
def test_unhealthy_without_an_active_replica(client, redis_url, route):
    response = client.get(route)
    assert response.status_code == 503
    assert response.get_json() == {"error": "unhealthy", "error_type": "healthcheck"}
    register_replica(redis_url, state="starting")
    assert client.get(route).status_code == 503


@pytest.mark.parametrize("route", HEALTH_ROUTES)
def test_healthy_with_an_active_replica(client, redis_url, route):
    register_replica(redis_url)
    response = client.get(route)
    assert response.status_code == 200 and response.data == b""


def test_unhealthy_when_redis_is_down(model_dir):
    client = create_app(Settings(model_id=str(model_dir), redis_url="redis://127.0.0.1:1/0")).test_client()
    assert client.get("/health").status_code == 503
