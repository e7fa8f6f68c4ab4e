"""A real replica worker (`python -m tests.integration.gated_worker worker --slot N`) whose engine
holds its next step while the file named by ENGINE_GATE exists: a test pauses generation at a
point it chooses instead of guessing how fast this machine generates."""
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
    _step(self)


if __name__ == "__main__":
    from blitzscale.cli import main

    Engine.step = gated_step
    sys.exit(main())
