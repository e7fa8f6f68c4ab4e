"""A replica whose engine runs as fast as a GPU of a chosen speed, whatever this machine's cores
(bench.autoscale_trace): every forward takes at least SIM_STEP_S plus SIM_PREFILL_S_PER_TOKEN for
each prompt token it prefills, spent sleeping. So replicas add capacity as separate GPUs would,
instead of sharing two CPU cores, and a burst's queueing is the trace's, not the machine's.

    python -m bench.trace_worker agent --host-name h1 ...   # an agent whose replicas run this way
"""
from __future__ import annotations

import os
import sys
import time

from engine.generic_runner import GenericRunner
from engine.model_runner import ModelRunner


def simulated(forward):
    step = float(os.environ.get("SIM_STEP_S") or 0)
    per_token = float(os.environ.get("SIM_PREFILL_S_PER_TOKEN") or 0)

    def timed(self, batch):
        started = time.perf_counter()
        output = forward(self, batch)
        device = step + per_token * sum(chunk.end - chunk.start for chunk in batch.prefill)
        time.sleep(max(0.0, device - (time.perf_counter() - started)))
        return output
    return timed


if __name__ == "__main__":
    from blitzscale.cli import main
    from tasks.control import agent

    ModelRunner.forward = simulated(ModelRunner.forward)
    GenericRunner.forward = simulated(GenericRunner.forward)
    agent.WORKER_MODULE = "bench.trace_worker"  # the agent's replicas run this module too
    sys.exit(main())
