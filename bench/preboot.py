"""A replica start from a pre-booted process against one from a fresh process, side by side on
this machine (docs/scaling.md, "Pre-booted processes").

    .venv/bin/python -m bench.preboot                  # the tiny random model, 3 rounds each, ~2 min
    .venv/bin/python -m bench.preboot --rounds 5 --model-id DIR

Two host agents on one Redis, each with one CPU place: `pre` keeps one pre-booted process
(`--preboot 1`), `fresh` none (`--preboot 0`). Each round starts one replica on each (in turn,
alternating which goes first), timed from the agent's start (what a start command runs) to the
replica `active` in Redis, then stops it. A round begins only once `pre`'s pre-booted process is
ready and nothing else boots: a pre-booted process is booted ahead, off the start's clock. Prints
each start and the medians' ratio, fresh / pre-booted; writes bench/results/preboot.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import print_table, save
from blitzscale.redis_server import EmbeddedRedis
from common.keys import replica_key
from common.processes import stop_processes
from common.settings import Settings
from tasks.control.agent import HostAgent

PATHS = ("preboot", "fresh")


def wait(predicate, what: str, timeout: float = 300):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(0.02)
    raise TimeoutError(f"{what} not reached in {timeout} s")


def start_once(agent: HostAgent, path: str, round_: int) -> dict:
    started = time.perf_counter()
    process = agent.start_new()
    assert process is not None, "no slot or place for the replica"
    slot = next(s for s, p in agent.children.items() if p is process)
    name = f"replica{slot}@{agent.host}"

    def active() -> dict | None:
        raw = agent.redis.get(replica_key(name))
        record = json.loads(raw) if raw else None
        return record if record and record.get("pid") == process.pid and record.get("state") == "active" else None

    try:
        record = wait(active, f"{name} active")
        seconds = time.perf_counter() - started
    finally:
        stop_processes([process], grace=30)
    wait(lambda: not agent.held(), f"{agent.host}'s place free")
    assert record.get("start_path") == path, record.get("start_path")
    return {"path": path, "round": round_, "start_to_active_s": round(seconds, 3),
            "load_seconds": record.get("load_seconds"), "weight_seconds": record.get("weight_seconds")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-id", default=None, help="a model directory (default: a tiny random model)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="bench-preboot-"))
    model_id = args.model_id
    if model_id is None:
        import torch  # noqa: PLC0415 (only to write the random model)

        from bench.random_model import write_random_model  # noqa: PLC0415

        model_id = str(write_random_model("tiny", workdir / "model", torch.float32))
    server = EmbeddedRedis().start()
    agents = {}
    try:
        base = Settings(redis_url=server.url, model_id=model_id, devices="cpu", max_replicas=2, weight_peers="off",
                        heartbeat_ttl=2.0, weight_cache_dir=str(workdir / "cache"))
        agents = {path: HostAgent(base.replace(preboot=1 if path == "preboot" else 0), host=path,
                                  log_dir=str(workdir / path)).start() for path in PATHS}
        rows = []
        for round_ in range(args.rounds):
            for path in PATHS if round_ % 2 == 0 else reversed(PATHS):
                wait(lambda: agents["preboot"].preboot.ready() == 1, "the pre-booted process ready")
                rows.append(start_once(agents[path], path, round_))
                print_table(rows[-1:], list(rows[-1]))
    finally:
        for agent in agents.values():
            agent.stop(grace=10)
        server.stop()
    print()
    print_table(rows, ["path", "round", "start_to_active_s", "load_seconds", "weight_seconds"])
    median = {path: statistics.median(r["start_to_active_s"] for r in rows if r["path"] == path) for path in PATHS}
    ratio = round(median["fresh"] / median["preboot"], 2)
    print(f"start to active, medians: pre-booted {median['preboot']:.2f} s, fresh {median['fresh']:.2f} s: "
          f"fresh / pre-booted {ratio}x")
    path = save("preboot", {"model_id": model_id, "rounds": args.rounds, "rows": rows, "median_s": median,
                            "fresh_over_preboot": ratio})
    print(f"wrote {path}; logs in {workdir}")


if __name__ == "__main__":
    main()
