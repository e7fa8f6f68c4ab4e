from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.default_model import converted_default_model
from tests.service import Service
from tests.tiny_model import build_tiny_model

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process, in this one and every process a test starts (they inherit it): the
# tests' models are tiny, and a test runs the web, replicas and itself on a few shared cores, where
# a second OpenMP thread spin-waits for a core instead of helping (the engine tests ran several
# times slower with two). Set before anything imports torch; an explicit OMP_NUM_THREADS wins.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def service(tiny_model_dir, tmp_path_factory):
    """Web (gunicorn) + one replica worker + Redis, serving the tiny model."""
    workdir = tmp_path_factory.mktemp("service")
    with Service(str(tiny_model_dir), workdir, env={
            "XDG_CACHE_HOME": str(workdir / "cache"), "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024"}).running() as svc:
        yield svc


@pytest.fixture(scope="session")
def default_model_entry() -> Path:
    """The default model converted once into this host's weight cache, read-only for every test
    that serves it (tests.default_model.link_weights gives a test's own cache the same files)."""
    return converted_default_model()


@pytest.fixture(scope="session")
def real_service(default_model_entry, tmp_path_factory):
    """The default model (SmolLM2-135M-Instruct from its GGUF file), for the few tests that
    need real text. Converted once into the host weight cache."""
    workdir = tmp_path_factory.mktemp("real-service")
    from common.settings import default_model_id

    svc = Service(default_model_id(), workdir)
    try:
        svc.start(timeout=300)
        yield svc
    finally:
        svc.stop()


@pytest.fixture(scope="session")
def tiny_reference(tiny_model_dir):
    """transformers' own generate on the tiny model: what a lone greedy request must give."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()

    def greedy(text: str, max_new_tokens: int) -> list[int]:
        ids = tokenizer(text, return_tensors="pt").input_ids
        with torch.inference_mode():
            out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
        return out[0, ids.shape[1]:].tolist()

    greedy.tokenizer = tokenizer
    greedy.model = model
    return greedy
