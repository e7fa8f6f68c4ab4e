"""`--device` in any spelling resolves to a device with an index (`torch.cuda.set_device` refuses
`cuda` alone), also `cuda:3` in a process pinned to GPU 3 by CUDA_VISIBLE_DEVICES. A pure function:
checked here on CPU with the GPU counts given; scripts/gpu_check.sh starts a real engine with it."""
from __future__ import annotations

import pytest
import torch

from engine.devices import DeviceError, resolve_device


@pytest.mark.parametrize("spelling, slot, count, visible, expected", [
    (None, 0, 0, None, "cpu"),
    (None, 3, 2, None, "cuda:1"),  # one replica per GPU, by slot
    ("cpu", 0, 2, None, "cpu"),
    ("cuda", 0, 1, None, "cuda:0"),
    ("cuda", 1, 2, None, "cuda:1"),
    ("cuda:0", 5, 1, "3", "cuda:0"),
    ("cuda:1", 0, 2, None, "cuda:1"),
    ("cuda:3", 0, 1, "3", "cuda:0"),  # pinned by the agent: GPU 3 is this process's only one
    ("cuda:3", 0, 2, "1,3", "cuda:1"),
    ("CUDA:1", 0, 2, None, "cuda:1"),  # as --devices takes it (tasks/control/devices.py)
    (" Cuda ", 1, 2, None, "cuda:1"),
    ("CPU", 0, 2, None, "cpu"),
])
def test_every_spelling_resolves_to_an_indexed_device(spelling, slot, count, visible, expected):
    device = resolve_device(spelling, slot, count, visible)
    assert device == torch.device(expected)
    assert device.type == "cpu" or device.index is not None


@pytest.mark.parametrize("spelling, count, visible, message", [
    ("cuda", 0, None, "--device cuda: this process sees no CUDA device"),
    ("cuda:3", 1, "2", r"--device cuda:3: this process sees 1 GPU\(s\) \(CUDA_VISIBLE_DEVICES=2\)"),
    ("cuda:2", 2, None, r"this process sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=unset\)"),
    ("gpu", 1, None, "--device 'gpu' is not a device torch knows"),
])
def test_a_device_this_process_cannot_use_is_one_clear_line(spelling, count, visible, message):
    with pytest.raises(DeviceError, match=message):
        resolve_device(spelling, 0, count, visible)


@pytest.mark.parametrize("spelling, expected", [
    (" cuda:1 ", "cuda:1"),  # from a quoted environment variable or a config file
    ("CUDA:0", "cuda:0"),
    ("Cuda", "cuda:0"),
    ("0", "cuda:0"),  # a bare index: torch.device(0) is cuda:0
    ("1", "cuda:1"),
    (" CPU", "cpu"),
])
def test_case_blanks_and_a_bare_index_resolve_as_torch_would_mean_them(spelling, expected):
    assert resolve_device(spelling, 0, 2, None) == torch.device(expected)


@pytest.mark.parametrize("spelling", ["cuda:-1", "cuda:01", "cuda:x", "-1"])
def test_a_malformed_index_is_one_clear_line_never_another_gpu(spelling):
    with pytest.raises(DeviceError, match="is not a device torch knows"):
        resolve_device(spelling, 0, 2, "GPU-0a1b,GPU-2c3d")


def test_uuids_in_cuda_visible_devices_never_pick_a_gpu_by_a_number_they_do_not_hold():
    assert resolve_device("cuda:1", 0, 2, "GPU-0a1b,GPU-2c3d") == torch.device("cuda:1")
    with pytest.raises(DeviceError, match=r"sees 2 GPU\(s\) \(CUDA_VISIBLE_DEVICES=GPU-0a1b,GPU-2c3d\)"):
        resolve_device("cuda:3", 0, 2, "GPU-0a1b,GPU-2c3d")
