"""Pre-booted replica processes (tasks/control/preboot_pool.py, tasks/runtime/preboot.py): a
process booted ahead for a place (with its environment) touches no device and no Redis, becomes
exactly the command handed to it (its environment replaced, its log, its pid kept), and goes away
with `serve` (SIGTERM). On one real fleet (tests/fleet_service.py: Redis, web, Celery workers, a
real agent on h1 with two CPU places and `PREBOOT=1`): a start is served by the pre-booted
process, a replacement boots, two starts at once take one pre-booted and one fresh process, and
every one serves; last, the agent killed leaves none. Then what the agent refuses or stops (a
process claiming CUDA, one still importing when a fresh start begins, a stand-in command, a
failed boot), the default, and what an adversary tried: processes dying while booting (booted a
bounded number of times), one still importing when its pipe closes (exits at once), a start
racing the agent's stop or a second start of its slot (nothing spawned)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import redis
import requests

from blitzscale.cli import main
from blitzscale.redis_server import EmbeddedRedis
from common.settings import Settings
from tasks.control import agent as agent_module
from tasks.control import preboot_pool
from tasks.control.agent import HostAgent
from tasks.control.preboot_pool import BOOT_MODULE, PrebootPool, Prebooted
from tests.fleet_service import FleetService

ENV = {"MANUALLY_SCALE": "true", "MAX_REPLICAS": "3", "DOWN_TARGET": "stop", "HEARTBEAT_TTL": "2",
       "MAX_BATCH_SIZE": "2", "MAX_INPUT_TOKENS": "512", "MAX_TOTAL_TOKENS": "1024", "REPLICA_CHECK_INTERVAL": "0.5",
       "PREBOOT": "1"}
HOSTS = {"h1": ("cpu,cpu", "127.0.0.2")}
BOOT_S = 90  # a pre-booted process's imports, on a loaded 2-core machine


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError(f"{what} not reached in {timeout} s")


def preboot_children(parent: int) -> list[int]:
    """The pre-booted processes still waiting for a command (their stdin the agent's pipe; a
    replica one became keeps its command line) whose parent is `parent`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = open(f"/proc/{entry}/stat").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and BOOT_MODULE.encode() in cmdline and stat.rsplit(")", 1)[1].split()[0] != "Z":
            try:
                waiting = os.readlink(f"/proc/{entry}/fd/0").startswith("pipe:")
            except OSError:
                continue
            if waiting:
                found.append(int(entry))
    return found


def environment(pid: int) -> dict[str, str]:
    """What /proc shows of a process's environment: the one it was started with."""
    raw = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def alive(pid: int) -> bool:
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# -- one pre-booted process, through the pool itself


