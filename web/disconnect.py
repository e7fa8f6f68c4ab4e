"""Whether the client of the current request hung up, for a JSON request that waits for its final
event (a stream learns it when a write fails). Under gunicorn's gthread worker the request's socket
is in the WSGI environ: readable with nothing to read is the client's FIN. A request that is
cancelled this way unsubscribes from its channel, and its replica cancels it at its next `alive`
tick (tasks/runtime/stream_relay.py), as for a stream."""
from __future__ import annotations

import select
import socket
from collections.abc import Callable

from flask import request

CHECK_EVERY = 0.5  # seconds: how often a waiting JSON request looks at its client's socket


class ClientDisconnected(Exception):
    """The client closed its connection before the answer was ready."""


def disconnect_watch() -> Callable[[], bool]:
    """A check for the current request's client; never true without a socket to watch (the test
    client, another server)."""
    sock = request.environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket) or hasattr(sock, "context"):  # TLS: MSG_PEEK cannot see its EOF
        return lambda: False

    # poll, not select: a busy process serves connections on descriptors past select's 1,024,
    # where select raises (and every such client would be taken as gone).
    poller = select.poll()
    poller.register(sock, select.POLLIN)

    def gone() -> bool:
        try:
            readable = poller.poll(0)
            return bool(readable) and sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (OSError, ValueError):  # reset, or closed under us
            return True

    return gone
