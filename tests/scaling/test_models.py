"""Several models (common/models.py, tasks/control/cold_start.py): the catalog's slots and queues,
the models file, scale to zero in the autoscaler's decision, and which replica an eviction may
stop (never a busy one, never one its model's minimum keeps)."""
from __future__ import annotations

import pytest

from common.settings import Settings
from tasks.control.autoscaler import Memory, Observation, Policy, decide
from tasks.control.cold_start import evictable


def test_one_model_is_todays_cluster():
    s = Settings(model_id="/m/tiny", num_replicas=2)
    assert [(m.name, m.slots, m.queue) for m in s.catalog.models] == [("tiny", range(2), "generation")]
    assert s.slot_count == 2 and not s.cold_starts and s.for_slot(1) is s


def test_each_model_owns_its_slots_and_queue():
    s = Settings(models="a=/m/a,b=org/b", num_replicas=1, max_replicas=2, min_replicas=0)
    a, b = s.catalog.models
    assert (a.slots, a.queue, b.slots, b.queue) == (range(0, 2), "generation", range(2, 4), "generation:b")
    assert s.slot_count == 4 and s.cold_starts
    assert s.for_slot(3).model_id == "org/b" and s.for_slot(3).served_model == "b"


@pytest.mark.parametrize("suffix,text", [
    (".toml", '[[models]]\nname = "a"\nmodel_id = "/m/a"\n[[models]]\nname = "b"\nmodel_id = "/m/b"\n'
              'max_replicas = 3\nmax_batch_size = 4\n'),
    (".yaml", "models:\n  - {name: a, model_id: /m/a}\n  - {name: b, model_id: /m/b, max_replicas: 3, max_batch_size: 4}\n"),
])
def test_models_file_overrides_per_model(tmp_path, suffix, text):
    path = tmp_path / f"models{suffix}"
    path.write_text(text)
    a, b = Settings(models_file=str(path)).catalog.models
    assert (a.settings.max_batch_size, b.settings.max_batch_size) == (32, 4)
    assert (a.slots, b.slots) == (range(0, 1), range(1, 4))
    assert b.settings.catalog is a.settings.catalog  # a model's overrides never reshape the others' slots


@pytest.mark.parametrize("models,words", [("a=/m/a,a=/m/b", "twice"), ("a@x=/m/a", "usable"), ("a", "NAME=ID"),
                                         ("m" * 65 + "=/m/a", "at most 64")])
def test_bad_models_are_refused(models, words):
    with pytest.raises(ValueError, match=words):
        Settings(models=models).catalog


def test_scale_to_zero_only_when_idle_long_enough():
    policy = Policy(0, 2, zero_after_s=10)
    idle = Observation(now=100, queued=0, in_flight=0, serving=1, capacity_per_replica=4, idle_s=11)
    assert decide(idle, policy, Memory())[0].action == "down"
    assert decide(Observation(100, 0, 0, 1, 4, idle_s=9), policy, Memory())[0].action == "hold"
    assert decide(Observation(100, 1, 0, 1, 4, idle_s=11), policy, Memory())[0].action == "hold"  # queued work
    assert decide(Observation(100, 1, 0, 0, 4, idle_s=0), policy, Memory())[0].action == "up"  # cold: at once
    # Without --scale-to-zero-after, min 0 keeps the last replica.
    assert decide(Observation(100, 0, 0, 1, 4, idle_s=1e9), Policy(0, 2, hold_s=0), Memory())[0].action == "hold"


class Control:
    def __init__(self, settings, queued=None):
        self.settings = settings
        self.queued = queued or {}

    def queue_size(self, slots, model=None):
        return self.queued.get(model, 0)


def view(model, state="active", running=0, waiting=0, target=None):
    return {"model": model, "state": state, "alive": True, "running": running, "waiting": waiting, "target": target}