def test_a_preboot_process_touches_no_device_nor_redis_and_becomes_the_command_it_is_handed(tmp_path):
    with EmbeddedRedis() as server:
        connection = redis.Redis.from_url(server.url)
        base = {**os.environ, "REDIS_URL": server.url, "MAX_BATCH_SIZE": "7", "BOOT_ONLY": "1",
                "OMP_NUM_THREADS": "2"}
        pool = PrebootPool(1, lambda place: {**base, "DEVICE_NAME": place}, detach=True)
        try:
            pool.fill(["cpu:0", "cpu:1"])
            wait_for(lambda: pool.ready() == 1, BOOT_S, "a ready pre-booted process")
            prebooted = pool._processes[0]
            pid = prebooted.process.pid
            assert prebooted.place == "cpu:0" and environment(pid)["DEVICE_NAME"] == "cpu:0"  # its place's, from exec
            assert prebooted.report["cuda_initialized"] is False and prebooted.report["pid"] == pid
            # no socket of any kind (no Redis connection), and Redis has one client: this test
            fds = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
            assert not [fd for fd in fds if fd.startswith("socket:")], fds
            assert [c["name"] for c in connection.client_list()] == [""] and len(connection.client_list()) == 1
            assert "libcuda" not in open(f"/proc/{pid}/maps").read()

            out, log = tmp_path / "probe.json", tmp_path / "replica.log"
            env = {"PATH": os.environ["PATH"], "PYTHONPATH": os.environ.get("PYTHONPATH", ""), "MAX_BATCH_SIZE": "3",
                   "OMP_NUM_THREADS": "1"}
            probe = [sys.executable, "-m", "tests.scaling.preboot_probe", str(out), "--slot", "4"]
            assert pool.take("cpu:1", probe, env, str(log)) is None  # booted for another place
            process, _ = pool.take("cpu:0", probe, env, str(log))
            assert process.pid == pid and process.wait(30) == 0
            report = json.loads(out.read_text())
            assert report["pid"] == pid and report["name"] == "__main__"
            assert report["argv"] == [str(out), "--slot", "4"]
            assert report["env"]["MAX_BATCH_SIZE"] == "3" and "BOOT_ONLY" not in report["env"]  # hand-over env wins
            assert report["torch_imported"] and report["celery_worker_imported"]  # booted before the command
            assert report["threads"] == 1  # OpenMP read the boot's 2 when torch loaded: the replica's 1 wins
            assert log.read_text() == f"probe {pid} ran\n"
            assert pool.take("cpu:0", [sys.executable, "-m", "tests.scaling.preboot_probe"], env, None) is None  # none
            assert pool.take("cpu:0", ["/bin/true"], env, None) is None  # not a module run: boots fresh
        finally:
            pool.stop()
        assert not alive(pid)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_stopped_leaves_no_preboot_process(tmp_path, tiny_model_dir):
    """`blitzscale serve` (its agent in-process; a model that scales to zero: no replica to load,
    its pre-booted process booted at once) gets SIGTERM with its process perhaps still importing.
    (An agent killed: on the fleet below, the last case.)"""
    with EmbeddedRedis() as server:
        env = {**os.environ, "MODEL_ID": str(tiny_model_dir), "WEIGHT_CACHE_DIR": str(tmp_path / "cache"),
               "XDG_CACHE_HOME": str(tmp_path / "home"), "MIN_REPLICAS": "0", "MAX_REPLICAS": "2",
               "MANUALLY_SCALE": "true"}  # PREBOOT's default: 1, where a model scales to zero
        env.pop("REDIS_URL", None)
        env.pop("PREBOOT", None)
        process = subprocess.Popen([sys.executable, "-m", "blitzscale.cli", "serve", "--port", str(free_port())],
                                   env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            children = wait_for(lambda: preboot_children(process.pid), BOOT_S, "serve's pre-booted process")
            process.send_signal(signal.SIGTERM)
            assert process.wait(60) == 0
            wait_for(lambda: not any(alive(pid) for pid in children), BOOT_S, "no pre-booted process after SIGTERM")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


# -- on a real fleet


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("preboot-fleet")
    svc = FleetService(tiny_model_dir, workdir, HOSTS, env={**ENV, "XDG_CACHE_HOME": str(workdir / "home")})
    try:
        yield svc.start()
    finally:
        svc.stop()


def ready_preboot(fleet) -> list[int]:
    """The agent's pre-booted pids, once its record says they are ready."""
    wait_for(lambda: fleet.host("h1")["prebooted"] == 1, BOOT_S, "h1's pre-booted process ready")
    return preboot_children(fleet.agents["h1"].pid)


def generate(fleet, n: int) -> requests.Response:
    return requests.post(f"{fleet.base_url}/generate", timeout=120,
                         json={"inputs": f"Story {n}:", "parameters": {"max_new_tokens": 4, "details": True}})


def starts(fleet) -> dict[str, float]:
    metrics = requests.get(f"{fleet.base_url}/metrics", timeout=10).text
    return {path: float(line.rsplit(" ", 1)[1]) for path in ("preboot", "fresh")
            for line in metrics.splitlines() if line.startswith(f'blitz_replica_starts_total{{path="{path}"}}')}


def test_a_start_is_served_by_the_preboot_process_and_a_replacement_boots(fleet):
    [prebooted] = ready_preboot(fleet)
    assert fleet.modify("TriggerNormalUp", old_stub_indices=[0], new_stub_indices=[1]).status_code == 200
    replica = fleet.wait_state(1, "active", timeout=90)
    assert (replica["pid"], replica["name"], replica["host"], replica["start_path"]) == (
        prebooted, "replica1@h1", "h1", "preboot")
    assert replica["start_seconds"] > 0
    env = environment(replica["pid"])  # what /proc shows: the place's environment, as a fresh process's
    assert (env["DEVICE"], env["DEVICE_NAME"], env["CUDA_VISIBLE_DEVICES"], env["HOST_NAME"]) == (
        "cpu", replica["device"], "", "h1")
    fleet.stop_slots(0)  # replica 1 is the only one left to serve
    response = generate(fleet, 1)
    assert response.status_code == 200 and response.json()["details"]["generated_tokens"] == 4, response.text
    [replacement] = ready_preboot(fleet)  # one free place left: one process booted for it
    assert replacement != prebooted
    assert starts(fleet) == {"preboot": 1.0}


def test_two_starts_at_once_take_the_preboot_process_and_a_fresh_one_and_both_serve(fleet):
    fleet.stop_slots(1)
    [prebooted] = ready_preboot(fleet)
    assert fleet.modify("TriggerNormalUp", old_stub_indices=[], new_stub_indices=[1, 2]).status_code == 200
    replicas = [fleet.wait_state(slot, "active", timeout=120) for slot in (1, 2)]
    by_path = {r["start_path"]: r for r in replicas}
    assert set(by_path) == {"preboot", "fresh"} and by_path["preboot"]["pid"] == prebooted
    assert {r["device"] for r in replicas} == {"cpu:0", "cpu:1"}
    # each replica holds at most its 2 batch slots of jobs (prefetch 1): 4 jobs held behind the
    # engine gate are 2 in each, so both serve
    fleet.pause_engine()
    try:
        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(generate, fleet, n) for n in range(4)]
            fleet.wait_for(lambda: all(fleet.slot(s)["running"] + fleet.slot(s)["waiting"] > 0 for s in (1, 2)),
                           timeout=60, what="a request in each replica")
            fleet.resume_engine()
            responses = [f.result() for f in futures]
    finally:
        fleet.resume_engine()
    assert [r.status_code for r in responses] == [200] * 4
    assert starts(fleet) == {"preboot": 2.0, "fresh": 1.0}
    # no free place, and still one booted (for a held place: ready when its replica goes)
    [again] = ready_preboot(fleet)
    assert again not in {r["pid"] for r in replicas}


