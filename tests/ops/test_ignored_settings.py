"""TGI's --max-waiting-tokens and --waiting-served-ratio: accepted, shown in /info, and said to do
nothing when changed (the engine prefills at every step, so there is no pause to tune)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_only_changed_values_are_named():
    assert Settings().ignored_settings() is None
    line = Settings(waiting_served_ratio=1.2).ignored_settings()
    assert line.startswith("--waiting-served-ratio has no effect") and "--max-waiting-tokens" not in line
    both = Settings(max_waiting_tokens=5, waiting_served_ratio=1.2).ignored_settings()
    assert both.startswith("--max-waiting-tokens and --waiting-served-ratio have no effect")


def _worker_stderr(*flags: str) -> str:
    """`blitzscale worker` without REDIS_URL: it reads its settings, then refuses to start."""
    env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "MAX_WAITING_TOKENS", "WAITING_SERVED_RATIO")}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-m", "blitzscale.cli", "worker", *flags], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "needs REDIS_URL" in result.stderr
    return result.stderr


def test_the_command_warns_once_at_startup_when_set():
    stderr = _worker_stderr("--max-waiting-tokens", "5")
    assert stderr.count("--max-waiting-tokens has no effect") == 1 and "WARNING" in stderr
    assert "no effect" not in _worker_stderr()
