"""docker-compose.yml, Procfile, Prometheus and Grafana files: valid, and running what exists.

`docker compose` is not installed here: the compose file is checked against the Compose
Specification's JSON schema (compose_spec.json beside this file, from docker-compose 1.29.2,
Apache-2.0), and every command it runs is parsed by the `blitzscale` CLI's own parser.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import yaml

from blitzscale.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONTRACT_METRICS = {
    "tgi_request_count", "tgi_request_success", "tgi_request_failure", "tgi_batch_inference_count",
    "tgi_batch_inference_success", "tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens",
    "tgi_request_duration", "tgi_request_validation_duration", "tgi_request_queue_duration",
    "tgi_request_inference_duration", "tgi_request_mean_time_per_token_duration", "tgi_request_input_length",
    "tgi_request_generated_tokens", "tgi_batch_inference_duration", "tgi_batch_forward_duration",
}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def parses(argv: list[str]) -> bool:
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def test_compose_file_follows_the_compose_specification(compose):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(__file__).parent / "compose_spec.json").read_text())
    errors = sorted(jsonschema.Draft201909Validator(schema).iter_errors(compose), key=str)
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_compose_services_and_their_commands(compose):
    services = compose["services"]
    assert {"redis", "web", "worker", "prometheus", "grafana"} <= set(services)
    for name in ("web", "worker", "autoscaler"):
        command = services[name]["command"]
        assert command[0] == "blitzscale" and parses(command[1:]), (name, command)
        assert services[name]["environment"]["REDIS_URL"] == "redis://redis:6379/0"
    assert services["web"]["command"][1] == "web" and "3000:3000" in services["web"]["ports"]
    assert int(services["web"]["environment"]["WEB_WORKERS"]) >= 2  # metrics merged across workers
    assert services["worker"]["command"][1] == "worker"
    assert services["autoscaler"]["command"][1] == "autoscaler"
    assert "deploy" not in services["worker"]  # CPU by default ...
    text = (ROOT / "docker-compose.yml").read_text()
    # ... with the GPU reservation there, commented
    assert re.search(r"#\s*- driver: nvidia", text) and re.search(r"#\s*capabilities: \[gpu\]", text)


def test_compose_mounts_exist_in_the_repository(compose):
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), (name, source)


def test_prometheus_scrapes_the_web(compose):
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = compose["services"]["web"]["command"][compose["services"]["web"]["command"].index("--port") + 1]
    assert job["static_configs"][0]["targets"] == [f"web:{port}"]


def test_grafana_is_provisioned_with_the_dashboard(compose):
    grafana = compose["services"]["grafana"]
    mounts = dict(v.split(":")[:2] for v in grafana["volumes"])
    datasource = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/blitzscale.yml").read_text())
    assert provider["providers"][0]["options"]["path"] == mounts["./deploy/grafana/dashboards"]
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"


def dashboard_metrics() -> set[str]:
    dashboard = json.loads((DEPLOY / "grafana/dashboards/blitzscale.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert exprs and all(exprs)
    names = set(re.findall(r"\b((?:tgi|blitz)_[a-z_]+)", " ".join(exprs)))
    return {re.sub(r"_(bucket|sum|count|total)$", "", name) for name in names}


def test_dashboard_shows_throughput_latency_queue_batch_and_replica_states():
    dashboard = json.loads((DEPLOY / "grafana/dashboards/blitzscale.json").read_text())
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("throughput", "latency", "queue", "batch size", "replicas by state"):
        assert topic in titles, topic
    used = dashboard_metrics()
    assert {"tgi_request_duration", "tgi_queue_size", "tgi_batch_current_size", "blitz_replicas"} <= used
    assert {m for m in used if m.startswith("tgi_")} <= CONTRACT_METRICS
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def procfile() -> dict[str, str]:
    lines = [line for line in (ROOT / "Procfile").read_text().splitlines() if line.strip()]
    return dict(line.split(":", 1) for line in lines)


def test_procfile_roles_run_blitzscale_commands():
    processes = procfile()
    assert set(processes) >= {"web", "worker", "autoscaler"}
    for name, command in processes.items():
        argv = shlex.split(command.strip())
        assert argv[0] == "blitzscale" and parses(argv[1:]), (name, command)
        assert argv[1] == name


def test_the_image_has_what_the_commands_need():
    dockerfile = (ROOT / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (\S+) ", dockerfile, re.M)
    for source in copied:
        assert (ROOT / source).exists(), source
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert 'blitzscale = "blitzscale.cli:main"' in pyproject
    include = re.search(r"^include = \[(.*)\]", pyproject, re.M).group(1)
    packages = [name.strip().strip('"').rstrip("*") for name in include.split(",")]
    assert set(packages) <= set(copied), f"packages the image does not copy: {set(packages) - set(copied)}"


def test_compose_workers_do_not_share_a_cache_and_reach_each_other(compose):
    """Every worker container has its own weight cache (an anonymous volume) and serves its
    weights to the others on the compose network (tasks/runtime/peer_weights.py)."""
    worker = compose["services"]["worker"]
    assert worker["volumes"] == ["/root/.cache/blitzscale"]  # no named volume: one per container
    assert worker["environment"]["WEIGHTS_HOST"] == "auto"
    assert worker["expose"] == [worker["environment"]["WEIGHTS_PORT"]]
    assert "ports" not in worker  # the data plane is not published on the host
