"""TGI's validation rules, order and messages (TGI router's validation.rs)."""
from __future__ import annotations

import pytest

from common.settings import Settings
from web.errors import ValidationError
from web.validation import validate_request

PREFIX = "Input validation error: "
SETTINGS = Settings(model_id="unused", max_input_tokens=10, max_total_tokens=20)
JOB_PARAMETERS = {
    "do_sample", "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "frequency_penalty", "seed",
    "max_new_tokens", "stop", "best_of", "details", "decoder_input_details", "top_n_tokens", "return_full_text",
    "watermark", "grammar", "adapter_id", "cache_salt",
}


def encode(text: str) -> list[int]:
    return [len(word) for word in text.split()]


def validate(inputs="hello world", stream=False, full_text_default=False, settings=SETTINGS, **parameters):
    return validate_request({"inputs": inputs, "parameters": parameters}, settings=settings, encode=encode,
                            stream=stream, full_text_default=full_text_default)


def error_of(**kwargs) -> str:
    with pytest.raises(ValidationError) as raised:
        validate(**kwargs)
    assert raised.value.status == 422 and raised.value.error_type == "validation"
    return raised.value.message


def test_rules_are_checked_in_tgis_order():
    """Start with every rule broken; fixing them one at a time reveals the next, in TGI's order."""
    request = dict(
        inputs="", best_of=3, temperature=0.0, repetition_penalty=0.0, frequency_penalty=2.5, top_p=1.0,
        typical_p=0.0, top_k=0, max_new_tokens=0, stop=["a"] * 5, seed=7, top_n_tokens=6, truncate=0,
        grammar={"type": "json", "value": "{not json"},
    )
    steps = [
        ("`best_of` must be > 0 and <= 2. Given: 3", {"best_of": 2}),
        ("`temperature` must be strictly positive", {"temperature": 0.5}),
        ("`repetition_penalty` must be strictly positive", {"repetition_penalty": 1.1}),
        ("`frequency_penalty` must be >= -2.0 and <= 2.0", {"frequency_penalty": -2.0}),
        ("`top_p` must be > 0.0 and < 1.0", {"top_p": 0.9}),
        ("`typical_p` must be > 0.0 and < 1.0", {"typical_p": 0.9}),
        ("`top_k` must be strictly positive", {"top_k": 5}),
        ("`max_new_tokens` must be strictly positive", {"max_new_tokens": 5}),
        ("`stop` supports up to 4 stop sequences. Given: 5", {"stop": ["a", "b", "c", "d"]}),
        ("`seed` must not be set when `best_of` > 1", {"seed": None}),
        ("`top_n_tokens` must be >= 0 and <= 5. Given: 6", {"top_n_tokens": 5}),
        ("`inputs` cannot be empty", {"inputs": " ".join(["w"] * 16)}),
        ("`truncate` must be strictly positive and less than 10. Given: 0", {"truncate": None}),
        ("`inputs` tokens + `max_new_tokens` must be <= 20. Given: 16 `inputs` tokens and 5 `max_new_tokens`",
         {"inputs": " ".join(["w"] * 11)}),
        ("`inputs` must have less than 10 tokens. Given: 11", {"inputs": "w w w"}),
        ("grammar is not valid: the JSON schema is not valid JSON: Expecting property name enclosed in double "
         "quotes: line 1 column 2 (char 1)", {"grammar": {"type": "json", "value": {}}}),
    ]
    for message, fix in steps:
        assert error_of(**request) == PREFIX + message
        request.update(fix)
    valid = validate(**request)
    assert valid.input_length == 3 and valid.parameters["max_new_tokens"] == 5


@pytest.mark.parametrize("parameters, message", [
    ({"best_of": 0}, "`best_of` must be > 0 and <= 2. Given: 0"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "seed": 1}, "`seed` must not be set when `best_of` > 1"),
    ({"temperature": -1.0}, "`temperature` must be strictly positive"),
    ({"frequency_penalty": -2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"top_k": -3}, "`top_k` must be strictly positive"),
    ({"max_new_tokens": -1}, "`max_new_tokens` must be strictly positive"),
    ({"top_n_tokens": -1}, "`top_n_tokens` must be >= 0 and <= 5. Given: -1"),
    ({"truncate": 11}, "`truncate` must be strictly positive and less than 10. Given: 11"),
    ({"max_new_tokens": 19}, "`inputs` tokens + `max_new_tokens` must be <= 20. Given: 2 `inputs` tokens "
                             "and 19 `max_new_tokens`"),
    ({"grammar": {"type": "json", "value": {"type": "objekt"}}},
     "grammar is not valid: 'objekt' is not valid under any of the given schemas"),
])
def test_each_rule_has_tgis_message(parameters, message):
    assert error_of(**parameters) == PREFIX + message


def test_streaming_rules():
    assert error_of(stream=True, best_of=2, do_sample=True) == (
        PREFIX + "`best_of` != 1 is not supported when streaming tokens")
    assert error_of(stream=True, decoder_input_details=True) == (
        PREFIX + "`decoder_input_details` == true is not supported when streaming tokens")
    assert validate(stream=True, best_of=1).job.stream is True
    assert validate(decoder_input_details=True).parameters["decoder_input_details"] is True


