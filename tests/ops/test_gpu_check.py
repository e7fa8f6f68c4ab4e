"""scripts/gpu_check.sh can fail: on a machine without CUDA it checks nothing, exits non-zero and
says so in one line (before, it ended `exit 0` whatever happened)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_check.sh"


def _has_gpu() -> bool:
    smi = shutil.which("nvidia-smi")
    return smi is not None and subprocess.run([smi, "-L"], capture_output=True).returncode == 0


@pytest.mark.skipif(_has_gpu(), reason="a GPU is here: the script would run every GPU check")
def test_without_cuda_the_gpu_check_fails_in_one_line(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT)], env={"PATH": "/usr/bin:/bin", "OUT": str(tmp_path)},
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.splitlines() == ["gpu_check: no CUDA device on this machine (nvidia-smi finds no GPU): "
                                        "nothing checked"]
