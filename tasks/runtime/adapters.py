"""The replica's LoRA adapters (`--lora-adapters`): each found on this host (a local directory, or
a hub id through the local Hugging Face cache, downloaded when missing, as the model is), then
read and checked against the loaded model (engine/lora_files.py). Any adapter that cannot be had
or does not fit stops the replica's start, naming the adapter and, for a misfit, the module."""
from __future__ import annotations

import logging
from pathlib import Path

from common import hub
from common.adapters import AdapterSpec
from common.settings import Settings
from engine.lora_files import AdapterError, LoraAdapter, load_adapter

log = logging.getLogger(__name__)


def adapter_directory(spec: AdapterSpec) -> Path:
    if spec.is_local:
        directory = Path(spec.source).expanduser()
        if not directory.is_dir():
            raise AdapterError(f"LoRA adapter {spec.name!r}: {spec.source} is not a directory")
        return directory
    return hub.ensure_adapter(spec.source)


def load_adapters(settings: Settings, model) -> list[LoraAdapter]:
    adapters = []
    for spec in settings.adapters:
        adapter = load_adapter(spec.name, adapter_directory(spec), model)
        log.info("LoRA adapter %s: rank %d on %d modules", spec.name, adapter.rank, len(adapter.modules))
        adapters.append(adapter)
    return adapters
