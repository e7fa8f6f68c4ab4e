"""The web's pub/sub connection cut without a FIN or RST (a Redis host that vanished, a failover
that moved its address): no read ever fails and the OS's keepalive notices only after hours. The
subscriber must notice by itself (a PING left unanswered) and subscribe again on a new connection,
or every request of the process is refused (its subscription never confirmed) until then.

A TCP proxy in front of a real Redis stands for the network: `black_hole` stops forwarding on the
connections it has (keeping them open), while new connections pass."""
from __future__ import annotations

import socket
import threading

import redis

from tasks.client.subscriber import Subscriber


class BlackHoleProxy:
    def __init__(self, target: tuple[str, int]):
        self._target = target
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._pipes: list[tuple[socket.socket, socket.socket, threading.Event]] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self._target)
            holed = threading.Event()
            with self._lock:
                self._pipes.append((client, upstream, holed))
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink, holed), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket, holed: threading.Event) -> None:
        while True:
            try:
                data = source.recv(65536)
            except OSError:
                return
            if not data:
                return
            if not holed.is_set():  # a black-holed connection swallows what it reads
                try:
                    sink.sendall(data)
                except OSError:
                    return

    def black_hole(self) -> None:
        with self._lock:
            for _, _, holed in self._pipes:
                holed.set()

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for client, upstream, _ in self._pipes:
                client.close()
                upstream.close()


def test_a_silently_dead_connection_is_replaced(redis_url, redis_client):
    server = redis.Redis.from_url(redis_url).connection_pool.connection_kwargs
    proxy = BlackHoleProxy((server["host"], server["port"]))
    subscriber = Subscriber(f"redis://127.0.0.1:{proxy.port}/0")
    try:
        before = subscriber.subscribe("blackhole-a")
        redis_client.publish("blackhole-a", b"one")
        assert before.get(timeout=5) == b"one"

        proxy.black_hole()
        # Confirmed only once the subscriber saw its connection dead and made another (seconds).
        after = subscriber.subscribe("blackhole-b", timeout=30)
        redis_client.publish("blackhole-b", b"two")
        assert after.get(timeout=5) == b"two"
        redis_client.publish("blackhole-a", b"three")  # the older subscription was carried over
        assert before.get(timeout=5) == b"three"
    finally:
        proxy.close()
