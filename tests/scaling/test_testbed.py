"""bench.testbed: hosts as network namespaces with shaped links, real Redis, web, agents and
replicas. Up and down twice in a row leaves nothing; a run killed with SIGKILL leaves its
namespaces and processes to `--cleanup`, which removes them all; Ctrl-C tears a run down.
Skipped where `ip netns` is not permitted (no root)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from bench.testbed import fleet
from bench.testbed.fleet import STATE_DIR, _start_time
from bench.testbed.netns import NetnsUnavailable, check_permitted, ip, leftovers

try:
    check_permitted()
except NetnsUnavailable as reason:
    pytestmark = pytest.mark.skip(reason=str(reason))


def run_things(run: str) -> list[str]:
    found = leftovers()
    return [name for name in found["namespaces"] + found["links"] if f"-{run}-" in name]


def test_up_and_down_twice_leaves_nothing(tiny_model_dir):
    for _ in range(2):
        testbed = fleet.Testbed(2, "1gbit", tiny_model_dir, replicas={"h0": 1, "h1": 1})
        with testbed:
            by_host = testbed.replicas_by_host()
            assert sorted(by_host) == ["h0", "h1"]  # a replica in each host's namespace
            namespaces = {h.name: h.namespace for h in testbed.hosts}
            for host, replicas in by_host.items():  # each really runs inside its host's namespace
                in_namespace = ip("netns", "pids", namespaces[host]).stdout.split()
                assert str(replicas[0]["pid"]) in in_namespace
            assert run_things(testbed.run)
            answer = requests.post(f"{testbed.base_url}/generate", json={"inputs": "Hello", "parameters": {
                "max_new_tokens": 3}}, timeout=60)
            assert answer.status_code == 200 and answer.json()["generated_text"]
        assert testbed.left_behind() == []
        assert run_things(testbed.run) == [] and not testbed.state_file.exists()


def start_runner(tiny_model_dir) -> tuple[subprocess.Popen, dict]:
    """`python -m bench.testbed` held up; returns it and its state file once it is up."""
    runner = subprocess.Popen([sys.executable, "-m", "bench.testbed", "--hosts", "1", "--rate", "100mbit",
                               "--model-id", str(tiny_model_dir), "--max-seconds", "120"],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = runner.stdout.readline()
    assert line.startswith("testbed up"), line
    state = next(json.loads(p.read_text()) for p in STATE_DIR.glob("*.json")
                 if json.loads(p.read_text())["owner"][0] == runner.pid)
    return runner, state


def alive(state: dict) -> list[int]:
    return [pid for pid, started in state["processes"] if _start_time(pid) == started]


def redis_dir(state: dict) -> Path:
    """The run's redis-server's --dir (its working directory: it sets its own process title)."""
    for pid, _ in state["processes"]:
        if Path(f"/proc/{pid}/comm").read_text().strip() == "redis-server":
            return Path(os.readlink(f"/proc/{pid}/cwd"))
    raise AssertionError("no redis-server among the run's processes")


def test_a_killed_run_is_removed_by_cleanup(tiny_model_dir):
    runner, state = start_runner(tiny_model_dir)
    try:
        redis_files = redis_dir(state)
        assert redis_files.is_dir()
    finally:
        runner.kill()  # SIGKILL: no handler, no atexit
    runner.wait(10)
    assert run_things(state["run"]) and alive(state)  # left behind
    cleaned = subprocess.run([sys.executable, "-m", "bench.testbed", "--cleanup"], capture_output=True, text=True,
                             timeout=60)
    assert cleaned.returncode == 0 and cleaned.stdout.startswith("testbed cleanup:"), cleaned
    assert run_things(state["run"]) == []
    deadline = time.monotonic() + 10
    while alive(state) and time.monotonic() < deadline:  # SIGKILLed; gone once reaped by init
        time.sleep(0.1)
    assert alive(state) == [] and not Path(state["workdir"]).exists()
    assert not redis_files.exists()  # Redis's directory too


def test_cleanup_spares_a_live_run_and_ctrl_c_tears_it_down(tiny_model_dir):
    runner, state = start_runner(tiny_model_dir)
    try:
        subprocess.run([sys.executable, "-m", "bench.testbed", "--cleanup"], check=True, capture_output=True, timeout=60)
        assert run_things(state["run"]) and len(alive(state)) == len(state["processes"])  # its owner lives
        runner.send_signal(signal.SIGINT)
        assert "testbed down" in runner.stdout.read()
        assert runner.wait(60) == 0
    finally:
        runner.kill()
    assert run_things(state["run"]) == [] and alive(state) == []
    assert not (STATE_DIR / f"{state['run']}.json").exists()


def test_a_failure_half_way_up_takes_everything_down(tiny_model_dir, monkeypatch):
    """The second host's shaping fails after the bridge, the first host, Redis and nothing else
    exist: up() raises, and nothing of the run is left."""
    from bench.testbed import netns

    shaped = []

    def failing_shape(device, rate, delay, namespace=None):
        shaped.append(device)
        if len(shaped) == 3:  # the second host's veth
            raise RuntimeError("tc refused")
        real_shape(device, rate, delay, namespace)

    real_shape = netns.shape
    monkeypatch.setattr(netns, "shape", failing_shape)
    testbed = fleet.Testbed(2, "1gbit", tiny_model_dir)
    with pytest.raises(RuntimeError, match="tc refused"):
        testbed.up()
    assert testbed.left_behind() == [] and run_things(testbed.run) == [] and not testbed.state_file.exists()

    monkeypatch.setattr(netns, "shape", real_shape)
    later = fleet.Testbed(1, "1gbit", tiny_model_dir)
    monkeypatch.setattr(later, "start_agent", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))  # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        later.up()  # after the network, Redis and the web
    assert later.left_behind() == [] and run_things(later.run) == []


@pytest.mark.parametrize("content", ["{trunc", "[]", '{"run": "zz"}', '{"run": "zz", "owner": [1]}',
                                     '{"run": "zz", "owner": [999999999, "1"], "processes": [[1]]}'])
def test_cleanup_survives_a_state_file_it_cannot_read(content):
    """A state file cut short (a full disk), from another version or edited by hand: `--cleanup`
    removes it and goes on to the rest, it does not die with a traceback."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    broken = STATE_DIR / "zzzz-broken.json"
    broken.write_text(content)
    try:
        cleaned = subprocess.run([sys.executable, "-m", "bench.testbed", "--cleanup"], capture_output=True, text=True,
                                 timeout=60)
        assert cleaned.returncode == 0 and cleaned.stdout.startswith("testbed cleanup:"), cleaned
        assert not broken.exists()
    finally:
        broken.unlink(missing_ok=True)


