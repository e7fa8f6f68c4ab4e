"""Constrained decoding in the engine, on the tiny random model: the grammar does all the work.

The schemas bound every string and number, so that a random model's output completes well
inside its token budget.
"""
from __future__ import annotations

import json
import re
import threading
import time

import jsonschema
import pytest
import torch

from engine.engine import Engine
from engine.grammar import GrammarError, allocate_bitmask, apply_token_bitmask, compiler_for, grammar_matcher
from engine.outputs import FinishReason, RequestCancelled
from engine.params import GenerationRequest, Grammar, SamplingParams, StoppingParams
from engine.scheduler import SchedulerConfig

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "maxItems": 2},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "active"],
    "additionalProperties": False,
}
DATE = r"20[0-9]{2}-(0[1-9]|1[0-2])-[0-3][0-9]"
SAMPLED = dict(do_sample=True, temperature=1.0, top_k=20)


@pytest.fixture(scope="module")
def model_and_tokenizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def engine(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig()).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def tokenizer(model_and_tokenizer):
    return model_and_tokenizer[1]


def request(tokenizer, rid, text="Hello", grammar=None, max_new_tokens=120, **sampling):
    if sampling.get("do_sample"):
        sampling.setdefault("seed", 7)
    return GenerationRequest(
        request_id=rid,
        input_ids=tuple(tokenizer(text).input_ids),
        sampling=SamplingParams(**sampling),
        stopping=StoppingParams(max_new_tokens=max_new_tokens),
        grammar=grammar,
    )


def finish_of(stream):
    events = list(stream)
    return events, events[-1].finish


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_json_schema_output_validates(engine, tokenizer, sampling):
    for n in range(3):
        _, finish = finish_of(engine.submit(request(
            tokenizer, f"json-{n}-{bool(sampling)}", f"Person {n}:", Grammar("json", PERSON),
            **{**sampling, **({"seed": n} if sampling else {})})))
        assert finish.reason is FinishReason.EOS_TOKEN, finish
        jsonschema.validate(json.loads(finish.generated_text), PERSON)


