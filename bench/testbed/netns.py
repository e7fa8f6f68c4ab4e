"""Hosts as Linux network namespaces: a bridge in the root namespace, one namespace per host with a
veth to the bridge, each end's egress shaped with `tc` (so a host's link is shaped both ways).

Every name starts with `bzt-<run>-` (namespaces, veths, the bridge) so that `cleanup_leftovers`
finds what a dead run left and never touches anything else. Interface names must fit in 15
characters (IFNAMSIZ): `bzt-<4 hex>-h<i>` does up to 99 hosts.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import re
import signal
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PREFIX = "bzt-"
STATE_DIR = Path(tempfile.gettempdir()) / "bzt-testbed"  # the runs' state files (bench/testbed/fleet.py)
SUBNETS = ipaddress.ip_network("10.231.0.0/16")  # one /24 per run, the first not already on a link
_UNITS = {"bit": 1, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}


class NetnsUnavailable(RuntimeError):
    """`ip netns` is not permitted here (no root, no CAP_NET_ADMIN, no iproute2), or links
    cannot be shaped (no `tc`, no tbf)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], capture_output=True, text=True, check=True, timeout=30)


def rate_bits(rate: str) -> float:
    """tc's rate spelling (`1gbit`, `500mbit`) → bits per second."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmgt]?bit)", rate.strip().lower())
    if not match:
        raise ValueError(f"rate {rate!r}: write it as tc does, e.g. 1gbit, 500mbit")
    return float(match[1]) * _UNITS[match[2]]


def check_permitted(delay: str | None = None) -> None:
    """Raise NetnsUnavailable with one line when namespaces cannot be made here (or links
    shaped, or given `delay`, when netem is missing)."""
    probe = f"{PREFIX}probe-{os.getpid()}"
    try:
        made = ip("netns", "add", probe, check=False)
    except FileNotFoundError:
        raise NetnsUnavailable("bench.testbed needs iproute2 (`ip`): not installed") from None
    if made.returncode != 0:
        raise NetnsUnavailable(f"bench.testbed needs root (ip netns add: {made.stderr.strip() or 'not permitted'})")
    try:  # every link is shaped: without `tc` or tbf (or netem, for a delay), bring-up would fail half-way
        tc("-n", probe, "qdisc", "add", "dev", "lo", "root", "handle", "1:", "tbf", "rate", "1mbit", "burst", "32kbit",
           "latency", "100ms")
        if delay:
            shape_delay = ("-n", probe, "qdisc", "add", "dev", "lo", "parent", "1:1", "handle", "10:", "netem", "delay")
            try:
                tc(*shape_delay, delay)
            except subprocess.CalledProcessError as error:
                raise NetnsUnavailable(f"--delay needs netem, which this kernel refuses: {error.stderr.strip()}") from None
    except FileNotFoundError:
        raise NetnsUnavailable("bench.testbed needs iproute2's `tc`: not installed") from None
    except subprocess.CalledProcessError as error:
        raise NetnsUnavailable(f"bench.testbed needs tc's tbf qdisc: {error.stderr.strip()}") from None
    finally:
        ip("netns", "del", probe, check=False)


@dataclass(frozen=True)
class Host:
    name: str  # h0, h1, ...
    namespace: str
    veth: str  # the root namespace's end, on the bridge
    address: str  # the host's address on the bridge's subnet


class Network:
    """The bridge, the namespaces and the shaped veths of one run."""

    def __init__(self, run: str, hosts: int, rate: str, delay: str | None = None):
        if not 1 <= hosts <= 99:
            raise ValueError("--hosts: 1 to 99")
        self.run, self.rate, self.delay = run, rate, delay
        rate_bits(rate)  # a bad spelling fails before anything is made
        self.bridge = f"{PREFIX}{run}-br"
        self._place(hosts, _free_subnet(int(run, 16)))  # a first guess: up() takes the one free then

    def _place(self, hosts: int, subnet: ipaddress.IPv4Network) -> None:
        self.subnet = subnet
        self.gateway = str(subnet.network_address + 1)  # the bridge: Redis and the web
        self.hosts = [Host(f"h{i}", f"{PREFIX}{self.run}-h{i}", f"{PREFIX}{self.run}-h{i}",
                           str(subnet.network_address + 10 + i)) for i in range(hosts)]

    def up(self) -> "Network":
        """Make everything; on any failure, remove what was made and raise."""
        try:
            with _subnet_lock():  # from the choice to the bridge's address: no other run takes it meanwhile
                self._place(len(self.hosts), _free_subnet(int(self.run, 16)))
                ip("link", "add", self.bridge, "type", "bridge")
                ip("addr", "add", f"{self.gateway}/{self.subnet.prefixlen}", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
            for host in self.hosts:
                self._add_host(host)
        except BaseException:
            self.down()
            raise
        return self

    def _add_host(self, host: Host) -> None:
        inner = f"{host.veth}p"
        ip("netns", "add", host.namespace)
        ip("link", "add", host.veth, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", host.namespace)
        ip("link", "set", host.veth, "master", self.bridge)
        ip("link", "set", host.veth, "up")
        run = ("netns", "exec", host.namespace, "ip")
        ip(*run, "link", "set", "lo", "up")
        ip(*run, "link", "set", inner, "name", "eth0")
        ip(*run, "addr", "add", f"{host.address}/{self.subnet.prefixlen}", "dev", "eth0")
        ip(*run, "link", "set", "eth0", "up")
        shape(host.veth, self.rate, self.delay)  # into the host
        shape("eth0", self.rate, self.delay, namespace=host.namespace)  # out of the host

    def link(self, host: Host, up: bool) -> None:
        """A host's link down (its cable pulled) or up again."""
        ip("link", "set", host.veth, "up" if up else "down")

    def down(self) -> None:
        """Kill what runs in our namespaces, delete them, the veths and the bridge (idempotent)."""
        for host in self.hosts:
            remove_namespace(host.namespace)
            ip("link", "del", host.veth, check=False)
        ip("link", "del", self.bridge, check=False)


