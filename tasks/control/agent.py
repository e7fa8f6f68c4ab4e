"""The host agent: starts replica worker processes on its host when the control plane asks.

Celery's remote control can attach, detach and shut down a worker, but cannot create one; that
is the host's job (here), or the orchestrator's (`docker compose --scale worker=N`, Kubernetes).
The agent announces itself in Redis (`common.keys.agent_key`), takes JSON commands from its
host's list (`{"op": "start", "slot": N, "standby": false}`), and owns the processes it starts:
it stops them when it stops. `blitzscale serve` runs one in-process; `blitzscale agent` alone.
Each replica maps its weights from the host weight cache (converted once per host).
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import redis

from common.keys import SLOTS_KEY, agent_commands_key, agent_key, slot_target_key
from common.processes import stop_processes
from common.settings import Settings
from common.states import ReplicaState

log = logging.getLogger(__name__)

PRESENCE_TTL_S = 5
EXIT_WAIT_S = 30.0


def worker_argv(slot: int, standby: bool = False) -> list[str]:
    return [sys.executable, "-m", "blitzscale.cli", "worker", "--slot", str(slot), *(["--standby"] if standby else [])]


class HostAgent:
    def __init__(self, settings: Settings, host: str | None = None, log_dir: str | None = None,
                 env: dict | None = None):
        """`env`: the replicas' base environment (default: ours); the settings go on top."""
        self.settings = settings
        self.env = {**(os.environ if env is None else env), **settings.to_env()}
        self.host = host or socket.gethostname()
        self.log_dir = log_dir
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        self.children: dict[int, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start_replica(self, slot: int, standby: bool = False) -> subprocess.Popen | None:
        """Start a worker for `slot`. The control plane asks only for a slot with no live replica:
        a process of ours still there is on its way out (a warm shutdown), so it is waited for;
        one still alive after `EXIT_WAIT_S` is left alone and nothing is started."""
        with self._lock:
            previous = self.children.get(slot)
        if previous is not None and previous.poll() is None:
            log.info("agent: slot %d: waiting for pid %d to exit", slot, previous.pid)
            try:
                previous.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                log.error("agent: slot %d: pid %d still runs; not starting another", slot, previous.pid)
                return None
        self._register_loading(slot, standby)
        with self._lock:
            out = None
            if self.log_dir:
                os.makedirs(self.log_dir, exist_ok=True)
                out = open(os.path.join(self.log_dir, f"replica{slot}.log"), "ab")
            process = subprocess.Popen(worker_argv(slot, standby), env=self.env, start_new_session=True,
                                       stdout=out, stderr=subprocess.STDOUT if out else None)
            self.children[slot] = process
        log.info("agent: started replica%d (pid %d%s)", slot, process.pid, ", standby" if standby else "")
        return process

    def _register_loading(self, slot: int, standby: bool) -> None:
        """The slot shows `loading` from now on, before the new process writes its own record,
        and the target it loads for (the autoscaler counts only those meant to serve)."""
        entry = {"slot": slot, "host": self.host, "state": ReplicaState.LOADING, "by": "agent",
                 "updated_at": time.time()}
        pipe = self.redis.pipeline()
        pipe.hset(SLOTS_KEY, str(slot), json.dumps(entry))
        pipe.set(slot_target_key(slot), ReplicaState.STANDBY if standby else ReplicaState.ACTIVE)
        pipe.execute()

    def handle(self, command: dict) -> None:
        if command.get("op") == "start" and isinstance(command.get("slot"), int):
            # In a thread: waiting out an exiting process must not stop the agent's presence.
            threading.Thread(target=self.start_replica, args=(command["slot"], bool(command.get("standby"))),
                             name=f"start-replica{command['slot']}", daemon=True).start()
        else:
            log.warning("agent: unknown command %r", command)

    def serve_forever(self) -> None:
        """Announce this host, run commands, reap children that exited; until `stop()`."""
        commands = agent_commands_key(self.host)
        while not self._stop.is_set():
            try:
                self.redis.set(agent_key(self.host), json.dumps({"host": self.host, "pid": os.getpid()}),
                               ex=PRESENCE_TTL_S)
                item = self.redis.blpop([commands], timeout=1)
                if item is not None:
                    self.handle(json.loads(item[1]))
            except (redis.RedisError, ValueError) as error:
                log.warning("agent: %s", error)
                self._stop.wait(1)
            self._reap()

    def start(self) -> "HostAgent":
        self._thread = threading.Thread(target=self.serve_forever, name="host-agent", daemon=True)
        self._thread.start()
        return self

    def _reap(self) -> None:
        with self._lock:
            for slot, process in list(self.children.items()):
                if process.poll() is not None:
                    log.info("agent: replica%d (pid %d) exited with %s", slot, process.pid, process.returncode)
                    del self.children[slot]

    def stop(self, grace: float = 20.0) -> None:
        """Stop taking commands, then stop every replica this agent started (SIGTERM: Celery's
        warm shutdown, running generations finish), killing those still there after `grace`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)
        try:
            self.redis.delete(agent_key(self.host))
        except redis.RedisError:
            pass
        with self._lock:
            processes = list(self.children.values())
            self.children.clear()
        for process in stop_processes(processes, grace):
            log.warning("agent: replica pid %d did not stop in %.0f s; killed it", process.pid, grace)
