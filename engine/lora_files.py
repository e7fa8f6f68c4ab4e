"""LoRA adapters in PEFT's format, read and checked against the base model they will run on.

An adapter directory holds `adapter_config.json` and `adapter_model.safetensors`, whose tensors
are named `base_model.model.<module>.lora_A.weight` ([r, in]) and `...lora_B.weight` ([out, r]).
Every check happens at load, so a replica whose adapter does not fit its model refuses to start
with a message naming the module, instead of failing (or silently doing nothing) on a request.
Plain LoRA on `nn.Linear` projections only: DoRA, LoRA biases, embedding LoRA and
`modules_to_save` are refused by name, and so is LoRA on the input embeddings (`embed_tokens`) or
on an `lm_head` tied to them; LoRA on an untied `lm_head` is served (on the kept logits rows).
See docs/engine.md ("LoRA adapters").
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_TENSOR = re.compile(r"^(?P<module>.+)\.lora_(?P<kind>[AB])(?:\.[^.]+)?\.weight$")


class AdapterError(ValueError):
    """An adapter that cannot run on this base model; the message names the adapter (and module)."""


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float  # alpha / r (alpha / sqrt(r) with rsLoRA)

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    modules: dict[str, LoraWeights]  # the base model's module name -> its low-rank update

    @property
    def rank(self) -> int:
        return max(w.rank for w in self.modules.values())


def load_adapter(name: str, directory: str | Path, model) -> LoraAdapter:
    """Read a PEFT LoRA directory and check every tensor against `model`'s modules."""
    from safetensors.torch import load_file

    directory = Path(directory)
    fail = _failer(name)
    config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        fail(f"{directory} is not a PEFT LoRA adapter directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads(config_path.read_text())
    _check_config(config, fail)
    tensors = load_file(str(weights_path))
    _check_embeddings(config.get("target_modules"), tensors, model, fail)
    pairs = _pairs(tensors, fail)
    if not pairs:
        fail(f"{WEIGHTS_FILE} holds no lora_A/lora_B weights")
    targets = config.get("target_modules")
    modules = {}
    for module_name, (a, b) in sorted(pairs.items()):
        if not _targeted(module_name, targets):
            fail(f"module {module_name}: has LoRA weights but is not in target_modules {targets}")
        modules[module_name] = _checked(module_name, a, b, model, config, fail)
    _check_targets_exist(targets, model, fail)
    return LoraAdapter(name, modules)


def _failer(name: str):
    def fail(message: str):
        raise AdapterError(f"LoRA adapter {name!r}: {message}")
    return fail


def _check_config(config: dict, fail) -> None:
    if config.get("peft_type", "LORA") != "LORA":
        fail(f"peft_type is {config.get('peft_type')!r}; only LORA adapters are served")
    refused = {
        "use_dora": "DoRA (use_dora)", "lora_bias": "LoRA biases (lora_bias)",
        "modules_to_save": "modules_to_save (whole trained modules)", "fan_in_fan_out": "fan_in_fan_out weights",
        "layer_replication": "layer_replication",
    }
    for key, what in refused.items():
        if config.get(key):
            fail(f"{what} is not supported")
    if config.get("bias", "none") != "none":
        fail(f"bias={config['bias']!r} is not supported (only 'none')")
    if not isinstance(config.get("r"), int) or config["r"] <= 0:
        fail(f"r must be a positive integer, not {config.get('r')!r}")
    alpha = config.get("lora_alpha")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
        fail(f"lora_alpha must be a number, not {alpha!r}")


def _embedding_modules(model) -> dict[str, str]:
    """The model's embedding modules by name -> which end they are ("input", "output")."""
    ends = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
    return {name: end for name, module in model.named_modules()
            for end, embedding in ends.items() if module is embedding and name}


def _check_embeddings(targets, tensors: dict[str, torch.Tensor], model, fail) -> None:
    """LoRA on the output projection (`lm_head`) runs on the kept logits rows (engine/lora.py);
    refused by module: LoRA on the input embeddings, and on an `lm_head` tied to them (peft's
    merge would change both). The base weight peft saves beside them (`save_embedding_layers`)
    must be the model's own (else the adapter came with a resized or retrained vocabulary);
    it is then dropped."""
    embeddings = _embedding_modules(model)
    named = [t for t in targets if isinstance(t, str)] if isinstance(targets, (list, tuple, set)) else []
    touched = [name for name in embeddings if any(name == t or name.endswith("." + t) for t in named)]
    touched += [name for name in embeddings if name not in touched
                and any(key.removeprefix(_PREFIX).startswith(name + ".") for key in tensors)]
    tied = model.get_input_embeddings().weight is model.get_output_embeddings().weight
    for name in touched:
        short = name.rsplit(".", 1)[-1]
        if embeddings[name] == "input" or tied:
            why = "the input embeddings" if embeddings[name] == "input" else "an output projection tied to the input embeddings"
            fail(f"module {name}: LoRA on {why} is not supported (train the adapter without {short} in target_modules)")
        base = tensors.pop(f"{_PREFIX}{name}.base_layer.weight", None)
        weight = model.get_submodule(name).weight
        if base is not None and not torch.equal(base.to(weight.dtype), weight.detach().cpu()):
            fail(f"module {name}: the adapter's saved base weight is not this model's (a resized or retrained vocabulary)")


def _pairs(tensors: dict[str, torch.Tensor], fail) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR.match(key.removeprefix(_PREFIX))
        if match is None:
            fail(f"tensor {key} is not a lora_A/lora_B weight (embedding LoRA, DoRA and biases are not supported)")
        found.setdefault(match["module"], {})[match["kind"]] = tensor
    for module, pair in found.items():
        if set(pair) != {"A", "B"}:
            fail(f"module {module}: lora_{'B' if 'A' in pair else 'A'} is missing")
    return {module: (pair["A"], pair["B"]) for module, pair in found.items()}


def _pattern_value(module: str, patterns: dict | None, default):
    """PEFT's rank_pattern/alpha_pattern: the first key matching the module's name (or its end)."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _targeted(module: str, targets) -> bool:
    if targets is None:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _check_targets_exist(targets, model, fail) -> None:
    """Every name in target_modules names some nn.Linear of the base model."""
    if targets is None or isinstance(targets, str):
        return
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for target in targets:
        if not any(n == target or n.endswith("." + target) for n in linear):
            fail(f"target module {target!r} matches no linear module of the base model")


def _checked(module_name: str, a: torch.Tensor, b: torch.Tensor, model, config: dict, fail) -> LoraWeights:
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        fail(f"module {module_name}: the base model has no such module")
    if not isinstance(module, torch.nn.Linear):
        fail(f"module {module_name}: is a {type(module).__name__}, not a linear projection")
    rank = _pattern_value(module_name, config.get("rank_pattern"), config["r"])
    alpha = _pattern_value(module_name, config.get("alpha_pattern"), config["lora_alpha"])
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
        fail(f"module {module_name}: lora_A is {list(a.shape)} and lora_B {list(b.shape)}, "
             f"not rank {rank} as adapter_config.json says")
    if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
        fail(f"module {module_name}: the adapter's shapes (lora_A {list(a.shape)}, lora_B {list(b.shape)}) do not fit "
             f"the base model's projection ({module.in_features} in, {module.out_features} out)")
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraWeights(a.float(), b.float(), scale)
