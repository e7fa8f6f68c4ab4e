"""A job's typed parameters onto engine requests, field for field (the replica side only).

The web resolved every default and the seed (web.validation): nothing is defaulted here. What the
engine refuses (`engine.params` checks its own edge) fails the job with a clear error.
"""
from __future__ import annotations

import dataclasses

from common.protocol import Job, SamplingParameters, derived_seed
from engine.params import GenerationRequest, Grammar, SamplingParams, StoppingParams


def engine_requests(job: Job) -> list[GenerationRequest]:
    """One request, or `best_of` of them (the n-th with the n-th derived seed) for TGI's best_of."""
    base = engine_request_id(job)
    if job.best_of == 1:
        return [_request(job, base, job.sampling)]
    if job.sampling.seed is None:
        raise ValueError("best_of > 1 needs a sampled request with a seed")
    return [_request(job, f"{base}/{n}", dataclasses.replace(job.sampling, seed=derived_seed(job.sampling.seed, n)))
            for n in range(job.best_of)]


def engine_request_id(job: Job) -> str:
    """The job's id in the engine: a re-run (attempt > 0) gets its own, so that an earlier run
    still going on the same replica is never confused with it."""
    return f"{job.request_id}.{job.attempt}" if job.attempt else job.request_id


def _request(job: Job, request_id: str, sampling: SamplingParameters) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        input_ids=tuple(job.input_ids),
        sampling=SamplingParams(
            do_sample=sampling.do_sample,
            temperature=sampling.temperature,
            top_k=sampling.top_k,
            top_p=sampling.top_p,
            typical_p=sampling.typical_p,
            repetition_penalty=sampling.repetition_penalty,
            frequency_penalty=sampling.frequency_penalty,
            presence_penalty=sampling.presence_penalty,
            generated_frequency_penalty=sampling.generated_frequency_penalty,
            logit_bias=tuple((token_id, bias) for token_id, bias in sampling.logit_bias),
            seed=sampling.seed,
            watermark=sampling.watermark,
        ),
        stopping=StoppingParams(max_new_tokens=job.stopping.max_new_tokens,
                                stop_sequences=tuple(job.stopping.stop_sequences)),
        top_n_tokens=job.top_n_tokens,
        token_logprobs=job.token_logprobs,
        prefill_logprobs=job.decoder_input_details,
        prefill_top_n_tokens=job.prefill_top_n_tokens,
        grammar=Grammar(job.grammar.kind, job.grammar.value) if job.grammar else None,
        adapter=job.adapter_id,
        cache_salt=job.cache_salt,
    )