def test_an_agent_killed_leaves_no_preboot_process(fleet):
    """`blitzscale agent` gets SIGKILL with its process perhaps still importing (a place was freed
    just now): the process exits when its command pipe closes. Last on the fleet: h1 is gone after."""
    fleet.stop_slots(2)
    agent = fleet.agents["h1"]
    children = wait_for(lambda: preboot_children(agent.pid), BOOT_S, "h1's pre-booted process for the freed place")
    os.kill(agent.pid, signal.SIGKILL)  # the agent alone: its group (replica 1) is the fleet's to stop
    agent.wait(30)
    wait_for(lambda: not any(alive(pid) for pid in children), BOOT_S, "no pre-booted process after the agent's SIGKILL")
    fleet.kill_host("h1")  # replica 1, left by its agent


# -- what the agent refuses, without booting a real one


def test_a_process_that_started_cuda_before_its_hand_over_is_stopped_and_never_used():
    read_end, write_end = os.pipe()
    claims = f"import os, sys; os.write({write_end}, b'{{\"cuda_initialized\": true}}\\n'); sys.stdin.read()"
    process = subprocess.Popen([sys.executable, "-c", claims], stdin=subprocess.PIPE, pass_fds=(write_end,))
    os.close(write_end)
    pool = PrebootPool(1, lambda place: dict(os.environ), detach=False)
    pool._processes.append(Prebooted(process, read_end, "cpu:0"))
    try:
        wait_for(lambda: not pool._sweep(), 30, "its ready line read and the process refused")
        assert process.poll() is not None and pool.ready() == 0  # stopped, never counted ready
        assert pool.take("cpu:0", [sys.executable, "-m", "tests.scaling.preboot_probe"], {}, None) is None
    finally:
        pool.stop()


def test_an_agent_keeps_none_for_a_command_it_cannot_hand_over_and_survives_a_failed_boot(tmp_path, monkeypatch):
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, devices="cpu,cpu", preboot=1, model_id=str(tmp_path / "none"),
                            weight_cache_dir=str(tmp_path / "cache"))
        agent = HostAgent(settings, host="hq", env={"PATH": os.environ["PATH"]})
        try:
            monkeypatch.setattr(agent_module, "worker_argv", lambda slot, standby=False: ["/bin/sleep", "30"])
            agent._fill_preboot()
            assert agent.preboot._processes == []  # a stand-in command: nothing to pre-boot for
            monkeypatch.undo()

            tries = []

            def no_process(*args, **kwargs):
                tries.append(args)
                raise OSError(24, "Too many open files")

            monkeypatch.setattr(preboot_pool.subprocess, "Popen", no_process)
            for _ in range(6):  # the agent's loop: logged, not raised, and not tried every second forever
                agent._fill_preboot()
            assert agent.preboot._processes == [] and len(tries) == preboot_pool.MAX_FAILED_BOOTS
        finally:
            agent.stop(grace=2)


