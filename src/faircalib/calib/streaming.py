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


# --- where the calibration engine keeps its activation caches -----------------------------------
# The engine (calib.engine.quantize_model) keeps every calibration sequence's block input, and
# with reconstruction the block's targets and the float stream, as lists of [batch, L, D]
# tensors. On the calibration device they are read in place; on the host every block copies them
# to the device two or three times. `plan_cache` puts them on the device when they fit.

# what a plan leaves unused on the device: the estimate below is not a measurement (allocator
# fragmentation, kernels' workspaces and the CUDA context are not in it)
CACHE_MARGIN_FRACTION = 0.1
CACHE_MARGIN_MIN_BYTES = 2 * GIB
FLOAT32_BYTES, FLOAT64_BYTES, CODE_BYTES = 4, 8, 1


def cache_copies(recon_target: str | None) -> int:
    """Full copies of the block-input cache alive at once: the cache; with reconstruction the
    block's float targets; against the float stream also the float-stream cache they replace."""
    return 1 + (recon_target is not None) + (recon_target == "float_stream")


def cache_margin(budget: int | None) -> int:
    """The safety margin a plan keeps free: 10% of the budget, at least 2 GiB."""
    if budget is None:
        return CACHE_MARGIN_MIN_BYTES
    return max(CACHE_MARGIN_MIN_BYTES, int(CACHE_MARGIN_FRACTION * budget))


def block_working_bytes(
    shapes: list[tuple[int, int]],
    batch_rows: int,
    act_bytes: int,
    sample_rows: int,
    recon_rows: int = 0,
) -> int:
    """An estimate of the device bytes one block's calibration needs besides the parameters and
    the caches: the largest of its three phases.

    shapes: (in_features, out_features) of each quantizable linear; batch_rows: token rows of
    one statistics batch (sequences x L); act_bytes: the activations' element size; sample_rows:
    rows each accumulator keeps (min(max_rows_per_layer, all rows)); recon_rows: token rows of
    one reconstruction minibatch (0: no reconstruction).
    - statistics: every linear's float64 Hessian and float32 row sample, plus one batch at the
      block's widest activation: its float32 rows, weighted rows and |rows| (LayerInputs-
      Accumulator.summarise) and four activation-dtype tensors of the forward (gate, up, their
      product, a temporary);
    - GPTQ: the finished statistics plus the widest linear's float64 Hessian, inverse and a
      temporary and its float32 weight, codes, error and losses;
    - reconstruction: per weight eight float32 values (base levels, offset, its gradient, the
      best step's snapshot, the forward's levels, scaled weight and two temporaries) and the
      minibatch's float32 inputs and outputs of every linear, kept for the backward pass.
    """
    stats = sum(i * i * FLOAT64_BYTES + sample_rows * i * FLOAT32_BYTES for i, _ in shapes)
    width = max(max(i, o) for i, o in shapes)
    batch = batch_rows * width * (3 * FLOAT32_BYTES + 4 * act_bytes)
    gptq = max(i * i * 3 * FLOAT64_BYTES + i * o * 4 * FLOAT32_BYTES for i, o in shapes)
    recon = 0
    if recon_rows:
        learnable = sum(i * o for i, o in shapes) * 8 * FLOAT32_BYTES
        recon = learnable + recon_rows * sum(i + o for i, o in shapes) * FLOAT32_BYTES
    return max(stats + batch, stats + gptq, recon)


def module_bytes(modules) -> int:
    """Bytes of the parameters and buffers (a quantized linear's weight is a buffer)."""
    return sum(
        t.numel() * t.element_size() for m in modules for t in [*m.parameters(), *m.buffers()]
    )


def resident_bytes(model: DiffusionLM, offload: bool) -> int:
    """Bytes the engine keeps on the device besides caches: the parameters and buffers of the
    stem/head and of the largest block (offloading) or of every block, and the uint8 codes of
    the quantized linears there."""

    def with_codes(block: nn.Module) -> int:
        codes = sum(lin.weight.numel() for _, lin in model.quantizable_linears(block))
        return module_bytes([block]) + codes * CODE_BYTES

    blocks = [with_codes(b) for b in model.blocks]
    stem_head = module_bytes(model.outside_blocks())
    return stem_head + (max(blocks) if offload else sum(blocks))


