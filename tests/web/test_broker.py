"""tasks/queue/broker.py relies on kombu's Redis transport internals (QoS.restore_unacked, ack, reject,
`_delivered`, Transport.connection_errors). This fails loudly when an upgrade changes them:
the names and signatures first, then the behaviour on a real Redis that goes away."""
from __future__ import annotations

import inspect
import re
from pathlib import Path

import kombu
import pytest
from kombu.transport import redis as kombu_redis

from blitzscale.redis_server import EmbeddedRedis
from tasks.queue import broker

ROOT = Path(__file__).resolve().parents[2]


def test_kombu_is_within_the_pinned_range():
    pin = re.search(r'"kombu>=(\d+)\.(\d+),<(\d+)\.(\d+)"', (ROOT / "pyproject.toml").read_text())
    assert pin, "pyproject.toml pins kombu to the range tasks/queue/broker.py was written for"
    low, high = tuple(map(int, pin.groups()[:2])), tuple(map(int, pin.groups()[2:]))
    version = tuple(int(p) for p in kombu.__version__.split(".")[:2])
    assert low <= version < high, f"kombu {kombu.__version__} is outside {pin.group(0)}"


@pytest.mark.parametrize("method, parameters", [
    ("restore_unacked", ["self", "client"]),
    ("ack", ["self", "delivery_tag"]),
    ("reject", ["self", "delivery_tag", "requeue"]),
])
def test_the_patched_qos_methods_keep_their_signatures(method, parameters):
    assert list(inspect.signature(getattr(kombu_redis.QoS, method)).parameters) == parameters
    assert getattr(broker.QoS, method) is not getattr(kombu_redis.QoS, method)  # ours overrides it


def test_the_transport_wiring_we_subclass_is_there():
    assert kombu_redis.Channel.QoS is kombu_redis.QoS and broker.Channel.QoS is broker.QoS
    assert kombu_redis.Transport.Channel is kombu_redis.Channel and broker.Transport.Channel is broker.Channel
    errors = kombu_redis.Transport.connection_errors
    assert isinstance(errors, tuple) and all(issubclass(e, BaseException) for e in errors)


def test_jobs_held_when_redis_goes_away_do_not_crash_the_consumer():
    """A message taken without ack is in `_delivered`; with Redis gone, restore_unacked and ack
    (what Celery calls on the way down and after) must neither raise nor keep the tag."""
    server = EmbeddedRedis().start()
    try:
        with kombu.Connection(server.url, transport=broker.TRANSPORT) as connection:
            channel = connection.channel()
            queue = kombu.Queue("broker-test", kombu.Exchange("broker-test"), routing_key="broker-test")
            connection.Producer(channel).publish({"n": 1}, exchange=queue.exchange, routing_key="broker-test",
                                                 declare=[queue])
            first, second = queue(channel).get(no_ack=False), None
            connection.Producer(channel).publish({"n": 2}, exchange=queue.exchange, routing_key="broker-test")
            second = queue(channel).get(no_ack=False)
            assert isinstance(channel.qos, broker.QoS)
            assert set(channel.qos._delivered) == {first.delivery_tag, second.delivery_tag}
            server.stop()
            channel.qos.ack(first.delivery_tag)
            assert first.delivery_tag not in channel.qos._delivered
            channel.qos.restore_unacked()
            assert not channel.qos._delivered
    finally:
        server.stop()