@pytest.mark.parametrize("argv, env", [(["--preboot", "-1"], {}), ([], {"PREBOOT": "-2"}), ([], {"PREBOOT": "one"})])
def test_a_bad_preboot_setting_is_one_line_naming_it(monkeypatch, argv, env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        main(["agent", *argv])
    message = str(stopped.value.code)
    assert ("--preboot" in message or "PREBOOT" in message) and "\n" not in message, message


def test_by_default_an_agent_preboots_only_where_a_model_scales_to_zero(tmp_path):
    """A host that keeps its replicas (the default, --min-replicas 1) spends nothing on processes
    it may never use; one whose model scales to zero keeps one for the cold start; --preboot wins."""
    assert Settings().preboot_processes == 0
    assert Settings(min_replicas=0).preboot_processes == 1
    models = tmp_path / "models.toml"
    models.write_text('[models.a]\nmodel_id = "a"\n[models.b]\nmodel_id = "b"\nmin_replicas = 0\n')
    assert Settings(models_file=str(models)).preboot_processes == 1  # one model of several is enough
    assert Settings(min_replicas=0, preboot=0).preboot_processes == 0
    assert Settings(preboot=3).preboot_processes == 3


def test_a_fresh_start_stops_the_processes_still_booting_and_keeps_the_ready_ones():
    """Their imports would share the host's CPU with the start someone waits for."""
    pool = PrebootPool(2, lambda place: dict(os.environ), detach=False)
    unsaid = []  # the booting one's ready pipe stays open: it has not said anything yet
    for place, says in (("cpu:0", None), ("cpu:1", b'{"cuda_initialized": false}\n')):
        read_end, write_end = os.pipe()
        if says:
            os.write(write_end, says)
            os.close(write_end)
        else:
            unsaid.append(write_end)
        process = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
        pool._processes.append(Prebooted(process, read_end, place))
    booting, ready = (p.process for p in pool._processes)
    try:
        assert pool.ready_places() == {"cpu:1"} and len(pool._processes) == 2
        pool.stop_booting()
        assert booting.poll() is not None and ready.poll() is None
        assert [p.place for p in pool._processes] == ["cpu:1"]
    finally:
        pool.stop()
        for fd in unsaid:
            os.close(fd)
    assert ready.poll() is not None


@pytest.mark.parametrize("dies", ["os._exit(3)", "os.kill(os.getpid(), signal.SIGKILL)"])
def test_processes_that_die_while_booting_are_booted_a_bounded_number_of_times(tmp_path, caplog, dies):
    """An import that fails, or the OOM killer taking every one as it boots: the agent's loop fills
    the pool every second; it must not boot and lose a process each time forever (starts boot
    fresh), and it says so once."""
    (tmp_path / "sitecustomize.py").write_text(f"import os, signal\n{dies}\n")  # dies before any import
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    pool = PrebootPool(1, lambda place: env, detach=False)
    boots = []
    boot = pool._boot
    pool._boot = lambda place: boots.append(place) or boot(place)
    try:
        with caplog.at_level("WARNING", logger=preboot_pool.__name__):
            for _ in range(12):  # the agent's loop, faster
                pool.fill(["cpu:0"])
                time.sleep(0.1)
                pool._sweep()
        assert 1 <= len(boots) <= preboot_pool.MAX_FAILED_BOOTS, boots
        assert pool.ready() == 0 and pool._processes == []
        assert pool.take("cpu:0", [sys.executable, "-m", "tests.scaling.preboot_probe"], {}, None) is None
        given_up = [r for r in caplog.records if r.levelname == "ERROR"]
        assert len(given_up) == 1 and "fresh" in given_up[0].getMessage(), [r.getMessage() for r in caplog.records]
    finally:
        pool.stop()


# -- starts racing the agent's stop, and each other (a stand-in command: the fresh path)


@pytest.fixture
def sleeper_agent(tmp_path, monkeypatch):
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, devices="cpu,cpu", preboot=1, model_id=str(tmp_path / "none"),
                            weight_cache_dir=str(tmp_path / "cache"))
        monkeypatch.setattr(agent_module, "worker_argv", lambda slot, standby=False: ["/bin/sleep", "60"])
        agent = HostAgent(settings, host="hr", env={"PATH": os.environ["PATH"]})
        try:
            yield agent
        finally:
            agent.stop(grace=2)


