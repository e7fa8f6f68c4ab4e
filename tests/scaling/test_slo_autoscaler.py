"""`--autoscale-policy slo` end to end over a real Redis (replica and agent records, no
processes): what the replicas publish becomes the policy's observation (tasks/control/slo_observe.py),
its decision acts through placement, and its desired count and estimate are logged and exported
in /metrics; the measured rates come from differences between ticks."""
from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from blitzscale.redis_server import EmbeddedRedis
from common.fleet import AgentRecord, Place, StartCommand
from common.keys import agent_commands_key, agent_key, replica_key
from common.settings import Settings
from tasks.control.autoscaler import Autoscaler
from tasks.control.slo_observe import SloObserver
from web.redis_collector import RedisFigures
from web.scaling_metrics import ScalingReader


@pytest.fixture
def connection():
    with EmbeddedRedis() as server:
        yield redis.Redis.from_url(server.url)


def record(slot: int, state: str = "active", **fields) -> dict:
    return {"slot": slot, "name": f"replica{slot}@h1", "host": "h1", "device": f"cpu:{slot}", "state": state,
            "running": 0, "waiting": 0, "kv_slots": 4, "load_seconds": 2.0, "waiting_tokens": 0,
            "prefill_tokens": 10_000, "prefill_seconds": 10.0, "decode_seconds": 0.0, "decode_steps": 0, **fields}


def publish(connection, *records: dict) -> None:
    for view in records:
        connection.set(replica_key(view["name"]), json.dumps(view), ex=30)


def metrics(connection) -> str:
    registry = CollectorRegistry()
    registry.register(RedisFigures(SimpleNamespace(redis=connection), [ScalingReader()]))
    return generate_latest(registry).decode()


def test_waiting_tokens_past_the_ttft_slo_add_a_replica_logged_and_exported(connection, caplog):
    url = connection.connection_pool.connection_kwargs
    settings = Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", model_id="m", autoscale_policy="slo",
                        ttft_slo=1.0, min_replicas=1, max_replicas=2)
    connection.set(agent_key("h1"), AgentRecord("h1", 1, (Place("cpu:0", slot=0), Place("cpu:1"))).to_json(), ex=30)
    # 4000 prompt tokens wait at 1000 tokens/s: 4 s of TTFT, 4x the SLO
    publish(connection, record(0, waiting=4, waiting_tokens=4000))
    with caplog.at_level(logging.INFO, logger="tasks.control.autoscaler"):
        decision = Autoscaler(settings).tick()
    assert (decision.action, decision.count) == ("up", 1)  # 2 wanted, the upper bound
    assert StartCommand.from_json(connection.lpop(agent_commands_key("h1"))) == StartCommand(1, "cpu:1")
    logged = [r.getMessage() for r in caplog.records if "(slo)" in r.getMessage()]
    assert len(logged) == 1 and logged[0].startswith("autoscaler (slo) m: 1 → 2 replicas")
    assert '"waiting_tokens": 4000' in logged[0] and '"prefill_rate": 1000.0' in logged[0]
    text = metrics(connection)
    assert 'blitz_autoscaler_desired_replicas{model="m"} 2.0' in text
    assert 'blitz_autoscaler_ttft_estimate_seconds{model="m"} 4.0' in text
    assert 'blitz_autoscaler_add_replica_seconds{model="m"} 2.0' in text  # the live replica's start


