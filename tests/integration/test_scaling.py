"""Live replica scaling through HTTP, checked in Celery's own view (`inspect active_queues`) and
in /cluster_state: up (new process, standby → active), down (drain → standby, or → stopped),
errors, a replica killed with SIGKILL, and a drain that keeps a running stream alive."""
from __future__ import annotations

import json
import os
import signal
import time

import pytest
import requests

from common.keys import replica_queue
from tests.scaling_service import ScalingService

ENV = {"MANUALLY_SCALE": "true", "MAX_REPLICAS": "3", "HEARTBEAT_TTL": "2",
       "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024"}


def _service(tiny_model_dir, tmp_path_factory, name, replicas=1, **env):
    workdir = tmp_path_factory.mktemp(name)
    return ScalingService(str(tiny_model_dir), workdir, replicas=replicas,
                          env={"XDG_CACHE_HOME": str(workdir / "cache"), **ENV, **env})


@pytest.fixture(scope="module")
def cluster(tiny_model_dir, tmp_path_factory):
    svc = _service(tiny_model_dir, tmp_path_factory, "scaling")
    try:
        yield svc.start()
    finally:
        svc.stop()


def celery_queues(svc) -> dict[str, list[str]]:
    """Celery's own view: which worker consumes which shared queue (every replica also consumes
    its own, always: checked here, then left out)."""
    replies = svc.celery().control.inspect(timeout=1.0).active_queues() or {}
    return {name: shared_queues(name, [q["name"] for q in queues]) for name, queues in replies.items()}


def shared_queues(name: str, queues: list[str]) -> list[str]:
    assert replica_queue(name) in queues, (name, queues)
    return [q for q in queues if q != replica_queue(name)]


def assert_agrees_with_celery(svc) -> None:
    state = svc.cluster()
    celery = celery_queues(svc)
    for replica in state["replicas"]:
        if replica["state"] in ("active", "standby"):
            expected = ["generation"] if replica["state"] == "active" else []
            assert celery[replica["name"]] == expected, (replica, celery)
            assert shared_queues(replica["name"], replica["celery"]["queues"]) == expected
            assert replica["celery"]["pid"] == replica["pid"]
        elif replica["state"] in ("dead", "stopped"):
            assert replica["name"] not in celery or replica["pid"] != replica.get("celery", {}).get("pid")


def test_up_down_and_up_again(cluster):
    assert cluster.slot(0)["state"] == "active"
    assert celery_queues(cluster) == {"replica0@" + cluster.slot(0)["host"]: ["generation"]}

    response = cluster.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=[1])  # a new process
    assert response.status_code == 200 and response.content == b""
    replica = cluster.wait_state(1, "active", timeout=60)
    assert replica["weight_source"] == "directory" and replica["load_seconds"] > 0
    assert replica["device"] == "cpu:0" and replica["torch_device"] == "cpu"  # the agent's first place
    assert replica["kv_slots"] >= 1 and replica["cuda_graphs"] == 0  # no graphs on CPU
    assert celery_queues(cluster)[replica["name"]] == ["generation"]
    assert_agrees_with_celery(cluster)

    assert cluster.modify("TriggerNoramalDown", stub_indices=[1]).status_code == 200  # BlitzScale's spelling
    cluster.wait_state(1, "standby", timeout=10)
    assert celery_queues(cluster)[replica["name"]] == []
    assert_agrees_with_celery(cluster)

    started = time.monotonic()
    assert cluster.modify("TriggerDecodeUp", old_stub_indices=[0], new_stub_indices=[1]).status_code == 200
    cluster.wait_state(1, "active", timeout=10)
    assert time.monotonic() - started < 2.0  # standby → active: one add_consumer
    assert cluster.slot(1)["pid"] == replica["pid"]  # the same process, re-attached
    assert_agrees_with_celery(cluster)
    metrics = requests.get(f"{cluster.base_url}/metrics").text
    assert 'blitz_scale_up_times_total{path="standby",trigger="manual"} 1.0' in metrics
    assert f'blitz_replica_slots{{host="{replica["host"]}",state="active"}} 2.0' in metrics


@pytest.mark.parametrize("body,status,words", [
    ({"type": "TriggerNormalUp", "data": {"old_stub_indices": [0], "new_stub_indices": [7]}}, 400, "unknown stub"),
    ({"type": "TriggerNormalUp", "data": {"old_stub_indices": [2], "new_stub_indices": [2]}}, 400, "not a live"),
    ({"type": "TriggerNormalDown", "data": {"stub_indices": [2]}}, 400, "no running replica"),
    ({"type": "TriggerScaleDown", "data": {"stub_indices": [0, 0]}}, 400, "twice"),
    ({"type": "TriggerMutation", "data": {"stub_indices": [0]}}, 400, "disaggregation"),
    ({"type": "TriggerSideways", "data": {"stub_indices": [0]}}, 422, "type"),
    ({"type": "TriggerNormalDown"}, 422, "data"),
    ({"type": "TriggerNormalDown", "data": {"stub_indices": "one"}}, 422, "stub_indices"),
    ({"type": "TriggerNormalUp", "data": {"new_stub_indices": [1]}}, 422, "old_stub_indices"),
    ({"type": "TriggerNormalDown", "data": {"stub_indices": [-1]}}, 422, "stub_indices"),
])
def test_impossible_commands_are_error_responses(cluster, body, status, words):
    response = requests.post(f"{cluster.base_url}/modify_cluster_state", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert set(error) == {"error", "error_type"} and words in error["error"], error
    assert error["error_type"] == ("scaling" if status == 400 else "validation")


def test_already_in_that_state(cluster):
    cluster.wait_state(0, "active")
    response = cluster.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=[0])
    assert response.status_code == 400 and "already active" in response.json()["error"]


