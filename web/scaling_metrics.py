"""Scaling metrics read at scrape time from Redis: how often replicas were scaled up and down
(`blitz_scale_up_times`, by trigger and path), replica processes started pre-booted or fresh
(`blitz_replica_starts`), the autoscaler's decisions, its scale-ups blocked
(`blitz_scale_up_blocked`, by reason), and every slot by host and state, `dead` and `stopped`
included (`blitz_replica_slots`), and by model (`blitz_model_replicas`, every served model, 0
included: a model scaled to zero shows 0 active); with the SLO policy, each model's desired replicas
and the estimate behind them (`blitz_autoscaler_desired_replicas{model}`,
`blitz_autoscaler_ttft_estimate_seconds{model}`, `blitz_autoscaler_add_replica_seconds{model}`),
for a KEDA ScaledObject to follow."""
from __future__ import annotations

import json
from collections import Counter

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.states import ReplicaState
from common.keys import AUTOSCALER_KEY
from tasks.control.cluster import read_agents, read_counters, read_slots
from web.redis_collector import RedisReader

NAMES = ("blitz_scale_up_times", "blitz_scale_down_times", "blitz_autoscaler_decisions", "blitz_scale_up_blocked",
         "blitz_replica_slots", "blitz_model_replicas", "blitz_autoscaler_desired_replicas",
         "blitz_autoscaler_ttft_estimate_seconds", "blitz_autoscaler_add_replica_seconds", "blitz_replica_starts")


class ScalingReader(RedisReader):
    source = "scaling"

    def read(self, client):
        connection = client.redis
        settings = getattr(client, "settings", None)
        catalog = settings.catalog if settings is not None else None
        slots = read_slots(connection)
        models = catalog.names if catalog is not None else []
        for slot, view in slots.items():
            view["model"] = catalog.for_slot(slot).name if catalog is not None else ""
        decided = slo_decisions(connection.get(AUTOSCALER_KEY))
        return read_counters(connection), slots, [a.host for a in read_agents(connection)], models, decided

    def families(self, values):
        counters, slots, hosts, models, decided = values
        up = CounterMetricFamily("blitz_scale_up_times", "Replicas scaled up (path: standby = add_consumer to a "
                                 "standby replica, process = a new worker process)", labels=["trigger", "path"])
        down = CounterMetricFamily("blitz_scale_down_times", "Replicas scaled down", labels=["trigger", "target"])
        decisions = CounterMetricFamily("blitz_autoscaler_decisions", "Autoscaler decisions that acted",
                                        labels=["action"])
        starts = CounterMetricFamily("blitz_replica_starts", "Replica processes host agents started, by path "
                                     "(preboot: handed to a pre-booted process; fresh: a new interpreter)",
                                     labels=["path"])
        blocked = CounterMetricFamily("blitz_scale_up_blocked", "Autoscaler ticks that wanted new replicas and found "
                                      "no free device (or no host agent)", labels=["reason"])
        families = {"scale_up": (up, 2), "scale_down": (down, 2), "decision": (decisions, 1),
                    "scale_up_blocked": (blocked, 1), "replica_start": (starts, 1)}
        for name, value in sorted(counters.items()):
            kind, *labels = name.split(":")
            family, arity = families.get(kind, (None, 0))
            if family is not None and len(labels) == arity:
                family.add_metric(labels, value)
        yield from (up, down, decisions, blocked, starts)
        yield _slots_by_host(slots, hosts)
        yield _replicas_by_model(slots, models)
        yield from _slo_estimate(decided)


def _replicas_by_model(slots: dict[int, dict], models: list[str]) -> GaugeMetricFamily:
    family = GaugeMetricFamily("blitz_model_replicas", "Replicas of each served model by state", labels=["model", "state"])
    counts = Counter((v["model"], str(v["state"])) for v in slots.values())
    for model in models:
        for state in ReplicaState:
            family.add_metric([model, state], counts[(model, str(state))])
    return family


def slo_decisions(raw: bytes | str | None) -> list[dict]:
    """The SLO policy's last decision for each model, from the autoscaler's state (none under the
    queue policy, or with the autoscaler away: its state expires after ten ticks). A state this
    version cannot read (an older one's, a hand edit) gives none: /metrics must still answer."""
    try:
        state = json.loads(raw) if raw else {}
    except ValueError:
        return []
    if not isinstance(state, dict):
        return []
    models = state.get("models") if isinstance(state.get("models"), dict) else {state.get("model"): state}
    decided = []
    for view in models.values():
        try:
            estimate = view.get("estimate") or {}
            decided.append({"model": str(view.get("model") or ""), "desired": float(view["desired"]),
                            "ttft_estimate_s": float(estimate.get("ttft_estimate_s", 0.0)),
                            "add_replica_s": float(estimate.get("add_replica_s", 0.0))})
        except (AttributeError, KeyError, TypeError, ValueError):
            continue
    return decided


def _slo_estimate(decided: list[dict]):
    if not decided:
        return
    for name, help_text, key in (
            ("blitz_autoscaler_desired_replicas", "Replicas the SLO policy wants", "desired"),
            ("blitz_autoscaler_ttft_estimate_seconds", "TTFT of the waiting prompt tokens at the serving replicas' "
             "measured prefill rate (queueing included)", "ttft_estimate_s"),
            ("blitz_autoscaler_add_replica_seconds", "Expected seconds to add a replica", "add_replica_s")):
        family = GaugeMetricFamily(name, help_text, labels=["model"])
        for model in decided:
            family.add_metric([model["model"]], model[key])
        yield family


def _slots_by_host(slots: dict[int, dict], agents: list[str]) -> GaugeMetricFamily:
    """Every state of every host that has an agent or a slot (0 included)."""
    family = GaugeMetricFamily("blitz_replica_slots", "Replica slots by host and state", labels=["host", "state"])
    counts = Counter((str(v.get("host") or ""), str(v["state"])) for v in slots.values())
    for host in sorted(set(agents) | {host for host, _ in counts}):
        for state in ReplicaState:
            family.add_metric([host, state], counts[(host, str(state))])
    return family
