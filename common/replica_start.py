"""How a replica process was started, told by its host agent in the environment: `preboot` (a
pre-booted interpreter took over: tasks/control/preboot_pool.py) or `fresh` (a new interpreter),
and when the agent started it, so the replica reports its start-to-loaded seconds (docs/scaling.md,
"Pre-booted processes")."""
from __future__ import annotations

import os
import time

PREBOOT = "preboot"
FRESH = "fresh"
PATH_ENV = "BLITZ_REPLICA_START"
STARTED_AT_ENV = "BLITZ_REPLICA_STARTED_AT"


def start_env(path: str, started_at: float) -> dict[str, str]:
    return {PATH_ENV: path, STARTED_AT_ENV: repr(started_at)}


def start_facts(environ=None) -> dict:
    """`start_path` and `start_seconds` (the agent's start to now); none for a replica started by
    hand (`blitzscale worker`) or by an orchestrator."""
    environ = os.environ if environ is None else environ
    path = environ.get(PATH_ENV)
    if path not in (PREBOOT, FRESH):
        return {}
    try:
        seconds = round(time.time() - float(environ.get(STARTED_AT_ENV, "")), 3)
    except ValueError:
        return {"start_path": path}
    return {"start_path": path, "start_seconds": seconds}
