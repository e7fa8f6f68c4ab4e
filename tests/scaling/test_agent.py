"""The host agent: starts processes on command, registers the slot, never doubles a slot."""
from __future__ import annotations

import json
import sys
import time

import pytest
import redis

from blitzscale.redis_server import EmbeddedRedis
from common.keys import SLOTS_KEY, agent_commands_key, agent_key
from common.settings import Settings
from tasks.control import agent as agent_module
from tasks.control.agent import HostAgent


@pytest.fixture(scope="module")
def redis_url():
    with EmbeddedRedis() as server:
        yield server.url


@pytest.fixture
def agent(redis_url, monkeypatch):
    monkeypatch.setattr(agent_module, "worker_argv",
                        lambda slot, standby=False: [sys.executable, "-c", "import time; time.sleep(30)"])
    monkeypatch.setattr(agent_module, "EXIT_WAIT_S", 0.2)
    redis.Redis.from_url(redis_url).flushall()
    host = HostAgent(Settings(redis_url=redis_url), host="test-host")
    yield host
    host.stop(grace=2)


def test_start_registers_the_slot_as_loading(agent):
    process = agent.start_replica(1)
    assert process is not None and process.poll() is None
    entry = json.loads(agent.redis.hget(SLOTS_KEY, "1"))
    assert (entry["state"], entry["by"], entry["host"]) == ("loading", "agent", "test-host")


def test_a_slot_with_a_live_process_is_not_started_twice(agent):
    first = agent.start_replica(0)
    assert agent.start_replica(0) is None  # still running after EXIT_WAIT_S: left alone
    assert first.poll() is None and agent.children[0] is first


def test_commands_and_presence(agent):
    agent.start()
    deadline = time.monotonic() + 5
    while not agent.redis.exists(agent_key("test-host")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.redis.exists(agent_key("test-host"))
    agent.redis.rpush(agent_commands_key("test-host"), json.dumps({"op": "start", "slot": 2}))
    while 2 not in agent.children and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.children[2].poll() is None
    processes = list(agent.children.values())
    agent.stop(grace=2)
    assert all(p.poll() is not None for p in processes)
    assert not agent.redis.exists(agent_key("test-host"))
