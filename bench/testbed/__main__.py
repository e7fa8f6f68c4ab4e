"""python -m bench.testbed: a fleet of hosts as network namespaces with shaped links.

    python -m bench.testbed --hosts 2 --rate 1gbit --selftest   # up, generate, measure, down: one line
    python -m bench.testbed --hosts 3 --rate 1gbit --delay 1ms   # up until Ctrl-C (or --max-seconds)
    python -m bench.testbed --cleanup                           # remove what a killed run left

Needs root (ip netns, tc); without it, one line and exit status 77 (skipped). See docs/scaling.md.
"""
from __future__ import annotations

import argparse
import atexit
import signal
import sys
import time
from pathlib import Path

from bench.testbed.fleet import Testbed, cleanup_dead_runs
from bench.testbed.netns import NetnsUnavailable, check_permitted
from bench.testbed.selftest import selftest

SKIPPED = 77  # the automake convention for "cannot run here"


def _interrupt(signum, _frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def _out_of_time(signum, _frame):
    raise TimeoutError("--max-seconds reached")


def tiny_model(directory: Path) -> Path:
    import torch

    from bench.random_model import write_random_model

    return write_random_model("tiny", directory, torch.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", type=int, default=2)
    parser.add_argument("--rate", default="1gbit", help="each host's link, both ways, as tc writes it")
    parser.add_argument("--delay", default=None, help="one-way delay of each host's link (netem), e.g. 1ms")
    parser.add_argument("--places", type=int, default=1, help="CPU places per host")
    parser.add_argument("--model-id", default=None, help="a model directory (default: a ~1 MB random one)")
    parser.add_argument("--selftest", action="store_true")
    parser.add_argument("--cleanup", action="store_true", help="remove every bzt- thing a dead run left")
    parser.add_argument("--max-seconds", type=int, default=900, help="tear down after this long, whatever happens")
    args = parser.parse_args(argv)
    try:
        check_permitted(args.delay)
    except NetnsUnavailable as error:
        print(f"testbed skipped: {error}")
        return SKIPPED
    if args.cleanup:
        removed = cleanup_dead_runs()
        print(f"testbed cleanup: {removed['processes']} processes, {len(removed['namespaces'])} namespaces, "
              f"{len(removed['links'])} links removed")
        return 0
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    signal.signal(signal.SIGALRM, _out_of_time)
    signal.alarm(args.max_seconds)
    replicas = {f"h{i}": 1 for i in range(args.hosts)} if args.selftest else {"h0": 1}
    testbed = Testbed(args.hosts, args.rate, args.model_id or "", args.delay, args.places, replicas,
                      env={"DOWN_TARGET": "standby"} if args.selftest else None)
    atexit.register(testbed.down)  # whatever ends us (but SIGKILL: --cleanup, or the next run)
    if not args.model_id:  # in the run's workdir: a SIGKILLed run's model goes with it at --cleanup
        testbed.model_dir = str(tiny_model(testbed.workdir / "model"))
    if args.selftest:
        ok, line = selftest(testbed)
        print(line)
        return 0 if ok else 1
    try:
        testbed.up()
        print(f"testbed up: web {testbed.base_url}, Redis {testbed.redis.public_url}, hosts "
              + ", ".join(f"{h.name} {h.address} ({h.namespace})" for h in testbed.hosts)
              + f"; Ctrl-C tears it down (or in {args.max_seconds} s)", flush=True)
        while True:
            time.sleep(3600)
    except (KeyboardInterrupt, TimeoutError) as stop:
        print(f"testbed down ({stop or 'interrupted'})")
    finally:
        testbed.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
