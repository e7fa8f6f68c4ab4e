"""Start and stop the child processes of `blitzscale serve`, in order, cleanly."""
from __future__ import annotations

import logging
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Protocol

from common.processes import stop_processes

log = logging.getLogger(__name__)


class Restartable(Protocol):
    def running(self) -> bool: ...
    def restart(self) -> object: ...


class Supervisor:
    """Children run in their own sessions, so a terminal's Ctrl-C reaches only us and we stop
    them in order: the web first (no new requests), then the replicas, then Redis."""

    def __init__(self):
        self.children: list[tuple[str, subprocess.Popen]] = []
        self.restartable: list[tuple[str, Restartable]] = []
        self._stopping = False
        self._next_restart = 0.0
        self._checks: list[Callable[[], str | None]] = []
        self.fatal: str | None = None  # why the service stopped by itself, for its last line

    def keep_running(self, name: str, service: Restartable) -> None:
        """Restart `service` whenever it is found dead (the private Redis: its clients reconnect)."""
        self.restartable.append((name, service))

    def stop_when(self, check: Callable[[], str | None]) -> None:
        """Stop the service when `check()` returns a reason (a replica that cannot load)."""
        self._checks.append(check)

    def spawn(self, name: str, argv: list[str], env: dict) -> subprocess.Popen:
        process = subprocess.Popen(argv, env=env, start_new_session=True)
        self.children.append((name, process))
        log.info("started %s (pid %d)", name, process.pid)
        return process

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._on_signal)
        signal.signal(signal.SIGHUP, self._reload)

    def _reload(self, _signum, _frame):
        """SIGHUP: passed to the web (gunicorn's master makes new workers, which read
        --tenants-file again); nothing else restarts."""
        for name, process in self.children:
            if name == "web" and process.poll() is None:
                log.info("SIGHUP: reloading the web's configuration (pid %d)", process.pid)
                process.send_signal(signal.SIGHUP)

    def _on_signal(self, signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)

    def wait(self) -> int:
        """Block until a child exits by itself (then stop the others) or we are told to stop."""
        try:
            while True:
                for name, process in self.children:
                    if process.poll() is not None:
                        log.error("%s exited with %s; stopping the service", name, process.returncode)
                        return 1
                for check in self._checks:
                    self.fatal = check()
                    if self.fatal:
                        return 3
                self._restart_dead()
                time.sleep(0.5)
        except KeyboardInterrupt:
            return 0
        finally:
            self.stop_all()

    def _restart_dead(self) -> None:
        if time.monotonic() < self._next_restart:
            return
        for name, service in self.restartable:
            if service.running():
                continue
            log.error("%s exited; restarting it", name)
            try:
                service.restart()
            except (RuntimeError, OSError) as error:
                log.error("could not restart %s (%s); trying again in 2 s", name, error)
                self._next_restart = time.monotonic() + 2
                return
            log.warning("%s restarted: the web and the replicas reconnect to it; requests in flight "
                        "failed with an error", name)

    def stop_all(self, grace: float = 20.0) -> None:
        if self._stopping:
            return
        self._stopping = True
        names = {process.pid: name for name, process in self.children}
        # In start order: web, replicas.
        for process in stop_processes([process for _, process in self.children], grace):
            log.warning("%s did not stop in %.0f s; killed it", names[process.pid], grace)
        self.children.clear()
