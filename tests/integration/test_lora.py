"""LoRA adapters through the real service (web, Redis, a replica started with --lora-adapters):
TGI's `adapter_id` on every TGI route, the OpenAI `model` field with the official client, /info
and /v1/models, unknown adapters refused, and a replica whose adapter does not fit refusing to
start with a message naming the module."""
from __future__ import annotations

import json
import threading
import time

import openai
import pytest
import requests

from tests.lora_adapters import build_adapter, greedy, merged_model
from tests.service import Service

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    return {"alpha": build_adapter(tiny_model_dir, root / "alpha", seed=11),
            "beta": build_adapter(tiny_model_dir, root / "beta", seed=12, rank=4, alpha=8)}


@pytest.fixture(scope="module")
def lora_service(tiny_model_dir, adapter_dirs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("lora-service")
    adapters = ",".join(f"{name}={path}" for name, path in adapter_dirs.items())
    with Service(str(tiny_model_dir), workdir, env={"XDG_CACHE_HOME": str(workdir / "cache"),
                                                    "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024",
                                                    "LORA_ADAPTERS": adapters}).running() as svc:
        yield svc


@pytest.fixture(scope="module")
def reference(tiny_model_dir, adapter_dirs, tiny_reference):
    """Greedy token ids of a prompt under the base model or an adapter merged by peft."""
    models = {None: tiny_reference.model, **{n: merged_model(tiny_model_dir, d) for n, d in adapter_dirs.items()}}
    tokenizer = tiny_reference.tokenizer
    memo = {}

    def tokens(text: str, adapter: str | None, max_new_tokens: int = 10) -> list[int]:
        key = (text, adapter, max_new_tokens)
        if key not in memo:
            memo[key] = greedy(models[adapter], tokenizer(text).input_ids, max_new_tokens)
        return memo[key]

    tokens.tokenizer = tokenizer
    return tokens


def generate(svc, inputs, route="/generate", **parameters):
    response = requests.post(f"{svc.base_url}{route}", json={"inputs": inputs, "parameters": parameters}, timeout=60)
    return response


def ids_of(body: dict) -> list[int]:
    return [token["id"] for token in body["details"]["tokens"]]


def test_adapter_id_gives_peft_merged_tokens(lora_service, reference):
    for adapter in ("alpha", "beta", None):
        response = generate(lora_service, PROMPT, max_new_tokens=10, details=True, adapter_id=adapter)
        assert response.status_code == 200, response.text
        ids = ids_of(response.json())
        assert ids == reference(PROMPT, adapter)[: len(ids)] and len(ids) >= 3, adapter
    assert reference(PROMPT, "alpha") != reference(PROMPT, None) != reference(PROMPT, "beta")


def test_adapter_id_on_every_tgi_route(lora_service, reference):
    expected = reference.tokenizer.decode(reference(PROMPT, "alpha", 6), skip_special_tokens=True)
    compat = requests.post(f"{lora_service.base_url}/", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 6, "adapter_id": "alpha", "return_full_text": False}},
        timeout=60)
    assert compat.status_code == 200 and compat.json()[0]["generated_text"] == expected
    invocations = requests.post(f"{lora_service.base_url}/invocations", json={
        "inputs": PROMPT, "parameters": {"max_new_tokens": 6, "adapter_id": "alpha", "return_full_text": False}},
        timeout=60)
    assert invocations.status_code == 200 and invocations.json()[0]["generated_text"] == expected
    stream = generate(lora_service, PROMPT, route="/generate_stream", max_new_tokens=6, adapter_id="alpha")
    events = [json.loads(line[5:]) for line in stream.content.decode().splitlines() if line.startswith("data:")]
    assert stream.status_code == 200 and events[-1]["generated_text"] == expected


def test_concurrent_requests_on_two_adapters_and_the_base(lora_service, reference):
    """Staggered requests that batch together on the replica each get their own model's tokens."""
    jobs = [(f"{PROMPT} {n}", [None, "alpha", "beta"][n % 3]) for n in range(9)]
    results = {}

    def run(n, text, adapter):
        threading.Event().wait(0.03 * n)
        results[n] = generate(lora_service, text, max_new_tokens=8, details=True, adapter_id=adapter)

    threads = [threading.Thread(target=run, args=(n, *job)) for n, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for n, (text, adapter) in enumerate(jobs):
        assert results[n].status_code == 200, results[n].text
        ids = ids_of(results[n].json())
        assert ids == reference(text, adapter, 8)[: len(ids)], (n, adapter)


@pytest.mark.parametrize("route", ["/generate", "/generate_stream", "/", "/invocations"])
def test_unknown_adapter_is_a_422_naming_the_known_ones(lora_service, route):
    response = generate(lora_service, PROMPT, route=route, adapter_id="gamma")
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: `adapter_id` 'gamma' is not a LoRA adapter of this service; "
                 "its adapters: alpha, beta",
        "error_type": "validation"}


