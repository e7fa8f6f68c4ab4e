"""Turn a job's validated TGI parameters into engine requests (the replica side only)."""
from __future__ import annotations

import random

from engine.params import GenerationRequest, Grammar, SamplingParams, StoppingParams
from common.protocol import Job

_SEED_RANGE = 2**63 - 1


def engine_requests(job: Job) -> list[GenerationRequest]:
    """One request, or `best_of` of them (each with its own seed) for TGI's best_of."""
    p = job.parameters
    best_of = p.get("best_of") or 1
    seeds = [p.get("seed")] if best_of == 1 else [random.randint(0, _SEED_RANGE) for _ in range(best_of)]
    base = engine_request_id(job)
    return [_request(job, f"{base}/{n}" if best_of > 1 else base, seed) for n, seed in enumerate(seeds)]


def engine_request_id(job: Job) -> str:
    """The job's id in the engine: a re-run (attempt > 0) gets its own, so that an earlier run
    still going on the same replica is never confused with it."""
    return f"{job.request_id}.{job.attempt}" if job.attempt else job.request_id


def _request(job: Job, request_id: str, seed: int | None) -> GenerationRequest:
    p = job.parameters
    do_sample = bool(p.get("do_sample"))
    sampling = SamplingParams(
        do_sample=do_sample,
        temperature=p.get("temperature") or 1.0,
        top_k=p.get("top_k"),
        top_p=p.get("top_p"),
        typical_p=p.get("typical_p"),
        repetition_penalty=p.get("repetition_penalty") or 1.0,
        frequency_penalty=p.get("frequency_penalty") or 0.0,
        presence_penalty=p.get("presence_penalty") or 0.0,
        generated_frequency_penalty=p.get("generated_frequency_penalty") or 0.0,
        logit_bias=tuple((int(token_id), float(bias)) for token_id, bias in p.get("logit_bias") or ()),
        seed=(seed if seed is not None else random.randint(0, _SEED_RANGE)) if do_sample else None,
    )
    stopping = StoppingParams(max_new_tokens=p["max_new_tokens"], stop_sequences=tuple(p.get("stop") or ()))
    grammar = p.get("grammar")  # {"type": "json" | "regex", "value": ...}, checked by the web
    return GenerationRequest(
        request_id=request_id,
        input_ids=tuple(job.input_ids),
        sampling=sampling,
        stopping=stopping,
        top_n_tokens=p.get("top_n_tokens") or 0,
        prefill_logprobs=bool(p.get("decoder_input_details")),
        grammar=Grammar(grammar["type"], grammar["value"]) if grammar else None,
    )
