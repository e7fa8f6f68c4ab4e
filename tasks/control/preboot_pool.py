"""A host agent's pre-booted replica processes (`--preboot N`, docs/scaling.md, "Pre-booted processes").

A fresh replica process spends seconds importing torch, transformers and Celery before it reads a
byte of weights: on a loaded host, most of a cold start. The pool keeps up to N interpreters that
have done those imports (tasks/runtime/preboot.py), each booted for one place (a free one first) with exactly
the environment a fresh replica there would get (its device variables included: what
`/proc/<pid>/environ` shows, and what CUDA would read, are the place's from the start), and hands
a start on that place to it over its stdin: the replica's module, arguments, environment (the
settings, read by the replica only then) and log path. The process it hands over is the
`subprocess.Popen` the agent keeps for the replica, as a fresh one would be: same pid from boot
to exit, same session (`detach`), same signals.

Never waited for: a start with no ready process gets a fresh one. A pre-booted process exits by
itself when its command pipe closes (the agent stopped or died) and `stop()` ends them.
"""
from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable

from common.processes import stop_processes

log = logging.getLogger(__name__)

BOOT_MODULE = "tasks.runtime.preboot"
# Processes in a row lost before a hand-over (an import failing, the OOM killer, one refused for
# CUDA): the next would go the same way, so none more are booted and every start boots fresh.
MAX_FAILED_BOOTS = 3


class Prebooted:
    """One pre-booted process: booting until its ready line arrives."""

    def __init__(self, process: subprocess.Popen, ready_fd: int, place: str = ""):
        self.process = process
        self.place = place  # the place whose environment it was booted with
        self.ready_fd = ready_fd
        self.started = time.monotonic()
        self.report: dict | None = None  # its ready line: boot_seconds, cuda_initialized, ...

    def check(self) -> bool | None:
        """True: ready; None: still booting; False: it died or is unusable (and is stopped)."""
        if self.report is not None:
            return self.process.poll() is None or self._discard(f"exited with {self.process.returncode} while waiting")
        if self.ready_fd < 0:
            return False
        readable, _, _ = select.select([self.ready_fd], [], [], 0)
        if not readable:
            return None if self.process.poll() is None else self._discard("exited while booting")
        line = os.read(self.ready_fd, 65536)
        os.close(self.ready_fd)
        self.ready_fd = -1
        try:
            self.report = json.loads(line)
        except ValueError:
            return self._discard("exited while booting" if not line else f"said {line!r}")
        if self.report.get("cuda_initialized"):  # a waiting process holds no device (docs/scaling.md)
            return self._discard("initialised CUDA before its hand-over")
        log.info("agent: pre-booted pid %d ready (%.1f s of imports)", self.process.pid,
                 self.report.get("boot_seconds", 0.0))
        return self.process.poll() is None

    def _discard(self, why: str) -> bool:
        log.warning("agent: pre-booted pid %d %s; not using it", self.process.pid, why)
        self.close()
        stop_processes([self.process], 2.0)
        return False

    def close(self) -> None:
        if self.ready_fd >= 0:
            os.close(self.ready_fd)
            self.ready_fd = -1

    def hand_over(self, module: str, args: list[str], env: dict, log_path: str | None) -> bool:
        command = {"module": module, "args": args, "env": env, "log": log_path}
        try:
            self.process.stdin.write((json.dumps(command) + "\n").encode())
            self.process.stdin.close()  # its only command
        except (BrokenPipeError, OSError, ValueError):
            self._discard("was gone at its hand-over")
            return False
        return True


