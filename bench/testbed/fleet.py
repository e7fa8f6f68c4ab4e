"""A fleet on the namespaces of bench/testbed/netns.py: Redis and the web in the root namespace
(bound to the bridge's address), one host agent per host namespace with its own host cache, its
replicas' data planes on the host's address. Real processes, real network stacks, shaped links.

What a run starts is written to a state file (`/tmp/bzt-testbed/<run>.json`: its owner and
every process, each with its start time so a reused pid is never killed), so that
`cleanup_dead_runs` (the `--cleanup` command, and every new testbed before it starts) removes
what a run killed with SIGKILL left behind.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import requests

from bench.common import preboot_setting, prebooted_ready
from bench.testbed.netns import PREFIX, STATE_DIR, Host, Network, check_permitted, leftovers, remove_leftovers
from blitzscale.redis_server import EmbeddedRedis, free_port
from common.processes import stop_processes

def _start_time(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), None when it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


class Testbed:
    def __init__(self, hosts: int, rate: str, model_dir: str | Path, delay: str | None = None,
                 places: int = 1, replicas: dict[str, int] | None = None, env: dict | None = None,
                 workdir: Path | None = None, agent_module: str = "blitzscale.cli"):
        """`places`: CPU places per host; `replicas`: host → replicas its agent starts at once;
        `agent_module`: what runs the agents (tests run theirs through a gated engine)."""
        self.run = _unused_run_id()
        self.network = Network(self.run, hosts, rate, delay)
        self.model_dir, self.places, self.replicas = str(model_dir), places, replicas or {}
        self.own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"bzt-{self.run}-"))
        self.state_file = STATE_DIR / f"{self.run}.json"
        self.processes: dict[str, subprocess.Popen] = {}
        self.pids: set[int] = set()  # every process we started, for `left_behind`
        self.env: dict[str, str] = dict(os.environ)
        self.redis: EmbeddedRedis | None = None
        self.extra_env = env or {}
        self.agent_module = agent_module
        self.base_url = ""
        self._down = False
        if self.own_workdir:  # recorded from its birth: a run SIGKILLed before up() leaves it to --cleanup
            self._record()

    @property
    def hosts(self) -> list[Host]:
        return self.network.hosts

    # -- up and down

    def up(self, timeout: float = 180) -> "Testbed":
        check_permitted()
        cleanup_dead_runs()
        self._record()
        try:
            self.network.up()
            gateway = self.network.gateway
            # its directory in the workdir: a SIGKILLed run's goes with it at --cleanup
            self.redis = EmbeddedRedis(host=gateway, directory=self.workdir / "redis")
            self.redis.start(on_spawn=self._redis_spawned)
            port = free_port(gateway)
            self.base_url = f"http://{gateway}:{port}"
            slots = max(1, len(self.hosts) * self.places)
            self.env = {**os.environ, "REDIS_URL": self.redis.url, "MODEL_ID": self.model_dir, "HF_HUB_OFFLINE": "1",
                        "MANUALLY_SCALE": "true", "MAX_REPLICAS": str(slots), "DOWN_TARGET": "stop",
                        "HEARTBEAT_TTL": "3", "WEIGHT_PEERS": "prefer", "XDG_CACHE_HOME": str(self.workdir / "home"),
                        **self.extra_env}
            self.spawn("web", ["web"], HOSTNAME=gateway, PORT=str(port),
                       WEIGHT_CACHE_DIR=str(self.cache(self.hosts[0])))
            for host in self.hosts:
                self.start_agent(host, self.replicas.get(host.name, 0))
            self.wait(lambda: set(self.cluster().get("agents", [])) == {h.name for h in self.hosts}, "the agents", timeout)
            wanted = sum(self.replicas.values())
            self.wait(lambda: sum(r["state"] == "active" for r in self.cluster()["replicas"]) == wanted,
                      f"{wanted} replicas active", timeout)
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Stop every process (agents first: they stop their replicas), then the network; the
        namespaces' removal kills whatever is left in them. Idempotent."""
        with _uninterrupted():
            if self._down:
                return
            self._down = True
            self._tear_down()

    def _tear_down(self) -> None:
        agents = [p for name, p in self.processes.items() if name.startswith("agent-")]
        stop_processes(agents, grace=15)
        others = [p for name, p in self.processes.items() if not name.startswith("agent-")]
        for process in others:  # the web's gunicorn workers are in its process group
            _signal_group(process.pid, signal.SIGTERM)
        stop_processes(others, grace=10)
        for process in self.processes.values():
            _signal_group(process.pid, signal.SIGKILL)  # anything a process left in its group
        if self.redis is not None:
            self.redis.stop()
        self.network.down()
        self.state_file.unlink(missing_ok=True)
        if self.own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def left_behind(self, settle_s: float = 5.0) -> list[str]:
        """After `down`: whatever of this run still exists (namespaces, links, processes), given
        `settle_s` for a SIGKILLed process to be gone."""
        deadline = time.monotonic() + settle_s
        while True:
            found = leftovers()
            names = [f"netns {n}" for n in found["namespaces"] if f"-{self.run}-" in n]
            names += [f"link {n}" for n in found["links"] if f"-{self.run}-" in n]
            names += [f"process {pid}" for pid in sorted(self.pids) if _start_time(pid) and not _zombie(pid)]
            if not names or time.monotonic() > deadline:
                return names
            time.sleep(0.1)

    def __enter__(self) -> "Testbed":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- processes

    def spawn(self, name: str, argv: list[str], host: Host | None = None, module: str = "blitzscale.cli",
              capture: bool = False, **env: str) -> subprocess.Popen:
        """`python -m module argv` in `host`'s namespace (the root namespace when None), in a
        process group of its own, its output in the workdir (or a pipe, with `capture`)."""
        prefix = ["ip", "netns", "exec", host.namespace] if host else []
        out = subprocess.PIPE if capture else open(self.workdir / f"{name}.log", "ab")
        process = subprocess.Popen([*prefix, sys.executable, "-m", module, *argv], env={**self.env, **env},
                                   stdout=out, stderr=None if capture else subprocess.STDOUT, text=capture,
                                   start_new_session=True)
        self.processes[name] = process
        self.pids.add(process.pid)
        self._record()
        return process

    def start_agent(self, host: Host, replicas: int = 0) -> subprocess.Popen:
        devices = ",".join(["cpu"] * self.places)
        return self.spawn(f"agent-{host.name}", ["agent", "--host-name", host.name, "--devices", devices,
                                                 "--replicas", str(replicas)], host, self.agent_module,
                          WEIGHT_CACHE_DIR=str(self.cache(host)), WEIGHTS_HOST=host.address)

    def cache(self, host: Host) -> Path:
        return self.workdir / f"cache-{host.name}"

    def _redis_spawned(self) -> None:
        """Recorded before it answers: a run killed meanwhile leaves it to --cleanup (and down())."""
        self.pids.add(self.redis.process.pid)
        self._record()

    def _record(self) -> None:
        """The state file: our run, our pid, every process we started (written on each change)."""
        STATE_DIR.mkdir(parents=True, exist_ok=True)
        pids = [p.pid for p in self.processes.values()]
        if self.redis is not None and self.redis.process is not None:
            pids.append(self.redis.process.pid)
        state = {"run": self.run, "owner": [os.getpid(), _start_time(os.getpid())],
                 "processes": [[pid, _start_time(pid)] for pid in pids], "workdir": str(self.workdir),
                 "own_workdir": self.own_workdir}
        temporary = self.state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(state))
        temporary.replace(self.state_file)

    # -- the service

    def cluster(self) -> dict:
        try:
            return requests.get(f"{self.base_url}/cluster_state", params={"celery": "false"}, timeout=10).json()
        except (requests.RequestException, ValueError):
            return {"agents": [], "replicas": [], "hosts": []}

    def replicas_by_host(self) -> dict[str, list[dict]]:
        out: dict[str, list[dict]] = {}
        for replica in self.cluster()["replicas"]:
            if replica.get("host") and replica["state"] in ("loading", "active", "draining", "standby"):
                out.setdefault(replica["host"], []).append(replica)
        return out

    def modify(self, kind: str, **data) -> None:
        """BlitzScale's scaling command; raises with the service's answer unless 200."""
        response = requests.post(f"{self.base_url}/modify_cluster_state", json={"type": kind, "data": data}, timeout=30)
        if response.status_code != 200:
            raise RuntimeError(f"{kind} {data}: {response.status_code} {response.text.strip()}")

    def wait_prebooted(self, timeout: float = 300) -> None:
        """Every agent's pre-booted processes ready (bench/common.py): call before timing a start."""
        preboot = preboot_setting(self.env)
        self.wait(lambda: (hosts := self.cluster()["hosts"]) and prebooted_ready(hosts, preboot),
                  "the agents' pre-booted processes ready", timeout)

    def wait_states(self, wanted: dict[int, str], timeout: float = 120) -> None:
        def reached() -> bool:
            states = {r["slot"]: r["state"] for r in self.cluster()["replicas"]}
            return all(states.get(slot) == state for slot, state in wanted.items())
        self.wait(reached, f"slots {wanted}", timeout)

    def wait(self, predicate, what: str, timeout: float = 120, poll: float = 0.05):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if value := predicate():
                return value
            for name, process in self.processes.items():
                if process.poll() is not None and not name.startswith("probe"):
                    raise RuntimeError(f"{name} exited ({process.returncode}) waiting for {what}; see {self.workdir}/{name}.log")
            time.sleep(poll)
        raise TimeoutError(f"{what} not reached in {timeout:.0f} s; see {self.workdir}")