def test_cleanup_removes_only_a_workdir_a_run_made(tmp_path):
    """A dead run's state file naming a directory no run made (edited, or another tool's): the
    directory stays; only `bzt-<run>-…` workdirs go."""
    keep = tmp_path / "precious"
    keep.mkdir()
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = STATE_DIR / "zzzz-foreign.json"
    state.write_text(json.dumps({"run": "zzzz", "owner": [999999999, "1"], "processes": [], "workdir": str(keep),
                                 "own_workdir": True}))
    try:
        subprocess.run([sys.executable, "-m", "bench.testbed", "--cleanup"], check=True, capture_output=True, timeout=60)
        assert keep.exists() and not state.exists()
    finally:
        state.unlink(missing_ok=True)


def test_a_run_killed_mid_bring_up_leaves_not_even_its_model():
    """`python -m bench.testbed` without --model-id writes a random model; SIGKILLed as soon as
    its web starts (the replica still loading), `--cleanup` removes that model too."""
    runner = subprocess.Popen([sys.executable, "-m", "bench.testbed", "--hosts", "1", "--max-seconds", "120"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def web_model():
            for path in STATE_DIR.glob("*.json"):
                try:
                    state = json.loads(path.read_text())
                    if state["owner"][0] == runner.pid and len(state["processes"]) >= 2:  # Redis, the web
                        environ = Path(f"/proc/{state['processes'][1][0]}/environ").read_bytes().split(b"\0")
                        return state, next(v[9:].decode() for v in environ if v.startswith(b"MODEL_ID="))
                except (OSError, ValueError, KeyError, StopIteration):
                    pass
            return None
        deadline = time.monotonic() + 90
        while not (found := web_model()) and runner.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert found, "the runner's web never started"
    finally:
        runner.kill()  # SIGKILL: no handler, no atexit
        runner.wait(10)
    state, model = found
    assert Path(model, "config.json").exists()
    subprocess.run([sys.executable, "-m", "bench.testbed", "--cleanup"], check=True, capture_output=True, timeout=60)
    assert run_things(state["run"]) == [] and not Path(state["workdir"]).exists()
    assert not Path(model).exists()


def test_cleanup_spares_the_permission_probe_of_a_live_process():
    """Every run and test first probes with a `bzt-probe-<pid>` namespace: a `--cleanup` at that
    moment must not delete it (the prober would report a missing tc or root); a dead prober's goes."""
    live, dead = f"bzt-probe-{os.getpid()}", "bzt-probe-999999999"
    for name in (live, dead):
        ip("netns", "add", name)
    try:
        subprocess.run([sys.executable, "-m", "bench.testbed", "--cleanup"], check=True, capture_output=True, timeout=60)
        namespaces = ip("netns", "list").stdout
        assert live in namespaces and dead not in namespaces
    finally:
        for name in (live, dead):
            ip("netns", "del", name, check=False)


def test_two_runs_made_at_once_get_different_subnets():
    """Two runs whose ids pick the same first /24 (0x0001 and 0x0100: 1 and 256, 255 subnets),
    both made before either is up: the second must not put its bridge on the first's subnet."""
    from bench.testbed.netns import Network

    first, second = Network("0001", 1, "1gbit"), Network("0100", 1, "1gbit")
    try:
        first.up()
        second.up()
        assert first.subnet != second.subnet
        assert second.gateway in ip("-o", "-4", "addr", "show", "dev", second.bridge).stdout
        assert second.hosts[0].address in ip("netns", "exec", second.hosts[0].namespace, "ip", "-o", "-4", "addr").stdout
    finally:
        first.down()
        second.down()
    assert run_things("0001") == run_things("0100") == []


def test_a_second_ctrl_c_during_teardown_still_leaves_nothing(tiny_model_dir):
    """The impatient operator: Ctrl-C, then Ctrl-C and SIGTERM again while the teardown stops the
    agents. The teardown finishes anyway; nothing is left for `--cleanup`."""
    runner, state = start_runner(tiny_model_dir)
    try:
        runner.send_signal(signal.SIGINT)
        assert runner.stdout.readline().startswith("testbed down")  # printed as the teardown starts
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGINT):
            runner.send_signal(signum)
        runner.wait(60)
    finally:
        runner.kill()
    assert run_things(state["run"]) == [] and not (STATE_DIR / f"{state['run']}.json").exists()
    deadline = time.monotonic() + 10
    while alive(state) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert alive(state) == []


def test_cleanup_never_signals_a_reused_pid():
    """A dead run's state file naming a pid that now belongs to another process (its start time
    differs): `--cleanup` leaves that process alone."""
    bystander = subprocess.Popen(["sleep", "60"], start_new_session=True)
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    state = STATE_DIR / "zzzz-reused.json"
    state.write_text(json.dumps({"run": "zzzz", "owner": [999999999, "1"], "processes": [[bystander.pid, "1"]]}))
    try:
        subprocess.run([sys.executable, "-m", "bench.testbed", "--cleanup"], check=True, capture_output=True, timeout=60)
        assert bystander.poll() is None and not state.exists()
    finally:
        bystander.kill()
        bystander.wait(10)
        state.unlink(missing_ok=True)


def test_redis_is_in_the_state_file_before_it_answers(tiny_model_dir, monkeypatch):
    """A run SIGKILLed while its Redis starts (before the first PING answers) must have recorded
    that redis-server, or `--cleanup` could never stop it."""
    import redis as redis_client

    testbed = fleet.Testbed(1, "1gbit", tiny_model_dir)
    recorded = []

    def ping_after_looking(client, *args, **kwargs):
        recorded.extend(pid for pid, _ in json.loads(testbed.state_file.read_text())["processes"])
        raise KeyboardInterrupt  # the run stops here, as a SIGKILL would have
    monkeypatch.setattr(redis_client.Redis, "ping", ping_after_looking)
    with pytest.raises(KeyboardInterrupt):
        testbed.up()
    assert testbed.redis is not None and testbed.redis.process.pid in recorded
    assert testbed.left_behind() == [] and run_things(testbed.run) == []
