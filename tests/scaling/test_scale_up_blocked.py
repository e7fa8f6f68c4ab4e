"""The autoscaler over a real Redis and a host agent's record (no processes): new replicas go
where placement says, and a scale-up with no free device is logged once per change and counted
at every tick (`blitz_scale_up_blocked_total{reason}`)."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from blitzscale.redis_server import EmbeddedRedis
from common.fleet import AgentRecord, Place, StartCommand
from common.keys import SLOTS_KEY, agent_commands_key, agent_key
from common.settings import Settings
from tasks.control.autoscaler import Autoscaler
from web.redis_collector import RedisFigures
from web.scaling_metrics import ScalingReader


@pytest.fixture
def connection():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


def advertise(connection, *places: Place) -> None:
    connection.set(agent_key("h1"), AgentRecord("h1", 1, places).to_json(), ex=30)


def metrics(connection) -> str:
    registry = CollectorRegistry()
    registry.register(RedisFigures(SimpleNamespace(redis=connection), [ScalingReader()]))
    return generate_latest(registry).decode()


def test_blocked_then_placed_when_a_device_frees(connection, caplog):
    url = connection.connection_pool.connection_kwargs
    settings = Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", min_replicas=2, max_replicas=3)
    advertise(connection, Place("cpu:0", slot=0))
    connection.hset(SLOTS_KEY, "0", json.dumps({"slot": 0, "host": "h1", "device": "cpu:0", "state": "loading",
                                                "by": "agent", "updated_at": 1e12}))
    autoscaler = Autoscaler(settings)
    with caplog.at_level(logging.WARNING, logger="tasks.control.autoscaler"):
        for _ in range(3):
            decision = autoscaler.tick()
    assert (decision.action, decision.count) == ("up", 1)  # 1 serving < min 2
    assert [r.getMessage() for r in caplog.records] == [
        "autoscaler: scale-up blocked (no_free_device): 1 new replicas wanted (1 serving < min 2); "
        "0 free devices on 1 hosts"]
    assert 'blitz_scale_up_blocked_total{reason="no_free_device"} 3.0' in metrics(connection)
    assert not connection.hexists(SLOTS_KEY, "1") and not connection.llen(agent_commands_key("h1"))

    advertise(connection, Place("cpu:0", slot=0), Place("cpu:1"))
    autoscaler.tick()
    entry = json.loads(connection.hget(SLOTS_KEY, "1"))
    assert (entry["host"], entry["device"], entry["state"], entry["by"]) == ("h1", "cpu:1", "loading", "control")
    assert StartCommand.from_json(connection.lpop(agent_commands_key("h1"))) == StartCommand(1, "cpu:1")
    assert autoscaler.control.placement()["placements"] == [
        {"slot": 1, "host": "h1", "device": "cpu:1", "weights": "source", "fetch_from": []}]
    text = metrics(connection)
    assert 'blitz_replica_slots{host="h1",state="loading"} 2.0' in text
    assert 'blitz_scale_up_times_total{path="process",trigger="autoscaler"} 1.0' in text


def test_no_agent_is_a_reason_of_its_own(connection):
    url = connection.connection_pool.connection_kwargs
    autoscaler = Autoscaler(Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", min_replicas=1))
    autoscaler.tick()
    assert 'blitz_scale_up_blocked_total{reason="no_agent"} 1.0' in metrics(connection)


def test_two_blocked_models_each_log_their_block_once(connection, caplog):
    # One block memory for every model: two blocked models replaced each other's every tick, so
    # each block was logged again at every tick (twice a second), naming no model.
    url = connection.connection_pool.connection_kwargs
    settings = Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", models="a=/m/a,b=/m/b",
                        min_replicas=1, max_replicas=1)
    autoscaler = Autoscaler(settings)  # no agent: neither model's replica can start
    with caplog.at_level(logging.WARNING, logger="tasks.control.autoscaler"):
        for _ in range(4):
            autoscaler.tick()
    blocks = [r.getMessage() for r in caplog.records if "scale-up blocked" in r.getMessage()]
    assert len(blocks) == 2, blocks
    assert any("model a" in line for line in blocks) and any("model b" in line for line in blocks), blocks