def test_the_queue_policy_exports_no_slo_estimate(connection):
    url = connection.connection_pool.connection_kwargs
    publish(connection, record(0))
    Autoscaler(Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", min_replicas=1, max_replicas=1)).tick()
    assert "blitz_autoscaler_desired_replicas" not in metrics(connection)


def test_rates_come_from_differences_between_ticks():
    observer = SloObserver("m", smoothing_s=1e-9)  # no smoothing: the last tick's rate
    first = observer.observe({0: {**record(0), "alive": True}}, queued=0, now=100.0, batch_slots=4)
    assert first.arrival_tokens_per_s == 0.0 and first.prefill_tokens_per_s == 1000.0
    later = {**record(0, prefill_tokens=12_000, waiting=2, waiting_tokens=1000, decode_seconds=0.5, decode_steps=10),
             "alive": True}
    newcomer = {**record(1, prefill_tokens=50_000, prefill_seconds=50.0), "alive": True}  # adds no arrivals yet
    seen = observer.observe({0: later, 1: newcomer}, queued=3, now=101.0, batch_slots=4)
    # 2000 prefilled + 1000 waiting in replicas + 3 queued jobs × 500 (the waiting ones' mean prompt)
    assert seen.waiting_tokens == 2500 and seen.waiting_requests == 5
    assert seen.arrival_tokens_per_s == pytest.approx(4500.0)
    assert seen.decode_step_s == pytest.approx(0.05)
    assert seen.prefill_tokens_per_s == pytest.approx(62_000 / 60.0)


def test_a_standby_replica_makes_adding_one_quick():
    from tasks.control.slo_observe import STANDBY_ADD_S, add_replica_seconds

    live = {0: {**record(0, load_seconds=12.0), "alive": True}}
    assert add_replica_seconds(live) == 12.0
    assert add_replica_seconds({**live, 1: {**record(1, state="standby"), "alive": True}}) == STANDBY_ADD_S


def test_the_time_to_add_a_replica_is_measured_from_loading_to_active():
    observer = SloObserver("m")
    serving = {0: {**record(0), "alive": True}}
    observer.observe({**serving, 1: {"slot": 1, "state": "loading", "alive": False}}, 0, now=10.0, batch_slots=4)
    observer.observe({**serving, 1: {"slot": 1, "state": "loading", "alive": False}}, 0, now=20.0, batch_slots=4)
    seen = observer.observe({**serving, 1: {**record(1), "alive": True}}, 0, now=32.5, batch_slots=4)
    assert seen.add_replica_s == 22.5  # not the records' 2 s of loading weights


def test_with_two_models_each_is_decided_and_exported_on_its_own(connection):
    """Prompt tokens pile up for model a only: a gets a replica, b holds, and each model's estimate
    is its own series."""
    url = connection.connection_pool.connection_kwargs
    settings = Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", models="a=/m/a,b=/m/b",
                        autoscale_policy="slo", ttft_slo=1.0, min_replicas=1, max_replicas=2)
    a, b = settings.catalog.models
    places = (Place("cpu:0", slot=a.slots[0]), Place("cpu:1", slot=b.slots[0]), Place("cpu:2"))
    connection.set(agent_key("h1"), AgentRecord("h1", 1, places).to_json(), ex=30)
    busy = record(a.slots[0], waiting=4, waiting_tokens=4000, model="a")
    idle = {**record(b.slots[0], model="b"), "name": f"replica{b.slots[0]}@h1", "device": "cpu:1"}
    publish(connection, busy, idle)
    Autoscaler(settings).tick()
    assert StartCommand.from_json(connection.lpop(agent_commands_key("h1"))).slot in a.slots
    assert connection.lpop(agent_commands_key("h1")) is None  # nothing for b
    text = metrics(connection)
    assert 'blitz_autoscaler_desired_replicas{model="a"} 2.0' in text
    assert 'blitz_autoscaler_desired_replicas{model="b"} 1.0' in text
    assert 'blitz_autoscaler_ttft_estimate_seconds{model="a"} 4.0' in text


@pytest.mark.parametrize("state", ["{not json", "[1, 2]", '"text"', '{"models": [1]}', '{"model": "m", "desired": "x"}',
                                   '{"model": "m", "desired": 2, "estimate": [1]}',
                                   '{"model": "m", "desired": 2, "estimate": {"ttft_estimate_s": "soon"}}', '{"models": {"m": {"desired": null}}}'])
def test_a_malformed_autoscaler_state_never_breaks_metrics(connection, state):
    """/metrics answers whatever the autoscaler key holds (an older version's state, a hand edit):
    the SLO figures are left out, the rest is exported."""
    from common.keys import AUTOSCALER_KEY

    publish(connection, record(0))
    connection.set(AUTOSCALER_KEY, state)
    text = metrics(connection)
    assert "blitz_replica_slots" in text and "blitz_autoscaler_desired_replicas{" not in text


def test_a_model_scaled_to_zero_stays_there_until_a_request_comes(connection):
    """--min-replicas 0 with --scale-to-zero-after: once at zero and idle, the SLO policy must not
    start a replica again at the next tick (then stop it, then start it: a loop of cold starts)."""
    url = connection.connection_pool.connection_kwargs
    settings = Settings(redis_url=f"redis://{url['host']}:{url['port']}/0", model_id="m", autoscale_policy="slo",
                        min_replicas=0, max_replicas=2, scale_to_zero_after=1.0)
    connection.set(agent_key("h1"), AgentRecord("h1", 1, (Place("cpu:0"), Place("cpu:1"))).to_json(), ex=30)
    autoscaler = Autoscaler(settings)
    autoscaler._started -= 60  # idle for a minute: no request since the autoscaler started
    decision = autoscaler.tick()
    assert decision.action == "hold", decision
    assert connection.lpop(agent_commands_key("h1")) is None  # no process started
    assert 'blitz_autoscaler_desired_replicas{model="m"} 0.0' in metrics(connection)
