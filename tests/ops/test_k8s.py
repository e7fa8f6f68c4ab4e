"""deploy/k8s/: every manifest valid against the Kubernetes schemas (offline, from the
`kubernetes-validate` package), running commands the CLI parses, with the probes and placement
the fleet needs; the KEDA note's ScaledObject aims at the worker Deployment and every queue (the web's count)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from blitzscale.cli import build_parser
from tasks.control.cluster import START_TIMEOUT_S

kubernetes_validate = pytest.importorskip("kubernetes_validate")

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KUBERNETES_VERSION = "1.30"


def documents() -> list[dict]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text()) if doc]


def resource(kind: str, name: str) -> dict:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def container(kind: str, name: str) -> dict:
    (only,) = resource(kind, name)["spec"]["template"]["spec"]["containers"]
    return only


def probe_window(probe: dict) -> int:
    return probe.get("periodSeconds", 10) * probe.get("failureThreshold", 3)


@pytest.mark.parametrize("doc", documents(), ids=lambda d: f"{d['kind']}/{d['metadata']['name']}")
def test_every_manifest_follows_the_kubernetes_schema(doc):
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)  # raises on any error or unknown field


def test_every_command_is_one_the_cli_parses():
    commands = [c["command"] for d in documents() if d["kind"] in ("Deployment", "DaemonSet")
                for c in d["spec"]["template"]["spec"]["containers"] if c["image"].startswith("blitzscale")]
    probes = [p["exec"]["command"] for d in documents() if d["kind"] in ("Deployment", "DaemonSet")
              for c in d["spec"]["template"]["spec"]["containers"]
              for p in (c.get("startupProbe"), c.get("readinessProbe"), c.get("livenessProbe"))
              if p and "exec" in p and p["exec"]["command"][0] == "blitzscale"]
    assert len(commands) == 4 and len(probes) == 6
    for argv in commands + probes:
        assert argv[0] == "blitzscale"
        build_parser().parse_args(argv[1:])  # SystemExit on anything it does not know


def test_services_select_their_pods_and_redis_is_where_the_settings_say():
    for service in (d for d in documents() if d["kind"] == "Service"):
        deployment = resource("Deployment", service["metadata"]["name"])
        assert service["spec"]["selector"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    port = resource("Service", "blitzscale-redis")["spec"]["ports"][0]["port"]
    assert "REDIS_URL" not in resource("ConfigMap", "blitzscale-settings")["data"]  # it holds the password
    for c in blitzscale_containers():
        assert {"configMapRef": {"name": "blitzscale-settings"}} in c["envFrom"]
        assert {"secretRef": {"name": "blitzscale-secrets"}} in c["envFrom"]
        env = {e["name"]: e for e in c["env"]}
        assert env["REDIS_URL"]["value"] == f"redis://:$(REDIS_PASSWORD)@blitzscale-redis:{port}/0"


def blitzscale_containers() -> list[dict]:
    return [c for doc in documents() for c in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
            if c["image"].startswith("blitzscale")]


def test_redis_requires_the_password_from_the_secret():
    secret = resource("Secret", "blitzscale-secrets")
    assert {"REDIS_PASSWORD", "WEIGHTS_SECRET", "ADMIN_API_KEY"} <= set(secret["stringData"])
    redis_container = container("Deployment", "blitzscale-redis")
    assert redis_container["command"] == ["redis-server", "--requirepass", "$(REDIS_PASSWORD)"]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in redis_container["env"]}
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"] == {"name": "blitzscale-secrets", "key": "REDIS_PASSWORD"}
    assert len(blitzscale_containers()) == 4  # web, worker, agent, autoscaler: each has it (test above)


def _pods_selected(selector: dict, labels: dict) -> bool:
    """A label selector (matchLabels and In expressions) against a pod's labels."""
    if not selector.get("matchLabels", {}).items() <= labels.items():
        return False
    return all(labels.get(e["key"]) in e["values"] for e in selector.get("matchExpressions", []) if e["operator"] == "In")


