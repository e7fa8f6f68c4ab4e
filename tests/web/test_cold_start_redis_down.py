"""With several models (cold starts on), Redis going away answers a generation request with the
queue-unavailable error in the route's shape, as with one model, never a 500."""
from __future__ import annotations

import pytest

from blitzscale.redis_server import EmbeddedRedis
from common.settings import Settings
from web.app import create_app


def answers_without_redis(**models) -> list[tuple[int, str]]:
    server = EmbeddedRedis().start()
    client = create_app(Settings(redis_url=server.url, max_input_tokens=10, max_total_tokens=20, queue_timeout=3.0,
                                 **models)).test_client()
    server.stop()
    tgi = client.post("/generate", json={"inputs": "hello", "parameters": {"max_new_tokens": 1}},
                      headers={"X-Amzn-SageMaker-Target-Model": "b"} if "models" in models else {})
    chat = client.post("/v1/completions", json={"model": "b" if "models" in models else None, "prompt": "hello",
                                                "max_tokens": 1})
    return [(tgi.status_code, tgi.json["error_type"]), (chat.status_code, chat.json["error"]["type"])]


def test_redis_down_answers_as_with_one_model(model_dir):
    one = answers_without_redis(model_id=str(model_dir))
    assert one[0][0] != 500 and one[1][0] != 500
    assert answers_without_redis(models=f"a={model_dir},b={model_dir}", min_replicas=0) == one