@pytest.mark.parametrize("sampling", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_regex_output_full_matches(engine, tokenizer, sampling):
    _, finish = finish_of(engine.submit(request(tokenizer, f"date-{bool(sampling)}", "Today is",
                                                Grammar("regex", DATE), **sampling)))
    assert re.fullmatch(DATE, finish.generated_text), finish.generated_text
    assert finish.reason is FinishReason.EOS_TOKEN


def test_any_json_parses_and_text_joins_from_tokens(engine, tokenizer):
    # A hot temperature spreads the random model over the allowed tokens, EOS among them.
    streams = [engine.submit(request(tokenizer, f"any-{seed}", "Data:", Grammar("json", {}), max_new_tokens=300,
                                     do_sample=True, seed=seed, temperature=3.0)) for seed in range(6)]
    for stream in streams:
        events, finish = finish_of(stream)
        assert finish.reason is FinishReason.EOS_TOKEN, finish
        json.loads(finish.generated_text)
        assert "".join(e.token.text for e in events if not e.token.special) == finish.generated_text


def test_grammar_and_free_rows_in_one_batch(engine, tokenizer):
    """Free rows get exactly the tokens they get with no grammar row beside them."""
    free = [("Hello", {}), ("The capital of France is", {}), ("Numbers: 0 1", {"do_sample": True, "seed": 3, "top_p": 0.9})]
    alone = [[e.token.id for e in engine.submit(request(tokenizer, f"alone-{n}", text, max_new_tokens=30, **s))]
             for n, (text, s) in enumerate(free)]
    results = {}

    def run(key, req):
        results[key] = list(engine.submit(req))

    jobs = [(f"free-{n}", request(tokenizer, f"free-{n}", text, max_new_tokens=30, **s)) for n, (text, s) in enumerate(free)]
    jobs += [(f"json-{n}", request(tokenizer, f"mixed-json-{n}", f"Person {n}:", Grammar("json", PERSON), **s))
             for n, s in enumerate([{}, {**SAMPLED, "seed": 11}])]
    jobs.append(("date", request(tokenizer, "mixed-date", "Today is", Grammar("regex", DATE), **SAMPLED)))
    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    for n in range(len(free)):
        assert [e.token.id for e in results[f"free-{n}"]] == alone[n]
    for n in range(2):
        jsonschema.validate(json.loads(results[f"json-{n}"][-1].finish.generated_text), PERSON)
    assert re.fullmatch(DATE, results["date"][-1].finish.generated_text)


def test_max_new_tokens_before_completion_is_length(engine, tokenizer):
    events, finish = finish_of(engine.submit(request(tokenizer, "short", "Person:", Grammar("json", PERSON), max_new_tokens=4)))
    assert finish.reason is FinishReason.LENGTH
    assert len(events) == 4
    assert '{"name": "'.startswith(finish.generated_text)  # cut short inside the first key


def test_logprobs_come_from_the_masked_distribution(engine, tokenizer):
    """The forced first token `{` has probability 1 under the mask: logprob 0, and it is its
    own only top token (forbidden tokens, at -inf, are no alternatives)."""
    req = request(tokenizer, "forced", "Person:", Grammar("json", PERSON))
    events, _ = finish_of(engine.submit(GenerationRequest(**{**req.__dict__, "top_n_tokens": 3})))
    assert events[0].token.text == "{"
    assert events[0].token.logprob == pytest.approx(0.0, abs=1e-5)
    assert [t.text for t in events[0].top_tokens] == ["{"]
    assert all(len(e.top_tokens) >= 1 and all(t.logprob > -float("inf") for t in e.top_tokens) for e in events)


def test_cancel_frees_a_grammar_row(engine, tokenizer):
    # A string with no bound: the random model keeps writing it.
    stream = engine.submit(request(tokenizer, "endless", "Hello", Grammar("json", {"type": "string"}), max_new_tokens=2000))
    next(stream)
    engine.cancel("endless")
    with pytest.raises(RequestCancelled):
        list(stream)
    deadline = time.monotonic() + 5
    while engine.stats().running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats().running == 0


def test_invalid_grammar_is_refused_at_submit(engine, tokenizer):
    with pytest.raises(GrammarError, match="grammar is not valid"):
        engine.submit(request(tokenizer, "bad", "Hello", Grammar("regex", "a+(")))
    with pytest.raises(ValueError):
        Grammar("xml", "<a/>")


def test_compiled_grammars_are_cached_by_hash(tokenizer):
    eos = frozenset({tokenizer.eos_token_id})
    compiler = compiler_for(tokenizer, eos)
    reordered = dict(reversed(list(PERSON.items())))  # the same schema, keys in another order
    assert compiler._compiled(Grammar("json", PERSON)) is compiler._compiled(Grammar("json", reordered))
    assert compiler._compiled(Grammar("regex", DATE)) is not compiler._compiled(Grammar("json", PERSON))
    # One matcher per row: rows advance independently over one compiled grammar.
    first, second = (grammar_matcher(Grammar("regex", "[0-9]"), tokenizer, eos) for _ in range(2))
    assert first.advance(tokenizer.convert_tokens_to_ids("2"))  # one digit: complete
    assert first.is_complete and not second.is_complete


def test_many_threads_compile_at_once(tokenizer):
    eos = frozenset({tokenizer.eos_token_id})
    schemas = [{"type": "object", "properties": {f"k{n % 4}": {"type": "integer"}}} for n in range(16)]
    results, errors = [], []

    def compile_one(schema):
        try:
            results.append(grammar_matcher(Grammar("json", schema), tokenizer, eos))
        except Exception as error:  # noqa: BLE001 - any failure is the test's failure
            errors.append(error)

    threads = [threading.Thread(target=compile_one, args=(schema,)) for schema in schemas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors and len(results) == 16


def test_apply_masks_only_the_grammar_rows_and_the_extra_columns():
    width = 70  # two bitmask words cover 64 tokens: columns 64..69 are past the tokenizer
    logits = torch.randn(3, width)
    bitmask = allocate_bitmask(1, 64)
    bitmask[0, 0] = 0b1010  # tokens 1 and 3
    out = apply_token_bitmask(logits, bitmask, torch.tensor([1]))
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    allowed = torch.isfinite(out[1]).nonzero().view(-1).tolist()
    assert allowed == [1, 3]
    assert out[1, 1] == logits[1, 1]


def test_a_grammar_failing_mid_generation_fails_only_its_request(engine, tokenizer):
    """A regex whose lexer outgrows the library's limits once it starts matching: that request
    gets an error, its neighbour goes on."""
    neighbour = engine.submit(request(tokenizer, "neighbour", "Hello", max_new_tokens=20))
    stream = engine.submit(request(tokenizer, "huge", "Hello", Grammar("regex", "(a{1000}){1000}")))
    with pytest.raises(GrammarError, match="the grammar failed"):
        list(stream)
    assert len(list(neighbour)) == 20
