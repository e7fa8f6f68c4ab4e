"""`--speculate` through the real service (web, Celery, Redis, a replica of the tiny model):
the setting reaches the replica's engine, a repetitive prompt's greedy answer is plain
decoding's (transformers' generate), and the drafts show in /metrics and /cluster_state."""
from __future__ import annotations

import re
import time

import pytest
import requests

from tests.service import Service

PROMPT = "Numbers: 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3"


@pytest.fixture(scope="module")
def speculating(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("speculate")
    with Service(str(tiny_model_dir), workdir, env={"XDG_CACHE_HOME": str(workdir / "cache"), "SPECULATE": "4",
                                                    "SPECULATE_NGRAM_MIN": "1"}).running() as svc:
        yield svc


def test_speculated_answers_are_plain_decodings_and_the_drafts_are_counted(speculating, tiny_reference):
    for prompt in (PROMPT, "Hello"):
        response = requests.post(f"{speculating.base_url}/generate", json={
            "inputs": prompt, "parameters": {"max_new_tokens": 24, "details": True, "decoder_input_details": False}},
            timeout=60)
        assert response.status_code == 200, response.text
        tokens = [t["id"] for t in response.json()["details"]["tokens"]]
        assert tokens == tiny_reference(prompt, 24)
    # A replica publishes its counts with its heartbeat: wait for the one after these requests.
    deadline = time.monotonic() + 10
    while True:
        metrics = requests.get(f"{speculating.base_url}/metrics", timeout=10).text
        replicas = requests.get(f"{speculating.base_url}/cluster_state", timeout=10).json()["replicas"]
        speculation = next((r["speculation"] for r in replicas if r.get("speculation")), None)
        drafted = re.search(r'^blitz_spec_decode_num_draft_tokens_total\{replica="[^"]+"\} (\S+)$', metrics, re.M)
        if drafted and float(drafted.group(1)) > 0 and speculation and speculation["draft_tokens"] > 0:
            break
        assert time.monotonic() < deadline, (metrics[-2000:], replicas)
        time.sleep(0.2)
    assert speculation["speculate"] == 4
    assert 0 <= speculation["acceptance_rate"] <= 1
    skipped = re.search(r"^tgi_request_skipped_tokens_sum (\S+)$", metrics, re.M)
    assert skipped and float(skipped.group(1)) <= speculation["accepted_tokens"]  # a stop may cut a draft short


def test_speculate_flags_and_environment_set_the_settings():
    import argparse

    from blitzscale.cli import _add_settings_flags, _settings
    from common.settings import Settings

    parser = argparse.ArgumentParser()
    _add_settings_flags(parser)
    args = parser.parse_args(["--speculate", "3", "--speculate-ngram-max", "5"])
    settings = _settings(args)
    assert (settings.speculate, settings.speculate_ngram_min, settings.speculate_ngram_max) == (3, 2, 5)
    assert Settings.from_env({"SPECULATE": "2"}).speculate == 2
    for bad in ({"SPECULATE": "-1"}, {"SPECULATE_NGRAM_MIN": "4", "SPECULATE_NGRAM_MAX": "2"},
                {"SPECULATE_NGRAM_MIN": "0"}):
        with pytest.raises(ValueError, match="speculate"):
            Settings.from_env(bad)
