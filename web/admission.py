"""TGI's concurrency limit: at most `max_concurrent_requests` generation requests in flight in
this process; the next one gets 429 `Model is overloaded`."""
from __future__ import annotations

import threading

from web.errors import Overloaded


class Admission:
    def __init__(self, limit: int):
        self.limit = limit
        self._in_flight = 0
        self._lock = threading.Lock()

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def acquire(self) -> "Slot":
        with self._lock:
            if self._in_flight >= self.limit:
                raise Overloaded()
            self._in_flight += 1
        return Slot(self)

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1


class Slot:
    """One admitted request. `release` may be called more than once (a stream's generator and
    its response's close hook both call it)."""

    def __init__(self, admission: Admission):
        self._admission = admission
        self._released = False
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            if self._released:
                return
            self._released = True
        self._admission._release()

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
