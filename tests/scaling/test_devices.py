"""A host's places: `--devices` parsed, GPUs read from `nvidia-smi`'s output, the default on a
machine with and without GPUs, and the environment that pins a replica to one place."""
from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest

from common.fleet import Place
from common.settings import Settings
from tasks.control.devices import Gpu, host_places, parse_devices, replica_device_env, visible_gpus, with_memory

SMI = ("0, GPU-aaaa0000-1111, NVIDIA H100 80GB HBM3, 81559, 80000\n"
       "1, GPU-bbbb0000-2222, NVIDIA H100 80GB HBM3, 81559, 1024\n"
       "3, GPU-dddd0000-4444, NVIDIA H100 80GB HBM3, 81559, 81000\n")
SMI_LIST = ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-aaaa0000-1111)\n"
            "  MIG 3g.40gb     Device  0: (UUID: MIG-1111aaaa-0000)\n"
            "  MIG 3g.40gb     Device  1: (UUID: MIG-2222aaaa-0000)\n"
            "GPU 1: NVIDIA H100 80GB HBM3 (UUID: GPU-bbbb0000-2222)\n"
            "GPU 3: NVIDIA H100 80GB HBM3 (UUID: GPU-dddd0000-4444)\n"
            "  MIG 1g.10gb     Device  0: (UUID: MIG-3333dddd-0000)\n")


def smi(output: str | None, listing: str = SMI_LIST):
    def run(argv, **_):
        if output is None:
            raise FileNotFoundError(argv[0])
        return SimpleNamespace(stdout=listing if argv[1] == "-L" else output)
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
    assert [g.index for g in gpus] == [0, 1, 3]
    assert gpus[1] == Gpu(1, "NVIDIA H100 80GB HBM3", 81559 << 20, 1024 << 20, uuid="GPU-bbbb0000-2222")
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
    order = {"CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert replica_device_env("cuda:3") == {"CUDA_VISIBLE_DEVICES": "3", **order, "DEVICE": "cuda:0",
                                            "DEVICE_NAME": "cuda:3"}
    assert replica_device_env("cpu:1") == {"CUDA_VISIBLE_DEVICES": "", **order, "DEVICE": "cpu", "DEVICE_NAME": "cpu:1"}


def test_uuids_in_cuda_visible_devices_are_honoured_and_handed_on_as_given():
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-dddd0000-4444,GPU-bbbb"}, run=smi(SMI))  # a prefix, as CUDA takes
    assert [(g.index, g.ident) for g in gpus] == [(1, "GPU-bbbb"), (3, "GPU-dddd0000-4444")]  # never GPU 0
    assert host_places(Settings(), gpus) == ["cuda:1", "cuda:3"]
    assert replica_device_env("cuda:3", gpus)["CUDA_VISIBLE_DEVICES"] == "GPU-dddd0000-4444"
    assert replica_device_env("cuda:1", gpus)["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
    mixed = visible_gpus({"CUDA_VISIBLE_DEVICES": "3,GPU-aaaa0000-1111"}, run=smi(SMI))
    assert [(g.index, g.visible_as) for g in mixed] == [(0, "GPU-aaaa0000-1111"), (3, "3")]


def test_mig_instances_are_places_of_their_own_named_as_given():
    gpus = visible_gpus({"CUDA_VISIBLE_DEVICES": "MIG-2222aaaa-0000,MIG-3333dddd-0000"}, run=smi(SMI))
    assert [(g.index, g.name, g.ident) for g in gpus] == [
        (0, "NVIDIA H100 80GB HBM3 MIG 3g.40gb", "MIG-2222aaaa-0000"),
        (1, "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "MIG-3333dddd-0000")]
    assert host_places(Settings(), gpus) == ["cuda:0", "cuda:1"]
    env = replica_device_env("cuda:1", gpus)
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-3333dddd-0000" and env["DEVICE"] == "cuda:0"
    assert with_memory([Place("cuda:0")], gpus)[0].label == "NVIDIA H100 80GB HBM3 MIG 3g.40gb"


def test_an_entry_nvidia_smi_does_not_list_is_left_out_not_replaced(caplog):
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "GPU-ffff"}, run=smi(SMI)) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "MIG-ffff"}, run=smi(SMI)) == []
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}, run=smi(SMI)) == []  # no GPU allowed: none handed out
    assert "GPU-ffff" in caplog.text and "MIG-ffff" in caplog.text


def test_nvidia_smi_failing_is_no_gpus():
    def run(argv, **_):
        raise subprocess.CalledProcessError(9, argv)
    assert visible_gpus({}, run=run) == []


def test_devices_outside_the_operators_restriction_are_named():
    from tasks.control.devices import outside_restriction
    restricted = {"CUDA_VISIBLE_DEVICES": "GPU-bbbb0000-2222,3"}
    assert outside_restriction(["cuda:0", "cuda:1", "cuda:3", "cpu:0"], restricted, run=smi(SMI)) == ["cuda:0"]
    assert outside_restriction(["cuda:0"], {}, run=smi(SMI)) == []  # no restriction
    assert outside_restriction(["cuda:0"], restricted, run=smi(None)) == []  # no nvidia-smi: nothing to check