def test_draining_finishes_a_running_stream(cluster):
    """Scale down the only active replica while it streams: the stream completes, in order."""
    for slot in (1, 2):
        if cluster.slot(slot)["state"] == "active":
            assert cluster.modify("TriggerNormalDown", stub_indices=[slot]).status_code == 200
            cluster.wait_state(slot, "standby", timeout=10)
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 600, "details": True, "do_sample": True, "seed": 3,
                                              "temperature": 0.1}}
    with requests.post(f"{cluster.base_url}/generate_stream", json=body, stream=True, timeout=120) as response:
        lines = response.iter_lines()
        events = []
        for line in lines:
            if line.startswith(b"data:"):
                events.append(json.loads(line[5:]))
                if len(events) == 3:
                    break
        assert cluster.modify("TriggerNormalDown", stub_indices=[0]).status_code == 200
        draining = cluster.wait_for(lambda: cluster.slot(0)["state"] in ("draining", "standby") and cluster.slot(0),
                                    timeout=5, what="slot 0 draining")
        events += [json.loads(line[5:]) for line in lines if line.startswith(b"data:")]
    assert draining["state"] == "draining" or events[-1]["details"]["generated_tokens"] < 10, draining
    last = events[-1]
    assert "error" not in last and last["details"]["finish_reason"] in ("length", "eos_token"), last
    assert [e["index"] for e in events] == list(range(1, len(events) + 1))
    cluster.wait_state(0, "standby", timeout=10)
    assert requests.get(f"{cluster.base_url}/health").status_code == 503  # nobody consumes now
    assert cluster.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=[0]).status_code == 200
    cluster.wait_state(0, "active", timeout=10)
    assert requests.get(f"{cluster.base_url}/health").status_code == 200
    assert_agrees_with_celery(cluster)


def test_a_killed_replica_is_seen_dead(cluster):
    if cluster.slot(1)["state"] != "active":
        assert cluster.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=[1]).status_code == 200
        cluster.wait_state(1, "active", timeout=60)
    os.kill(cluster.slot(1)["pid"], signal.SIGKILL)
    cluster.wait_state(1, "dead", timeout=15)
    assert not cluster.slot(1, celery=True)["celery"]["responding"]
    assert requests.get(f"{cluster.base_url}/health").status_code == 200  # slot 0 still serves

    cluster.kill_replica(0)  # the service's own replica process, SIGKILL
    cluster.wait_state(0, "dead", timeout=15)
    cluster.wait_for(lambda: requests.get(f"{cluster.base_url}/health").status_code == 503, 10, "/health 503")
    assert cluster.cluster()["counts"]["dead"] == 2

    # A dead slot comes back as a new process (started by the host agent).
    assert cluster.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=[0]).status_code == 200
    cluster.wait_state(0, "active", timeout=60)
    cluster.wait_for(lambda: requests.get(f"{cluster.base_url}/health").status_code == 200, 10, "/health 200")
    generated = requests.post(f"{cluster.base_url}/generate", json={"inputs": "Hi", "parameters": {"max_new_tokens": 3}})
    assert generated.status_code == 200


def test_scale_down_to_stopped(tiny_model_dir, tmp_path_factory):
    """With `--down-target stop`, a drained replica gets Celery's shutdown and its slot is `stopped`;
    a worker started with `--slot auto` claims the lowest free slot."""
    svc = _service(tiny_model_dir, tmp_path_factory, "scaling-stop", replicas=2, DOWN_TARGET="stop")
    try:
        svc.start()
        svc.wait_state(1, "active", timeout=60)
        process = svc.replicas[1]
        assert svc.modify("TriggerScaleDown", stub_indices=[1]).status_code == 200
        stopped = svc.wait_state(1, "stopped", timeout=20)
        assert process.wait(20) == 0  # a clean exit
        assert stopped["name"] not in celery_queues(svc)
        assert svc.modify("TriggerScaleDown", stub_indices=[1]).status_code == 400

        svc.replicas[9] = svc._spawn("replica-auto", ["worker", "--slot", "auto"])
        auto = svc.wait_state(1, "active", timeout=60)
        assert auto["name"].startswith("replica1@") and auto["pid"] == svc.replicas[9].pid
    finally:
        svc.stop()
