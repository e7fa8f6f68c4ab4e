"""Model weights: convert a GGUF file once per host, then load (map) the converted copy.

The host weight cache holds one safetensors copy of each GGUF model, keyed by the GGUF file's
content hash. The first replica on a host converts (dequantizes) and writes it under an
exclusive file lock into a temporary directory that is renamed into place, so concurrent first
loads neither corrupt it nor convert twice; every later replica maps the safetensors file.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

log = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class PreparedWeights:
    directory: Path
    source: str  # "directory" | "host-cache" | "gguf-conversion"
    seconds: float  # time spent obtaining the directory (conversion or cache lookup)


def prepare_gguf(gguf_path: Path, target: Path, tokenizer_only: bool = False) -> PreparedWeights:
    """Make sure `target` holds the converted model (or just its tokenizer)."""
    started = time.perf_counter()
    wanted = target / ("tokenizer.json" if tokenizer_only else WEIGHTS_FILE)
    if wanted.is_file():
        return PreparedWeights(target, "host-cache", time.perf_counter() - started)
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(target.with_name(target.name + ".lock")):
        if wanted.is_file():  # another process converted it while we waited for the lock
            return PreparedWeights(target, "host-cache", time.perf_counter() - started)
        staging = target.with_name(f"{target.name}.staging-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        _write_tokenizer(gguf_path, staging)
        if not tokenizer_only:
            _write_weights(gguf_path, staging)
        (staging / "blitzscale.json").write_text(
            json.dumps({"source": str(gguf_path), "converted_at": time.time(), "complete": not tokenizer_only})
        )
        shutil.rmtree(target, ignore_errors=True)  # a tokenizer-only entry is superseded
        os.replace(staging, target)
    return PreparedWeights(target, "gguf-conversion", time.perf_counter() - started)


def _write_tokenizer(gguf_path: Path, directory: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer.save_pretrained(directory)


def _write_weights(gguf_path: Path, directory: Path) -> None:
    """Dequantize with transformers, then save through a plain model built from the config
    (a model loaded from GGUF refuses save_pretrained)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    log.info("converting %s (GGUF → safetensors, once per host)", gguf_path.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
    config = loaded.config
    for attribute in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attribute):
            delattr(config, attribute)
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.save_pretrained(directory, safe_serialization=True)
    generation_config = loaded.generation_config or GenerationConfig.from_model_config(config)
    generation_config.save_pretrained(directory)


@contextmanager
def _exclusive_lock(path: Path):
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def resolve_dtype(name: str | None, device: torch.device, config_dtype) -> torch.dtype:
    """`--dtype` when given; else the model's dtype on GPU and float32 on CPU (fp16 matmuls
    are slow or missing on CPUs)."""
    if name:
        return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]
    if device.type == "cpu":
        return torch.float32
    if isinstance(config_dtype, torch.dtype) and config_dtype != torch.float32:
        return config_dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def load_model(directory: Path, device: torch.device, dtype_name: str | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(directory)
    dtype = resolve_dtype(dtype_name, device, getattr(config, "dtype", None))
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, attn_implementation="sdpa")
    return model.to(device).eval()
