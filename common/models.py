"""Several models on one fleet (docs/models.md): `--models NAME=ID[,NAME=ID...]` and
`--models-file` (TOML or YAML), read into a `ModelCatalog`.

Each model owns a fixed range of replica slots (the first model's start at 0, the next model's
after the first's, ...), so a slot's number says which model its replica serves: a host agent,
a replica starting in `--slot N` and the control plane all agree without asking anyone. Each
model has its own shared queue: the first model keeps `generation` (and a one-model cluster,
the default, is exactly the single-model service), the others `generation:<name>`.

The flags are every model's defaults; a models file overrides, per model, `min_replicas`,
`max_replicas`, `max_batch_size`, `lora_adapters` (and `revision`, `dtype`, `speculate`,
`speculative_model`: a draft model of that model's tokenizer). No torch here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from common.adapters import BASE_ALIASES
from common.keys import GENERATION_QUEUE

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")  # no `/` and no `@`: it is part of queue names
MAX_NAME = 64  # a name is part of queue names, Redis keys and metric labels: a name, not a payload
OVERRIDABLE = ("min_replicas", "max_replicas", "max_batch_size", "lora_adapters", "revision", "dtype", "speculate",
               "speculative_model")
# What each override may be: a file is read as written (YAML `3` is an int, `"3"` a string, TOML
# `1e400` a float): a wrong kind or a number past these is one clear line at start, never a
# TypeError later or a slot range of a trillion slots that the control plane walks.
MAX_SLOTS_PER_MODEL = 4096
_INTEGERS = {"min_replicas": 0, "max_replicas": 0, "max_batch_size": 1, "speculate": 0}  # name -> least value


@dataclass(frozen=True)
class ModelSpec:
    name: str  # what clients name: OpenAI's `model`, SageMaker's target-model header
    model_id: str  # as `--model-id` takes it: hub id, local directory, .gguf file
    overrides: tuple[tuple[str, object], ...] = ()  # settings that differ from the flags


def parse_models(value: str | None) -> list[ModelSpec]:
    """`--models a=org/model,b=/path/to/dir`; ValueError naming what is wrong."""
    specs = []
    for item in (part.strip() for part in (value or "").split(",")):
        if not item:
            continue
        name, sep, model_id = item.partition("=")
        if not sep or not model_id.strip():
            raise ValueError(f"`models`: {item!r} is not NAME=ID")
        specs.append(ModelSpec(name.strip(), model_id.strip()))
    return specs


def read_models_file(path: str) -> list[ModelSpec]:
    """A TOML or YAML file: a `models` list (or table by name) of {name, model_id, <overrides>}."""
    text = Path(path).read_text()
    if path.lower().endswith(".toml"):
        import tomli  # tomllib is 3.11's; tomli is the same parser on 3.10

        try:
            data = tomli.loads(text)
        except tomli.TOMLDecodeError as error:
            raise ValueError(f"`models_file` {path}: {error}") from error
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"`models_file` {path}: {error}") from error
    entries = data.get("models") if isinstance(data, dict) else None
    if isinstance(entries, dict):
        entries = [{"name": name, **(entry or {})} if isinstance(entry or {}, dict) else entry
                   for name, entry in entries.items()]
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"`models_file` {path}: no `models` list")
    specs = []
    for entry in entries:
        if not isinstance(entry, dict) or not entry.get("name") or not entry.get("model_id"):
            raise ValueError(f"`models_file` {path}: every model needs `name` and `model_id` ({entry!r})")
        unknown = set(entry) - {"name", "model_id", *OVERRIDABLE}
        if unknown:
            raise ValueError(f"`models_file` {path}: model {entry['name']!r}: unknown settings {sorted(unknown)} "
                             f"(per model: {', '.join(OVERRIDABLE)})")
        if not isinstance(entry["model_id"], str):
            raise ValueError(f"`models_file` {path}: model {entry['name']!r}: `model_id` must be a string")
        overrides = tuple((k, _checked(path, entry["name"], k, entry[k])) for k in OVERRIDABLE if k in entry)
        specs.append(ModelSpec(str(entry["name"]), entry["model_id"], overrides))
    return specs


def _checked(path: str, name: object, key: str, value: object) -> object:
    """One per-model setting of a models file, as the flag takes it; ValueError naming it."""
    where = f"`models_file` {path}: model {name!r}: `{key}`"
    if key in _INTEGERS:
        least = _INTEGERS[key]
        if isinstance(value, bool) or not isinstance(value, int) or not least <= value <= MAX_SLOTS_PER_MODEL:
            raise ValueError(f"{where} must be a whole number from {least} to {MAX_SLOTS_PER_MODEL} ({value!r})")
    elif value is not None and not isinstance(value, str):
        raise ValueError(f"{where} must be a string ({value!r})")
    return value


def model_queue(index: int, name: str) -> str:
    """A model's shared queue: the first model's is `generation`, as a one-model cluster's."""
    return GENERATION_QUEUE if index == 0 else f"{GENERATION_QUEUE}:{name}"


@dataclass(frozen=True)
class ServedModel:
    """One model of the catalog, with its settings (the flags, then its overrides)."""
    index: int
    name: str
    settings: object  # common.settings.Settings (of this model: model_id, served name, range, ...)
    slots: range  # the replica slots that serve it

    @property
    def queue(self) -> str:
        return model_queue(self.index, self.name)


class ModelCatalog:
    """Every served model in order (the first is the default one)."""

    def __init__(self, models: list[ServedModel]):
        self.models = models
        self._by_name = {m.name: m for m in models}

    @property
    def first(self) -> ServedModel:
        return self.models[0]

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    @property
    def several(self) -> bool:
        return len(self.models) > 1

    @property
    def slot_count(self) -> int:
        return self.models[-1].slots.stop

    def get(self, name: str | None) -> ServedModel | None:
        return self._by_name.get(name) if name else None

    def for_slot(self, slot: int) -> ServedModel:
        """The model a slot's replica serves (slots past the last range: the last model's)."""
        return next((m for m in self.models if slot in m.slots), self.models[-1])

    def owner_of_adapter(self, adapter: str) -> ServedModel | None:
        return next((m for m in self.models if adapter in m.settings.adapter_names), None)


def check_name(name: str) -> str:
    if len(name) > MAX_NAME:
        raise ValueError(f"`models`: a model name is at most {MAX_NAME} characters ({name[:20]!r}... has {len(name)})")
    if not _NAME.match(name):
        raise ValueError(f"`models`: {name!r} is not a usable model name (letters, digits, . _ - :)")
    if name in BASE_ALIASES:  # OpenAI's `model: tgi` means the default model: this one would be unreachable
        raise ValueError(f"`models`: {name!r} means the default model in a request's `model`; name it otherwise")
    return name
