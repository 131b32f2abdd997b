"""Stack the linear layers that read one input into one layer: one GEMM instead of several.

Why: a block's q, k and v (its gate and up) read the same rows. As separate layers they are
separate GEMMs: more launches, the input read once per layer, and small layers that no kernel
runs well. Dream-7B's k and v are 3584 x 512: 32 output tiles at M = 1024, where no 8-bit GEMM
beat bf16 (benchmarks/results/kernels-split-k). Stacked along the output they are one layer,
3584 x 4608 for Dream's attention, 4096 x 24576 for LLaDA's gate and up: the shapes where the
8-bit GEMMs run fastest. vLLM stacks them the same way (QKVParallelLinear,
MergedColumnParallelLinear).

Stacking is exact in the math: per-channel and per-(channel, group) weight quantization give
every output row its own scale, zero point and bias, so the stacked layer holds the members'
rows unchanged. Per-token activation quantization sees the same rows. Only the kernel the
stacked shape takes (and so the float accumulation order) can differ; INT8 accumulates exactly.

`stack_linears(root, groups)` replaces each group's members in place by `StackedMember`s. For
given input rows, the first member called runs the stacked layer once and splits its output;
the others take their slices of that result. "Given input rows" means what
`shared_activations.quantize_once` means: the same tensor (or view base), address, shape,
strides, dtype and version counter, under the same grad, inference and autocast modes; rows
that need a gradient are never shared. Inference-mode tensors have no version counter: as with
`quantize_once`, sharing then relies on the caller not writing the rows in place between two
members' calls (no faircalib block does). The result is dropped once every member has taken
its slice, when a member is called with other rows (then it runs the stacked layer again:
still correct, only slower), or by `release_pending` (`formats.packed.stack_readers` calls it
after every block forward, so a forward that raises between two members holds nothing). No
scope is needed, so the K/V-cache steps, which call the block's `forward_cached` outside its
hooks, stack too.

The stacked layer is a child of the group's first member, so `model.to(...)`, `modules()` and
`buffers()` see it once. `state_dict()` keeps the unstacked names and values: each member
writes its own rows back, copies on the layer's device (safetensors refuses tensors that share
memory; `keep_vars=True` gives views instead), so a stacked model saves as it loaded, at the
cost of one copy of the stacked weights while the state dict lives. Loading a state dict into
a stacked model is refused (load, then stack).

A group stacks when its members are the same kind of layer with the same quantization:
`nn.Linear` (same dtype and device), or a class with a `stacked(layers)` classmethod
(`QuantLinear`, `formats.packed.FP8ActLinear`) that raises ValueError naming what differs.
Any other group is left as it was and reported.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from faircalib.kernels.shared_activations import rows_identity


@dataclass
class StackReport:
    """What `stack_linears` did: the groups stacked (their paths) and those left apart, why."""

    stacked: list[tuple[str, ...]] = field(default_factory=list)
    left: list[tuple[tuple[str, ...], str]] = field(default_factory=list)


def stack_layers(layers: Sequence[nn.Module]) -> nn.Module:
    """One layer whose output is the layers' outputs concatenated in order; ValueError naming
    what keeps them apart."""
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1:
        raise ValueError(f"they are different layers ({sorted(k.__name__ for k in kinds)})")
    kind = kinds.pop()
    if kind is nn.Linear:
        return _stacked_linear(layers)
    stacked = getattr(kind, "stacked", None)
    if stacked is None:
        raise ValueError(f"{kind.__name__} layers cannot be stacked")
    return stacked(layers)


def _stacked_linear(layers: Sequence[nn.Linear]) -> nn.Linear:
    first = layers[0]
    for layer in layers[1:]:
        if layer.in_features != first.in_features:
            raise ValueError("their input widths differ")
        if (layer.bias is None) != (first.bias is None):
            raise ValueError("some have a bias and some do not")
        if (layer.weight.dtype, layer.weight.device) != (first.weight.dtype, first.weight.device):
            raise ValueError("their dtypes or devices differ")
    out = sum(layer.out_features for layer in layers)
    with torch.device("meta"):
        fused = nn.Linear(first.in_features, out, bias=first.bias is not None)
    state = {"weight": torch.cat([layer.weight.detach() for layer in layers])}
    if first.bias is not None:
        state["bias"] = torch.cat([layer.bias.detach() for layer in layers])
    fused.load_state_dict(state, assign=True)
    fused.requires_grad_(first.weight.requires_grad)
    return fused


class _Group:
    """The stacked layer of one group and the result waiting for the members not yet called."""

    def __init__(self, stacked: nn.Module, sizes: list[int]) -> None:
        self.stacked = stacked
        self.sizes = sizes
        self.rows: tuple | None = None  # identity of the rows `parts` were computed for
        self.holder: Any = None  # weakref to those rows' base, or (inference mode) the rows
        self.parts: tuple[torch.Tensor, ...] = ()
        self.waiting: set[int] = set()  # members that have not taken their part yet
        self._state: tuple[int, dict] | None = None  # (id of a state_dict being written, ours)

    def part(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if x.requires_grad and torch.is_grad_enabled():  # autograd: no result is shared
            self.release()
            return self.stacked(x).split(self.sizes, dim=-1)[index]
        rows, holder, base = _identity(x)
        if index in self.waiting and rows == self.rows and _same_base(self.holder, base):
            self.waiting.discard(index)
            part = self.parts[index]
            if not self.waiting:
                self.release()
            return part
        parts = self.stacked(x).split(self.sizes, dim=-1)
        self.rows, self.holder, self.parts = rows, holder, parts
        self.waiting = set(range(len(self.sizes))) - {index}
        return parts[index]

    def release(self) -> None:
        """Forget the result waiting for members not yet called."""
        self.rows, self.holder, self.parts, self.waiting = None, None, (), set()

    def state_for(self, destination: dict) -> dict[str, torch.Tensor]:
        """The stacked layer's state, computed once per `state_dict` call for all members."""
        if self._state is None or self._state[0] != id(destination):
            self._state = (id(destination), self.stacked.state_dict(keep_vars=True))
        return self._state[1]

    def state_written(self) -> None:
        self._state = None


