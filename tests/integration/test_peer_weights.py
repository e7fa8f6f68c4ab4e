"""Weights from a live peer, end to end, on two simulated hosts: host A (the web and the replicas
started by the test, its own host cache, data plane on 127.0.0.1) and host B (a host agent with
an empty host cache of its own, data plane on 127.0.0.2). A scale-up onto B copies the weights
from A's replicas over HTTP; a source killed midway is replaced by another; a receiver killed
midway leaves nothing in B's cache. Real Redis, Celery workers, agent and web."""
from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import requests

from common import model_files
from common.settings import Settings
from tests.scaling_service import ScalingService

CHUNK = 32 << 10  # the tiny model is ~540 kB: 17 chunks
HOST_A = {"WEIGHTS_HOST": "127.0.0.1", "WEIGHTS_MAX_SEND_RATE": "0.12"}  # MB/s: a copy takes ~4 s
HOST_B = {"WEIGHTS_HOST": "127.0.0.2", "WEIGHT_PEERS": "prefer"}  # prefer: the tiny model is a plain directory


class TwoHosts(ScalingService):
    """Replicas started by the test run on host A; the host agent (and every replica the scaling
    command starts) on host B."""

    def __init__(self, model_dir: Path, workdir: Path):
        super().__init__(str(model_dir), workdir, env={
            "MANUALLY_SCALE": "true", "MAX_REPLICAS": "3", "HEARTBEAT_TTL": "2", "WEIGHTS_CHUNK_SIZE": str(CHUNK),
            "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024", "XDG_CACHE_HOME": str(workdir / "home-cache"),
            "WEIGHT_CACHE_DIR": str(workdir / "host-a"), **HOST_A})
        self.host_b_cache = workdir / "host-b"
        settings = Settings(model_id=str(model_dir), weight_cache_dir=str(self.host_b_cache))
        self.entry_b = model_files.cache_entry(settings, model_files.resolve(settings).sha)

    def _spawn(self, name, args, module="blitzscale.cli"):
        if name != "agent":
            return super()._spawn(name, args, module)
        env_a = self.env
        self.env = {**env_a, "WEIGHT_CACHE_DIR": str(self.host_b_cache), **HOST_B}
        try:
            return super()._spawn(name, args, module)
        finally:
            self.env = env_a

    def start_source(self, slot: int) -> dict:
        self.start_replica(slot)
        return self.wait_state(slot, "active", timeout=90)

    def transferring(self, slot: int) -> dict:
        """The slot while it loads, once its copy has received some bytes."""
        return self.wait_for(lambda: (v := self.slot(slot)) and (v.get("transfer") or {}).get("bytes", 0) > 0 and v,
                             timeout=90, what=f"slot {slot} receiving weights", interval=0.05)

    def stop_slot(self, slot: int) -> None:
        view = self.slot(slot)
        self.celery().control.shutdown(destination=[view["name"]])
        self.wait_state(slot, "stopped", timeout=30)

    def empty_host_b(self) -> None:
        shutil.rmtree(self.host_b_cache, ignore_errors=True)


@pytest.fixture(scope="module")
def hosts(tiny_model_dir, tmp_path_factory):
    svc = TwoHosts(tiny_model_dir, tmp_path_factory.mktemp("peer-weights"))
    try:
        yield svc.start()
    finally:
        svc.stop()


def files(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()
            if p.is_file() and not p.name.startswith(".")}


def greedy_tokens(svc, prompt: str = "The capital of France", n: int = 12) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True, "decoder_input_details": False}}
    response = requests.post(f"{svc.base_url}/generate", json=body, timeout=60)
    assert response.status_code == 200, response.text
    return [t["id"] for t in response.json()["details"]["tokens"]]


def only_slot_serves(svc, slot: int, others: list[int]) -> list[int]:
    """Greedy tokens as `slot` alone gives them (the others in standby meanwhile, then back)."""
    for other in others:
        assert svc.modify("TriggerNormalDown", stub_indices=[other]).status_code == 200
        svc.wait_state(other, "standby", timeout=20)
    try:
        return greedy_tokens(svc)
    finally:
        for other in others:
            assert svc.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=[other]).status_code == 200
            svc.wait_state(other, "active", timeout=20)


