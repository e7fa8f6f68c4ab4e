"""The host agent: one per host; starts replica worker processes there, each on its own place.

Celery's remote control can attach, detach and shut down a worker, but cannot create one; that
is the host's job (here), or the orchestrator's (`docker compose --scale worker=N`, Kubernetes).
The agent advertises its host in Redis, renewed like a heartbeat (`common.fleet.AgentRecord`: its
places with their memory and the slot holding each, its host cache's models, its replicas' data
plane address), runs the data plane over its host cache and keeps that cache within
`--host-cache-bytes` (tasks/weights/cache_plane.py, docs/host-cache.md), takes start commands from its host's list (`common.fleet.StartCommand`: a slot and the
place the control plane chose for it), and owns the processes it starts: each gets exactly its
one device (tasks/control/devices.py), and the agent stops them when it stops. It keeps up to
`--preboot` interpreters booted for its next starts (tasks/control/preboot_pool.py), one at
most per place (free ones first): a start hands its replica to one, else boots a fresh process.

A restarted agent announces itself again; replicas of its host that it did not start (left by
its previous run) keep their places, and it never signals them. `blitzscale serve` runs one
in-process; `blitzscale agent` alone (docs/scaling.md, "A fleet").
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import redis

from common import model_files, replica_start
from common.fleet import CUDA, AgentRecord, Place, StartCommand, read_agents
from common.keys import SCALE_COUNTERS_KEY, SLOTS_KEY, agent_commands_key, agent_key, slot_target_key
from common.processes import stop_processes
from common.replica_records import live_records
from common.settings import Settings, env_name
from common.slot_leases import CONTROL_OWNER, NoFreeSlot, agent_owner, allocate, release
from common.states import ReplicaState
from tasks.control.cluster import read_slots
from tasks.control.devices import host_places, replica_device_env, visible_gpus, with_memory
from tasks.control.preboot_pool import PrebootPool
from tasks.weights.cache_plane import CachePlane, run_forever
from tasks.weights.sources import advertised_host

log = logging.getLogger(__name__)

PRESENCE_TTL_S = 5
EXIT_WAIT_S = 30.0
MEMORY_REFRESH_S = 5.0  # how often the GPUs' free memory is read again (nvidia-smi)
WORKER_MODULE = "blitzscale.cli"  # what a replica process runs (a test may run it through a wrapper)


def worker_argv(slot: int, standby: bool = False) -> list[str]:
    return [sys.executable, "-m", WORKER_MODULE, "worker", "--slot", str(slot), *(["--standby"] if standby else [])]


class HostAgent:
    def __init__(self, settings: Settings, host: str | None = None, log_dir: str | None = None,
                 env: dict | None = None, detach: bool = True):
        """`env`: the replicas' base environment (default: ours); the settings go on top.
        `detach`: each replica in a session of its own (`serve`, whose supervisor stops them in
        order), else in the agent's process group (`blitzscale agent`: the host's processes go
        down together, as they do when the host does)."""
        self.settings = settings
        self.host = host or settings.host
        self.env = {**(os.environ if env is None else env), **settings.to_env(), env_name("host_name"): self.host}
        self.env.pop(env_name("devices"), None)  # a replica gets its one place, not the host's list
        self.detach = detach
        self.log_dir = log_dir
        self.redis = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=2, socket_timeout=5)
        self._gpus = visible_gpus()
        self._gpus_at = time.monotonic()
        self.places = [Place(name) for name in host_places(settings, self._gpus)]
        self.weights_host = advertised_host(settings.weights_host)
        self.model_sha: str | None = None
        self.children: dict[int, subprocess.Popen] = {}
        self.devices: dict[int, str] = {}  # slot → the place its process holds
        self._adopted: dict[str, int] = {}  # place → slot of a live replica of this host we did not start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.cache = CachePlane(settings, self.redis, self.host)
        # filled once the agent runs, each process for a place (free ones first), with that place's environment
        self.preboot = PrebootPool(settings.preboot_processes, self._place_env, detach)

    # -- starting replicas

    def start_new(self, standby: bool = False, slots: range | None = None) -> subprocess.Popen | None:
        """A replica in a slot allocated cluster-wide (common/slot_leases.py): the lowest slot
        (of `slots`: a model's, with several models) that no replica, agent or start command
        holds, claimed with its `loading` entry in one atomic step, so that agents starting at
        once never share a slot."""
        entry = {"host": self.host, "state": ReplicaState.LOADING, "by": "agent", "updated_at": time.time()}
        self.announce()  # first: a start on a host with no agent present reads as dead, free to take
        try:
            slot = allocate(self.redis, read_slots(self.redis), agent_owner(self.host), entry, slots=slots)
        except NoFreeSlot as error:
            log.error("agent: %s; not starting a replica", error)
            return None
        process = self.start_replica(slot, standby)
        if process is None:
            release(self.redis, slot, agent_owner(self.host))
        return process

    def start_replica(self, slot: int, standby: bool = False, device: str | None = None) -> subprocess.Popen | None:
        """Start a worker for `slot` on the place `device` (None, or taken: the lowest free one).
        The control plane asks only for a slot with no live replica: a process of ours still there
        is on its way out (a warm shutdown), so it is waited for; one still alive after
        `EXIT_WAIT_S` is left alone and nothing is started."""
        with self._lock:
            previous = self.children.get(slot)
        if previous is not None and previous.poll() is None:
            log.info("agent: slot %d: waiting for pid %d to exit", slot, previous.pid)
            try:
                previous.wait(EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                log.error("agent: slot %d: pid %d still runs; not starting another", slot, previous.pid)
                return None
        with self._lock:
            exited = self._reap_locked()
            refused = self._refuse_start_locked(slot)
            place = None if refused else self._claim(device)
            if place is not None:
                self._register_loading(slot, standby, place)
                process, path, booted = self._spawn(slot, standby, place)
                self.children[slot], self.devices[slot] = process, place
        self._free_slots(exited)
        if refused:
            return None
        if place is None:
            self._register_unplaced(slot, device)
            return None
        self._count_start(path)
        log.info("agent: started replica%d on %s (pid %d, %s%s)", slot, place, process.pid,
                 f"pre-booted {booted:.1f} s ago" if path == replica_start.PREBOOT else "fresh process",
                 ", standby" if standby else "")
        return process

    def _refuse_start_locked(self, slot: int) -> bool:
        """A start (in a thread of its own: `handle`) must not spawn when the agent is stopping
        (`stop()` does not wait for start threads: nobody would stop that replica), nor when another
        start of the slot spawned since this one looked (a command sent twice): its process would
        replace a live one in `children`, and run untracked beside it."""
        if self._stop.is_set():
            log.info("agent: stopping; not starting replica%d", slot)
            return True
        current = self.children.get(slot)  # _reap_locked just dropped the ones that exited
        if current is not None:
            log.warning("agent: slot %d: pid %d was started for it meanwhile; not starting another", slot, current.pid)
            return True
        return False

    def _claim(self, wanted: str | None) -> str | None:
        held = self.held()
        free = [p.name for p in self.places if p.name not in held]
        if wanted is not None and wanted not in free:
            log.warning("agent: %s is %s; taking another place", wanted,
                        f"held by slot {held[wanted]}" if wanted in held else f"not a place of {self.host}")
        if wanted in free:
            return wanted
        ready = self.preboot.ready_places()  # no place asked for: one with a process booted for it
        return next((name for name in free if name in ready), free[0] if free else None)

    def _spawn(self, slot: int, standby: bool, place: str) -> tuple[subprocess.Popen, str, float]:
        """The replica's process: a pre-booted one it is handed to, else a fresh one (never
        waiting for one still booting). Returns it, its path (preboot | fresh) and how long ago
        a pre-booted one was started."""
        argv = worker_argv(slot, standby)
        log_path = None
        if self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            log_path = os.path.join(self.log_dir, f"replica{slot}.log")
        env = self._place_env(place)
        now = time.time()
        taken = self.preboot.take(place, argv, {**env, **replica_start.start_env(replica_start.PREBOOT, now)},
                                  log_path)
        if taken is not None:
            process, prebooted = taken
            return process, replica_start.PREBOOT, time.monotonic() - prebooted.started
        self.preboot.stop_booting()  # the imports would compete with this start's
        out = open(log_path, "ab") if log_path else None
        try:
            process = subprocess.Popen(argv, env={**env, **replica_start.start_env(replica_start.FRESH, now)},
                                       start_new_session=self.detach, stdout=out,
                                       stderr=subprocess.STDOUT if out else None)
        finally:
            if out is not None:
                out.close()  # the child holds its own copy
        return process, replica_start.FRESH, 0.0

    def _place_env(self, place: str) -> dict:
        """A replica's environment on `place`: ours, the settings, and that one device."""
        return {**self.env, **replica_device_env(place, self._gpus)}

    def _count_start(self, path: str) -> None:
        """`blitz_replica_starts_total{path}` (web/scaling_metrics.py)."""
        try:
            self.redis.hincrby(SCALE_COUNTERS_KEY, f"replica_start:{path}", 1)
        except redis.RedisError as error:
            log.warning("agent: could not count a replica start: %s", error)

    def _fill_preboot(self) -> None:
        """Boot pre-booted processes for the places, free ones first; not while a replica of ours loads (on a
        small host their imports would slow its start, the one being waited for)."""
        if self.preboot.size == 0 or not self.preboot.can_run(worker_argv(0)):
            return
        with self._lock:
            ours = list(self.devices)
        slots = read_slots(self.redis)
        if any(slots.get(slot, {}).get("state") == ReplicaState.LOADING for slot in ours):
            return
        with self._lock:
            held = self.held()
            try:
                free = [p.name for p in self.places if p.name not in held]
                self.preboot.fill(free + [p.name for p in self.places if p.name in held])
            except OSError as error:  # no process could be made (memory, file limits): starts boot fresh
                log.warning("agent: could not boot a pre-booted process: %s", error)

    def held(self) -> dict[str, int]:
        """Place → the slot holding it: our processes, and live replicas of this host that a
        previous run of the agent started."""
        mine = {place: slot for slot, place in self.devices.items() if slot in self.children}
        return {**self._adopted, **mine}

    def _register_loading(self, slot: int, standby: bool, place: str) -> None:
        """The slot shows `loading` on its place from now on, before the new process writes its
        own record, and the target it loads for (the autoscaler counts only those meant to serve)."""
        entry = {"slot": slot, "host": self.host, "device": place, "state": ReplicaState.LOADING, "by": "agent",
                 "updated_at": time.time()}
        pipe = self.redis.pipeline()
        pipe.hset(SLOTS_KEY, str(slot), json.dumps(entry))
        pipe.set(slot_target_key(slot), ReplicaState.STANDBY if standby else ReplicaState.ACTIVE)
        pipe.execute()

    def _register_unplaced(self, slot: int, wanted: str | None) -> None:
        """No free place here (the control plane saw an older record): the slot is `dead`, so
        that the autoscaler places it again."""
        log.error("agent: no free place on %s for slot %d (asked: %s; held: %s)", self.host, slot, wanted, self.held())
        entry = {"slot": slot, "host": self.host, "state": ReplicaState.DEAD, "by": "agent", "updated_at": time.time(),
                 "error": f"no free device on {self.host}"}
        self.redis.hset(SLOTS_KEY, str(slot), json.dumps(entry))

    # -- commands and presence

    def handle(self, raw: bytes | str) -> None:
        try:
            command = StartCommand.from_json(raw)
        except (TypeError, ValueError) as error:
            log.warning("agent: unknown command %r (%s)", raw, error)
            return
        if not self._still_placed_here(command):
            log.info("agent: slot %d was placed elsewhere since; ignoring its start", command.slot)
            return
        # In a thread: waiting out an exiting process must not stop the agent's presence.
        threading.Thread(target=self.start_replica, args=(command.slot, command.standby, command.device),
                         name=f"start-replica{command.slot}", daemon=True).start()

    def _still_placed_here(self, command: StartCommand) -> bool:
        """A command that waited in the list (the agent was away) may be stale: the slot's entry
        must still be a start placed on this host."""
        raw = self.redis.hget(SLOTS_KEY, str(command.slot))
        entry = json.loads(raw) if raw else {}
        return entry.get("state") == ReplicaState.LOADING and entry.get("host") in (None, self.host)

    def record(self) -> AgentRecord:
        if any(p.kind == CUDA for p in self.places) and time.monotonic() - self._gpus_at > MEMORY_REFRESH_S:
            self._gpus, self._gpus_at = visible_gpus(), time.monotonic()
        with self._lock:
            held = self.held()
            prebooted = self.preboot.ready()
        places = with_memory([replace(p, slot=held.get(p.name)) for p in self.places], self._gpus)
        return AgentRecord(self.host, os.getpid(), tuple(places), tuple(cached_models(self.settings)),
                           self.model_sha, self.weights_host, time.time(), cache_addr=self.cache.address,
                           cache_shas=tuple(self.cache.served()), cache_bytes=self.cache.cache.usage(),
                           cache_limit=self.cache.cache.limit, prebooted=prebooted)

    def announce(self) -> None:
        self._adopt()
        self.redis.set(agent_key(self.host), self.record().to_json(), ex=PRESENCE_TTL_S)

    def _adopt(self) -> None:
        """Live replicas of this host that we did not start keep their places."""
        names = {p.name for p in self.places}
        with self._lock:
            ours = set(self.children)
        self._adopted = {r["device"]: r["slot"] for r in live_records(self.redis)
                         if r.get("host") == self.host and r.get("device") in names and r.get("slot") not in ours}

    def serve_forever(self) -> None:
        """Announce this host, run commands, reap children that exited; until `stop()`."""
        commands = agent_commands_key(self.host)
        while not self._stop.is_set():
            try:
                self.announce()
                item = self.redis.blpop([commands], timeout=1)
                if item is not None:
                    self.handle(item[1])
                self._fill_preboot()
            except (redis.RedisError, ValueError) as error:
                log.warning("agent: %s", error)
                self._stop.wait(1)
            with self._lock:
                exited = self._reap_locked()
            self._free_slots(exited)

    def start(self) -> "HostAgent":
        threading.Thread(target=self._resolve_model, name="agent-model", daemon=True).start()
        self.cache.start()
        threading.Thread(target=run_forever, args=(self.cache, self._stop, self._cached_elsewhere),
                         name="host-cache", daemon=True).start()
        self._thread = threading.Thread(target=self.serve_forever, name="host-agent", daemon=True)
        self._thread.start()
        return self

    def _cached_elsewhere(self) -> set[str]:
        """The models a host named before this one also serves from its cache: evicted first here,
        so the cluster keeps one copy. Only the hosts after the first holder do so, so two hosts
        over their bounds at once never both drop the cluster's last copies."""
        return {sha for agent in read_agents(self.redis) if agent.host < self.host for sha in agent.cache_shas}

    def _resolve_model(self) -> None:
        """The model its replicas load (hashing a GGUF file the first time: not on the loop)."""
        try:
            self.model_sha = model_files.resolve(self.settings).sha
        except OSError as error:
            log.warning("agent: cannot resolve the model %s: %s", self.settings.model_id, error)

    def _reap_locked(self) -> list[tuple[int, subprocess.Popen]]:
        """Forget the children that exited (their places are free); returns them (slot, process)."""
        exited = []
        for slot, process in list(self.children.items()):
            if process.poll() is not None:
                log.info("agent: replica%d (pid %d) exited with %s", slot, process.pid, process.returncode)
                del self.children[slot]
                self.devices.pop(slot, None)
                exited.append((slot, process))
        return exited

    def _free_slots(self, exited: list[tuple[int, subprocess.Popen]]) -> None:
        """A child gone without a clean stop (it died loading, or crashed) is `dead` at once and
        its slot's lease ends: its place and slot are free now, not when its start times out.
        Unless the slot is another start's already (the child hung, its record expired, and the
        slot was placed elsewhere): its entry names another host or process, and is left alone."""
        for slot, process in exited:
            try:
                raw = self.redis.hget(SLOTS_KEY, str(slot))
                entry = json.loads(raw) if raw else {}
                if entry.get("host", self.host) != self.host or entry.get("pid") not in (None, process.pid):
                    log.info("agent: slot %d of exited pid %d is another start's now; left alone", slot, process.pid)
                    continue
                if entry.get("state") != ReplicaState.STOPPED:
                    self.redis.hset(SLOTS_KEY, str(slot), json.dumps({
                        **entry, "slot": slot, "host": self.host, "state": ReplicaState.DEAD, "by": "agent",
                        "updated_at": time.time(), "error": f"exited with {process.returncode}"}))
                release(self.redis, slot, agent_owner(self.host), CONTROL_OWNER, f"replica{slot}@{self.host}")
            except redis.RedisError as error:  # its lease and start time out instead
                log.warning("agent: could not free slot %d: %s", slot, error)

    def stop(self, grace: float = 20.0) -> None:
        """Stop taking commands, then stop every replica this agent started (SIGTERM: Celery's
        warm shutdown, running generations finish), killing those still there after `grace`."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(3)
        with self._lock:
            self.preboot.stop()
        self.cache.stop()
        try:
            self.redis.delete(agent_key(self.host))
        except redis.RedisError:
            pass
        with self._lock:
            processes = list(self.children.values())
            self.children.clear()
            self.devices.clear()
        for process in stop_processes(processes, grace):
            log.warning("agent: replica pid %d did not stop in %.0f s; killed it", process.pid, grace)


def cached_models(settings: Settings) -> list[str]:
    """The complete entries of this host's weight cache (their names: model hash prefixes)."""
    root = Path(settings.weight_cache_dir) / "models"
    try:
        entries = sorted(root.iterdir())
    except OSError:
        return []
    return [e.name for e in entries if "." not in e.name and e.is_dir() and model_files.entry_complete(e)]
