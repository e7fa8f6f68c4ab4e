"""The scaling side of the CLI: `blitzscale agent`, `blitzscale autoscaler`, and what `serve`
runs in-process (a host agent that owns the replica processes, and the autoscaler unless
`--manually-scale`)."""
from __future__ import annotations

import logging
import signal
import threading

from common.settings import Settings
from tasks.control.agent import HostAgent
from tasks.control.autoscaler import Autoscaler

log = logging.getLogger("blitzscale")


class Scaling:
    """A host agent (starting `num_replicas` replicas of each model, then `standby_replicas` in standby) and,
    unless manual scaling is on, the autoscaler; both threads of the calling process."""

    def __init__(self, settings: Settings, env: dict | None = None, autoscale: bool | None = None,
                 detach: bool = True):
        self.settings = settings
        self.agent = HostAgent(settings, env=env, detach=detach)
        self.autoscale = (not settings.manually_scale) if autoscale is None else autoscale
        self.autoscaler = None

    def start(self, replicas: int) -> "Scaling":
        # Each in a slot allocated cluster-wide: another host's agent may start its own at once.
        catalog = self.settings.catalog
        for model in catalog.models:  # with several models, each in its own slots (common/models.py)
            own = model.slots if catalog.several else None
            for _ in range(replicas):
                self.agent.start_new(slots=own)
            for _ in range(self.settings.standby_replicas):
                self.agent.start_new(standby=True, slots=own)
        self.agent.start()
        if self.autoscale:
            self.autoscaler = Autoscaler(self.settings).start()
        return self

    def stop_autoscaler(self) -> None:
        if self.autoscaler is not None:
            self.autoscaler.stop()

    def stop(self) -> None:
        self.stop_autoscaler()
        self.agent.stop()


def _wait_for_signal() -> None:
    stopped = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopped.set())
    while not stopped.wait(1):
        pass


def cmd_agent(settings: Settings, replicas: int = 0) -> int:
    """This host's agent alone (one per host of a cluster), starting `replicas` at once. Its
    replicas stay in its process group: the host's processes go down together."""
    if not settings.redis_url:
        raise SystemExit("blitzscale agent needs REDIS_URL (or --redis-url)")
    scaling = Scaling(settings, autoscale=False, detach=False).start(replicas)
    agent = scaling.agent
    log.info("host agent %s ready: %s", agent.host, ", ".join(p.name for p in agent.places))
    try:
        _wait_for_signal()
    finally:
        scaling.stop()
    return 0


def cmd_autoscaler(settings: Settings) -> int:
    """The autoscaler alone (one per cluster)."""
    if not settings.redis_url:
        raise SystemExit("blitzscale autoscaler needs REDIS_URL (or --redis-url)")
    if settings.manually_scale:
        raise SystemExit("manual scaling is on (--manually-scale): the autoscaler does not run")
    autoscaler = Autoscaler(settings).start()
    try:
        _wait_for_signal()
    finally:
        autoscaler.stop()
    return 0
