"""A host's places: `--devices` parsed, GPUs read from `nvidia-smi`'s output, the default on a
machine with and without GPUs, and the environment that pins a replica to one place."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from common.fleet import Place
from common.settings import Settings
from tasks.control.devices import Gpu, host_places, parse_devices, replica_device_env, visible_gpus, with_memory

SMI = "0, NVIDIA H100 80GB HBM3, 81559, 80000\n1, NVIDIA H100 80GB HBM3, 81559, 1024\n3, NVIDIA H100 80GB HBM3, 81559, 81000\n"


def smi(output: str | None):
    def run(argv, **_):
        if output is None:
            raise FileNotFoundError(argv[0])
        return SimpleNamespace(stdout=output)
    return run


@pytest.mark.parametrize("spec,places", [
    ("cpu,cpu", ["cpu:0", "cpu:1"]),
    ("cuda:0, cuda:3", ["cuda:0", "cuda:3"]),
    ("cpu:1,cpu", ["cpu:1", "cpu:0"]),
    ("CUDA:2,cpu", ["cuda:2", "cpu:0"]),
])
def test_devices_name_the_places(spec, places):
    assert parse_devices(spec) == places


@pytest.mark.parametrize("spec,words", [
    ("cuda", "with its index"), ("gpu:0", "is not"), ("cpu:1,cpu:1", "named twice"), (" , ", "no place"),
])
def test_devices_that_do_not_parse(spec, words):
    with pytest.raises(ValueError, match=words):
        parse_devices(spec)


def test_gpus_from_nvidia_smi_narrowed_by_cuda_visible_devices():
    gpus = visible_gpus({}, run=smi(SMI))
    assert [g.index for g in gpus] == [0, 1, 3] and gpus[1] == Gpu(1, "NVIDIA H100 80GB HBM3", 81559 << 20, 1024 << 20)
    assert [g.index for g in visible_gpus({"CUDA_VISIBLE_DEVICES": "3,1"}, run=smi(SMI))] == [1, 3]
    assert visible_gpus({}, run=smi(None)) == []  # no driver, no GPUs


def test_default_places_every_gpu_else_a_cpu_place_per_slot():
    gpus = visible_gpus({}, run=smi(SMI))
    assert host_places(Settings(), gpus) == ["cuda:0", "cuda:1", "cuda:3"]
    assert host_places(Settings(num_replicas=2, standby_replicas=1), []) == ["cpu:0", "cpu:1", "cpu:2"]
    assert host_places(Settings(devices="cuda:1"), gpus) == ["cuda:1"]
    places = with_memory([Place("cuda:1"), Place("cpu:0")], gpus)
    assert (places[0].label, places[0].memory_free) == ("NVIDIA H100 80GB HBM3", 1024 << 20)
    assert places[1].label == "cpu" and places[1].memory_total > 0


def test_a_replica_sees_exactly_its_place():
    assert replica_device_env("cuda:3") == {"CUDA_VISIBLE_DEVICES": "3", "DEVICE": "cuda:0", "DEVICE_NAME": "cuda:3"}
    assert replica_device_env("cpu:1") == {"CUDA_VISIBLE_DEVICES": "", "DEVICE": "cpu", "DEVICE_NAME": "cpu:1"}


def test_nvidia_smi_failing_is_no_gpus():
    def run(argv, **_):
        raise subprocess.CalledProcessError(9, argv)
    assert visible_gpus({}, run=run) == []
