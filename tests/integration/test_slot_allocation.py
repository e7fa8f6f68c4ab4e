"""Slots allocated cluster-wide, through the real service: two hosts' agents (real processes,
`blitzscale agent --standby-replicas 1` each, started together) start their replicas in two
distinct slots (not both in slot 0), and /cluster_state shows both, beside replica 0 of h0."""
from __future__ import annotations

import pytest

from tests.fleet_service import FleetService

ENV = {"MANUALLY_SCALE": "true", "STANDBY_REPLICAS": "1", "HEARTBEAT_TTL": "2", "MAX_BATCH_SIZE": "2",
       "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024"}
HOSTS = {"h1": ("cpu", "127.0.0.2"), "h2": ("cpu", "127.0.0.3")}


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("slots")
    svc = FleetService(tiny_model_dir, workdir, HOSTS, env={**ENV, "XDG_CACHE_HOME": str(workdir / "home")})
    try:
        yield svc.start()
    finally:
        svc.stop()


def test_two_agents_with_a_standby_replica_each_take_two_distinct_slots(fleet):
    def standby() -> dict[int, dict]:
        return {r["slot"]: r for r in fleet.cluster(False)["replicas"] if r["state"] == "standby"}

    replicas = fleet.wait_for(lambda: len(s := standby()) == 2 and s, timeout=120, what="two standby replicas")
    assert sorted(replicas) == [1, 2]  # slot 0 is h0's replica
    assert {r["host"] for r in replicas.values()} == {"h1", "h2"}
    assert {r["name"] for r in replicas.values()} == {f"replica{s}@{r['host']}" for s, r in replicas.items()}
    assert {r["slot"]: r["state"] for r in fleet.cluster(False)["replicas"]} == {0: "active", 1: "standby",
                                                                               2: "standby"}
    assert {h: set(fleet.places(h).values()) for h in HOSTS} == {"h1": {replicas_on(replicas, "h1")},
                                                                 "h2": {replicas_on(replicas, "h2")}}


def replicas_on(replicas: dict[int, dict], host: str) -> int:
    return next(s for s, r in replicas.items() if r["host"] == host)
