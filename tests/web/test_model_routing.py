"""Which model a request is for, with several models (web/model_routing.py): the body's `model`
on /v1 (a model or one of its adapters), SageMaker's target-model header elsewhere, the first
model when neither names one; an unknown name is a 404 naming the served ones."""
from __future__ import annotations

import pytest
from flask import Flask

from common.settings import Settings
from web.model_routing import TARGET_MODEL_HEADER, UnknownModel, requested_model
from web.openai.errors import ModelNotFound


@pytest.fixture(scope="module")
def catalog(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "models.yaml"
    path.write_text("models:\n  - {name: a, model_id: /m/a, lora_adapters: sql=/adapters/sql}\n"
                    "  - {name: b, model_id: /m/b}\n")
    return Settings(models_file=str(path)).catalog


app = Flask(__name__)


@pytest.fixture
def pick(catalog):
    def pick(path: str, body: dict | None = None, header: str | None = None) -> str:
        headers = {TARGET_MODEL_HEADER: header} if header else {}
        with app.test_request_context(path, method="POST", json=body or {}, headers=headers):
            return requested_model(catalog).name

    return pick


def test_the_body_picks_on_v1_and_the_header_elsewhere(pick):
    assert pick("/v1/chat/completions", {"model": "b"}) == "b"
    assert pick("/v1/chat/completions", {"model": "b"}, header="a") == "b"  # the body wins
    assert pick("/v1/completions", {}, header="b") == "b"
    assert pick("/v1/completions", {"model": "tgi"}) == "a"
    assert pick("/generate", {"model": "b"}) == "a"  # TGI's body has no model: the header or the first
    assert pick("/generate", header="b") == "b"
    assert pick("/invocations", header="b") == "b"


def test_an_adapter_name_picks_its_model(pick):
    assert pick("/v1/chat/completions", {"model": "sql"}) == "a"


def test_a_name_served_twice_is_refused():
    with pytest.raises(ValueError, match="sql named twice"):
        Settings(models="a=/m/a,b=/m/b", lora_adapters="sql=/adapters/sql").catalog
    with pytest.raises(ValueError, match="base model.s name"):
        Settings(models="a=/m/a,b=/m/b", lora_adapters="b=/adapters/b").catalog


def test_unknown_names_are_404_in_each_routes_shape(pick):
    with pytest.raises(ModelNotFound) as openai:
        pick("/v1/chat/completions", {"model": "nope"})
    assert openai.value.status == 404 and openai.value.code == "model_not_found"
    assert "a, sql, b" in openai.value.message
    with pytest.raises(UnknownModel) as tgi:
        pick("/generate", header="nope")
    assert tgi.value.status == 404 and tgi.value.to_dict()["error_type"] == "model_not_found"
    assert "a, b" in tgi.value.message


def test_chat_tokenize_picks_by_its_chat_bodys_model(pick):
    # TGI's /chat_tokenize takes a chat body: its `model` named b was refused as "does not exist"
    # by the first model (listing only a's names) while b is served.
    assert pick("/chat_tokenize", {"model": "b"}) == "b"
    assert pick("/chat_tokenize", {"model": "sql"}) == "a"
    assert pick("/chat_tokenize", {"model": "tgi"}, header="b") == "b"
    with pytest.raises(UnknownModel) as unknown:
        pick("/chat_tokenize", {"model": "nope"})
    assert unknown.value.status == 404 and "a, sql, b" in unknown.value.message


def test_vllm_tokenize_bodies_pick_by_their_model(pick):
    # vLLM's /tokenize and /detokenize bodies name a model: b's was tokenized by a's tokenizer
    assert pick("/tokenize", {"model": "b", "prompt": "hi"}) == "b"
    assert pick("/detokenize", {"model": "b", "tokens": [1]}) == "b"
    assert pick("/tokenize", {"inputs": "hi"}, header="b") == "b"  # TGI's body: the header
    with pytest.raises(UnknownModel):
        pick("/tokenize", {"model": "nope", "prompt": "hi"})


def test_a_model_named_as_the_base_alias_is_refused():
    # `model: tgi` means "the default model": a second model named tgi could never be picked by it
    with pytest.raises(ValueError, match="'tgi'"):
        Settings(models="a=/m/a,tgi=/m/b").catalog
