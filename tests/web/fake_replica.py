"""A stand-in for a replica: takes jobs off the Celery queue in Redis and publishes scripted
events on each job's stream channel, so the web is exercised end to end through real Redis."""
from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Iterable

import redis

from common.keys import GENERATION_QUEUE, replica_key, replica_queue, stream_channel
from common.protocol import EVENT_ERROR, EVENT_FINAL, EVENT_STARTED, EVENT_TOKEN, Job, StreamEvent

Script = Callable[[Job], Iterable["StreamEvent | float"]]  # a float: sleep that long


def decode_job(raw: bytes) -> Job:
    """A Celery message (kombu's Redis transport): the body is base64 JSON [args, kwargs, embed]."""
    message = json.loads(raw)
    args, _kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    return Job.from_dict(args[0])


def register_replica(redis_url: str, slot: int = 0, state: str = "active", **fields) -> None:
    name = f"replica{slot}@test"
    record = {"slot": slot, "name": name, "state": state, "model_id": "tiny", "model_sha": "abc123",
              "dtype": "float32", "device_type": "cpu", **fields}
    redis.Redis.from_url(redis_url).set(replica_key(name), json.dumps(record), ex=60)


def token(index: int, text: str, top_n: int = 0, logprob: bool = True) -> StreamEvent:
    """A token event; `logprob` False: the job said nothing shows it, so a replica sends None."""
    tok = {"id": index + 10, "text": text, "logprob": -0.5 if logprob else None, "special": False}
    top = [{"id": index + 10 + k, "text": text, "logprob": -0.5 - k, "special": False} for k in range(top_n)]
    return StreamEvent(kind=EVENT_TOKEN, index=index, token=tok, top_tokens=top or None)


def reply(words: list[str], *, finish_reason: str = "length", delay: float = 0.0, cached_tokens: int | None = None,
          skipped_tokens: int | None = None) -> Script:
    """started, one token event per word, then final (with details, timings, `cached_tokens` and
    `skipped_tokens`)."""

    def script(job: Job):
        yield StreamEvent(kind=EVENT_STARTED, replica="replica0@test")
        events = [token(i + 1, w, job.top_n_tokens, job.token_logprobs) for i, w in enumerate(words)]
        prefill = [{"id": i, "text": "p", "logprob": None if n == 0 else -1.0, "special": False}
                   for n, i in enumerate(job.input_ids)]
        prefill_top = [[] if n == 0 else [{**t, "id": t["id"] + 1, "logprob": -0.25}] * job.prefill_top_n_tokens
                       for n, t in enumerate(prefill)]
        if job.stream and job.decoder_input_details and events:  # as the relay sends them
            events[0].prefill, events[0].prefill_top_tokens = prefill, prefill_top if job.prefill_top_n_tokens else None
        for event in events:
            if delay:
                yield delay
            yield event
        details = {
            "finish_reason": finish_reason,
            "generated_tokens": len(words),
            "seed": job.sampling.seed,
            "prefill": prefill,
            "tokens": [e.token for e in events],
        }
        if job.top_n_tokens:
            details["top_tokens"] = [e.top_tokens for e in events]
        if job.prefill_top_n_tokens:
            details["prefill_top_tokens"] = prefill_top
        yield StreamEvent(kind=EVENT_FINAL, index=len(words), generated_text="".join(words), details=details,
                          timings={"queue": 0.25, "inference": 0.5}, cached_tokens=cached_tokens,
                          skipped_tokens=skipped_tokens)

    return script


def fail_after(words: list[str], error: str = "boom") -> Script:
    def script(job: Job):
        for i, w in enumerate(words):
            yield token(i + 1, w)
        yield StreamEvent(kind=EVENT_ERROR, error=error, error_type="generation")

    return script


class FakeReplica:
    """Registers an active replica record (`replica0@test`, as its `started` events name it)
    while it runs, as a real replica's heartbeat does."""

    def __init__(self, redis_url: str, script: Script, name: str = "replica0@test"):
        self.redis_url = redis_url
        self.name = name
        self.redis = redis.Redis.from_url(redis_url)
        self.script = script
        self.jobs: list[Job] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "FakeReplica":
        if not self.redis.exists(replica_key(self.name)):
            register_replica(self.redis_url, slot=int(self.name[len("replica"):].split("@")[0]))
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(5)
        self.redis.delete(replica_key(self.name))

    def _run(self) -> None:
        beat = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - beat > 5:  # the heartbeat: the record outlives a long (slow) test
                self.redis.expire(replica_key(self.name), 60)  # a record a test deleted stays deleted
                beat = time.monotonic()
            item = self.redis.brpop([GENERATION_QUEUE, replica_queue(self.name)], timeout=0.1)  # as a replica does
            if item is None:
                continue
            job = decode_job(item[1])
            self.jobs.append(job)
            for step in self.script(job):
                if self._stop.is_set():
                    return
                if isinstance(step, (int, float)):
                    time.sleep(step)
                else:
                    self.redis.publish(stream_channel(job.request_id), step.encode())
