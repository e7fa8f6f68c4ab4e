"""A host's places for replicas: one GPU each, or a share of the CPU (docs/scaling.md, "A fleet").

`--devices` names them (`cuda:0,cuda:1`, `cpu,cpu`); without it, every GPU that `nvidia-smi`
lists (as `CUDA_VISIBLE_DEVICES` narrows them), else one CPU place per replica slot, so that
`serve` on a laptop runs as many CPU replicas as its settings allow. No torch here (the web
imports the control plane): GPUs and their memory come from `nvidia-smi`.
"""
from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, replace

from common.fleet import CPU, CUDA, Place
from common.settings import Settings, env_name

log = logging.getLogger(__name__)

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,name,memory.total,memory.free", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_total: int  # bytes
    memory_free: int


def parse_devices(spec: str) -> list[str]:
    """`cuda:0, cuda:3` → ["cuda:0", "cuda:3"]; `cpu,cpu` → ["cpu:0", "cpu:1"] (a bare `cpu` takes
    the lowest index not named yet). A GPU needs its index; a place named twice is an error."""
    items = [_canonical(item) for item in spec.split(",") if item.strip()]
    named = [item for item in items if item != CPU]
    for name in named:
        if named.count(name) > 1:
            raise ValueError(f"--devices: {name} is named twice (one replica per place)")
    taken, names = set(named), []
    for item in items:
        if item == CPU:
            item = next(f"{CPU}:{i}" for i in range(len(items) + 1) if f"{CPU}:{i}" not in taken)
            taken.add(item)
        names.append(item)
    if not names:
        raise ValueError("--devices names no place")
    return names


def _canonical(item: str) -> str:
    kind, colon, index = item.strip().lower().partition(":")
    if kind not in (CPU, CUDA) or (colon and not index.isdigit()):
        raise ValueError(f"--devices: {item.strip()!r} is not `cuda:<index>`, `cpu:<index>` or `cpu`")
    if kind == CUDA and not colon:
        raise ValueError("--devices: a GPU is named with its index, e.g. `cuda:0`")
    return f"{kind}:{int(index)}" if colon else CPU


def visible_gpus(environ=None, run=subprocess.run) -> list[Gpu]:
    """The GPUs `nvidia-smi` reports (none without it), narrowed to `CUDA_VISIBLE_DEVICES` when
    that lists indices."""
    environ = os.environ if environ is None else environ
    try:
        out = run(NVIDIA_SMI_QUERY, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, name, total, free = (part.strip() for part in line.split(","))
        gpus.append(Gpu(int(index), name, int(float(total)) << 20, int(float(free)) << 20))  # MiB
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and all(part.strip().isdigit() for part in visible.split(",") if part.strip()):
        wanted = {int(part) for part in visible.split(",") if part.strip()}
        gpus = [gpu for gpu in gpus if gpu.index in wanted]
    return gpus


def host_places(settings: Settings, gpus: list[Gpu]) -> list[str]:
    if settings.devices:
        return parse_devices(settings.devices)
    if gpus:
        return [f"{CUDA}:{gpu.index}" for gpu in gpus]
    return [f"{CPU}:{i}" for i in range(settings.slot_count)]


def with_memory(places: list[Place], gpus: list[Gpu]) -> list[Place]:
    """Each place with its name and memory: the GPU's, or the host's for a CPU place."""
    by_index = {gpu.index: gpu for gpu in gpus}
    host_total, host_free = host_memory()
    out = []
    for place in places:
        if place.kind == CUDA and place.index in by_index:
            gpu = by_index[place.index]
            out.append(replace(place, label=gpu.name, memory_total=gpu.memory_total, memory_free=gpu.memory_free))
        elif place.kind == CPU:
            out.append(replace(place, label=CPU, memory_total=host_total, memory_free=host_free))
        else:
            out.append(place)
    return out


def host_memory() -> tuple[int | None, int | None]:
    """(total, available) bytes of this host's memory, from /proc/meminfo (None elsewhere)."""
    try:
        with open("/proc/meminfo") as handle:
            info = dict(line.split(":", 1) for line in handle)
    except OSError:
        return None, None
    kib = {key: int(value.split()[0]) << 10 for key, value in info.items() if key in ("MemTotal", "MemAvailable")}
    return kib.get("MemTotal"), kib.get("MemAvailable")


def replica_device_env(place: str) -> dict[str, str]:
    """The environment that gives a replica exactly this one place: a GPU is the only one its
    process sees (`CUDA_VISIBLE_DEVICES=<index>`, so it runs on `cuda:0`); a CPU place sees none."""
    kind, index = place.split(":")
    device = "cuda:0" if kind == CUDA else CPU
    return {"CUDA_VISIBLE_DEVICES": index if kind == CUDA else "", env_name("device"): device,
            env_name("device_name"): place}