def test_scale_up_onto_an_empty_host_copies_from_the_peer(hosts, tiny_model_dir, tiny_reference):
    source = hosts.slot(0)
    assert source["weights"]["state"] == "complete" and source["weights"]["addr"].startswith("http://127.0.0.1:")
    expected = greedy_tokens(hosts)
    assert expected == tiny_reference("The capital of France", 12)[:len(expected)]

    posted = time.monotonic()
    assert hosts.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=[1]).status_code == 200
    assert time.monotonic() - posted < 5  # the command answers at once; the copy runs in the new replica
    loading = hosts.transferring(1)
    assert loading["state"] == "loading" and loading["transfer"]["source"] == source["name"]
    assert 0 < loading["transfer"]["bytes"] <= loading["transfer"]["total"] and loading["transfer"]["mbps"] >= 0

    replica = hosts.wait_state(1, "active", timeout=90)
    assert replica["weight_source"] == "peer" and replica["weights"]["addr"].startswith("http://127.0.0.2:")
    assert replica["transfer"]["state"] == "done" and replica["transfer"]["sources"] == {
        source["name"]: replica["transfer"]["total"]}
    assert model_files.entry_complete(hosts.entry_b) and files(hosts.entry_b) == files(tiny_model_dir)
    assert only_slot_serves(hosts, 1, others=[0]) == expected

    metrics = requests.get(f"{hosts.base_url}/metrics").text
    total = replica["transfer"]["total"]
    assert f'blitz_weight_transfer_bytes_total{{source="{source["name"]}"}} {float(total)}' in metrics
    assert "blitz_weight_transfer_duration_seconds_count 1.0" in metrics


def test_a_source_killed_midway_is_replaced_by_another_peer(hosts, tiny_model_dir, tiny_reference):
    hosts.stop_slot(1)
    hosts.empty_host_b()
    spare = hosts.start_source(2)  # a second replica on host A holding the model
    assert hosts.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=[1]).status_code == 200
    killed = hosts.transferring(1)["transfer"]["source"]
    assert killed == hosts.slot(0)["name"]
    hosts.kill_replica(0)  # SIGKILL, mid-transfer

    replica = hosts.wait_state(1, "active", timeout=90)
    transfer = replica["transfer"]
    assert replica["weight_source"] == "peer" and transfer["failed_sources"] == [killed]
    assert set(transfer["sources"]) == {killed, spare["name"]} and sum(transfer["sources"].values()) == transfer["total"]
    assert files(hosts.entry_b) == files(tiny_model_dir)
    served = only_slot_serves(hosts, 1, others=[2])
    assert served == tiny_reference("The capital of France", 12)[:len(served)]


def test_a_receiver_killed_midway_leaves_nothing_in_the_cache(hosts, tiny_model_dir):
    hosts.stop_slot(1)
    hosts.empty_host_b()
    assert hosts.modify("TriggerNormalUp", old_stub_indices=[2], new_stub_indices=[1]).status_code == 200
    receiver = hosts.transferring(1)
    os.kill(receiver["pid"], signal.SIGKILL)
    hosts.wait_state(1, "dead", timeout=20)
    assert not hosts.entry_b.exists()  # a partial copy never becomes a cache entry
    deadline = time.monotonic() + 20  # its staging directory, its writer dead, is swept by host B's agent
    while list(hosts.host_b_cache.glob("models/*.staging-*")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list(hosts.host_b_cache.glob("models/*.staging-*")) and not hosts.entry_b.exists()

    assert hosts.modify("TriggerNormalUp", old_stub_indices=[2], new_stub_indices=[1]).status_code == 200
    replica = hosts.wait_state(1, "active", timeout=90)
    assert replica["weight_source"] == "peer" and files(hosts.entry_b) == files(tiny_model_dir)
    assert not list(hosts.host_b_cache.glob("models/*.staging-*"))
