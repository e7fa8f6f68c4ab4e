"""A host's places for replicas: one GPU each, or a share of the CPU (docs/scaling.md, "A fleet").

`--devices` names them (`cuda:0,cuda:1`, `cpu,cpu`); without it, every GPU that `nvidia-smi`
lists (as `CUDA_VISIBLE_DEVICES` narrows them), else one CPU place per replica slot, so that
`serve` on a laptop runs as many CPU replicas as its settings allow. No torch here (the web
imports the control plane): GPUs and their memory come from `nvidia-smi`.

The operator's `CUDA_VISIBLE_DEVICES` is a restriction, kept whatever it lists: indices, GPU UUIDs
(`GPU-…`) or MIG instances (`MIG-…`). Each GPU keeps the identifier it was given (`Gpu.ident`),
and that is what its replica's `CUDA_VISIBLE_DEVICES` holds; a place is `cuda:<nvidia-smi
index>`, or with MIG instances `cuda:<position in the list>` (several share one physical GPU).
`CUDA_DEVICE_ORDER=PCI_BUS_ID` makes CUDA number GPUs as `nvidia-smi` does, so a label names the
GPU actually used.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from dataclasses import dataclass, replace

from common.fleet import CPU, CUDA, Place
from common.settings import Settings, env_name

log = logging.getLogger(__name__)

NVIDIA_SMI_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,name,memory.total,memory.free",
                    "--format=csv,noheader,nounits"]
NVIDIA_SMI_LIST = ["nvidia-smi", "-L"]  # names each GPU's MIG instances and their UUIDs
DEVICE_ORDER = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}  # CUDA's numbering = nvidia-smi's
_GPU_LINE = re.compile(r"^GPU (\d+): .*\(UUID: (GPU-[^)]+)\)")
_MIG_LINE = re.compile(r"^\s+MIG (\S+)\s+Device\s+\d+: \(UUID: (MIG-[^)]+)\)")


@dataclass(frozen=True)
class Gpu:
    index: int  # its place's index: nvidia-smi's, or the MIG instance's position in CUDA_VISIBLE_DEVICES
    name: str
    memory_total: int | None  # bytes (None: a MIG instance, whose own size nvidia-smi's query does not give)
    memory_free: int | None
    uuid: str = ""
    ident: str = ""  # what its replica's CUDA_VISIBLE_DEVICES names it by: as the operator gave it

    @property
    def visible_as(self) -> str:
        return self.ident or str(self.index)


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


def _smi(run, argv) -> str | None:
    try:
        return run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None


def visible_gpus(environ=None, run=subprocess.run) -> list[Gpu]:
    """The GPUs `nvidia-smi` reports (none without it), narrowed to `CUDA_VISIBLE_DEVICES` when
    set, in nvidia-smi's order; MIG instances in the list's order. An entry that names nothing
    here is left out, with a warning (never replaced by another GPU)."""
    environ = os.environ if environ is None else environ
    out = _smi(run, NVIDIA_SMI_QUERY)
    if out is None:
        return []
    gpus = []
    for line in out.strip().splitlines():
        index, uuid, name, total, free = (part.strip() for part in line.split(","))
        gpus.append(Gpu(int(index), name, int(float(total)) << 20, int(float(free)) << 20, uuid=uuid))  # MiB
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return gpus
    entries = [part.strip() for part in visible.split(",") if part.strip()]
    if any(entry.startswith("MIG-") for entry in entries):
        return _mig_instances(entries, gpus, _smi(run, NVIDIA_SMI_LIST) or "")
    chosen = []
    for entry in entries:
        gpu = next((g for g in gpus if (str(g.index) == entry if entry.isdigit() else g.uuid.startswith(entry))), None)
        if gpu is None:
            log.warning("CUDA_VISIBLE_DEVICES names %s, which nvidia-smi does not list: left out", entry)
        elif all(g.index != gpu.index for g in chosen):
            chosen.append(replace(gpu, ident=entry))
    return sorted(chosen, key=lambda g: g.index)


def _mig_instances(entries: list[str], gpus: list[Gpu], listing: str) -> list[Gpu]:
    """One place per MIG instance of the list (a place each, even on one physical GPU), labelled
    with its profile and parent; memory: unknown per instance (nvidia-smi reports the parent's)."""
    by_index = {gpu.index: gpu for gpu in gpus}
    parent, instances = None, {}
    for line in listing.splitlines():
        if match := _GPU_LINE.match(line):
            parent = by_index.get(int(match.group(1)))
        elif (match := _MIG_LINE.match(line)) and parent is not None:
            instances[match.group(2)] = (match.group(1), parent)
    out = []
    for position, entry in enumerate(entries):
        found = instances.get(entry)
        if found is None:
            log.warning("CUDA_VISIBLE_DEVICES names %s, which nvidia-smi -L does not list as a MIG instance: "
                        "left out", entry)
            continue
        profile, gpu = found
        out.append(Gpu(position, f"{gpu.name} MIG {profile}", None, None, uuid=entry, ident=entry))
    return out


def outside_restriction(places: list[str], environ=None, run=subprocess.run) -> list[str]:
    """The GPU places of `--devices` that the operator's CUDA_VISIBLE_DEVICES does not allow
    (nothing to check without the variable, or without nvidia-smi)."""
    environ = os.environ if environ is None else environ
    if "CUDA_VISIBLE_DEVICES" not in environ or not visible_gpus({}, run):
        return []
    allowed = {gpu.index for gpu in visible_gpus(environ, run)}
    return [place for place in places if place.startswith(f"{CUDA}:") and int(place.split(":")[1]) not in allowed]


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


def replica_device_env(place: str, gpus: list[Gpu] = ()) -> dict[str, str]:
    """The environment that gives a replica exactly this one place: a GPU is the only one its
    process sees (`CUDA_VISIBLE_DEVICES=<the identifier the operator gave it>`, so it runs on
    `cuda:0`); a CPU place sees none."""
    kind, index = place.split(":")
    device = "cuda:0" if kind == CUDA else CPU
    visible = ""
    if kind == CUDA:
        visible = next((gpu.visible_as for gpu in gpus if gpu.index == int(index)), index)
    return {"CUDA_VISIBLE_DEVICES": visible, **DEVICE_ORDER, env_name("device"): device,
            env_name("device_name"): place}
