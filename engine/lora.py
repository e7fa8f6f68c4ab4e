"""Many LoRA adapters in one batch: each token adds its own adapter's `x · A · B · scale`.

The base model is untouched: every projection some adapter targets gets a forward hook that adds
the low-rank update of each token's adapter to the projection's output. The adapters' matrices
are stacked per projection, `A` as [K+1, in, r] and `B` as [K+1, r, out] (the scale folded into
B; index 0 is all zeros: "no adapter"; lower ranks padded with zeros), so a step is one forward
whatever mix of adapters its rows use (the Punica / S-LoRA approach, in plain torch). Two ways to
apply them (docs/engine.md, "LoRA adapters", has the measurements):

- `rows`: a per-row adapter index in a device tensor; the matrices are gathered by it and applied
  with two batched matmuls. No host decision, fixed shapes: what a captured CUDA graph replays
  (the index lives in a static buffer beside the token ids and positions).
- `grouped` (eager steps, the default): the host knows each token's adapter, so the tokens of
  each adapter present are gathered into one group per adapter, padded to the largest, and two
  batched matmuls apply the K adapters present (Punica's segmented matmul in torch): a fixed
  number of ops whatever K, each adapter's matrices read once. Rows without an adapter cost
  nothing; a step with no adapter at all skips the hooks' work entirely. When padding would
  more than double the rows (a long prompt chunk beside a few decode rows), `tokens` instead:
  a loop over the adapters present, each multiplying its own tokens (a slice for a chunk).

An adapter on the output projection (`lm_head`) works the same way, but that projection sees
only the kept logits rows (transformers applies `logits_to_keep` before it): its hook applies
the adapters of the kept rows (`kept_rows`), never the packed tokens' index.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial

import torch

from engine.host_transfer import device_longs
from engine.lora_files import LoraAdapter


EAGER_KERNELS = ("grouped", "tokens", "rows")


def adapter_groups(token_adapters: Sequence[int]) -> dict[int, list[int]]:
    """Each adapter present (never 0: no adapter) -> the positions of its tokens, in order."""
    groups: dict[int, list[int]] = {}
    for position, adapter in enumerate(token_adapters):
        if adapter:
            groups.setdefault(adapter, []).append(position)
    return groups


def stack_bytes(model, adapters: Sequence[LoraAdapter]) -> int:
    """What `LoraLayers` allocates on the model's device for these adapters (before it does)."""
    count, rank = len(adapters) + 1, max(adapter.rank for adapter in adapters)
    element = next(model.parameters()).element_size()
    total = 0
    for module_name in {m for adapter in adapters for m in adapter.modules}:
        module = model.get_submodule(module_name)
        total += count * rank * (module.in_features + module.out_features) * element
    return total


@dataclass
class Projection:
    a: torch.Tensor  # [K+1, in, r]
    b: torch.Tensor  # [K+1, r, out], scale folded in
    adapters: frozenset[int] = field(default_factory=frozenset)  # the indices that target it


class RowsStep:
    """Each row's adapter index on the device: gather, then two batched matmuls."""

    def __init__(self, index: torch.Tensor):
        self.index = index  # [N] long

    def apply(self, x: torch.Tensor, out: torch.Tensor, p: Projection) -> None:
        h = torch.bmm(x.unsqueeze(1), p.a.index_select(0, self.index))  # [N, 1, r]
        out.add_(torch.bmm(h, p.b.index_select(0, self.index)).squeeze(1))


class TokensStep:
    """Each adapter present multiplies its own tokens (known on the host)."""

    def __init__(self, positions: dict[int, list[int]], device: torch.device):
        self.groups: list[tuple[int, slice | torch.Tensor]] = []
        for adapter, rows in positions.items():
            contiguous = rows[-1] - rows[0] + 1 == len(rows)
            self.groups.append((adapter, slice(rows[0], rows[-1] + 1) if contiguous
                                else device_longs(rows, device)))

    def apply(self, x: torch.Tensor, out: torch.Tensor, p: Projection) -> None:
        for adapter, rows in self.groups:
            if adapter not in p.adapters:
                continue
            if isinstance(rows, slice):
                out[rows].addmm_(x[rows] @ p.a[adapter], p.b[adapter])
            else:
                out.index_add_(0, rows, (x.index_select(0, rows) @ p.a[adapter]) @ p.b[adapter])