def test_job_parameters_are_resolved():
    valid = validate()
    p = valid.parameters
    assert set(p) == JOB_PARAMETERS
    assert p == {
        "do_sample": False, "temperature": 1.0, "top_k": None, "top_p": None, "typical_p": None,
        "repetition_penalty": 1.0, "frequency_penalty": 0.0, "seed": None, "max_new_tokens": 18, "stop": [],
        "best_of": 1, "details": False, "decoder_input_details": False, "top_n_tokens": 0,
        "return_full_text": False, "watermark": False, "grammar": None, "adapter_id": None, "cache_salt": "",
    }
    assert valid.job.input_ids == [5, 5] and valid.job.request_id and valid.job.stream is False


@pytest.mark.parametrize("stream, parameters, shown", [
    (False, {}, False),
    (True, {}, True),  # every streamed token carries its logprob
    (False, {"details": True}, True),
    (False, {"decoder_input_details": True}, True),  # TGI returns the details with it
    (False, {"best_of": 2, "do_sample": True}, True),  # the candidates are ranked by them
])
def test_the_job_asks_for_token_logprobs_only_where_the_answer_shows_or_ranks_by_them(stream, parameters, shown):
    assert validate(stream=stream, **parameters).job.token_logprobs is shown


def test_max_new_tokens_defaults_to_100_when_there_is_room():
    roomy = Settings(model_id="unused", max_input_tokens=100, max_total_tokens=1000)
    assert validate(settings=roomy).parameters["max_new_tokens"] == 100
    assert validate(settings=roomy, max_new_tokens=7).parameters["max_new_tokens"] == 7


def test_sampling_is_on_with_any_sampling_parameter_and_gets_a_seed():
    for parameters in ({"do_sample": True}, {"temperature": 1.0}, {"top_k": 3}, {"top_p": 0.5}, {"typical_p": 0.5}):
        p = validate(**parameters).parameters
        assert p["do_sample"] is True and isinstance(p["seed"], int) and 0 <= p["seed"] < 2**64
    assert validate(do_sample=True, seed=42).parameters["seed"] == 42
    assert validate(seed=42).parameters["seed"] == 42  # greedy keeps a given seed


def test_truncate_keeps_the_last_tokens():
    valid = validate(inputs="a bb ccc dddd eeeee", truncate=2)
    assert valid.job.input_ids == [4, 5] and valid.input_length == 2
    assert valid.inputs == "a bb ccc dddd eeeee"


def test_return_full_text_default_depends_on_the_route():
    assert validate(full_text_default=True).parameters["return_full_text"] is True
    assert validate(full_text_default=True, return_full_text=False).parameters["return_full_text"] is False
    assert validate(return_full_text=True).full_text("!") == "hello world!"


@pytest.mark.parametrize("grammar, job_grammar", [
    ({"type": "json", "value": {}}, {"type": "json", "value": {}}),
    ({"type": "json_object", "value": {"type": "object"}}, {"type": "json", "value": {"type": "object"}}),
    ({"type": "json", "value": '{"type": "integer"}'}, {"type": "json", "value": {"type": "integer"}}),
    ({"type": "json_schema", "value": {"name": "n", "schema": {"type": "array"}}}, {"type": "json", "value": {"type": "array"}}),
    ({"type": "regex", "value": "[0-9]{3}-[a-z]+"}, {"type": "regex", "value": "[0-9]{3}-[a-z]+"}),
])
def test_a_valid_grammar_goes_into_the_job_in_one_shape(grammar, job_grammar):
    assert validate(grammar=grammar).parameters["grammar"] == job_grammar


@pytest.mark.parametrize("grammar, reason", [
    ({"type": "regex", "value": "a+("}, "unclosed group"),
    ({"type": "regex", "value": "(?=a)b"}, "look-around"),
    ({"type": "regex", "value": 12}, "a regex grammar's value must be a string"),
    ({"type": "json", "value": {"type": "objekt"}}, "'objekt' is not valid under any of the given schemas"),
    ({"type": "json", "value": {"type": "object", "properties": {"a": {"minimum": "x"}}}}, "'x' is not of type 'number'"),
    ({"type": "json", "value": {"$ref": "#/$defs/missing"}}, "does not exist"),
    ({"type": "json", "value": [1, 2]}, "a json grammar's value must be a JSON schema object"),
    ({"type": "json_schema", "value": {"name": "n"}}, "a json_schema grammar's value must be"),
])
def test_an_invalid_grammar_is_a_validation_error(grammar, reason):
    message = error_of(grammar=grammar)
    assert message.startswith(PREFIX + "grammar is not valid: ") and reason in message, message


def test_adapter_id_names_a_lora_adapter_or_the_base_model():
    settings = Settings(model_id="/models/tiny", lora_adapters="support=/srv/support,legal=/srv/legal")
    assert validate(settings=settings, adapter_id="legal").job.adapter_id == "legal"
    for base in (None, "", "tiny", "/models/tiny"):
        assert validate(settings=settings, adapter_id=base).job.adapter_id is None
    with pytest.raises(ValidationError, match="`adapter_id` 'sales' is not a LoRA adapter of this service; "
                                              "its adapters: support, legal"):
        validate(settings=settings, adapter_id="sales")
    with pytest.raises(ValidationError, match="its adapters: none"):  # no longer silently ignored
        validate(adapter_id="support")