def cache_budget(device: torch.device, max_gib: float | None, held_bytes: int) -> int | None:
    """Bytes the engine may use on `device`: `max_gib` when given; else (CUDA) what is free now
    plus what torch's allocator holds unused plus `held_bytes` (what the run already keeps there
    and the plan counts as resident); None on the CPU."""
    if max_gib is not None:
        return int(max_gib * GIB)
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    spare = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(free + spare + held_bytes)


@dataclass
class CachePlan:
    """Where the engine's caches live and how they move: on `device` (read in place) or on the
    host (pinned when `device` is CUDA, copied to it with non_blocking=True)."""

    on_device: bool
    device: torch.device
    cache_bytes: int  # every copy alive at once (`cache_copies`)
    resident_bytes: int
    working_bytes: int
    margin_bytes: int
    budget_bytes: int | None
    forced: bool = False

    @property
    def pinned(self) -> bool:
        # pin_memory needs CUDA: never called on a CPU-only build
        return not self.on_device and self.device.type == "cuda" and torch.cuda.is_available()

    @property
    def placement(self) -> str:
        return "device" if self.on_device else "host"

    def keep(self, h: torch.Tensor) -> torch.Tensor:
        """Store `h` (a block's output, or a tensor read from disk) in the cache, contiguous
        in both placements. Copies to pinned memory run asynchronously: `settle()` before the
        CPU reads them."""
        if self.on_device:
            return h.to(self.device).contiguous()
        out = torch.empty(h.shape, dtype=h.dtype, pin_memory=self.pinned)
        return out.copy_(h, non_blocking=self.pinned)

    def copy(self, h: torch.Tensor) -> torch.Tensor:
        """A second cache copy of a cached tensor (the float stream starts as the cache)."""
        return h.clone() if self.on_device else self.keep(h)

    def adopt(self, h: torch.Tensor) -> torch.Tensor:
        """`h` as this plan keeps it: itself where it already is so, else `keep(h)` (a tensor
        read from disk goes to the device, or into pinned memory)."""
        if self.on_device:
            placed = _same(h.device, self.device)
        else:  # is_pinned is only asked where pinning is possible
            placed = h.device.type == "cpu" and (not self.pinned or h.is_pinned())
        return h if placed and h.is_contiguous() else self.keep(h)

    def load(self, h: torch.Tensor) -> torch.Tensor:
        """A cached tensor on the device, for a forward (no copy when it lives there)."""
        return h.to(self.device, non_blocking=self.pinned)

    def settle(self) -> None:
        """Wait for the device's queued work: asynchronous copies to the host must land before
        the CPU reads them, and a phase's time is then its own, not the next phase's."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def to_dict(self) -> dict:
        return {
            "placement": self.placement,
            "device": str(self.device),
            "pinned": self.pinned,
            "forced": self.forced,
            "cache_bytes": self.cache_bytes,
            "resident_bytes": self.resident_bytes,
            "working_bytes": self.working_bytes,
            "margin_bytes": self.margin_bytes,
            "budget_bytes": self.budget_bytes,
        }


def plan_cache(
    device: torch.device,
    cache_bytes: int,
    resident: int,
    working: int,
    budget: int | None,
    force: str | None = None,
) -> CachePlan:
    """On the device when cache + resident parameters + working memory + margin fit `budget`
    (CUDA); on the CPU device where it computes (nothing moves). `force` ("device" or "host")
    overrides the arithmetic (tests)."""
    margin = cache_margin(budget)
    if force is not None:
        if force not in ("device", "host"):
            raise ValueError(f"force must be 'device' or 'host', got {force!r}")
        on_device = force == "device"
    elif device.type == "cuda":
        on_device = budget is not None and cache_bytes + resident + working + margin <= budget
    else:  # the CPU stores where it computes; a device without a budget keeps the host cache
        on_device = device.type == "cpu"
    return CachePlan(
        on_device, device, cache_bytes, resident, working, margin, budget, force is not None
    )
