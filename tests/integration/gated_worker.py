"""A real replica worker (`python -m tests.integration.gated_worker worker --slot N`) whose engine
holds its next step while the file named by ENGINE_GATE exists: a test pauses generation at a
point it chooses instead of guessing how fast this machine generates. ENGINE_STEP_DELAY (seconds)
makes every step at least that slow: a long generation lasts long by construction."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from engine.engine import Engine

_step = Engine.step


def gated_step(self: Engine) -> None:
    gate = Path(os.environ["ENGINE_GATE"])
    while gate.exists():
        time.sleep(0.01)
    time.sleep(float(os.environ.get("ENGINE_STEP_DELAY") or 0))
    _step(self)


if __name__ == "__main__":
    from blitzscale.cli import main

    Engine.step = gated_step
    sys.exit(main())
