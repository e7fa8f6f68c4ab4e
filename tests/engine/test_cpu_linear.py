"""Linear layers with weights packed for oneDNN on a CPU (engine/cpu_linear.py): the same
products as `nn.Linear` for every shape, and never a stale weight."""
from __future__ import annotations

import pytest
import torch

from engine.cpu_linear import can_prepack, prepack_linears

pytestmark = pytest.mark.skipif(not can_prepack(), reason="this torch has no oneDNN weight packing")


def layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.ReLU(), torch.nn.Linear(48, 16, bias=False))


@pytest.mark.parametrize("shape", [(1, 32), (9, 32), (1, 7, 32), (2, 3, 32)])
def test_packed_layers_give_what_nn_linear_gives(shape):
    plain, packed = layers(), layers()
    assert prepack_linears(packed) == 2
    x = torch.randn(shape)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)


def test_a_model_is_packed_once_and_its_hooks_still_run():
    model = layers()
    seen = []
    model[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))  # as LoRA's updates hook in
    assert prepack_linears(model) == 2 and prepack_linears(model) == 0  # a second engine on the same model
    with torch.inference_mode():
        model(torch.randn(5, 32))
    assert seen == [torch.Size([5, 48])]


def test_weights_changed_after_packing_are_used_not_the_stale_copy():
    plain, packed = layers(), layers()
    prepack_linears(packed)
    with torch.no_grad():
        for model in (plain, packed):
            model[0].weight.mul_(2)  # in place (a weight load into the same tensor)
            model[2].weight = torch.nn.Parameter(torch.ones(16, 48))  # replaced
    x = torch.randn(4, 32)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)


def test_training_and_other_dtypes_take_nn_linear():
    model = layers()
    prepack_linears(model)
    x = torch.randn(4, 32, requires_grad=True)
    model(x).sum().backward()  # gradients flow: the packed product is never used with grad on
    assert model[0].weight.grad is not None
    assert prepack_linears(layers().to(torch.bfloat16)) == 0


def test_a_packed_model_moved_or_cast_afterwards_computes_with_its_new_weights():
    plain, packed = layers(), layers()
    prepack_linears(packed)
    x = torch.randn(6, 32, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(packed.double()(x), plain.double()(x))  # never the float32 packed copy


def test_a_packed_model_can_be_deep_copied_and_the_copy_packs_its_own_weights():
    """A draft model made from the target is a deep copy; oneDNN's opaque tensor cannot be copied."""
    import copy

    plain, packed = layers(), layers()
    prepack_linears(packed)
    twin = copy.deepcopy(packed)
    with torch.no_grad():
        twin[0].weight.mul_(2)
        plain[0].weight.mul_(2)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), plain(x), atol=1e-5, rtol=1e-5)
        assert twin[0].packed_weight is not None and twin[0].packed_weight.source is twin[0].weight
        torch.testing.assert_close(packed(x), layers()(x), atol=1e-5, rtol=1e-5)  # the original unchanged


def test_weights_replaced_under_the_same_parameter_are_used():
    """`model.half().float()` (a cast and back) and `weight.data = ...` give a parameter new
    storage without bumping its version counter: the packed copy must not outlive it."""
    plain, packed = layers(), layers()
    prepack_linears(packed)
    x = torch.randn(5, 32)
    with torch.inference_mode():
        packed(x)  # packed and used once
    for model in (plain, packed):
        model.half().float()  # values rounded to float16, same Parameter objects
        model[2].weight.data = torch.full((16, 48), 0.5)
    with torch.inference_mode():
        torch.testing.assert_close(packed(x), plain(x), atol=1e-5, rtol=1e-5)


def test_a_model_cast_after_packing_frees_its_packed_copy():
    """A model moved or cast for good keeps no CPU copy of its weights beside the new ones."""
    model = layers()
    prepack_linears(model)
    with torch.inference_mode():
        model.double()(torch.randn(3, 32, dtype=torch.float64))
    assert model[0].packed_weight is None and model[2].packed_weight is None


def test_a_deep_copy_packs_its_weights_only_where_there_is_room(monkeypatch):
    """A copy (a draft model made from the target) packs lazily; it keeps the memory rule of
    `prepack_linears`: no packed copy past half the free memory."""
    import copy

    from engine import cpu_linear

    packed = layers()
    prepack_linears(packed)
    twin = copy.deepcopy(packed)
    monkeypatch.setattr(cpu_linear, "free_memory", lambda: 0)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        torch.testing.assert_close(twin(x), layers()(x), atol=1e-5, rtol=1e-5)
    assert twin[0].packed_weight is None and twin[2].packed_weight is None