def test_eviction_takes_the_least_recently_used_idle_model_never_a_busy_one():
    settings = Settings(models="a=/m/a,b=/m/b,c=/m/c", min_replicas=0)
    slots = {0: view("a", running=1), 1: view("b")}
    # a is the least recently used, but busy: b goes.
    assert evictable(Control(settings), slots, "c", {"a": 1.0, "b": 2.0}) == [1]
    slots = {0: view("a", waiting=1), 1: view("b", running=2)}
    assert evictable(Control(settings), slots, "c", {}) == []
    slots = {0: view("a"), 1: view("b")}
    assert evictable(Control(settings), slots, "c", {"a": 5.0, "b": 2.0}) == [1, 0]
    assert evictable(Control(settings, {"b": 1}), slots, "c", {"a": 5.0, "b": 2.0}) == [0]  # b has queued work
    assert evictable(Control(settings), {0: view("a", target="stopped")}, "c", {}) == []  # already leaving
    assert evictable(Control(settings), {1: view("b")}, "b", {}) == []  # never its own model's
    kept = Settings(models="a=/m/a,b=/m/b", min_replicas=1)
    assert evictable(Control(kept), {0: view("a")}, "b", {}) == []  # its minimum keeps it


def test_a_models_requests_see_only_its_replicas_and_prefixes(monkeypatch):
    """No model's queue, replicas or prefix affinity leak into another's (tasks/client)."""
    from common.protocol import Job, SamplingParameters, StoppingParameters
    from tasks.client.generation_client import GenerationClient

    client = GenerationClient(Settings(models="a=/m/a,b=/m/b", redis_url="redis://127.0.0.1:9/0"))
    records = {"replica0@h": {"model": "a", "state": "active"}, "replica1@h": {"model": "b", "state": "loading"}}
    monkeypatch.setattr(client, "replica_records", lambda max_age: records)
    assert client.replica_states(1, "b") == {"replica1@h": "loading"}
    assert client.replica_states(1, None) == client.replica_states(1, "a") == {"replica0@h": "active"}
    assert set(client.model_records("b")) == {"replica1@h"}
    job = Job("r1", [1, 2, 3], SamplingParameters(), StoppingParameters(max_new_tokens=1), model="a")
    other = Job("r2", [1, 2, 3], SamplingParameters(), StoppingParameters(max_new_tokens=1), model="b")
    assert client._salt(job) != client._salt(other)  # the same prompt's affinity keys differ by model


def test_a_busy_replica_is_not_evictable_now_but_will_be():
    """`busy_too`: whether a place can ever be freed (a request then waits instead of failing)."""
    settings = Settings(models="a=/m/a,b=/m/b", min_replicas=0)
    assert evictable(Control(settings), {0: view("a", running=1)}, "b", {}) == []
    assert evictable(Control(settings), {0: view("a", running=1)}, "b", {}, busy_too=True) == [0]
    kept = Settings(models="a=/m/a,b=/m/b", min_replicas=1)
    assert evictable(Control(kept), {0: view("a", running=1)}, "b", {}, busy_too=True) == []  # never: min 1


@pytest.mark.parametrize("entry,named", [
    ("{name: a, model_id: /m/a, max_replicas: 1000000000000}", "max_replicas"),  # a trillion slots walked
    ("{name: a, model_id: /m/a, min_replicas: -3}", "min_replicas"),
    ("{name: a, model_id: /m/a, max_replicas: '3'}", "max_replicas"),  # was a TypeError traceback
    ("{name: a, model_id: /m/a, max_batch_size: 0}", "max_batch_size"),
    ("{name: a, model_id: /m/a, max_batch_size: 2.5}", "max_batch_size"),
    ("{name: a, model_id: /m/a, max_replicas: true}", "max_replicas"),
    ("{name: a, model_id: /m/a, lora_adapters: 5}", "lora_adapters"),  # was an AttributeError traceback
    ("{name: a, model_id: [1, 2]}", "model_id"),
])
def test_models_file_hostile_values_are_one_clear_error(tmp_path, entry, named):
    path = tmp_path / "models.yaml"
    path.write_text(f"models:\n  - {entry}\n")
    with pytest.raises(ValueError, match=f"`{named}`"):
        Settings(models_file=str(path)).catalog


def test_models_file_table_entry_that_is_not_a_table(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("models: {a: {model_id: /m/a}, b: 3}\n")
    with pytest.raises(ValueError, match="needs `name` and `model_id`"):
        Settings(models_file=str(path)).catalog