def _identity(x: torch.Tensor) -> tuple[tuple, Any, torch.Tensor | None]:
    """`shared_activations.rows_identity`, with the modes a call runs under in the key."""
    rows, holder, base = rows_identity(x)
    device = x.device.type
    modes = (
        torch.is_grad_enabled(),
        torch.is_inference_mode_enabled(),
        torch.is_autocast_enabled(device),
        torch.get_autocast_dtype(device),
    )
    return (*rows, modes), holder, base


def _same_base(holder: Any, base: torch.Tensor | None) -> bool:
    return base is None or (isinstance(holder, weakref.ref) and holder() is base)


class StackedMember(nn.Module):
    """Member `index` of a stacked group: its slice of the group's stacked output."""

    def __init__(self, group: _Group, index: int, start: int, original: nn.Module) -> None:
        super().__init__()
        if index == 0:
            self.stacked = group.stacked  # the one child that holds the stacked layer
        self._group = group
        self.index, self.start = index, start
        self.in_features = group.stacked.in_features
        self.out_features = group.sizes[index]
        self._original_keys = tuple(original.state_dict(keep_vars=True))
        self._last = index == len(group.sizes) - 1
        self._register_state_dict_hook(_unstacked_state)
        self._register_load_state_dict_pre_hook(_refuse_load, with_module=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group.part(self.index, x)

    def release_pending(self) -> None:
        """Drop a stacked result that members not yet called would have taken."""
        self._group.release()

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        """The member's own keys: its rows of the stacked layer's tensors (and the tensors
        all members share, such as an input scale)."""
        group = self._group
        if self.index == 0:  # a state dict of the whole group starts here: compute afresh
            group.state_written()
        shared = getattr(group.stacked, "PER_INPUT_STATE", ())
        rows = slice(self.start, self.start + self.out_features)
        for key, tensor in group.state_for(destination).items():
            if key in self._original_keys:
                value = tensor if key in shared else tensor[rows]
                destination[prefix + key] = value if keep_vars else value.detach().clone()
        if self._last:
            group.state_written()

    def extra_repr(self) -> str:
        end = self.start + self.out_features
        return f"rows {self.start}:{end} of a stacked {type(self._group.stacked).__name__}"


def _unstacked_state(module: StackedMember, destination: dict, prefix: str, _meta: Any) -> None:
    """state_dict hook, after the children: drop the stacked child's own keys (the members
    wrote theirs in `_save_to_state_dict`)."""
    for key in [k for k in destination if k.startswith(prefix + "stacked.")]:
        del destination[key]
    metadata = getattr(destination, "_metadata", None)
    if metadata is not None:
        metadata.pop(prefix + "stacked", None)


def _refuse_load(
    module: StackedMember, state_dict, prefix, _meta, strict, missing, unexpected, errors
) -> None:  # noqa: ANN001
    errors.append(
        f"{prefix or 'the model'}: a stacked layer (kernels.stacked_linears) takes no state "
        "dict; load the checkpoint, then stack"
    )


def stack_linears(root: nn.Module, groups: Iterable[Sequence[str]]) -> StackReport:
    """Stack each group of layers (module paths from `root`) that read one input; a group whose
    members cannot be stacked, or are stacked already, stays as it is (the report says why)."""
    report = StackReport()
    for group in groups:
        paths = tuple(group)
        if len(paths) < 2:
            continue
        if len(set(paths)) != len(paths):
            report.left.append((paths, "a layer is named twice"))
            continue
        layers = [root.get_submodule(path) for path in paths]
        if any(isinstance(layer, StackedMember) for layer in layers):
            report.left.append((paths, "already stacked"))
            continue
        try:
            stacked = stack_layers(layers)
        except ValueError as why:
            report.left.append((paths, str(why)))
            continue
        shared = _Group(stacked, [layer.out_features for layer in layers])
        start = 0
        for index, (path, layer) in enumerate(zip(paths, layers, strict=True)):
            parent, _, child = path.rpartition(".")
            member = StackedMember(shared, index, start, layer)
            setattr(root.get_submodule(parent) if parent else root, child, member)
            start += layer.out_features
        report.stacked.append(paths)
    return report
