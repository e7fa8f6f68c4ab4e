"""Several models on one fleet (docs/models.md), through the real service: the default model and a
tiny random one answer through /v1 and a TGI route with SageMaker's target-model header, each
first request placing the model's replica at once; an idle model drops to zero replicas and
answers again; an unknown model is a 404 in each route's own shape."""
from __future__ import annotations

import re

import pytest
import requests

from common import model_files
from common.settings import Settings, default_model_id
from tests.default_model import link_weights
from tests.models_service import TARGET, ModelsService


@pytest.fixture(scope="module")
def two_models(tiny_model_dir, default_model_entry, tmp_path_factory):
    # smol second: a GGUF model that is not the first still has its tokenizer, queue and slots
    workdir = tmp_path_factory.mktemp("models")
    svc = ModelsService({"tiny": str(tiny_model_dir), "smol": default_model_id()}, workdir, places=2,
                        env={"SCALE_TO_ZERO_AFTER": "4"})
    try:
        svc.start()
        # The web prepared smol's tokenizer itself (its own host cache starts empty); the weights
        # come converted, as if this host had converted them before (saves a minute's conversion).
        entry = model_files.cache_entry(Settings(weight_cache_dir=str(workdir / "cache")), default_model_entry.name)
        assert (entry / "tokenizer.json").is_file() and not model_files.entry_complete(entry)
        link_weights(default_model_entry, workdir / "cache")
        yield svc
    finally:
        svc.stop()


def test_both_models_answer_through_v1_and_tgi(two_models, tiny_model_dir):
    svc = two_models
    chat = svc.chat("tiny")
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "tiny"
    real = svc.generate("smol", max_new_tokens=3, do_sample=False)
    assert real.status_code == 200, real.text
    assert "Paris" in real.json()["generated_text"]  # the default model's real text, not the tiny one's noise
    assert svc.generate("tiny").status_code == 200
    assert svc.chat("smol").json()["model"] == "smol"
    info = requests.get(f"{svc.base_url}/info", headers={TARGET: "tiny"}, timeout=10).json()
    assert info["model_id"] == str(tiny_model_dir)
    assert requests.get(f"{svc.base_url}/info", timeout=10).json()["model_id"] == str(tiny_model_dir)  # the first
    assert requests.get(f"{svc.base_url}/info", headers={TARGET: "smol"}, timeout=10).json()["model_id"] == \
        default_model_id()
    state = svc.cluster(False)
    # Each model's replica in its own slot (either may have scaled to zero already: 4 s idle).
    assert {r["slot"]: r["model"] for r in state["replicas"]} == {0: "tiny", 1: "smol"}
    assert set(state["models"]) == {"smol", "tiny"}
    listed = requests.get(f"{svc.base_url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["tiny", "smol"]


def test_unknown_model_is_404_naming_the_served_ones(two_models):
    svc = two_models
    chat = svc.chat("nope")
    assert chat.status_code == 404
    assert chat.json()["error"]["code"] == "model_not_found" and "tiny, smol" in chat.json()["error"]["message"]
    tgi = svc.generate("nope")
    assert tgi.status_code == 404 and set(tgi.json()) == {"error", "error_type"}
    assert "tiny, smol" in tgi.json()["error"]
    messages = requests.post(f"{svc.base_url}/v1/messages", timeout=10, json={
        "model": "nope", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    assert messages.status_code == 404 and messages.json()["error"]["type"] == "not_found_error"
    responses = requests.post(f"{svc.base_url}/v1/responses", timeout=10, json={"model": "nope", "input": "hi"})
    assert responses.status_code == 404 and responses.json()["error"]["code"] == "model_not_found"
    invocations = requests.post(f"{svc.base_url}/invocations", headers={TARGET: "nope"}, timeout=10,
                                json={"inputs": "hi", "parameters": {"max_new_tokens": 2}})
    assert invocations.status_code == 404


def test_an_idle_model_drops_to_zero_and_answers_again(two_models):
    svc = two_models
    assert svc.generate("tiny").status_code == 200
    svc.wait_for(lambda: not svc.live("tiny"), timeout=60, what="tiny scaled to zero")
    assert requests.get(f"{svc.base_url}/health", timeout=10).status_code == 200  # a cold model is servable
    again = svc.chat("tiny")
    assert again.status_code == 200, again.text
    assert again.json()["choices"][0]["message"]["content"] is not None
    metrics = requests.get(f"{svc.base_url}/metrics", timeout=10).text
    # Two cold starts of tiny at least (its first request, and this one), timed to the first token.
    starts = re.findall(r'^blitz_cold_starts_total\{model="tiny",source="(replica|host-cache|source)"\} (\S+)$',
                        metrics, re.M)
    assert sum(float(count) for _, count in starts) >= 2, metrics
    assert re.search(r'^blitz_cold_start_seconds_count\{model="tiny",source="[a-z-]+"\} [1-9]', metrics, re.M)
    assert re.search(r'^blitz_model_replicas\{model="smol",state="active"\} \d', metrics, re.M)
    # The request metrics, by model.
    assert re.search(r'^tgi_request_success_total\{model="tiny"\} [1-9]', metrics, re.M)
    assert re.search(r'^tgi_request_success_total\{model="smol"\} [1-9]', metrics, re.M)
