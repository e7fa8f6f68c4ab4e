"""A draft model for benchmarks: a model cut to its first K layers (embeddings, final norm and
head kept), written as a model directory beside its tokenizer.

Offline, the only real model is SmolLM2-135M; a smaller model of the same tokenizer is needed
to measure `--speculative-model`, and its first layers with its own head are one. Untrained for
the shortcut, they draft poorly (SmolLM2-135M's first 6, 12 or 20 of 30 layers: 0-8% acceptance,
docs/engine.md): a floor for what a trained small sibling gives; all 30 layers are the ceiling.

    python -m bench.truncated_draft --layers 6 --out /tmp/smollm2-6l
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def truncate(source: Path, layers: int, target: Path) -> Path:
    """`source` (config.json + model.safetensors + tokenizer) cut to its first `layers` layers, in `target`."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    config = json.loads((source / "config.json").read_text())
    if not 1 <= layers <= config["num_hidden_layers"]:
        raise ValueError(f"layers must be in 1..{config['num_hidden_layers']}, got {layers}")
    target.mkdir(parents=True, exist_ok=True)
    kept = {}
    with safe_open(source / "model.safetensors", framework="pt") as weights:
        for name in weights.keys():
            layer = _LAYER.search(name)
            if layer is None or int(layer.group(1)) < layers:
                kept[name] = weights.get_tensor(name)
    save_file(kept, target / "model.safetensors", metadata={"format": "pt"})
    config["num_hidden_layers"] = layers
    if isinstance(config.get("layer_types"), list):  # one entry a layer, in newer configs
        config["layer_types"] = config["layer_types"][:layers]
    (target / "config.json").write_text(json.dumps(config, indent=2))
    for path in source.iterdir():
        if path.name not in ("config.json", "model.safetensors") and path.is_file() and not path.name.startswith("."):
            shutil.copy(path, target / path.name)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    from bench.common import default_model_dir

    print(truncate(default_model_dir(), args.layers, args.out))


if __name__ == "__main__":
    main()
