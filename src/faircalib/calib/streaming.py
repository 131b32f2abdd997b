"""Whole-model forwards on a device that cannot hold the model, and quantization noise without a
second model: what FAIR-Calib's frontier tracking and instability scoring need at 8B scale.

Both work with forward hooks on `model.blocks`, so every family gets them unchanged and every
caller (the samplers, `log_probs`) runs the ordinary forward:

    with on_device(model, "cuda", stream=True):      # blocks visit the GPU one at a time
        generate(model, prompts, cfg)
    with quantization_noise(model, noise_fn):        # each block's weights perturbed in its forward
        model.log_probs(x, t)

`plan_batch` sizes the batches of such forwards from a device-memory budget, measuring one
sequence's working set with a probe forward (the vocabulary dominates it: one 2048-token sequence
of a 126k-vocabulary model is 1 GiB of float32 log-probabilities per copy).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from faircalib.models.base import DiffusionLM

GIB = 2**30
# the samplers and the scorer hold a few more [L, V] tensors than one log_probs call (slices,
# exp, KL terms): the measured single-forward working set times this is what a row is given
WORKING_SET_FACTOR = 3.0


def _tensors(module: nn.Module) -> Iterator[tuple[dict, str, torch.Tensor]]:
    """(owner dict, name, tensor) of every parameter and buffer, so `.data` can be swapped."""
    for sub in module.modules():
        for store in (sub._parameters, sub._buffers):
            for name, tensor in store.items():
                if tensor is not None:
                    yield store, name, tensor


def _to_device(block: nn.Module, device: torch.device) -> list[tuple[dict, str, torch.Tensor]]:
    """Point every tensor of `block` at a copy on `device`; returns what to point back to."""
    saved = []
    for store, name, tensor in _tensors(block):
        saved.append((store, name, tensor.data))
        tensor.data = tensor.data.to(device, non_blocking=True)
    return saved


def _restore(saved: list[tuple[dict, str, torch.Tensor]]) -> None:
    # in reverse: a tensor listed twice (shared inside a block) ends at its first, original data
    for store, name, data in reversed(saved):
        store[name].data = data


@contextmanager
def on_device(model: DiffusionLM, device: torch.device | str, stream: bool) -> Iterator[None]:
    """Run `model` on `device`. stream=False: the whole model moves there (and back to where each
    part was on exit). stream=True: only the stem/head modules move; each block's tensors are
    copied to the device for its own forward and dropped after it, so at most one block is there
    at a time and nothing is copied back (the CPU weights are never written)."""
    device = torch.device(device)
    homes = [(m, _home(m)) for m in model.outside_blocks()]
    if not stream:
        block_homes = [(b, _home(b)) for b in model.blocks]
        if not all(_same(p.device, device) for p in model.parameters()):
            model.to(device)
        try:
            yield
        finally:
            for module, home in homes + block_homes:
                module.to(home)
        return
    handles, pending = [], {}
    for module, _ in homes:
        module.to(device)
    for i, block in enumerate(model.blocks):

        def pre(_mod, _args, i=i, block=block):
            pending[i] = _to_device(block, device)

        def post(_mod, _args, _out, i=i):
            _restore(pending.pop(i))

        handles += [block.register_forward_pre_hook(pre), block.register_forward_hook(post)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for saved in pending.values():  # a forward that raised midway
            _restore(saved)
        for module, home in homes:
            module.to(home)


def _same(a: torch.device, b: torch.device) -> bool:
    """cuda and cuda:0 (the current device) are one place; so are cpu and cpu:0."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _home(module: nn.Module) -> torch.device:
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


NoiseFn = Callable[[int, int, torch.Tensor], torch.Tensor]  # (block, linear index, weight)


