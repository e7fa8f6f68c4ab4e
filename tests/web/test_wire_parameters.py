"""The web → replica contract: the web resolves every default and the seed once and sends typed
parameters; the replica maps them 1:1 onto the engine's and re-defaults nothing."""
from __future__ import annotations

import dataclasses
import json

import pytest

from common.protocol import Job, SamplingParameters, StoppingParameters, derived_seed
from engine.params import Grammar, SamplingParams, StoppingParams
from tasks.runtime.job_params import engine_requests
from tests.web.test_validation import validate


def over_the_wire(job: Job) -> Job:
    return Job.from_dict(json.loads(json.dumps(job.to_dict())))


def test_the_job_is_typed_and_survives_json():
    job = validate(temperature=0.7, top_k=5, top_p=0.9, stop=["x"], max_new_tokens=4, top_n_tokens=2,
                   grammar={"type": "regex", "value": "[a-z]+"}).job
    assert isinstance(job.sampling, SamplingParameters) and isinstance(job.stopping, StoppingParameters)
    assert job.sampling.do_sample and job.sampling.temperature == 0.7 and isinstance(job.sampling.seed, int)
    assert job.stopping == StoppingParameters(max_new_tokens=4, stop_sequences=["x"])
    assert over_the_wire(job) == job


def test_defaults_are_resolved_by_the_web():
    job = validate().job
    assert job.sampling == SamplingParameters()  # greedy, TGI's neutral values, no seed
    assert job.stopping.max_new_tokens == 18  # what max_total_tokens leaves (20 - 2 prompt tokens)
    assert (job.best_of, job.top_n_tokens, job.decoder_input_details, job.grammar) == (1, 0, False, None)


def test_a_greedy_request_sends_no_seed_but_the_web_keeps_the_given_one():
    valid = validate(seed=42)
    assert valid.job.sampling.seed is None and valid.parameters["seed"] == 42


def test_the_replica_maps_every_field_one_to_one():
    job = over_the_wire(validate(temperature=0.5, top_k=3, top_p=0.8, typical_p=0.7, repetition_penalty=1.3,
                                 frequency_penalty=0.4, seed=9, stop=["."], max_new_tokens=5, top_n_tokens=1,
                                 decoder_input_details=True, grammar={"type": "json", "value": {}},
                                 watermark=True).job)
    job.sampling = dataclasses.replace(job.sampling, presence_penalty=0.2, generated_frequency_penalty=-0.3,
                                       logit_bias=[(4, -2.0)])
    job.prefill_top_n_tokens = 2
    job.token_logprobs = False
    [request] = engine_requests(over_the_wire(job))
    assert request.sampling == SamplingParams(
        do_sample=True, temperature=0.5, top_k=3, top_p=0.8, typical_p=0.7, repetition_penalty=1.3,
        frequency_penalty=0.4, presence_penalty=0.2, generated_frequency_penalty=-0.3, logit_bias=((4, -2.0),),
        seed=9, watermark=True)
    assert request.stopping == StoppingParams(max_new_tokens=5, stop_sequences=(".",))
    assert request.input_ids == tuple(job.input_ids) and request.request_id == job.request_id
    assert request.top_n_tokens == 1 and request.prefill_logprobs is True and request.prefill_top_n_tokens == 2
    assert request.grammar == Grammar("json", {}) and request.token_logprobs is False


def test_a_job_from_a_web_that_predates_token_logprobs_gets_them():
    wire = validate().job.to_dict()
    del wire["token_logprobs"]
    assert Job.from_dict(wire).token_logprobs is True


def test_best_of_samples_take_seeds_derived_from_the_webs_one():
    job = validate(best_of=2, do_sample=True).job
    requests = engine_requests(job)
    seeds = [r.sampling.seed for r in requests]
    assert seeds == [job.sampling.seed, derived_seed(job.sampling.seed, 1)] and seeds[0] != seeds[1]
    assert [r.request_id for r in requests] == [f"{job.request_id}/0", f"{job.request_id}/1"]
    assert [r.sampling.seed for r in engine_requests(over_the_wire(job))] == seeds  # reproducible


def test_the_replica_does_not_re_default_a_sampled_job_without_seed():
    """A seed is the web's to choose: a sampled job without one is refused at the engine's edge."""
    job = validate(do_sample=True).job
    job.sampling = dataclasses.replace(job.sampling, seed=None)
    with pytest.raises(ValueError, match="seed"):
        engine_requests(job)
