"""The project says `requires-python = ">=3.10"`: every source file compiles under Python 3.10
(no 3.11+ syntax), and the modules that both tiers import first, which need only the standard
library, import under it (no 3.11+ standard library: enum.StrEnum, tomllib, typing.Self...).
Skipped where no Python 3.10 is installed."""
from __future__ import annotations

import glob
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _python310() -> str | None:
    """A Python 3.10 that runs (a pyenv shim may name one it will not run)."""
    for candidate in [*sorted(glob.glob(str(Path.home() / ".pyenv/versions/3.10*/bin/python"))), shutil.which("python3.10")]:
        if candidate and subprocess.run([candidate, "--version"], capture_output=True).returncode == 0:
            return candidate
    return None


PYTHON310 = _python310()
pytestmark = pytest.mark.skipif(PYTHON310 is None, reason="no Python 3.10 here")

COMPILE_ALL = """
import subprocess, sys
files = subprocess.run(["git", "ls-files", "*.py"], capture_output=True, text=True, check=True).stdout.split()
for path in files:
    compile(open(path, encoding="utf-8").read(), path, "exec")
print(len(files))
"""


def run310(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON310, "-c", code], cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_every_source_file_compiles_under_python_3_10():
    result = run310(COMPILE_ALL)
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) > 100


def test_the_shared_protocol_imports_under_python_3_10():
    result = run310("import common.protocol, common.states, common.keys; "
                    "from common.protocol import FailureReason; "
                    "print(str(FailureReason.NO_REPLICA), f'{FailureReason.NO_REPLICA}')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["no_replica", "no_replica"]
