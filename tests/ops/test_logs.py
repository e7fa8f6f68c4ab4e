"""Logs as text or JSON lines, each naming its request; the request id on every response."""
from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest

from common import logs
from common.settings import Settings


class QuietCluster:
    """The few client methods the app calls outside generation; no Redis."""

    def redis_alive(self):
        return True

    def replicas(self):
        return [{"name": "replica0@h", "slot": 0, "state": "active", "device_type": "cpu", "running": 2,
                 "waiting": 3}]

    def queue_size(self):
        return 4

    read_replicas, read_queue_size = replicas, queue_size  # what /metrics reads (raising when Redis is down)


@pytest.fixture
def app(tmp_path):
    from web.app import create_app

    return create_app(Settings(model_id=str(tmp_path), redis_url="redis://127.0.0.1:1/0"), client=QuietCluster())


@pytest.fixture
def capture():
    """Configure logging as a process would, into a buffer; the root logger is restored after."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level

    def configure(log_format: str) -> tuple[logging.Logger, io.StringIO]:
        stream = io.StringIO()
        config = logs.logging_config("INFO", log_format)
        config["handlers"]["stderr"]["stream"] = stream
        config["root"] = {"level": saved[1], "handlers": []}
        config["loggers"]["ops-test"] = {"level": "INFO", "handlers": ["stderr"], "propagate": False}
        logging.config.dictConfig(config)
        return logging.getLogger("ops-test"), stream

    yield configure
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


def test_json_lines_carry_the_bound_request_id(capture):
    logger, stream = capture("json")
    with logs.request_id_bound("abc-123"):
        logger.info("hello %s", "world")
    logger.warning("outside")
    first, second = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert first["message"] == "hello world" and first["request_id"] == "abc-123" and first["level"] == "INFO"
    assert {"ts", "logger", "process", "host"} <= set(first)
    assert second["request_id"] == "-" and second["level"] == "WARNING"


def test_text_lines_carry_the_bound_request_id(capture):
    logger, stream = capture("text")
    with logs.request_id_bound("abc-123"):
        logger.info("hello")
    assert "[abc-123]: hello" in stream.getvalue()


def test_log_format_is_checked():
    with pytest.raises(ValueError):
        Settings(log_format="yaml")
    assert Settings.from_env({"LOG_FORMAT": "json"}).log_format == "json"
    assert logs.logging_config("info", "json", gunicorn=True)["loggers"]["gunicorn.access"]["handlers"] == ["stderr"]


def test_request_id_is_taken_from_the_client_or_made(app):
    client = app.test_client()
    given = client.get("/health", headers={"X-Request-Id": "client-id.1"})
    assert given.headers["x-request-id"] == "client-id.1"
    made = client.get("/health").headers["x-request-id"]
    assert len(made) == 32 and made != client.get("/health").headers["x-request-id"]
    for unusable in ("two words", "x" * 200, "new\\nline"):
        assert client.get("/health", headers={"X-Request-Id": unusable}).headers["x-request-id"] != unusable
    assert client.post("/generate", json={"inputs": ""}, headers={"X-Request-Id": "bad-1"}).headers[
        "x-request-id"] == "bad-1"  # errors too


def test_cluster_gauges(app):
    text = app.test_client().get("/metrics").get_data(as_text=True)
    assert "tgi_queue_size 7.0" in text  # 4 in the broker + 3 waiting in the engine
    assert "blitz_queue_broker 4.0" in text
    assert 'blitz_replicas{state="active"} 1.0' in text and 'blitz_replicas{state="standby"} 0.0' in text
    assert 'blitz_replica_state{device_type="cpu",replica="replica0@h",slot="0",state="active"} 1.0' in text
    assert 'blitz_replica_running{replica="replica0@h"} 2.0' in text


def test_gunicorn_access_lines_take_the_id_of_the_response():
    record = logging.LogRecord("gunicorn.access", logging.INFO, __file__, 1, "%(r)s", None, None)
    record.args = {"r": "GET /health", "{x-request-id}o": "resp-7"}
    logs.RequestIdFilter().filter(record)
    assert record.request_id == "resp-7"
