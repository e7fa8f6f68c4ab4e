"""The replica's LoRA adapters (`--lora-adapters`): each found on this host, in its host cache or
on a live peer (tasks/runtime/adapter_weights.py), then read and checked against the loaded model
(engine/lora_files.py). Any adapter that cannot be had or does not fit stops the replica's start,
naming the adapter and, for a misfit, the module."""
from __future__ import annotations

import logging

from common.settings import Settings
from engine.lora_files import LoraAdapter, load_adapter
from tasks.runtime.adapter_weights import AdapterWeights
from tasks.runtime.peer_weights import ReplicaWeights

log = logging.getLogger(__name__)


def load_adapters(settings: Settings, model, weights: ReplicaWeights) -> list[LoraAdapter]:
    found = AdapterWeights(weights)
    adapters = []
    for spec in settings.adapters:
        adapter = load_adapter(spec.name, found.obtain(spec), model)
        log.info("LoRA adapter %s: rank %d on %d modules", spec.name, adapter.rank, len(adapter.modules))
        adapters.append(adapter)
    return adapters
