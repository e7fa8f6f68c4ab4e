"""vLLM's tokenizer routes beside TGI's, through the real web app: /tokenize told apart by its
body's keys, /detokenize, /tokenizer_info, each answering (and failing) in its own shape."""
from __future__ import annotations

import pytest

from tests.web.test_openai_routes import chat_model_dir, make_client  # noqa: F401

@pytest.fixture
def client(chat_model_dir, redis_url, redis_client):
    return make_client(chat_model_dir, redis_url)


def test_a_prompt_body_gets_vllms_answer(client):
    body = client.post("/tokenize", json={"model": "any", "prompt": "hello paris"}).get_json()
    assert body == {"count": 2, "max_model_len": 20, "tokens": [1, 8], "token_strs": None}
    body = client.post("/tokenize", json={"prompt": "hello paris", "return_token_strs": True,
                                          "add_special_tokens": False}).get_json()
    assert body["token_strs"] == ["hello", "paris"]


def test_a_messages_body_is_templated_as_vllm_does(client):
    messages = [{"role": "user", "content": "hello"}]
    body = client.post("/tokenize", json={"messages": messages, "return_token_strs": True}).get_json()
    # The template (tests.web.test_openai_routes.TEMPLATE) writes "user hello " then "a" for the
    # generation prompt; "user" is outside the word vocabulary ([UNK], id 0), "a" is id 9.
    assert body["token_strs"] == ["[UNK]", "hello", "a"] and body["tokens"] == [0, 1, 9]
    no_prompt = client.post("/tokenize", json={"messages": messages, "add_generation_prompt": False}).get_json()
    assert no_prompt["tokens"] == [0, 1] and no_prompt["count"] == 2
    assert client.post("/tokenize", json={"messages": messages, "continue_final_message": True,
                                          "add_generation_prompt": False}).get_json()["tokens"] == [0, 1]


def test_tgis_body_is_answered_as_before_even_beside_vllms_keys(client):
    tgi = client.post("/tokenize", json={"inputs": "hello paris", "prompt": "ignored"}).get_json()
    assert tgi == [{"id": 1, "text": "hello", "start": 0, "stop": 5}, {"id": 8, "text": "paris", "start": 6, "stop": 11}]


def test_detokenize_round_trips_and_refuses_unknown_ids(client):
    tokens = client.post("/tokenize", json={"prompt": "the capital of paris"}).get_json()["tokens"]
    assert client.post("/detokenize", json={"tokens": tokens}).get_json() == {"prompt": "the capital of paris"}
    response = client.post("/detokenize", json={"tokens": [1, 10**6]})
    error = response.get_json()["error"]
    assert response.status_code == 400 and error["param"] == "tokens" and "Given: 1000000" in error["message"]
    response = client.post("/detokenize", json={"tokens": ["a"]})
    assert response.status_code == 400 and response.get_json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"prompt": 5}, "prompt"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "user", "content": "a"}], "add_generation_prompt": True, "continue_final_message": True},
     "continue_final_message"),
])
def test_a_bad_vllm_body_is_a_vllm_error(client, body, param):
    response = client.post("/tokenize", json=body)
    assert response.status_code == 400 and response.get_json()["error"]["param"] == param


def test_a_bad_tgi_body_is_still_tgis_error(client):
    for body in ({"inputs": 5}, {}):
        response = client.post("/tokenize", json=body)
        assert response.status_code == 422 and response.get_json()["error_type"] == "validation"


def test_tokenizer_info_is_the_tokenizers_configuration(client):
    response = client.get("/tokenizer_info")
    info = response.get_json()
    assert response.status_code == 200 and info["tokenizer_class"] and info["chat_template"].startswith("{% for m")
    assert not {"name_or_path", "vocab_file", "tokenizer_file"} & set(info)  # no paths of this host


def test_the_document_shows_both_bodies(client):
    spec = client.get("/api-doc/openapi.json").get_json()
    body = spec["paths"]["/tokenize"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert [ref["$ref"].rsplit("/", 1)[-1] for ref in body["oneOf"]] == [
        "TokenizeRequest", "VllmTokenizeRequest", "VllmChatTokenizeRequest"]
    assert {"/detokenize", "/tokenizer_info"} <= set(spec["paths"])