class GroupedStep:
    """Punica's segmented matmul in plain torch: the tokens of each adapter present gathered into
    one padded group per adapter ([K, G, in]), two batched matmuls with the K adapters' matrices,
    then the real rows added back. A fixed number of ops whatever K; used while padding at most
    doubles the rows (uneven groups, a long prompt chunk beside a few rows, take `TokensStep`)."""

    def __init__(self, groups: dict[int, list[int]], device: torch.device):
        size = max(len(rows) for rows in groups.values())
        gather, kept, targets = [], [], []
        for k, rows in enumerate(groups.values()):
            gather += rows + rows[:1] * (size - len(rows))  # padding repeats a real row; dropped below
            kept += range(k * size, k * size + len(rows))
            targets += rows
        self.shape = (len(groups), size)
        self.adapters = device_longs(list(groups), device)
        self.gather = device_longs(gather, device)
        self.kept = None if len(kept) == len(gather) else device_longs(kept, device)
        self.targets = device_longs(targets, device)

    @staticmethod
    def fits(groups: dict[int, list[int]]) -> bool:
        return len(groups) * max(len(rows) for rows in groups.values()) <= 2 * sum(len(r) for r in groups.values())

    def apply(self, x: torch.Tensor, out: torch.Tensor, p: Projection) -> None:
        count, size = self.shape
        grouped = x.index_select(0, self.gather).view(count, size, x.shape[1])
        h = torch.bmm(grouped, p.a.index_select(0, self.adapters))
        y = torch.bmm(h, p.b.index_select(0, self.adapters)).view(count * size, -1)
        out.index_add_(0, self.targets, y if self.kept is None else y.index_select(0, self.kept))


class LoraLayers:
    """The adapters of one replica, hooked into its model's projections."""

    def __init__(self, model, adapters: Sequence[LoraAdapter], eager_kernel: str = "grouped"):
        """`eager_kernel`: how eager steps apply the adapters: `grouped` (padded groups, two bmm;
        the fastest measured), `tokens` (a loop over the adapters present) or `rows` (gathered
        per row, as graphs do). bench.lora compares them."""
        if eager_kernel not in EAGER_KERNELS:
            raise ValueError(f"eager_kernel must be one of {', '.join(EAGER_KERNELS)}")
        self.eager_kernel = eager_kernel
        if not adapters:
            raise ValueError("LoraLayers needs at least one adapter")
        self.names = {adapter.name: k + 1 for k, adapter in enumerate(adapters)}
        self.rank = max(adapter.rank for adapter in adapters)
        parameter = next(model.parameters())
        self.device, self.dtype = parameter.device, parameter.dtype
        self.step: RowsStep | GroupedStep | TokensStep | None = None  # what the hooks apply during a forward
        self.kept_step: RowsStep | GroupedStep | TokensStep | None = None  # the output projection's: kept rows
        output = model.get_output_embeddings()
        self._hooks = []
        self.projections: dict[str, Projection] = {}
        self.targets_output = False  # some adapter targets the output projection: the runner says its kept rows
        for module_name in sorted({m for adapter in adapters for m in adapter.modules}):
            module = model.get_submodule(module_name)
            projection = self.projections[module_name] = self._stack(module, module_name, adapters)
            kept = module is output
            self.targets_output |= kept
            self._hooks.append(module.register_forward_hook(partial(self._add_update, projection, kept)))

    def index(self, name: str | None) -> int:
        """An adapter's index (0: none); KeyError for a name this replica does not serve."""
        return 0 if name is None else self.names[name]

    @contextmanager
    def rows(self, index: torch.Tensor) -> Iterator[None]:
        """Within: the forward's rows use the adapters `index` ([N] long, on the device) names
        (every row's logits are kept: the output projection takes the same index)."""
        self.step = self.kept_step = RowsStep(index)
        try:
            yield
        finally:
            self.step = self.kept_step = None

    @contextmanager
    def tokens(self, token_adapters: Sequence[int]) -> Iterator[None]:
        """Within: the forward's packed tokens use these adapters (host ints, 0: none)."""
        self.step = self._step_for(token_adapters)
        try:
            yield
        finally:
            self.step = None

    @contextmanager
    def kept_rows(self, kept_adapters: Sequence[int]) -> Iterator[None]:
        """Within: the logits rows the forward keeps use these adapters (host ints, 0: none), in
        the order the output projection sees them."""
        self.kept_step = self._step_for(kept_adapters)
        try:
            yield
        finally:
            self.kept_step = None

    def _step_for(self, adapters: Sequence[int]) -> RowsStep | GroupedStep | TokensStep | None:
        groups = adapter_groups(adapters)
        if not groups:
            return None
        if self.eager_kernel == "rows":
            return RowsStep(device_longs(adapters, self.device))
        if self.eager_kernel == "grouped" and GroupedStep.fits(groups):
            return GroupedStep(groups, self.device)
        return TokensStep(groups, self.device)

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _stack(self, module: torch.nn.Linear, module_name: str, adapters: Sequence[LoraAdapter]) -> Projection:
        count, rank = len(adapters) + 1, self.rank
        a = torch.zeros(count, module.in_features, rank, dtype=torch.float32)
        b = torch.zeros(count, rank, module.out_features, dtype=torch.float32)
        targeting = set()
        for k, adapter in enumerate(adapters, start=1):
            weights = adapter.modules.get(module_name)
            if weights is None:
                continue
            a[k, :, : weights.rank] = weights.a.T
            b[k, : weights.rank, :] = weights.b.T * weights.scale
            targeting.add(k)
        return Projection(a.to(self.device, self.dtype), b.to(self.device, self.dtype), frozenset(targeting))

    def _add_update(self, projection: Projection, kept: bool, module, args, output: torch.Tensor):
        step = self.kept_step if kept else self.step
        if step is None:
            return None
        x = args[0]
        step.apply(x.reshape(-1, x.shape[-1]), output.view(-1, output.shape[-1]), projection)
        return output
