"""Every message that crosses a process boundary: the job on the queue and the events on a
request's stream channel. Both the publisher (replica) and the subscriber (web) use this
module; new fields are optional so that old and new processes can talk.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

EVENT_TOKEN = "token"
EVENT_FINAL = "final"
EVENT_ERROR = "error"
EVENT_STARTED = "started"
EVENT_ALIVE = "alive"  # the replica still works on the request (streaming or not)
EVENT_RETRY = "retry"  # web side only: the job was re-enqueued, its tokens will be replayed


@dataclass
class Job:
    """A validated generation request, as enqueued by the web."""

    request_id: str
    input_ids: list[int]
    parameters: dict  # validated TGI parameters (see web.validation.ValidParameters.to_job)
    stream: bool = False
    enqueued_at: float = field(default_factory=time.time)
    attempt: int = 0  # 1, 2, ...: re-enqueued by the web after the replica running it died
    trace_id: str | None = None  # the request's x-request-id: named in every log line about it

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Job":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass
class StreamEvent:
    """One message on a stream channel.

    kind=started: a replica took the job (`replica`, `device_type`, `timings` = {queue: seconds}).
    kind=alive:   sent by the replica when it published nothing else for a while: it still works on
                  the request (the web's silence deadline counts from the last event of any kind).
    kind=token:   `index` (1-based), `token`, `top_tokens`.
    kind=final:   `index` of the last token, `generated_text` (without the prompt), `details`
                  (TGI Details: finish_reason, generated_tokens, seed, prefill, tokens,
                  top_tokens, best_of_sequences), `timings` (queue/inference seconds),
                  `device_type` of the replica that served it (`x-compute-type`).
    kind=error:   `error`, `error_type` (TGI's ErrorResponse fields).
    Every event a replica publishes carries the job's `attempt` (absent for the first), so that
    the web can drop what a replica it gave up on still sends.
    """

    kind: str
    index: int = 0
    token: dict | None = None
    top_tokens: list[dict] | None = None
    generated_text: str | None = None
    details: dict | None = None
    timings: dict | None = None
    replica: str | None = None
    device_type: str | None = None
    error: str | None = None
    error_type: str | None = None
    attempt: int | None = None

    def encode(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, separators=(",", ":"))

    @classmethod
    def decode(cls, raw: str | bytes) -> "StreamEvent":
        data = json.loads(raw)
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        return cls(**known)