@contextmanager
def quantization_noise(model: DiffusionLM, noisy_weight: NoiseFn) -> Iterator[None]:
    """While active, linear j of `model.quantizable_linears` of block i computes with
    `noisy_weight(i, j, weight)` instead of its weight: made in the block's forward (on
    the block's device) and dropped after it, so the noisy model never exists whole. Register
    inside `on_device(stream=True)` so that the noise is applied to the device copy."""
    handles, pending = [], {}
    for i, block in enumerate(model.blocks):
        linears = model.quantizable_linears(block)

        def pre(_mod, _args, i=i, linears=linears):
            saved = []
            for j, (_, linear) in enumerate(linears):
                saved.append((linear, linear.weight.data))
                linear.weight.data = noisy_weight(i, j, linear.weight.data)
            pending[i] = saved

        def post(_mod, _args, _out, i=i):
            for linear, data in pending.pop(i):
                linear.weight.data = data

        # prepend: the clean (device) weight is put back before `on_device`'s post hook, which
        # was registered first and points every tensor back at its CPU storage; in registration
        # order it would run first and this hook would then re-attach the device copy, leaving
        # every block's linears on the device
        handles += [
            block.register_forward_pre_hook(pre),
            block.register_forward_hook(post, prepend=True),
        ]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for saved in pending.values():
            for linear, data in saved:
                linear.weight.data = data


@dataclass
class Placement:
    """How whole-model forwards run on the device: streamed or resident, and the largest batch
    (rows per forward) that keeps the device's peak inside the budget."""

    stream: bool
    batch: int
    budget_bytes: int | None  # None: no budget (CPU, or no limit asked for)
    row_bytes: int  # the measured working set of one sequence's forward, times the factor

    def to_dict(self) -> dict:
        return {
            "stream": self.stream,
            "batch": self.batch,
            "budget_gib": None if self.budget_bytes is None else self.budget_bytes / GIB,
            "row_gib": self.row_bytes / GIB,
        }


def param_bytes(modules) -> int:
    return sum(p.numel() * p.element_size() for m in modules for p in m.parameters())


def fit_batch(
    whole: int, fixed_stream: int, row: int, budget: int, default: int, resident_ok: bool
) -> tuple[bool, int]:
    """(stream, batch): resident when allowed and the whole model (`whole` bytes) plus one row
    fits `budget`, else streamed (`fixed_stream`: stem/head + one block); then as many rows
    as fit, at most `default` and at least 1."""
    stream = not resident_ok or whole + row > budget
    fixed = fixed_stream if stream else whole
    return stream, int(max(1, min(default, (budget - fixed) // max(row, 1))))


def device_budget(device: torch.device, max_gib: float | None) -> int | None:
    """Bytes the run may use on `device`: `max_gib` when given, else the device's total memory
    (CUDA); None on the CPU."""
    if max_gib is not None:
        return int(max_gib * GIB)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    return None


@torch.no_grad()
def plan_batch(
    model: DiffusionLM,
    probe_x: torch.Tensor,
    probe_t: torch.Tensor,
    device: torch.device,
    budget: int | None,
    default_batch: int,
    resident_ok: bool = True,
) -> Placement:
    """Resident if the whole model plus one row fits the budget (and `resident_ok`), else
    streamed; the batch is `default_batch`, or fewer rows where the budget requires. The row
    working set is measured with one forward of `probe_x` [1, L] (CUDA only)."""
    if budget is None or device.type != "cuda":
        return Placement(
            stream=not resident_ok, batch=default_batch, budget_bytes=budget, row_bytes=0
        )
    whole = param_bytes([model])
    fixed_stream = param_bytes(model.outside_blocks()) + max(param_bytes([b]) for b in model.blocks)
    row = _row_bytes(model, probe_x, probe_t, device, stream=whole > budget or not resident_ok)
    stream, batch = fit_batch(whole, fixed_stream, row, budget, default_batch, resident_ok)
    return Placement(stream=stream, batch=batch, budget_bytes=budget, row_bytes=row)


def _row_bytes(model, x, t, device: torch.device, stream: bool) -> int:
    """WORKING_SET_FACTOR x the peak device bytes one sequence's forward adds to the weights."""
    torch.cuda.synchronize(device)
    with on_device(model, device, stream=stream):
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        model.log_probs(x.to(device), t.to(device))
        peak = torch.cuda.max_memory_allocated(device) - base
    copied = stream and not all(_same(p.device, device) for p in model.blocks.parameters())
    if copied:  # the probe's peak includes one block's copy, counted in `fixed` already
        peak -= max(param_bytes([b]) for b in model.blocks)
    return int(WORKING_SET_FACTOR * max(peak, 1))
