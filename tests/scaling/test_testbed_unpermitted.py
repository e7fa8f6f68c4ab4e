"""Where `ip netns` is not permitted, `python -m bench.testbed` says so in one line and exits 77
(skipped), touching nothing. As root, the test drops every capability first (setpriv)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from bench.testbed.netns import NetnsUnavailable, check_permitted


def unprivileged() -> list[str]:
    try:
        check_permitted()
    except NetnsUnavailable:
        return []  # already without the right
    if shutil.which("setpriv") is None:
        pytest.skip("root, and no setpriv to drop the capabilities")
    return ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--ambient-caps=-all"]


def test_without_the_right_it_says_so_in_one_line_and_skips():
    done = subprocess.run([*unprivileged(), sys.executable, "-m", "bench.testbed", "--hosts", "2", "--selftest"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 77, done
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("testbed skipped: bench.testbed needs root"), done


def test_without_tc_it_says_so_in_one_line_and_skips(tmp_path):
    """Root and iproute2's `ip`, but no `tc` (a slim CI image): one line and 77, not a traceback
    half-way through bring-up."""
    try:
        check_permitted()
    except NetnsUnavailable as reason:
        pytest.skip(str(reason))  # without root the line names root, not tc
    ip_binary = shutil.which("ip")
    (tmp_path / "ip").symlink_to(ip_binary)  # `ip` alone on the PATH
    done = subprocess.run([sys.executable, "-m", "bench.testbed", "--hosts", "1", "--selftest"], capture_output=True,
                          text=True, timeout=60, env={"PATH": str(tmp_path)})
    assert done.returncode == 77, done
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("testbed skipped:") and "tc" in done.stdout, done


def test_a_delay_without_netem_says_so_in_one_line_and_skips(tiny_model_dir):
    """docs/scaling.md: `--delay` on a kernel without sch_netem is one line (exit 77, as any
    testbed that cannot run here), before anything is made, not a traceback from mid-bring-up."""
    from bench.testbed.netns import ip

    try:
        check_permitted()
    except NetnsUnavailable as reason:
        pytest.skip(str(reason))
    probe = f"bzt-probe-{os.getpid()}"  # what --cleanup spares while we live
    ip("netns", "add", probe)
    try:
        if subprocess.run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                          capture_output=True).returncode == 0:
            pytest.skip("this kernel has netem")
    finally:
        ip("netns", "del", probe, check=False)
    done = subprocess.run([sys.executable, "-m", "bench.testbed", "--hosts", "1", "--delay", "1ms", "--model-id",
                           str(tiny_model_dir), "--max-seconds", "60"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 77, done
    assert done.stdout.count("\n") == 1 and done.stdout.startswith("testbed skipped:") and "netem" in done.stdout, done
