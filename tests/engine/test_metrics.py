"""The engine's batch metrics: a failed step is counted but not successful."""
from __future__ import annotations

from engine.metrics import EngineMetrics


def value(metrics: EngineMetrics, name: str, method: str) -> float:
    return metrics.registry.get_sample_value(name, {"replica": "r0", "method": method})


def test_a_failed_step_counts_but_is_not_a_success():
    metrics = EngineMetrics(replica="r0")
    metrics.observe_batch("decode", 4, 0.01, 0.02)
    metrics.observe_batch("decode", 4, 0.01, 0.02)
    metrics.observe_failure("decode")
    metrics.observe_batch("prefill", 1, 0.01, 0.02)
    assert value(metrics, "tgi_batch_inference_count_total", "decode") == 3
    assert value(metrics, "tgi_batch_inference_success_total", "decode") == 2
    assert value(metrics, "tgi_batch_inference_count_total", "prefill") == 1
    assert value(metrics, "tgi_batch_inference_success_total", "prefill") == 1
