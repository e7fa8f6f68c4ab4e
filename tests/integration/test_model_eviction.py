"""More models than places (docs/models.md, "LRU eviction"): a request for a model with no replica
and no free place stops the least recently used idle model's replica and is served once its
replica is placed there; a busy replica is never stopped, even as the least recently used; when
every place is busy the request waits, and is served once a place goes idle. Timing is the test's
own: the engines are held at the gate (tests.integration.gated_worker) while it looks."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
import redis

from common.keys import MODEL_USED_KEY
from tests.models_service import ModelsService


@pytest.fixture(scope="module")
def three_models(tiny_model_dir, tmp_path_factory):
    svc = ModelsService({name: str(tiny_model_dir) for name in ("a", "b", "c")},
                        tmp_path_factory.mktemp("eviction"), places=2)
    try:
        yield svc.start()
    finally:
        svc.stop()


def busy(svc: ModelsService, model: str) -> bool:
    return any(r["state"] == "active" and r["running"] + r["waiting"] > 0 for r in svc.model_slots(model).values())


def idle(svc: ModelsService, *models: str) -> bool:
    """Each model's replica active with nothing in it, as its record says (a heartbeat behind)."""
    return all(any(r["state"] == "active" for r in svc.model_slots(m).values()) and not busy(svc, m) for m in models)


def test_lru_eviction_frees_a_place_and_never_stops_a_busy_replica(three_models):
    svc = three_models
    assert svc.generate("a").status_code == 200
    assert svc.generate("b").status_code == 200
    a_pid = svc.wait_for(lambda: (r := svc.model_slots("a").get(0)) and r["state"] == "active" and r["pid"], 30, "a")
    svc.wait_for(lambda: idle(svc, "a", "b"), 30, "a and b idle")
    with ThreadPoolExecutor(2) as pool:
        svc.pause_engine()
        try:
            held = pool.submit(svc.generate, "a")
            svc.wait_for(lambda: busy(svc, "a"), 30, "a's request in its engine")
            # a is now the least recently used model, but busy: the place for c must come from b.
            redis.Redis.from_url(svc.env["REDIS_URL"]).hset(MODEL_USED_KEY, "a", 1.0)
            cold = pool.submit(svc.generate, "c")
            svc.wait_for(lambda: svc.model_slots("c").get(2, {}).get("state") in ("loading", "active"), 90,
                         "c placed on b's place")
            assert svc.model_slots("b")[1]["state"] in ("stopped", "draining", "standby")
            a = svc.model_slots("a")[0]
            assert (a["state"], a["pid"]) == ("active", a_pid)  # never stopped, never replaced
        finally:
            svc.resume_engine()
        assert held.result().status_code == 200
        assert cold.result().status_code == 200, cold.result().text
    assert not svc.live("b")


def test_with_every_place_busy_a_request_waits_until_one_goes_idle(three_models):
    svc = three_models
    assert svc.generate("a").status_code == 200
    assert svc.generate("c").status_code == 200
    svc.wait_for(lambda: idle(svc, "a", "c"), 30, "a and c idle")
    pids = {m: svc.live(m)[0]["pid"] for m in ("a", "c")}
    with ThreadPoolExecutor(3) as pool:
        svc.pause_engine()
        try:
            held = [pool.submit(svc.generate, model) for model in ("a", "c")]
            svc.wait_for(lambda: busy(svc, "a") and busy(svc, "c"), 30, "a and c busy")
            waiting = pool.submit(svc.generate, "b")
            # The autoscaler sees b's queued request and wants a replica for it: nothing is stopped.
            svc.wait_for(lambda: ((svc.cluster(False)["autoscaler"] or {}).get("models", {}).get("b", {})
                                  .get("action") == "up"), 30, "the autoscaler wanting b up")
            assert {m: [r["pid"] for r in svc.live(m)] for m in ("a", "c")} == {m: [p] for m, p in pids.items()}
            assert not svc.live("b") and not waiting.done()
        finally:
            svc.resume_engine()
        assert [f.result().status_code for f in held] == [200, 200]
        served = waiting.result()
    assert served.status_code == 200, served.text  # a place went idle: the least recently used one made room