def pod_labels() -> dict[str, dict]:
    return {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in documents()
            if d["kind"] in ("Deployment", "DaemonSet")}


def test_network_policies_let_only_blitzscale_reach_redis_and_the_data_plane():
    pods = pod_labels()
    policies = {d["metadata"]["name"]: d["spec"] for d in documents() if d["kind"] == "NetworkPolicy"}
    guarded = {"blitzscale-redis": {"blitzscale-redis"}, "blitzscale-weights": {"blitzscale-worker", "blitzscale-agent"}}
    allowed = {"blitzscale-redis": {"blitzscale-web", "blitzscale-worker", "blitzscale-agent", "blitzscale-autoscaler"},
               "blitzscale-weights": {"blitzscale-worker", "blitzscale-agent"}}
    for name, spec in policies.items():
        assert spec["policyTypes"] == ["Ingress"]
        assert {pod for pod, labels in pods.items() if _pods_selected(spec["podSelector"], labels)} == guarded[name]
        (rule,) = spec["ingress"]
        sources = {pod for pod, labels in pods.items() for peer in rule["from"]
                   if _pods_selected(peer["podSelector"], labels)}
        assert sources == allowed[name] and all(set(peer) == {"podSelector"} for peer in rule["from"])
    assert set(policies) == set(guarded)
    assert policies["blitzscale-redis"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 6379}]
    assert not any(_pods_selected(p["podSelector"], pods["blitzscale-web"]) for p in policies.values())  # web open


def test_the_web_is_ready_when_a_replica_serves():
    web = container("Deployment", "blitzscale-web")
    assert web["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert web["ports"] == [{"name": "http", "containerPort": 3000}] and "--port" in web["command"]
    assert "livenessProbe" in web and "startupProbe" in web


def test_an_agent_on_every_gpu_node_names_its_host_and_keeps_its_cache():
    daemonset = resource("DaemonSet", "blitzscale-agent")
    spec = daemonset["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    agent = container("DaemonSet", "blitzscale-agent")
    assert agent["command"][:2] == ["blitzscale", "agent"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["HOST_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["WEIGHTS_HOST"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["NVIDIA_VISIBLE_DEVICES"]["value"] == "all"
    (volume,) = spec["volumes"]
    assert volume["hostPath"]["path"] and agent["volumeMounts"][0]["mountPath"] == "/root/.cache/blitzscale"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert agent[kind]["exec"]["command"] == ["blitzscale", "probe", "agent"]


def test_a_worker_pod_has_the_time_of_the_longest_weight_load_to_start():
    worker = container("Deployment", "blitzscale-worker")
    assert worker["resources"]["limits"] == {"nvidia.com/gpu": 1}
    assert probe_window(worker["startupProbe"]) >= START_TIMEOUT_S  # the control plane's own bound on a start
    assert worker["startupProbe"]["exec"]["command"][-1] == "--ready"
    assert worker["livenessProbe"]["exec"]["command"] == ["blitzscale", "probe", "replica"]


def test_the_keda_note_scales_the_workers_on_every_queue():
    blocks = re.findall(r"```yaml\n(.*?)```", (K8S / "README.md").read_text(), re.S)
    (scaled,) = [yaml.safe_load(b) for b in blocks if "ScaledObject" in b]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == resource("Deployment", "blitzscale-worker")["metadata"]["name"]
    (trigger,) = scaled["spec"]["triggers"]
    # The web's count of the shared queue and the replicas' own ones, not one Redis list.
    assert trigger["type"] == "metrics-api" and trigger["metadata"]["valueLocation"] == "queue_size"
    web = resource("Service", "blitzscale-web")
    assert trigger["metadata"]["url"] == f"http://{web['metadata']['name']}:{web['spec']['ports'][0]['port']}" \
        "/cluster_state?celery=false"
