"""kombu's Redis transport, made to survive a Redis restart under load.

With `acks_late`, a replica holds unacknowledged messages while it generates. When Redis goes
away, Celery's consumer closes its channel, and kombu (5.7) then tries to put those messages
back through a connection that it has already torn down: an AttributeError that Celery treats
as unrecoverable, so the worker process exits. Here that restore is best effort: the messages
stay in (or, after a restart without persistence, are gone from) the `unacked` hash, and the
web re-enqueues any request whose replica stopped serving it (tasks.client.event_stream), so nothing
is lost that anyone still waits for. The consumer then reconnects as usual.
"""
from __future__ import annotations

import logging

from kombu.transport import redis as kombu_redis

log = logging.getLogger(__name__)

TRANSPORT = "tasks.queue.broker:Transport"  # Celery's `broker_transport`


GONE = (AttributeError, OSError, *kombu_redis.Transport.connection_errors)  # the channel's connection was torn down


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client=None):
        try:
            super().restore_unacked(client)
        except GONE as error:
            log.warning("could not give %d unacknowledged job(s) back to the queue (Redis is gone): %r",
                        len(self._delivered), error)
            self._delivered.clear()

    def ack(self, delivery_tag):
        """A job that finished while Redis was away: its message went with the old connection."""
        try:
            super().ack(delivery_tag)
        except GONE as error:
            log.warning("could not acknowledge a finished job (Redis was away): %r", error)
            self._delivered.pop(delivery_tag, None)

    def reject(self, delivery_tag, requeue=False):
        try:
            super().reject(delivery_tag, requeue=requeue)
        except GONE as error:
            log.warning("could not reject a job (Redis was away): %r", error)
            self._delivered.pop(delivery_tag, None)


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