class PrebootPool:
    def __init__(self, size: int, env_for: Callable[[str], dict], detach: bool):
        """`env_for(place)`: the environment of a replica on that place (a process booted for it
        starts with it; the replica's own, the same plus how it was started, replaces it at
        hand-over). `detach`: each in a session of its own, as the agent's replicas."""
        self.size = size
        self.env_for = env_for
        self.detach = detach
        self._processes: list[Prebooted] = []
        self._stopped = False
        self._failures = 0  # processes lost in a row before a hand-over (MAX_FAILED_BOOTS)

    def ready(self) -> int:
        return sum(1 for p in self._sweep() if p.report is not None)

    def ready_places(self) -> set[str]:
        return {p.place for p in self._sweep() if p.report is not None}

    def _sweep(self) -> list[Prebooted]:
        kept = []
        for prebooted in self._processes:
            if prebooted.check() is False:
                self._lost()
            else:
                kept.append(prebooted)
        self._processes = kept
        return kept

    def _lost(self) -> None:
        self._failures += 1
        if self._failures == MAX_FAILED_BOOTS:
            log.error("agent: %d pre-booted processes in a row were lost before their hand-over; booting none "
                      "more, every start boots a fresh process (see the warnings above for why)", self._failures)

    @property
    def given_up(self) -> bool:
        return self._failures >= MAX_FAILED_BOOTS

    def fill(self, places: list[str]) -> None:
        """Keep a process ready or booting for each of the first min(N, len(places)) of `places`
        (the host's, the free ones first). A held place gets one too: it holds no device, and it
        is what a start there needs the moment that place's replica goes (an LRU eviction, a
        scale-down), when every place of a busy host is held. One booted for a place that is not
        among `places` any more is stopped: its environment is that place's."""
        if self._stopped:
            return
        for prebooted in [p for p in self._sweep() if p.place not in places]:
            log.info("agent: %s is not a place here now; stopping the process booted for it (pid %d)",
                     prebooted.place, prebooted.process.pid)
            self._processes.remove(prebooted)
            prebooted.close()
            stop_processes([prebooted.process], 2.0)
        if self.given_up:
            return
        covered = {p.place for p in self._processes}
        wanted = min(self.size, len(places)) - len(self._processes)
        for place in [place for place in places if place not in covered][:max(0, wanted)]:
            try:
                self._processes.append(self._boot(place))
            except OSError:  # no process could be made (memory, file limits): a loss too
                self._lost()
                raise

    def _boot(self, place: str) -> Prebooted:
        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen([sys.executable, "-m", BOOT_MODULE, "--ready-fd", str(write_end)],
                                       stdin=subprocess.PIPE, env=self.env_for(place), pass_fds=(write_end,),
                                       start_new_session=self.detach)
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        log.info("agent: booting a replica process for %s ahead of its start (pid %d)", place, process.pid)
        return Prebooted(process, read_end, place)

    def stop_booting(self) -> None:
        """Stop the processes still importing: a fresh start is under way, and on a small host their
        imports would slow the start someone waits for (the next `fill` boots them again)."""
        booting = [p for p in self._sweep() if p.report is None]
        for prebooted in booting:
            log.info("agent: a fresh start is under way; stopping pid %d, booting for %s", prebooted.process.pid,
                     prebooted.place)
            self._processes.remove(prebooted)
            prebooted.close()
        stop_processes([p.process for p in booting], 2.0)

    @staticmethod
    def can_run(argv: list[str]) -> bool:
        """A pre-booted process becomes a module run by this interpreter (`python -m MODULE ...`),
        nothing else (a test's stand-in command boots fresh, and no process is kept for it)."""
        return len(argv) >= 3 and argv[0] == sys.executable and argv[1] == "-m"

    def take(self, place: str, argv: list[str], env: dict,
             log_path: str | None) -> tuple[subprocess.Popen, Prebooted] | None:
        """The process ready for `place`, now running `argv` (`python -m MODULE ARGS`) with `env`;
        None when none is ready there (or `argv` is not a module run)."""
        if not self.can_run(argv):
            return None
        for prebooted in self._sweep():
            if prebooted.report is None or prebooted.place != place:
                continue
            self._processes.remove(prebooted)
            if prebooted.hand_over(argv[2], argv[3:], env, log_path):
                self._failures = 0
                return prebooted.process, prebooted
            self._lost()
        return None

    def stop(self, grace: float = 5.0) -> None:
        self._stopped = True
        processes, self._processes = self._processes, []
        for prebooted in processes:
            prebooted.close()
            if prebooted.process.stdin is not None:
                try:
                    prebooted.process.stdin.close()  # EOF: it exits, even mid-import
                except OSError:
                    pass
        stop_processes([p.process for p in processes], grace)