def _unused_run_id() -> str:
    """Four hex digits no namespace, link or state file uses yet: a clash would make this run's
    teardown remove another run's namespace."""
    taken = leftovers(set())
    names = " ".join(taken["namespaces"] + taken["links"])
    while True:
        run = secrets.token_hex(2)
        if f"-{run}-" not in names and not (STATE_DIR / f"{run}.json").exists():
            return run


@contextmanager
def _uninterrupted():
    """Ctrl-C, SIGTERM, SIGHUP and --max-seconds' alarm ignored while tearing down: down() runs
    once, and a teardown cut half-way by a second Ctrl-C would leave the rest behind."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {signum: signal.signal(signum, signal.SIG_IGN)
             for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGALRM)}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)


def _signal_group(pid: int, signum: int) -> None:
    """The process and, when it leads one, its process group."""
    for kill in (os.killpg, os.kill):
        try:
            kill(pid, signum)
        except (ProcessLookupError, PermissionError):
            pass


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _alive(pid: int, started: str | None) -> bool:
    return started is not None and _start_time(pid) == started


def cleanup_dead_runs() -> dict:
    """Remove what runs whose owner is gone left: their processes (each process group, only if
    the pid still names the process we started), their namespaces, veths and bridge, their
    state files and workdirs; then any `bzt-` namespace or link no live run owns."""
    alive, killed = set(), 0
    for path in sorted(STATE_DIR.glob("*.json")) if STATE_DIR.is_dir() else []:
        state = _read_state(path)
        if state is None:  # cut short, another version's, edited: nothing in it can be trusted
            path.unlink(missing_ok=True)
            continue
        run, owner, processes, workdir = state
        if _alive(*owner):
            alive.add(run)
            continue
        for pid, started in processes:
            if _alive(pid, started):
                _signal_group(pid, signal.SIGKILL)
                killed += 1
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)
        path.unlink(missing_ok=True)
    removed = remove_leftovers(alive)
    return {"processes": killed, **removed}


def _read_state(path: Path) -> tuple[str, tuple[int, str], list[tuple[int, str]], Path | None] | None:
    """A state file's run, owner, processes and the workdir to remove with it (only one this run
    made: `bzt-<run>-…`); None when it cannot be read as a state file."""
    try:
        state = json.loads(path.read_text())
        run, (owner, owner_started) = str(state["run"]), state["owner"]
        processes = [(int(pid), str(started)) for pid, started in state["processes"]]
        owner = (int(owner), str(owner_started))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    workdir = Path(str(state.get("workdir", ""))) if state.get("own_workdir") else None
    if workdir is not None and not workdir.name.startswith(f"{PREFIX}{run}-"):
        workdir = None
    return run, owner, processes, workdir
