"""Stopping child processes: SIGTERM, then SIGKILL after a grace period (one loop for the
CLI's supervisor, the host agent, the private Redis and the tests)."""
from __future__ import annotations

import subprocess
import time


def stop_process(process: subprocess.Popen, grace: float) -> None:
    """SIGTERM, then SIGKILL if it has not exited within `grace` seconds."""
    stop_processes([process], grace)


def stop_processes(processes: list[subprocess.Popen], grace: float) -> list[subprocess.Popen]:
    """SIGTERM to all at once (in order), then SIGKILL whatever has not exited within `grace`
    seconds in all; returns the ones that had to be killed."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + grace
    killed = []
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            killed.append(process)
    return killed
