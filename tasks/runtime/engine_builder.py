"""A replica's model, adapters and engine, built from its settings: the one module of the replica
runtime that imports torch, transformers and the engine. tasks.runtime.replica imports it when it
loads its model, so that importing the runtime (the CLI, Celery's tools) stays free of torch."""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import AutoTokenizer

from common import hub, model_files
from common.settings import Settings
from engine.devices import resolve_device
from engine.draft_model import vocabulary_refusal
from engine.engine import Engine
from engine.outputs import EngineError
from engine.lora_files import LoraAdapter
from engine.metrics import EngineMetrics
from engine.outputs import TokenEvent
from engine.scheduler import SchedulerConfig
from engine.speculative import SpeculativeConfig
from engine.watermark import Watermark
from engine.weights import PreparedWeights, load_model, prepare_gguf
from tasks.runtime.adapters import load_adapters
from tasks.runtime.peer_weights import ReplicaWeights


@dataclass(frozen=True)
class BuiltEngine:
    engine: Engine
    device: torch.device
    dtype: str  # the model's, as the replica record shows it ("float32")
    adapters: list[LoraAdapter]


def prepare_weights(source, target) -> PreparedWeights:
    """A GGUF file converted into the host cache entry `target`; a model directory as it is."""
    return prepare_gguf(source.path, target) if source.is_gguf else PreparedWeights(target, "directory", 0.0)


def build_engine(settings: Settings, slot: int, directory, weights: ReplicaWeights, metrics_name: str,
                 step_listener: Callable[[list[TokenEvent]], None]) -> BuiltEngine:
    """The model from `directory` on the replica's device, its adapters checked against it (a misfit
    stops the start here), and the engine started over them."""
    s = settings
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device = resolve_device(s.device, slot, cuda_count, os.environ.get("CUDA_VISIBLE_DEVICES"))
    if device.type == "cuda":
        torch.cuda.set_device(device)  # this thread loads and captures; the engine's loop sets its own
    model = load_model(directory, device, s.dtype)
    adapters = load_adapters(s, model, weights)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    draft = load_draft_model(s, device, model, tokenizer) if s.speculative_model else None
    config = SchedulerConfig(
        max_batch_size=s.max_batch_size,
        max_batch_total_tokens=s.max_batch_total_tokens,
        max_batch_prefill_tokens=s.max_batch_prefill_tokens,
        max_total_tokens=s.max_total_tokens,
        prefix_caching=s.prefix_caching,
    )
    engine = Engine(model, tokenizer, config, EngineMetrics(replica=metrics_name), step_listener=step_listener,
                    cuda_graphs=s.cuda_graphs, watermark=Watermark(s.watermark_gamma, s.watermark_delta),
                    adapters=adapters, speculative=SpeculativeConfig(
                        tokens=s.speculate, ngram_min=s.speculate_ngram_min, ngram_max=s.speculate_ngram_max),
                    draft_model=draft, draft_name=s.speculative_model or "").start()
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    return BuiltEngine(engine, device, dtype, adapters)


def load_draft_model(settings: Settings, device: torch.device, target, tokenizer):
    """`--speculative-model`, taken as `--model-id` is (a hub id downloaded once, a directory, a
    GGUF file converted once into the host cache), on the target's device and dtype; a model of
    another vocabulary stops the start here, in one line."""
    draft = settings.replace(model_id=settings.speculative_model, revision=None)
    hub.ensure_model(draft.model_id, None)
    source = model_files.resolve(draft)
    directory = model_files.prepared_dir(draft, source)
    if source.is_gguf:
        prepare_gguf(source.path, directory)  # once per host: a converted one is found and kept
    model = load_model(directory, device, str(next(target.parameters()).dtype).removeprefix("torch."))
    refusal = vocabulary_refusal(target, model, tokenizer, AutoTokenizer.from_pretrained(directory))
    if refusal:
        raise EngineError(f"--speculative-model {settings.speculative_model}: {refusal}: a draft model must share "
                          f"the target's tokenizer ({settings.model_id})")
    return model
