"""Every stream ends, with its final or an error, whatever fails or stops: a request whose last
token is known is over then, not when its KV slot is given back (with overlap on, a step later)."""
from __future__ import annotations

import pytest

from engine.engine import Engine
from engine.host_transfer import Fence
from engine.outputs import EngineError
from engine.scheduler import SchedulerConfig
from tests.engine.test_engine import model_and_tokenizer, request  # noqa: F401 (fixture)


class FailingRunner:
    """The engine's runner, whose `fail_at`-th forward raises (`where="forward"`) or whose
    `fail_at`-th step's tokens fail on their way to the host (`where="fence"`: as a CUDA error
    surfaces at the synchronize after its launch)."""

    def __init__(self, runner, where: str, fail_at: int):
        self.runner, self.where, self.fail_at = runner, where, fail_at
        self.calls = {"forward": 0, "fence": 0}

    def __getattr__(self, name):
        return getattr(self.runner, name)

    def _count(self, where: str) -> None:
        self.calls[where] += 1
        if where == self.where and self.calls[where] == self.fail_at:
            raise RuntimeError(f"device lost at {where} {self.fail_at}")

    def forward(self, batch):
        self._count("forward")
        return self.runner.forward(batch)

    def fence(self):
        runner = self

        class Reading(Fence):
            def wait(self):
                runner._count("fence")

        return Reading(runner.runner.device)


def outcome(stream) -> tuple[int, str]:
    """(tokens received, how the stream ended: 'final' or 'error')."""
    tokens = []
    try:
        for event in stream:
            tokens.append(event)
    except EngineError:
        return len(tokens), "error"
    assert tokens[-1].finish is not None
    return len(tokens), "final"


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("where", ["forward", "fence"])
@pytest.mark.parametrize("fail_at", range(1, 7))
def test_a_step_failure_after_a_requests_last_token_still_delivers_its_final(model_and_tokenizer, overlap,
                                                                             where, fail_at):
    """"short" gets its 3rd and last token from the 3rd step; with overlap on, the 4th is launched
    before the 3rd's tokens are read, and short's slot is released only after the 4th. Whichever
    step fails, every stream ends; short has its final once its last token could be read."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=4, max_total_tokens=256), overlap=overlap)
    engine.runner = FailingRunner(engine.runner, where, fail_at)
    short = engine.submit(request(tokenizer, "short", "Hello", max_new_tokens=3))
    long = engine.submit(request(tokenizer, "long", "Hello", max_new_tokens=20))
    engine.start()
    try:
        assert short.wait(30) and long.wait(30)
        assert outcome(short) == ((3, "final") if fail_at > 3 else (fail_at - 1, "error"))
        assert outcome(long) == (fail_at - 1, "error")  # every token read before the failure
    finally:
        engine.stop()


@pytest.mark.parametrize("overlap", [False, True])
def test_stop_between_steps_ends_every_stream(model_and_tokenizer, overlap):
    """Stopped after the step that read short's last token (with overlap on, its slot is still
    held by the step launched meanwhile): short has its final, the running and the queued
    requests an error."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=2, max_total_tokens=256), overlap=overlap)
    short = engine.submit(request(tokenizer, "short", "Hello", max_new_tokens=3))
    long = engine.submit(request(tokenizer, "long", "Hello", max_new_tokens=20))
    queued = engine.submit(request(tokenizer, "queued", "Hello", max_new_tokens=20))
    for _ in range(3 + overlap):  # overlap: the 3rd step's tokens are read by the 4th engine step
        engine.step()
    engine.stop()
    assert short.wait(0) and long.wait(0) and queued.wait(0)
    assert outcome(short) == (3, "final")
    assert outcome(long) == (3, "error")
    assert outcome(queued) == (0, "error")


def test_stop_ends_every_stream_of_a_running_engine(model_and_tokenizer):
    """Stopped while its loop runs: once stop() returns, every stream has ended; the long running
    request and the queued one with an error (the short one with its final or an error)."""
    model, tokenizer = model_and_tokenizer
    engine = Engine(model, tokenizer, SchedulerConfig(max_batch_size=2, max_total_tokens=512), overlap=True).start()
    streams = [engine.submit(request(tokenizer, f"r{n}", "Hello", max_new_tokens=3 + 200 * n)) for n in range(3)]
    next(streams[1])
    engine.stop(timeout=60)
    assert all(stream.wait(0) for stream in streams)
    assert [outcome(stream)[1] for stream in streams][1:] == ["error", "error"]
