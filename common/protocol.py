"""Every message that crosses a process boundary: the job on the queue (with its typed
generation parameters) and the events on a request's stream channel. Both the publisher
(replica) and the subscriber (web) use this module; fields added later are optional, and a
reader ignores fields it does not know, so that old and new processes can talk.

The web resolves every default and the seed before it sends a job (web.validation); a replica
maps these parameters 1:1 onto the engine's (tasks.runtime.job_params) and never re-defaults.
Range checks are the web's (its edge) and the engine's (`engine.params`, its own edge).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

EVENT_TOKEN = "token"
EVENT_FINAL = "final"
EVENT_ERROR = "error"
EVENT_STARTED = "started"
EVENT_ALIVE = "alive"  # the replica still works on the request (streaming or not)
EVENT_RETRY = "retry"  # web side only: the job was re-enqueued, its tokens will be replayed


class StrEnum(str, Enum):
    """`enum.StrEnum` (Python 3.11+) for 3.10: a member is its value, in `str()` and f-strings too."""

    __str__ = str.__str__
    __format__ = str.__format__


class FailureReason(StrEnum):
    """Why a request failed, finer than TGI's `error_type`: the `reason` label of
    `tgi_request_failure` and the web's WARNING line, so that a dashboard can split failures.
    Not shown to clients (their error body is TGI's)."""

    OVERLOADED = "overloaded"  # over --max-concurrent-requests (429)
    VALIDATION = "validation"  # the request itself (400/413/415/422)
    UNAUTHORIZED = "unauthorized"  # a missing or wrong API key (401)
    TOKENIZER_UNAVAILABLE = "tokenizer_unavailable"  # the web could not load the tokenizer yet
    QUEUE_UNAVAILABLE = "queue_unavailable"  # Redis could not be reached to admit or enqueue
    NO_REPLICA = "no_replica"  # no replica active or loading
    QUEUE_TIMEOUT = "queue_timeout"  # no replica took the job within --queue-timeout
    REQUEST_TIMEOUT = "request_timeout"  # not finished within --request-timeout
    REPLICA_SILENT = "replica_silent"  # no event within --replica-silence-timeout
    REDELIVERIES_EXHAUSTED = "redeliveries_exhausted"  # its replicas died more than --max-redeliveries times
    RERUN_DIVERGED = "rerun_diverged"  # a failover's re-run generated other tokens than those sent
    PUBLISH_FAILED = "publish_failed"  # the replica could not publish its tokens (the stream had a gap)
    ENGINE_ERROR = "engine_error"  # the replica's engine failed the request
    MALFORMED_JOB = "malformed_job"  # the replica could not read the job
    INCOMPLETE = "incomplete"  # the events ended without a final one
    BAD_EVENT = "bad_event"  # an event the web could not read
    INTERNAL = "internal"  # anything else (a bug)


_SEED_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: derived seeds spread over the whole range


def derived_seed(seed: int, n: int) -> int:
    """The seed of the `n`-th of several samples of one request (n = 0: the request's own), so
    that a set of samples (TGI's best_of, OpenAI's n) is reproducible from one seed."""
    return (seed + n * _SEED_MIX) % 2**64


@dataclass
class SamplingParameters:
    """How the next token is chosen; `engine.params.SamplingParams`, field for field."""

    do_sample: bool = False  # greedy unless set
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0  # TGI's: over the prompt and the output
    presence_penalty: float = 0.0  # OpenAI's: over the generated tokens only
    generated_frequency_penalty: float = 0.0  # OpenAI's frequency_penalty
    logit_bias: list[tuple[int, float]] = field(default_factory=list)  # (token id, added logit)
    seed: int | None = None  # set by the web for every sampled request; None when greedy
    watermark: bool = False  # TGI's watermark (the replica's --watermark-gamma and --watermark-delta)


@dataclass
class StoppingParameters:
    """When generation ends (besides EOS); `engine.params.StoppingParams`."""

    max_new_tokens: int
    stop_sequences: list[str] = field(default_factory=list)


@dataclass
class GrammarParameters:
    """What the whole output must match (`engine.params.Grammar`): kind `json` (value: a JSON
    schema, `{}` for any JSON value) or `regex` (value: a pattern)."""

    kind: str
    value: Any


@dataclass
class Job:
    """A validated generation request, as enqueued by the web."""

    request_id: str
    input_ids: list[int]
    sampling: SamplingParameters
    stopping: StoppingParameters
    stream: bool = False
    best_of: int = 1  # TGI's best_of: samples with derived_seed(sampling.seed, n); the best one wins
    top_n_tokens: int = 0
    decoder_input_details: bool = False  # the prompt tokens' logprobs in the details
    # Whether anything the client gets shows or ranks by each generated token's logprob (TGI's
    # details and stream tokens, best_of, OpenAI's logprobs): the replica skips it otherwise.
    token_logprobs: bool = True
    prefill_top_n_tokens: int = 0  # with decoder_input_details: each prompt token's likeliest alternatives
    grammar: GrammarParameters | None = None
    adapter_id: str | None = None  # the LoRA adapter it runs under (a name of --lora-adapters); None: the base model
    cache_salt: str = ""  # the prefix cache's namespace (the tenant's and the request's salt, web/tenancy.py)
    enqueued_at: float = field(default_factory=time.time)
    attempt: int = 0  # 1, 2, ...: re-enqueued by the web after the replica running it died
    trace_id: str | None = None  # the request's x-request-id: named in every log line about it
    model: str | None = None  # with several models (common/models.py): the one that runs it; None: the first

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        known["sampling"] = _from_dict(SamplingParameters, known["sampling"])
        known["sampling"].logit_bias = [(int(t), float(b)) for t, b in known["sampling"].logit_bias]
        known["stopping"] = _from_dict(StoppingParameters, known["stopping"])
        if known.get("grammar") is not None:
            known["grammar"] = _from_dict(GrammarParameters, known["grammar"])
        return cls(**known)


def _from_dict(cls, data: dict):
    return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


@dataclass
class StreamEvent:
    """One message on a stream channel.

    kind=started: a replica took the job (`replica`, `device_type`, `timings` = {queue: seconds}).
    kind=alive:   sent by the replica when it published nothing else for a while: it still works on
                  the request (the web's silence deadline counts from the last event of any kind).
    kind=token:   `index` (1-based), `token`, `top_tokens`; the first also `prefill` (and
                  `prefill_top_tokens`) when the job asks for the prompt's logprobs.
    kind=final:   `index` of the last token, `generated_text` (without the prompt), `details`
                  (TGI Details: finish_reason, generated_tokens, seed, prefill, tokens,
                  top_tokens, best_of_sequences), `timings` (queue/inference seconds),
                  `device_type` of the replica that served it (`x-compute-type`),
                  `cached_tokens` of the prompt reused from its prefix cache (OpenAI's usage),
                  `skipped_tokens` that came from accepted speculative drafts (absent: none).
    kind=error:   `error`, `error_type` (TGI's ErrorResponse fields), `reason` (a FailureReason:
                  for metrics and logs, not shown to the client).
    Every event a replica publishes carries the job's `attempt` (absent for the first), so that
    the web can drop what a replica it gave up on still sends.
    """

    kind: str
    index: int = 0
    token: dict | None = None
    top_tokens: list[dict] | None = None
    prefill: list[dict] | None = None
    prefill_top_tokens: list[list[dict]] | None = None
    generated_text: str | None = None
    details: dict | None = None
    timings: dict | None = None
    replica: str | None = None
    device_type: str | None = None
    error: str | None = None
    error_type: str | None = None
    reason: str | None = None
    attempt: int | None = None
    cached_tokens: int | None = None  # final: prompt tokens whose KV the replica found in its prefix cache
    skipped_tokens: int | None = None  # final: its tokens that came from accepted speculative drafts

    def encode(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> "StreamEvent":
        data = json.loads(raw)
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**known)
