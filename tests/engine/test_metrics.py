"""The engine's batch metrics: every forward counts; only a step that went through succeeds."""
from __future__ import annotations

import pytest

from engine.engine import Engine
from engine.metrics import EngineMetrics
from engine.outputs import EngineError
from engine.scheduler import SchedulerConfig
from tests.engine.test_engine import model_and_tokenizer, request  # noqa: F401 (fixture)


def value(metrics: EngineMetrics, name: str, method: str) -> float:
    return metrics.registry.get_sample_value(name, {"replica": "r0", "method": method})


def test_a_failed_step_counts_but_is_not_a_success(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    metrics = EngineMetrics(replica="r0")
    engine = Engine(model, tokenizer, SchedulerConfig(), metrics).start()
    forward = engine.runner.forward
    calls = []

    def failing_on_the_third_call(batch):  # the prompt, two decode steps, then the third fails
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("device lost")
        return forward(batch)

    engine.runner.forward = failing_on_the_third_call
    try:
        with pytest.raises(EngineError, match="device lost"):
            list(engine.submit(request(tokenizer, "doomed", "Hello", max_new_tokens=10)))
        assert len(list(engine.submit(request(tokenizer, "next", "Hello", max_new_tokens=4)))) == 4
    finally:
        engine.stop()
    assert value(metrics, "tgi_batch_inference_count_total", "decode") == 2 + 1 + 3
    assert value(metrics, "tgi_batch_inference_success_total", "decode") == 2 + 3
    assert value(metrics, "tgi_batch_inference_count_total", "prefill") == 2
    assert value(metrics, "tgi_batch_inference_success_total", "prefill") == 2


def test_the_batch_gauges_read_zero_once_every_request_has_ended(model_and_tokenizer):
    """What Prometheus sees of an idle replica: no batch, no KV tokens (not the last step's rows)."""
    model, tokenizer = model_and_tokenizer
    metrics = EngineMetrics(replica="r0")
    engine = Engine(model, tokenizer, SchedulerConfig(), metrics)  # stepped here: nothing runs after the last step
    streams = [engine.submit(request(tokenizer, f"r{n}", "Hello", max_new_tokens=3 + n)) for n in range(3)]
    while engine.scheduler.has_work or not engine._inbox.empty():
        engine.step()
    assert [len(list(s)) for s in streams] == [3, 4, 5]
    assert metrics.registry.get_sample_value("tgi_batch_current_size", {"replica": "r0"}) == 0


def test_a_dropped_forward_ahead_step_counts_neither_as_success_nor_as_failure(model_and_tokenizer):
    """Watermarked rows run each forward ahead of the previous step's tokens; when "short" ends,
    the forward already run for its next token is dropped, unread (and so when "long" ends).
    Every step counted is one whose tokens reached the streams."""
    model, tokenizer = model_and_tokenizer
    metrics = EngineMetrics(replica="r0")
    engine = Engine(model, tokenizer, SchedulerConfig(), metrics, overlap=True)
    forwards = []
    forward = engine.runner.forward
    engine.runner.forward = lambda batch: forwards.append(1) or forward(batch)
    streams = [engine.submit(request(tokenizer, rid, "Hello", max_new_tokens=n, watermark=True))
               for rid, n in (("short", 3), ("long", 10))]
    while not all(stream.wait(0) for stream in streams):
        engine.step()
    assert [len(list(s)) for s in streams] == [3, 10]
    assert len(forwards) == 1 + 9 + 2  # the prompts, long's 9 decode steps, one dropped after each end
    for name in ("tgi_batch_inference_count_total", "tgi_batch_inference_success_total"):
        assert value(metrics, name, "prefill") == 1
        assert value(metrics, name, "decode") == 9
