"""Faults on the testbed's real network stacks (bench.testbed): a host's link goes down in the
middle of generation — nothing is lost, the autoscaler places the replacement on another host —
and comes back (a partition that heals): the host's agent and replica rejoin without a second
replica in any slot. Engines run through tests.integration.gated_worker: the test holds them
while it cuts the link, instead of guessing how fast this machine generates."""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from bench.testbed import fleet
from bench.testbed.netns import NetnsUnavailable, check_permitted, ip
from tests.integration.sse import sse_events

try:
    check_permitted()
except NetnsUnavailable as reason:
    pytestmark = pytest.mark.skip(reason=str(reason))

TOKENS = 24


@pytest.fixture
def testbed(tiny_model_dir, tmp_path):
    gate = tmp_path / "engine-gate"
    bed = fleet.Testbed(3, "1gbit", tiny_model_dir, replicas={"h0": 1, "h1": 1}, agent_module="tests.integration.gated_agent",
                        env={"ENGINE_GATE": str(gate), "HEARTBEAT_TTL": "2", "MAX_BATCH_SIZE": "2",
                             "REPLICA_CHECK_INTERVAL": "0.5", "MAX_INPUT_TOKENS": "256", "MAX_TOTAL_TOKENS": "512"})
    bed.gate = gate
    try:
        yield bed.up()
    finally:
        gate.unlink(missing_ok=True)  # a held engine would hold its replica's shutdown
        bed.down()
    assert bed.left_behind() == []


def stream(testbed, n: int) -> list[dict]:
    body = {"inputs": f"Story {n}:", "parameters": {"max_new_tokens": TOKENS, "do_sample": True, "seed": n, "details": True}}
    with requests.post(f"{testbed.base_url}/generate_stream", json=body, stream=True, timeout=180) as response:
        assert response.status_code == 200, response.text
        return sse_events(response)


def by_host(testbed) -> dict[str, dict]:
    return {r["host"]: r for r in testbed.cluster()["replicas"] if r["state"] == "active"}


def test_a_host_cut_off_mid_generation_loses_nothing_and_rejoins_without_duplicates(testbed):
    testbed.spawn("autoscaler", ["autoscaler"], MANUALLY_SCALE="false", MIN_REPLICAS="2", MAX_REPLICAS="3",
                  SCALE_UP_THRESHOLD="100", SCALE_DOWN_THRESHOLD="0")  # it acts only under the minimum
    testbed.wait(lambda: (testbed.cluster().get("autoscaler") or {}).get("action") == "hold", "the autoscaler", 30)
    h1 = testbed.hosts[1]
    lost = by_host(testbed)["h1"]

    testbed.gate.touch()
    with ThreadPoolExecutor(4) as pool:
        streams = [pool.submit(stream, testbed, n) for n in range(4)]
        testbed.wait(lambda: all(r["running"] + r["waiting"] for r in by_host(testbed).values()), "requests on both hosts", 30)
        testbed.network.link(h1, up=False)  # the cable pulled, mid-generation
        testbed.gate.unlink()
        results = [s.result() for s in streams]
    for events in results:  # every request completes, in order, once, without an error
        assert [e["index"] for e in events] == list(range(1, TOKENS + 1)) and "error" not in events[-1]
        assert events[-1]["details"]["finish_reason"] == "length"

    # the replacement goes to h2: h1 is out of reach (its agent's record expired)
    replaced = testbed.wait(lambda: (p := testbed.cluster()["placement"]) and p.get("trigger") == "autoscaler" and p,
                            "the autoscaler's placement", 60)
    assert [p["host"] for p in replaced["placements"]] == ["h2"]
    testbed.wait(lambda: set(by_host(testbed)) == {"h0", "h2"}, "h0 and h2 serving", 90)
    assert "h1" not in testbed.cluster()["agents"]
    assert str(lost["pid"]) in ip("netns", "pids", h1.namespace).stdout.split()  # alive, only unreachable

    testbed.network.link(h1, up=True)  # the partition heals
    testbed.wait(lambda: "h1" in testbed.cluster()["agents"], "h1's agent back", 30)

    def settled():
        state = testbed.cluster()
        live = [r for r in state["replicas"] if r["state"] in ("loading", "active", "draining", "standby")]
        return len(live) == 2 and str(lost["pid"]) not in ip("netns", "pids", h1.namespace).stdout.split() and state
    state = testbed.wait(settled, "the returning replica gone, two serving", 60)
    live = [r for r in state["replicas"] if r["state"] == "active"]
    assert sorted(r["host"] for r in live) == ["h0", "h2"]
    assert max(Counter(r["slot"] for r in state["replicas"]).values()) == 1  # one replica per slot
    def h1_free():  # its agent notices its replica gone within a renewal of its record
        return all(p["slot"] is None for h in testbed.cluster()["hosts"] if h["host"] == "h1" for p in h["places"])
    testbed.wait(h1_free, "h1's place free again", 20)
    answer = requests.post(f"{testbed.base_url}/generate", json={"inputs": "after", "parameters": {"max_new_tokens": 4}},
                           timeout=60)
    assert answer.status_code == 200 and answer.json()["generated_text"]