def test_info_lists_the_adapters(lora_service):
    assert requests.get(f"{lora_service.base_url}/info", timeout=30).json()["lora_adapters"] == ["alpha", "beta"]


def test_openai_model_names_an_adapter(lora_service, reference, tiny_model_dir):
    client = openai.OpenAI(base_url=f"{lora_service.base_url}/v1", api_key="-", timeout=120, max_retries=0)
    models = client.models.list().data
    base = tiny_model_dir.name
    assert [(m.id, getattr(m, "parent", None)) for m in models] == [(base, None), ("alpha", base), ("beta", base)]
    assert client.models.retrieve("beta").parent == base
    expected = reference.tokenizer.decode(reference(PROMPT, "beta", 8), skip_special_tokens=True)
    answer = client.completions.create(model="beta", prompt=PROMPT, temperature=0, max_tokens=8)
    assert answer.choices[0].text == expected and answer.model == "beta"
    for name in (base, "tgi"):  # the base model
        plain = client.completions.create(model=name, prompt=PROMPT, temperature=0, max_tokens=8)
        assert plain.choices[0].text == reference.tokenizer.decode(reference(PROMPT, None, 8), skip_special_tokens=True)
    with pytest.raises(openai.NotFoundError) as refused:
        client.chat.completions.create(model="gamma", messages=[{"role": "user", "content": "Hi"}])
    assert refused.value.code == "model_not_found"
    assert f"The models served here: {base}, alpha, beta." in refused.value.message


def test_a_replica_on_another_host_gets_the_adapters_from_a_peer(lora_service, adapter_dirs, reference, tmp_path):
    """A replica on a host without the adapters' files (its paths do not exist there, its host
    cache is empty) copies them from the first replica's data plane by content hash, into its own
    host cache, and serves them once the first replica is gone."""
    host_b = tmp_path / "host-b"
    env_a = lora_service.env
    lora_service.env = {**env_a, "WEIGHT_CACHE_DIR": str(host_b), "WEIGHTS_HOST": "127.0.0.2",
                        "LORA_ADAPTERS": "alpha=/not/on/this/host/alpha,beta=/not/on/this/host/beta"}
    try:
        lora_service.start_replica(1)
    finally:
        lora_service.env = env_a
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and replica_state(lora_service, 1) != "active":
        lora_service._check_alive()
        time.sleep(0.3)
    assert replica_state(lora_service, 1) == "active", lora_service.logs()
    for name, directory in adapter_dirs.items():
        [copy] = [d for d in (host_b / "adapters").iterdir() if d.is_dir() and
                  (d / "adapter_config.json").read_bytes() == (directory / "adapter_config.json").read_bytes()]
        assert (copy / "adapter_model.safetensors").read_bytes() == (directory / "adapter_model.safetensors").read_bytes()
    lora_service.kill_replica(0)
    response = generate(lora_service, PROMPT, max_new_tokens=10, details=True, adapter_id="alpha")
    assert response.status_code == 200, response.text
    ids = ids_of(response.json())
    assert ids == reference(PROMPT, "alpha")[: len(ids)] and len(ids) >= 3


def replica_state(svc, slot: int) -> str | None:
    replicas = requests.get(f"{svc.base_url}/cluster_state", timeout=30).json()["replicas"]
    return next((r["state"] for r in replicas if r["slot"] == slot), None)


def test_a_replica_whose_adapter_does_not_fit_refuses_to_start(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file, save_file
    import torch

    directory = build_adapter(tiny_model_dir, tmp_path / "misfit", seed=13, targets=["v_proj"])
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"] = torch.randn(96, 8)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    svc = Service(str(tiny_model_dir), tmp_path / "svc", env={"XDG_CACHE_HOME": str(tmp_path / "cache"),
                                                              "LORA_ADAPTERS": f"misfit={directory}"})
    svc.redis.start()
    try:
        svc.env["REDIS_URL"] = svc.redis.url
        replica = svc.start_replica(0)
        assert replica.wait(120) != 0
        log = (svc.workdir / "replica0.log").read_text()
        assert "LoRA adapter 'misfit': module model.layers.0.self_attn.v_proj: the adapter's shapes" in log
    finally:
        svc.stop()