def shape(device: str, rate: str, delay: str | None, namespace: str | None = None) -> None:
    """tbf at `rate` on the device's egress (bursts of 4 ms of the rate, at least 256 KiB, so
    that GSO packets pass), with netem's delay under it when asked."""
    burst = max(int(rate_bits(rate) / 8 * 0.004), 256 << 10)
    prefix = ["-n", namespace] if namespace else []
    tc(*prefix, "qdisc", "add", "dev", device, "root", "handle", "1:", "tbf", "rate", rate,
       "burst", str(burst), "latency", "100ms")
    if delay:
        try:
            tc(*prefix, "qdisc", "add", "dev", device, "parent", "1:1", "handle", "10:", "netem", "delay", delay,
               "limit", "100000")
        except subprocess.CalledProcessError as error:
            raise NetnsUnavailable(f"--delay needs netem, which this kernel refuses: {error.stderr.strip()}") from None


def remove_namespace(namespace: str) -> None:
    """SIGKILL every process in the namespace, then delete it."""
    listed = ip("netns", "pids", namespace, check=False)
    for pid in listed.stdout.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    ip("netns", "del", namespace, check=False)


def leftovers(runs_alive: set[str] = frozenset()) -> dict[str, list[str]]:
    """`bzt-` namespaces and links that belong to no live run."""
    def dead(name: str) -> bool:
        if probe := re.fullmatch(rf"{PREFIX}probe-(\d+)", name):  # check_permitted's, while its process lives
            return not os.path.exists(f"/proc/{probe[1]}")
        match = re.match(rf"{PREFIX}([0-9a-f]+)-", name)
        return not match or match[1] not in runs_alive

    namespaces = [line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()]
    links = [line.split(":")[1].strip().split("@")[0] for line in ip("-o", "link", "show", check=False).stdout.splitlines()]
    return {"namespaces": [n for n in namespaces if n.startswith(PREFIX) and dead(n)],
            "links": [link for link in links if link.startswith(PREFIX) and dead(link)]}


def remove_leftovers(runs_alive: set[str] = frozenset()) -> dict[str, list[str]]:
    found = leftovers(runs_alive)
    for namespace in found["namespaces"]:
        remove_namespace(namespace)
    for link in found["links"]:
        ip("link", "del", link, check=False)  # a veth's peer goes with it
    return found


@contextmanager
def _subnet_lock():
    """An exclusive lock among the runs of this machine, on a directory (nothing left behind)."""
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(STATE_DIR, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


def _free_subnet(seed: int) -> ipaddress.IPv4Network:
    """The first /24 not on a link, searched from one the run id picks (two runs starting at the
    same moment then rarely race for the same one)."""
    used = ip("-o", "-4", "addr", "show", check=False).stdout
    taken = {ipaddress.ip_interface(m).network for m in re.findall(r"inet (\S+)", used)}
    subnets = list(SUBNETS.subnets(new_prefix=24))[1:]  # 10.231.0.0/24 left out
    start = seed % len(subnets)
    for subnet in subnets[start:] + subnets[:start]:
        if not any(subnet.overlaps(t) for t in taken):
            return subnet
    raise RuntimeError(f"no free /24 in {SUBNETS}")