def test_a_start_still_in_flight_when_the_agent_stops_starts_nothing(sleeper_agent):
    """`handle` runs each start in a thread of its own, which `stop()` does not wait for: one that
    gets to its spawn after the stop would leave a replica that nobody stops (its own session)."""
    sleeper_agent.stop(grace=2)
    process = sleeper_agent.start_replica(1)
    try:
        assert process is None and sleeper_agent.children == {}
    finally:
        if process is not None:
            process.kill()
            process.wait()


class GatedLock:
    """The agent's lock, where each start thread's second entry (its spawn) waits for the other
    start to have read the slot's process first: the interleaving of a start command replayed
    (or sent twice) while its first start is on its way."""

    def __init__(self):
        self._lock = threading.Lock()
        self._gate = threading.Barrier(2, timeout=10)
        self._entries: dict[str, int] = {}

    def __enter__(self):
        name = threading.current_thread().name
        if name.startswith("start-"):
            self._entries[name] = self._entries.get(name, 0) + 1
            if self._entries[name] == 2:
                self._gate.wait()
        self._lock.acquire()

    def __exit__(self, *exc):
        self._lock.release()


def test_two_starts_of_one_slot_at_once_leave_one_process_the_agent_tracks(sleeper_agent):
    sleeper_agent._lock = GatedLock()
    results = {}
    threads = [threading.Thread(target=lambda n=n: results.__setitem__(n, sleeper_agent.start_replica(3)),
                                name=f"start-{n}") for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    started = [p for p in results.values() if p is not None]
    try:
        assert len(started) == 1, started  # not two replicas for slot 3, one of them untracked
        assert sleeper_agent.children == {3: started[0]}
    finally:
        for process in started:
            process.kill()
            process.wait()


def test_a_process_still_importing_exits_as_soon_as_its_command_pipe_closes(tmp_path):
    """Its agent gone (killed, or stopped) while it imports: nobody will hand it a command, so it
    must not hold a core and memory until its imports end (90 s on a loaded host). Its torch
    import here never ends (a stand-in that sleeps), so only the closed pipe can end it."""
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text("import time\ntime.sleep(600)\n")
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    pool = PrebootPool(1, lambda place: env, detach=False)
    try:
        pool.fill(["cpu:0"])
        [prebooted] = pool._processes
        prebooted.process.stdin.close()  # what the agent's death does to the pipe
        assert prebooted.process.wait(10) == 0
    finally:
        pool.stop(grace=1)


def test_an_agent_whose_every_place_is_held_still_keeps_a_process_ready_for_the_next_start(tmp_path, monkeypatch):
    """Under many models every place of a host is held, and a start comes exactly when one's
    replica goes (an LRU eviction): booted only for free places, the pool had nothing ready then,
    and every cold start of bench.serverless booted fresh."""
    with EmbeddedRedis() as server:
        settings = Settings(redis_url=server.url, devices="cpu,cpu", preboot=1, model_id=str(tmp_path / "none"),
                            weight_cache_dir=str(tmp_path / "cache"))
        agent = HostAgent(settings, host="hh", env={"PATH": os.environ["PATH"],
                                                    "PYTHONPATH": os.environ.get("PYTHONPATH", "")})
        booted = []
        monkeypatch.setattr(agent.preboot, "_boot", lambda place: booted.append(place) or Prebooted(
            subprocess.Popen(["sleep", "30"], stdin=subprocess.PIPE), os.open(os.devnull, os.O_RDONLY), place))
        try:
            monkeypatch.setattr(agent, "held", lambda: {"cpu:0": 0, "cpu:1": 1})  # two replicas, neither loading
            agent._fill_preboot()
            assert booted == ["cpu:0"]  # for a held place: ready when its replica goes; --preboot 1: one
        finally:
            agent.stop(grace=2)
