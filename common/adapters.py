"""`--lora-adapters` as TGI's launcher takes it: a comma list of `name=path` or bare adapter ids.

A bare id is a Hugging Face hub id (served under that id, as TGI does) or a local directory
(served under its last path part: a client never sees a local path). The web only needs the
names (validation, /info, /v1/models); a replica resolves each source to a PEFT adapter
directory (`resolve`: local, else the local Hugging Face cache, downloaded when missing).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

BASE_ALIASES = ("tgi",)  # OpenAI `model` values that mean the base model (besides its own name)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/:-]*$")


@dataclass(frozen=True)
class AdapterSpec:
    name: str  # what a request names: TGI's `adapter_id`, OpenAI's `model`
    source: str  # a local directory or a hub id

    @property
    def is_local(self) -> bool:
        return _looks_local(self.source)


def parse_lora_adapters(value: str | None, base_names: tuple[str, ...] = ()) -> list[AdapterSpec]:
    """The adapters of `--lora-adapters`; ValueError naming what is wrong."""
    specs: list[AdapterSpec] = []
    for item in (part.strip() for part in (value or "").split(",")):
        if not item:
            continue
        name, _, source = item.partition("=") if "=" in item else ("", "", item)
        name, source = name.strip(), source.strip()
        if not source:
            raise ValueError(f"`lora_adapters`: {item!r} names no adapter path or id")
        name = name or (Path(source.rstrip("/")).name if _looks_local(source) else source)
        if not _NAME.match(name):
            raise ValueError(f"`lora_adapters`: {name!r} is not a usable adapter name (letters, digits, . _ - / :)")
        if name in base_names or name in BASE_ALIASES:
            raise ValueError(f"`lora_adapters`: {name!r} is the base model's name; give the adapter another")
        if any(spec.name == name for spec in specs):
            raise ValueError(f"`lora_adapters`: {name!r} is named twice")
        specs.append(AdapterSpec(name, source))
    return specs


def _looks_local(source: str) -> bool:
    return source.startswith(("/", ".", "~")) or Path(source).expanduser().exists() or source.count("/") != 1
