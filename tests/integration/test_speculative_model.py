"""`--speculative-model` through the real service (web, Celery, Redis, a replica of the tiny
model drafting with a draft model, here the tiny model itself): the answer is plain decoding's
(transformers' generate), and /cluster_state names the drafter and its acceptance."""
from __future__ import annotations

import time

import pytest
import requests
import torch

from tests.service import Service


@pytest.fixture(scope="module")
def drafting(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("speculative-model")
    with Service(str(tiny_model_dir), workdir, env={"XDG_CACHE_HOME": str(workdir / "cache"), "SPECULATE": "4",
                                                    "SPECULATIVE_MODEL": str(tiny_model_dir)}).running() as svc:
        yield svc


def test_draft_model_answers_are_plain_decodings_and_cluster_state_names_the_drafter(drafting, tiny_model_dir,
                                                                                     tiny_reference):
    for prompt in ("The capital of France is", "Hello"):
        response = requests.post(f"{drafting.base_url}/generate", json={
            "inputs": prompt, "parameters": {"max_new_tokens": 20, "details": True}}, timeout=60)
        assert response.status_code == 200, response.text
        assert [t["id"] for t in response.json()["details"]["tokens"]] == tiny_reference(prompt, 20)
    deadline = time.monotonic() + 10
    while True:  # a replica publishes its counts with its heartbeat: wait for the one after these requests
        replicas = requests.get(f"{drafting.base_url}/cluster_state", timeout=10).json()["replicas"]
        speculation = next((r["speculation"] for r in replicas if r.get("speculation")), None)
        if speculation and speculation["draft_tokens"] > 0:
            break
        assert time.monotonic() < deadline, replicas
        time.sleep(0.2)
    assert speculation["drafter"] == str(tiny_model_dir)
    assert speculation["acceptance_rate"] >= 0.9  # the model drafting for itself


def test_speculative_model_flag_environment_and_models_file(tmp_path):
    import argparse

    from blitzscale.cli import _add_settings_flags, _settings
    from common.settings import Settings

    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    settings = _settings(parser.parse_args(["--speculate", "3", "--speculative-model", "/models/draft"]))
    assert (settings.speculate, settings.speculative_model) == (3, "/models/draft")
    assert Settings.from_env({"SPECULATE": "2", "SPECULATIVE_MODEL": "org/draft"}).speculative_model == "org/draft"
    with pytest.raises(ValueError, match="--speculative-model drafts --speculate N tokens"):
        Settings.from_env({"SPECULATIVE_MODEL": "org/draft"})
    models = tmp_path / "models.yaml"
    models.write_text("models:\n  - {name: big, model_id: /m/big, speculate: 4, speculative_model: /m/small}\n"
                      "  - {name: other, model_id: /m/other}\n")
    catalog = Settings(models_file=str(models)).catalog
    assert [(m.settings.speculate, m.settings.speculative_model) for m in catalog.models] == [(4, "/m/small"), (0, None)]
    for entry, error in (("speculate: '4'", "`speculate` must be a whole number"),
                         ("speculative_model: 5", "`speculative_model` must be a string"),
                         ("speculate: 100", "--speculate must be in 0..64"),
                         ("speculative_model: /m/small", "--speculative-model drafts --speculate N tokens")):
        models.write_text(f"models:\n  - {{name: a, model_id: /m/a, {entry}}}\n")
        with pytest.raises(ValueError, match=error):
            Settings(models_file=str(models)).catalog


def test_a_replica_refuses_a_draft_model_of_another_tokenizer_in_one_line(tiny_model_dir, tmp_path):
    """What a replica start reports (tasks/runtime/engine_builder.py) when the draft's tokenizer is not the target's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.settings import Settings
    from engine.outputs import EngineError
    from tasks.runtime.engine_builder import load_draft_model
    from tests.tiny_model import build_tiny_model

    target = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    other = build_tiny_model(tmp_path / "other")
    swapped = AutoTokenizer.from_pretrained(other)
    swapped.add_tokens(["<|draft-only|>"])  # same size of output layer, one more token: not the same tokenizer
    swapped.save_pretrained(other)
    settings = Settings(model_id=str(tiny_model_dir), speculate=2, speculative_model=str(other))
    with pytest.raises(EngineError, match=r"^--speculative-model .*: its tokenizer's vocabulary differs from the "
                                          r"target's: a draft model must share the target's tokenizer"):
        load_draft_model(settings, torch.device("cpu"), target, tokenizer)
