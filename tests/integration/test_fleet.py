"""A fleet of hosts on one machine (tests/fleet_service.py): h1 with two CPU places and h2 with
one, each its own agent, host cache and data-plane address; replica 0 on h0 (no agent) holds the
model. Real Redis, Celery workers, agents, web and autoscaler, on the tiny model. The tests run
in order on one fleet: placement by cache, a copy chain across hosts, three places and a 400,
then a host lost under load."""
from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from tasks.weights.sources import read_transfers
from tests.fleet_service import FleetService
from tests.integration.sse import sse_events

ENV = {"MANUALLY_SCALE": "true", "MAX_REPLICAS": "5", "DOWN_TARGET": "stop", "HEARTBEAT_TTL": "2",
       "MAX_BATCH_SIZE": "2", "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024", "REPLICA_CHECK_INTERVAL": "0.5",
       "WEIGHTS_CHUNK_SIZE": str(32 << 10)}  # the tiny model is ~540 kB: 17 chunks
HOSTS = {"h1": ("cpu,cpu", "127.0.0.2"), "h2": ("cpu", "127.0.0.3")}


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("fleet")
    svc = FleetService(tiny_model_dir, workdir, HOSTS, env={**ENV, "XDG_CACHE_HOME": str(workdir / "home")})
    shutil.copytree(tiny_model_dir, svc.cache_entry("h2"))  # only h2's host cache holds the model
    try:
        yield svc.start()
    finally:
        svc.stop()


def environment(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def assert_exactly_its_device(replica: dict) -> None:
    """The process the agent started sees its one place and nothing else."""
    env = environment(replica["pid"])
    assert (env["DEVICE"], env["DEVICE_NAME"], env["CUDA_VISIBLE_DEVICES"]) == ("cpu", replica["device"], "")
    assert env["HOST_NAME"] == replica["host"] and "DEVICES" not in env


def placements(fleet) -> list[tuple]:
    plan = fleet.cluster(False)["placement"]["placements"]
    return [(p["slot"], p["host"], p["device"], p["weights"], p["fetch_from"]) for p in plan]


def test_agents_advertise_their_places_caches_and_data_planes(fleet):
    hosts = fleet.wait_for(lambda: (hs := {h["host"]: h for h in fleet.cluster(False)["hosts"]}) and all(
        h["model_sha"] for h in hs.values()) and hs, timeout=20, what="the agents' model")
    assert fleet.places("h1") == {"cpu:0": None, "cpu:1": None} and fleet.places("h2") == {"cpu:0": None}
    assert hosts["h2"]["models"] == [fleet.sha[:24]] and hosts["h1"]["models"] == []
    assert (hosts["h1"]["weights_host"], hosts["h2"]["weights_host"]) == ("127.0.0.2", "127.0.0.3")
    assert hosts["h1"]["model_sha"] == fleet.sha
    assert all(p["memory_total"] > 0 and p["label"] == "cpu" for h in hosts.values() for p in h["places"])


def test_the_first_replica_goes_to_the_host_whose_cache_holds_the_model(fleet):
    assert fleet.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=[1]).status_code == 200
    assert placements(fleet) == [(1, "h2", "cpu:0", "host-cache", [])]
    replica = fleet.wait_state(1, "active", timeout=90)
    assert (replica["name"], replica["host"], replica["device"]) == ("replica1@h2", "h2", "cpu:0")
    assert (replica["torch_device"], replica["weight_source"]) == ("cpu", "host-cache")
    assert_exactly_its_device(replica)
    assert fleet.places("h2") == {"cpu:0": 1}
    metrics = requests.get(f"{fleet.base_url}/metrics").text
    assert 'blitz_replica_slots{host="h2",state="active"} 1.0' in metrics
    assert 'blitz_replica_slots{host="h0",state="active"} 1.0' in metrics
    fleet.stop_slots(1)


