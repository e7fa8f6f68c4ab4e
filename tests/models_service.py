"""A cluster serving several models (`--models-file`): Redis, one host agent (its replicas through
the engine gate, tests.integration.gated_worker) with a few CPU places, the autoscaler, the web. No
replica at start: each model's first request places one (docs/models.md)."""
from __future__ import annotations

import subprocess
from pathlib import Path

import requests
import yaml

from common.processes import stop_processes
from tests.scaling_service import ScalingService
from tests.service import PausableService

TARGET = "X-Amzn-SageMaker-Target-Model"


class ModelsService(ScalingService, PausableService):
    def __init__(self, models: dict[str, str], workdir: Path, places: int, env: dict | None = None):
        workdir.mkdir(parents=True, exist_ok=True)
        models_file = workdir / "models.yaml"
        models_file.write_text(yaml.safe_dump({"models": [{"name": n, "model_id": m} for n, m in models.items()]}))
        super().__init__(next(iter(models.values())), workdir, replicas=0, env={
            "MODELS_FILE": str(models_file), "DEVICES": ",".join(["cpu"] * places), "MIN_REPLICAS": "0",
            "MAX_REPLICAS": "1", "NUM_REPLICAS": "0", "SCALE_INTERVAL": "0.2", "HEARTBEAT_TTL": "2",
            "MAX_INPUT_TOKENS": "256", "MAX_TOTAL_TOKENS": "512", "QUEUE_TIMEOUT": "120",
            # its own host cache: the web prepares every model's tokenizer at start, replicas or not
            "WEIGHT_CACHE_DIR": str(workdir / "cache"), **(env or {})})
        self.autoscaler: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> "ModelsService":
        self.redis.start()
        self.env["REDIS_URL"] = self.redis.url
        # The agent first: a cluster whose models start on demand is healthy once one can start them.
        self.agent = self._spawn("agent", ["agent"], module="tests.integration.gated_agent")
        self.autoscaler = self._spawn("autoscaler", ["autoscaler"])
        self.web = self._spawn("web", ["web"])
        self.wait_healthy(timeout)
        return self

    def stop(self) -> None:
        if self.autoscaler is not None:
            stop_processes([self.autoscaler], grace=10)
        super().stop()

    def generate(self, model: str | None, timeout: float = 180, **parameters) -> requests.Response:
        headers = {TARGET: model} if model else {}
        return requests.post(f"{self.base_url}/generate", headers=headers, timeout=timeout, json={
            "inputs": "The capital of France is", "parameters": {"max_new_tokens": 4, **parameters}})

    def chat(self, model: str, timeout: float = 180) -> requests.Response:
        return requests.post(f"{self.base_url}/v1/chat/completions", timeout=timeout, json={
            "model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "The capital of France is"}]})

    def model_slots(self, model: str) -> dict[int, dict]:
        return {r["slot"]: r for r in self.cluster(False)["replicas"] if r["model"] == model}

    def live(self, model: str) -> list[dict]:
        return [r for r in self.model_slots(model).values() if r["state"] in ("loading", "active", "draining", "standby")]
