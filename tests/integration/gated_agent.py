"""A real host agent (`python -m tests.integration.gated_agent agent --host-name h1 ...`) whose
replicas run through tests.integration.gated_worker: their engines hold their next step while the
file named by ENGINE_GATE exists."""
from __future__ import annotations

import sys

from tasks.control import agent

if __name__ == "__main__":
    from blitzscale.cli import main

    agent.WORKER_MODULE = "tests.integration.gated_worker"
    sys.exit(main())