def test_two_new_replicas_on_empty_hosts_copy_once_along_a_chain(fleet):
    fleet.empty_cache("h2")
    assert fleet.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=[1, 2]).status_code == 200
    assert placements(fleet) == [(1, "h1", "cpu:0", "peer", [0]), (2, "h2", "cpu:0", "peer", [1, 0])]
    first, second = fleet.wait_state(1, "active", timeout=90), fleet.wait_state(2, "active", timeout=90)
    assert (first["weight_source"], second["weight_source"]) == ("peer", "peer")
    total = first["transfer"]["total"]
    assert first["transfer"]["sources"] == {"replica0@h0": total}
    assert second["transfer"]["sources"] == {"replica1@h1": total}  # from its predecessor, not the source
    sent = read_transfers(redis.Redis.from_url(fleet.redis.url))
    assert int(sent["bytes:replica0@h0"]) == total and int(sent["bytes:replica1@h1"]) == total  # the source: once
    assert first["weights"]["addr"].startswith("http://127.0.0.2:") and second["weights"]["addr"].startswith(
        "http://127.0.0.3:")
    fleet.stop_slots(1, 2)


def test_three_replicas_take_three_places_and_a_fourth_is_refused(fleet):
    assert fleet.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=[1, 2, 3]).status_code == 200
    replicas = [fleet.wait_state(slot, "active", timeout=90) for slot in (1, 2, 3)]
    assert {(r["host"], r["device"]) for r in replicas} == {("h1", "cpu:0"), ("h1", "cpu:1"), ("h2", "cpu:0")}
    for replica in replicas:
        assert replica["weight_source"] == "host-cache"  # both hosts' caches hold the model now
        assert_exactly_its_device(replica)
    before = fleet.cluster(False)

    response = fleet.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=[4])
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["error_type"] == "scaling" and "no free device" in error["error"]
    assert "0 free, 3 in use" in error["error"], error
    after = fleet.cluster(False)
    assert 4 not in [r["slot"] for r in after["replicas"]] and after["placement"] == before["placement"]
    assert [h["places"] for h in after["hosts"]] == [h["places"] for h in before["hosts"]]
    assert 'blitz_replica_slots{host="h1",state="active"} 2.0' in requests.get(f"{fleet.base_url}/metrics").text


def stream(fleet, n: int) -> list[dict]:
    body = {"inputs": f"Story {n}:", "parameters": {"max_new_tokens": 24, "do_sample": True, "seed": n, "details": True}}
    with requests.post(f"{fleet.base_url}/generate_stream", json=body, stream=True, timeout=120) as response:
        assert response.status_code == 200, response.text
        return sse_events(response)


def in_flight(fleet, slot: int) -> int:
    view = fleet.slot(slot)
    return view.get("running", 0) + view.get("waiting", 0)


def test_a_lost_host_fails_over_and_the_autoscaler_places_its_replacement(fleet):
    fleet.stop_slots(0, 3)  # one replica left on each host: slot 1 on h1, slot 2 on h2
    assert (fleet.slot(1)["host"], fleet.slot(2)["host"]) == ("h1", "h2")
    fleet.start_autoscaler(MANUALLY_SCALE="false", MIN_REPLICAS="2", SCALE_UP_THRESHOLD="100",
                           SCALE_DOWN_THRESHOLD="0")  # it acts only under the minimum
    fleet.wait_for(lambda: (fleet.cluster(False)["autoscaler"] or {}).get("action") == "hold", 20, "the autoscaler")

    fleet.pause_engine()
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream, fleet, n) for n in range(4)]
        fleet.wait_for(lambda: in_flight(fleet, 1) and in_flight(fleet, 2), 20, "requests on both hosts")
        fleet.kill_host("h2")
        fleet.resume_engine()
        results = [s.result() for s in streams]
    for events in results:  # every request completes, in order, without an error
        assert [e["index"] for e in events] == list(range(1, 25)) and "error" not in events[-1]
        assert events[-1]["details"]["finish_reason"] == "length"
    assert fleet.wait_state(2, "dead", timeout=20)

    replacement = fleet.wait_for(lambda: (p := fleet.cluster(False)["placement"])["trigger"] == "autoscaler" and p,
                                 timeout=30, what="the autoscaler's placement")
    (placed,) = replacement["placements"]
    assert (placed["host"], placed["device"]) == ("h1", "cpu:1")
    fleet.wait_state(placed["slot"], "active", timeout=90)
    state = fleet.cluster(False)
    assert state["agents"] == ["h1"] and state["counts"]["active"] == 2
    assert {(r["host"], r["device"]) for r in state["replicas"] if r["state"] == "active"} == {
        ("h1", "cpu:0"), ("h1", "cpu:1")}

    fleet.start_agent("h2")  # the host comes back: its agent announces itself again, its place free
    fleet.wait_for(lambda: fleet.places("h2") == {"cpu:0": None}, 20, "h2 announced again")
    assert fleet.slot(2)["state"] == "dead"
