"""A real replica worker (`python -m tests.integration.stepped_worker worker --slot N`) whose
engine takes only the steps a test grants it: while the file named by ENGINE_STEPS exists, each
step waits until the number in it is above 0 and takes one (`grant` adds to it). A test then
knows how many steps a replica took, whatever the speed of the machine. No file: free running."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from engine.engine import Engine

_step = Engine.step


def _write(path: Path, steps: int) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(str(steps))
    os.replace(temporary, path)  # a reader sees the old number or the new one, never half


def granted(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def grant(path: Path, steps: int) -> None:
    """Let the engine take `steps` more steps (call it while the engine waits at 0: the engine
    writes the file only to take a step)."""
    _write(path, (granted(path) or 0) + steps)


def stepped(self: Engine) -> None:
    budget = Path(os.environ["ENGINE_STEPS"])
    while (left := granted(budget)) is not None and left <= 0:
        time.sleep(0.01)
    if left is not None:
        _write(budget, left - 1)
    _step(self)


if __name__ == "__main__":
    from blitzscale.cli import main

    Engine.step = stepped
    sys.exit(main())
