"""The host agent, with real processes and a real Redis: it advertises its places, starts each
replica on one place with exactly that device in its environment, registers the slot, never
doubles a slot or a place, ignores stale commands, and a restarted agent keeps (and never
signals) the replicas it did not start."""
from __future__ import annotations

import json
import os
import sys
import time

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.fleet import AgentRecord, StartCommand
from common.keys import SLOTS_KEY, agent_commands_key, agent_key, replica_key
from common.settings import Settings
from tasks.control import agent as agent_module
from tasks.control.agent import HostAgent
from tasks.weights.host_cache import Pin, keep_copy, pin_path

SLEEPER = [sys.executable, "-c", "import time; time.sleep(30)"]


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def make_agent(redis_url, monkeypatch, tmp_path):
    monkeypatch.setattr(agent_module, "worker_argv", lambda slot, standby=False: SLEEPER)
    monkeypatch.setattr(agent_module, "EXIT_WAIT_S", 0.2)
    redis.Redis.from_url(redis_url).flushall()
    agents = []

    def make(devices: str = "cpu,cpu", host_cache_bytes: int = 0, **kwargs) -> HostAgent:
        settings = Settings(redis_url=redis_url, devices=devices, weight_cache_dir=str(tmp_path / "cache"),
                            weights_host="127.0.0.5", model_id=str(tmp_path / "no-model"),
                            host_cache_bytes=host_cache_bytes)
        agents.append(HostAgent(settings, host="test-host", env={"PATH": os.environ["PATH"], "DEVICES": "x"}, **kwargs))
        return agents[-1]

    yield make
    for agent in agents:
        agent.stop(grace=2)


