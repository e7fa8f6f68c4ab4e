"""The default model (SmolLM2-135M-Instruct's GGUF file) converted once per host and shared
read-only by every test that needs it: its conversion (GGUF → safetensors) takes a minute or
more on a 2-core machine, and the tests that serve the default model check what it answers,
not how its weights were made. A test with its own host cache gets the converted files as hard
links (no copy of 0.5 GB; an entry is only ever replaced by a rename, never written in place)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from common import model_files
from common.settings import Settings, default_model_id

WEIGHTS_FILE = "model.safetensors"  # an entry is complete once this appears (common.model_files)


def converted_default_model() -> Path:
    """The default model's entry in this host's default weight cache (where `real_service` and
    `blitzscale prepare` put it), converted there by the product's own code if it is not yet."""
    from engine.weights import prepare_gguf

    settings = Settings(model_id=default_model_id())
    source = model_files.resolve(settings)
    return prepare_gguf(source.path, model_files.prepared_dir(settings, source)).directory


def link_weights(entry: Path, cache_dir: Path) -> Path:
    """Give the host cache `cache_dir` the converted weights of `entry`, as if this host had
    converted them earlier: every file its entry lacks is hard-linked in, the weights last, so
    the entry turns complete at once. An entry that already holds the tokenizer (the web's
    tokenizer-only preparation) keeps it."""
    target = cache_dir / "models" / entry.name
    target.mkdir(parents=True, exist_ok=True)
    # Not the dot files (a chunk manifest remembered for the entry's own files): its cache makes its own.
    missing = sorted((p for p in entry.iterdir()
                      if p.is_file() and not p.name.startswith(".") and not (target / p.name).exists()),
                     key=lambda p: p.name == WEIGHTS_FILE)
    for path in missing:
        try:
            os.link(path, target / path.name)
        except OSError:  # another filesystem: a copy, renamed into place whole
            staging = target / f".{path.name}.copying"
            shutil.copyfile(path, staging)
            os.replace(staging, target / path.name)
    return target
