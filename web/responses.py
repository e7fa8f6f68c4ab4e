"""TGI response bodies and headers, built from a request's events on its stream channel.

Pure functions of the validated request, the events and the request's clock (no Flask here)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from common.protocol import StreamEvent
from web.validation import ValidRequest


@dataclass
class RequestClock:
    """When a request was received, validated, picked up by a replica, and finished."""

    start: float = field(default_factory=time.monotonic)
    validated: float | None = None
    picked_up: float | None = None
    ended: float | None = None

    def mark(self, name: str) -> None:
        if getattr(self, name) is None:
            setattr(self, name, time.monotonic())

    @property
    def total(self) -> float:
        return (self.ended or time.monotonic()) - self.start

    @property
    def validation(self) -> float:
        return (self.validated or self.start) - self.start


@dataclass(frozen=True)
class Outcome:
    """A finished generation, with TGI's timings (seconds)."""

    final: StreamEvent
    total_time: float
    validation_time: float
    queue_time: float
    inference_time: float

    @classmethod
    def of(cls, final: StreamEvent, clock: RequestClock) -> "Outcome":
        clock.mark("ended")
        validated = clock.validated or clock.start
        picked_up = clock.picked_up or validated
        timings = final.timings or {}
        return cls(
            final=final,
            total_time=clock.total,
            validation_time=clock.validation,
            queue_time=_timing(timings, "queue", picked_up - validated),
            inference_time=_timing(timings, "inference", clock.ended - picked_up),
        )

    @property
    def generated_tokens(self) -> int:
        details = self.final.details or {}
        return int(details.get("generated_tokens") or self.final.index or 0)

    @property
    def skipped_tokens(self) -> int:
        """Tokens that came from accepted speculative drafts (TGI's `tgi_request_skipped_tokens`)."""
        return int(self.final.skipped_tokens or 0)

    @property
    def time_per_token(self) -> float:
        return self.inference_time / self.generated_tokens if self.generated_tokens else 0.0


def _timing(timings: dict, name: str, measured: float) -> float:
    """The replica's own figure when it sent one (`queue` or `queue_time`), else ours."""
    value = timings.get(name, timings.get(f"{name}_time"))
    return float(value) if value is not None else max(measured, 0.0)


def generate_response(valid: ValidRequest, final: StreamEvent) -> dict:
    response = {"generated_text": valid.full_text(final.generated_text or "")}
    if valid.wants_details:
        response["details"] = details(valid, final.details or {}, final.index)
    return response


def details(valid: ValidRequest, raw: dict, last_index: int = 0) -> dict:
    out = _sequence(valid, raw, last_index)
    sequences = raw.get("best_of_sequences")
    if sequences:
        out["best_of_sequences"] = [
            {"generated_text": valid.full_text(s.get("generated_text") or ""), **_sequence(valid, s)} for s in sequences
        ]
    return out


def _sequence(valid: ValidRequest, raw: dict, last_index: int = 0) -> dict:
    out = {
        "finish_reason": raw.get("finish_reason", "length"),
        "generated_tokens": raw.get("generated_tokens", last_index),
        "seed": raw.get("seed"),
        "prefill": (raw.get("prefill") or []) if valid.parameters["decoder_input_details"] else [],
        "tokens": raw.get("tokens") or [],
    }
    if raw.get("top_tokens"):
        out["top_tokens"] = raw["top_tokens"]
    return out


def stream_token(valid: ValidRequest, event: StreamEvent) -> dict:
    """A StreamResponse for every token but the last."""
    response = {"index": event.index, "token": event.token}
    if valid.parameters["top_n_tokens"] > 0:
        response["top_tokens"] = event.top_tokens or []
    response["generated_text"] = None
    response["details"] = None
    return response


def stream_last(valid: ValidRequest, event: StreamEvent, final: StreamEvent) -> dict:
    """The last StreamResponse: the last token, with the full text and the stream details."""
    response = stream_token(valid, event)
    response["generated_text"] = valid.full_text(final.generated_text or "")
    if valid.parameters["details"]:
        raw = final.details or {}
        response["details"] = {
            "finish_reason": raw.get("finish_reason", "length"),
            "generated_tokens": raw.get("generated_tokens", event.index),
            "seed": raw.get("seed"),
            "input_length": valid.input_length,
        }
    return response


def last_token_of(final: StreamEvent) -> StreamEvent | None:
    """A final event that arrived with no token event before it: its last token, if known."""
    tokens = (final.details or {}).get("tokens") or []
    if not tokens:
        return None
    return StreamEvent(kind="token", index=final.index or len(tokens), token=tokens[-1])


def timing_headers(valid: ValidRequest, outcome: Outcome, compute_type: str) -> dict:
    """TGI's units: `x-compute-time` in seconds (float), the other times in whole milliseconds."""
    return {
        "x-compute-type": compute_type,
        "x-compute-time": f"{outcome.total_time:.6f}",
        "x-compute-characters": str(len(valid.inputs)),
        "x-total-time": _millis(outcome.total_time),
        "x-validation-time": _millis(outcome.validation_time),
        "x-queue-time": _millis(outcome.queue_time),
        "x-inference-time": _millis(outcome.inference_time),
        "x-time-per-token": _millis(outcome.time_per_token),
        "x-prompt-tokens": str(valid.input_length),
        "x-generated-tokens": str(outcome.generated_tokens),
    }


def _millis(seconds: float) -> str:
    return str(int(max(seconds, 0.0) * 1000))