def environment(pid: int) -> dict[str, str]:
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def wait_for(predicate, timeout: float = 5.0):
    deadline = time.monotonic() + timeout
    while not (value := predicate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return value


def test_each_replica_gets_one_place_and_exactly_that_device(make_agent):
    agent = make_agent()
    first, second = agent.start_replica(1), agent.start_replica(2)
    assert agent.devices == {1: "cpu:0", 2: "cpu:1"}
    for process, place in ((first, "cpu:0"), (second, "cpu:1")):
        # /proc/<pid>/environ was seen once without the child's own variables on a loaded machine:
        # read it until the child's environment is there (bounded), then check every variable
        env = wait_for(lambda: (e := environment(process.pid)) and "DEVICE" in e and e) or environment(process.pid)
        assert (env["DEVICE"], env["DEVICE_NAME"], env["CUDA_VISIBLE_DEVICES"]) == ("cpu", place, "")
        assert env["HOST_NAME"] == "test-host" and "DEVICES" not in env  # its place, not the host's list
    entry = json.loads(agent.redis.hget(SLOTS_KEY, "2"))
    assert (entry["state"], entry["by"], entry["host"], entry["device"]) == ("loading", "agent", "test-host", "cpu:1")
    assert agent.start_replica(3) is None  # no place left
    assert json.loads(agent.redis.hget(SLOTS_KEY, "3"))["state"] == "dead"


def test_a_slot_with_a_live_process_is_not_started_twice(make_agent):
    agent = make_agent()
    first = agent.start_replica(0)
    assert agent.start_replica(0) is None  # still running after EXIT_WAIT_S: left alone
    assert first.poll() is None and agent.children[0] is first and agent.held() == {"cpu:0": 0}


def test_the_record_says_what_the_host_has(make_agent, tmp_path):
    entry = tmp_path / "cache" / "models" / ("ab" * 12)
    entry.mkdir(parents=True)
    (entry / "model.safetensors").write_bytes(b"weights")
    (tmp_path / "cache" / "models" / ("cd" * 12 + ".staging-1")).mkdir()  # not a complete entry
    agent = make_agent("cpu:0,cpu:3")
    agent.start_replica(5, device="cpu:3")
    agent.announce()
    record = AgentRecord.from_json(agent.redis.get(agent_key("test-host")))
    assert [(p.name, p.slot) for p in record.places] == [("cpu:0", None), ("cpu:3", 5)]
    assert record.places[0].memory_total > 0 and record.places[0].label == "cpu"
    assert record.models == ("ab" * 12,) and record.holds_model("ab" * 32) and not record.holds_model("cd" * 32)
    assert record.weights_host == "127.0.0.5" and record.pid == os.getpid()
    assert 0 < agent.redis.ttl(agent_key("test-host")) <= agent_module.PRESENCE_TTL_S


def test_the_agent_serves_its_cache_and_only_later_hosts_evict_shared_copies_first(make_agent, tmp_path):
    """Its record advertises its cache's data plane and models; a model that hosts `a-host` and
    `z-host` also cache counts as duplicated here only through `a-host` (named before us): `z-host`
    evicts it first, we do not, so the cluster never drops both copies at once."""
    source = tmp_path / "source"
    source.mkdir()
    (source / "model.safetensors").write_bytes(b"weights")
    keep_copy(source, tmp_path / "cache" / "models" / ("ef" * 12), "ef" * 32, 4096, "xxh3_128")
    agent = make_agent()
    agent.cache.start()
    try:
        agent.cache.refresh()
        agent.announce()
        record = AgentRecord.from_json(agent.redis.get(agent_key("test-host")))
        assert record.cache_shas == ("ef" * 32,) and record.serves_model("ef" * 32)
        assert record.cache_addr.startswith("http://127.0.0.5:") and record.cache_bytes > len(b"weights")
        for host, shas in (("a-host", ("11" * 32,)), ("z-host", ("22" * 32,))):
            agent.redis.set(agent_key(host), AgentRecord(host, cache_addr="http://x", cache_shas=shas).to_json())
        assert agent._cached_elsewhere() == {"11" * 32}
    finally:
        agent.cache.stop()


def test_a_running_agent_keeps_its_cache_within_the_bound_sparing_what_a_replica_maps(make_agent, tmp_path):
    """The agent's own loop (started, not driven by the test): of three 100 kB entries under a
    250 kB bound, the oldest unmapped one goes; the oldest, mapped by a replica (its pin), stays."""
    now = time.time()
    entries = {}
    for index, age in ((1, 300), (2, 200), (3, 100)):
        source = tmp_path / f"source-{index}"
        source.mkdir()
        (source / "model.safetensors").write_bytes(os.urandom(100_000))
        entries[index] = tmp_path / "cache" / "models" / (f"{index:02d}" * 12)
        keep_copy(source, entries[index], f"{index:02d}" * 32, 4096, "xxh3_128")
        os.utime(pin_path(entries[index]), (now - age, now - age))
    mapped = Pin(entries[1])
    os.utime(pin_path(entries[1]), (now - 300, now - 300))
    try:
        agent = make_agent(host_cache_bytes=250_000).start()
        assert wait_for(lambda: not entries[2].exists(), timeout=10)
        assert entries[1].exists() and entries[3].exists()
        assert wait_for(lambda: AgentRecord.from_json(agent.redis.get(agent_key("test-host"))).cache_shas == (
            "01" * 32, "03" * 32))
    finally:
        mapped.release()


def test_commands_start_on_the_place_asked_and_stale_ones_are_ignored(make_agent):
    agent = make_agent().start()
    assert wait_for(lambda: agent.redis.exists(agent_key("test-host")))
    placed = {"slot": 2, "host": "test-host", "device": "cpu:1", "state": "loading", "by": "control"}
    agent.redis.hset(SLOTS_KEY, "2", json.dumps(placed))
    agent.redis.hset(SLOTS_KEY, "3", json.dumps({**placed, "slot": 3, "host": "elsewhere"}))
    agent.redis.rpush(agent_commands_key("test-host"), StartCommand(3, "cpu:0").to_json())  # placed elsewhere since
    agent.redis.rpush(agent_commands_key("test-host"), StartCommand(2, "cpu:1").to_json())
    assert wait_for(lambda: 2 in agent.children)
    assert agent.devices == {2: "cpu:1"} and 3 not in agent.children
    processes = list(agent.children.values())
    agent.stop(grace=2)
    assert all(p.poll() is not None for p in processes)
    assert not agent.redis.exists(agent_key("test-host"))


def test_a_restarted_agent_keeps_the_replicas_it_did_not_start(make_agent):
    before = make_agent()
    survivor = before.start_replica(0)
    before.children.clear()  # the agent's process died; its replica lives on and heartbeats:
    before.redis.set(replica_key("replica0@test-host"), json.dumps(
        {"slot": 0, "name": "replica0@test-host", "host": "test-host", "device": "cpu:0", "state": "active"}))
    after = make_agent()
    after.announce()
    assert after.held() == {"cpu:0": 0}
    assert after.start_replica(1) is not None and after.devices == {1: "cpu:1"}
    after.stop(grace=2)
    assert survivor.poll() is None  # never signalled: not its process
    survivor.kill()
    survivor.wait()


def test_a_standalone_agent_keeps_its_replicas_in_its_process_group(make_agent):
    attached = make_agent(detach=False).start_replica(0)
    detached = make_agent("cpu:7").start_replica(1)
    assert os.getpgid(attached.pid) == os.getpgid(0)  # killing the agent's group takes them down too
    assert os.getpgid(detached.pid) == detached.pid  # serve: a session of its own
