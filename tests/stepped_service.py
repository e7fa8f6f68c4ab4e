"""The real service (tests/service.py) whose replicas run through tests.integration.stepped_worker,
each with its own step budget: a test grants each replica's engine the steps it may take."""
from __future__ import annotations

from pathlib import Path

from tests.service import Service


class SteppedService(Service):
    replica_module = "tests.integration.stepped_worker"

    def steps(self, slot: int) -> Path:
        """The replica's step budget (tests.integration.stepped_worker: `grant`, `granted`)."""
        return self.workdir / f"replica{slot}.steps"

    def start_replica(self, slot: int):
        self.env["ENGINE_STEPS"] = str(self.steps(slot))  # read when the process starts
        return super().start_replica(slot)

    def stop(self) -> None:
        for slot in list(self.replicas):
            self.steps(slot).unlink(missing_ok=True)  # a held engine would hold the warm shutdown
        super().stop()
