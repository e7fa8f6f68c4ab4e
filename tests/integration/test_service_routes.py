"""GET routes: health, info, metrics, OpenAPI and its Swagger UI; errors in TGI's shape."""
from __future__ import annotations

import re

import pytest
import requests

INFO_FIELDS = {
    "model_id", "model_sha", "model_dtype", "model_device_type", "model_pipeline_tag",
    "max_concurrent_requests", "max_best_of", "max_stop_sequences", "max_input_tokens", "max_total_tokens",
    "waiting_served_ratio", "max_batch_total_tokens", "max_waiting_tokens", "max_batch_size",
    "validation_workers", "max_client_batch_size", "router", "version", "sha", "docker_label",
}


@pytest.mark.parametrize("path", ["/health", "/ping", "/"])
def test_health_routes(service, path):
    response = requests.get(f"{service.base_url}{path}")
    assert response.status_code == 200


def test_info(service, tiny_model_dir):
    info = requests.get(f"{service.base_url}/info").json()
    assert INFO_FIELDS <= set(info)
    assert info["model_id"] == str(tiny_model_dir)
    assert info["model_dtype"] == "float32"
    assert info["model_device_type"] == "cpu"
    assert info["max_input_tokens"] == 512 and info["max_total_tokens"] == 1024
    assert info["max_best_of"] == 2 and info["max_stop_sequences"] == 4
    assert info["max_batch_total_tokens"] >= info["max_total_tokens"]
    assert isinstance(info["model_sha"], str) and info["model_sha"]


def test_metrics_count_requests(service):
    def scrape():
        return requests.get(f"{service.base_url}/metrics").text

    def value(text, name):
        match = re.search(rf"^{name}(?:\{{[^}}]*\}})? ([0-9.e+]+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    before = scrape()
    for _ in range(3):
        requests.post(f"{service.base_url}/generate", json={"inputs": "Hello", "parameters": {"max_new_tokens": 2}})
    requests.post(f"{service.base_url}/generate", json={"inputs": "", "parameters": {}})
    after = scrape()
    assert value(after, "tgi_request_count_total") - value(before, "tgi_request_count_total") >= 4
    assert value(after, "tgi_request_success_total") - value(before, "tgi_request_success_total") >= 3
    assert "tgi_request_duration_bucket" in after
    assert "tgi_request_failure_total" in after
    assert "tgi_queue_size" in after


def test_openapi_spec(service):
    spec = requests.get(f"{service.base_url}/api-doc/openapi.json").json()
    paths = spec["paths"]
    for path in ["/", "/generate", "/generate_stream", "/invocations", "/info", "/health", "/ping", "/metrics"]:
        assert path in paths, path
    assert "text/event-stream" in str(paths["/generate_stream"]["post"]["responses"]["200"])
    assert "422" in paths["/generate"]["post"]["responses"]
    schemas = spec["components"]["schemas"]
    for name in ["GenerateRequest", "GenerateParameters", "GenerateResponse", "ErrorResponse", "Info"]:
        assert any(key.startswith(name) for key in schemas), name


def test_swagger_ui_is_served_without_a_cdn(service):
    page = requests.get(f"{service.base_url}/docs")
    assert page.status_code == 200
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', page.text)
    assert assets, page.text[:500]
    for asset in assets:
        assert not asset.startswith("http"), asset
        url = asset if asset.startswith("/") else f"/docs/{asset}"
        assert requests.get(f"{service.base_url}{url}").status_code == 200, url


@pytest.mark.parametrize(
    "data,headers,status",
    [
        ("{not json", {"content-type": "application/json"}, 400),  # as TGI (axum): syntax → 400
        ('{"inputs": "x"}', {"content-type": "text/plain"}, None),
        ('{"inputs": 5}', {"content-type": "application/json"}, 422),
        ('{"inputs": "x", "parameters": {"max_new_tokens": "many"}}', {"content-type": "application/json"}, 422),
        ('{"inputs": "x", "parameters": {"temperature": NaN}}', {"content-type": "application/json"}, 422),
        ("[1, 2]", {"content-type": "application/json"}, 422),
    ],
)
def test_bad_requests_get_json_errors(service, data, headers, status):
    response = requests.post(f"{service.base_url}/generate", data=data, headers=headers)
    assert 400 <= response.status_code < 500
    if status:
        assert response.status_code == status
    body = response.json()
    assert set(body) == {"error", "error_type"}


def test_unknown_route_and_method(service):
    assert requests.get(f"{service.base_url}/nope").json()["error_type"]
    response = requests.get(f"{service.base_url}/generate")
    assert response.status_code == 405 and set(response.json()) == {"error", "error_type"}
