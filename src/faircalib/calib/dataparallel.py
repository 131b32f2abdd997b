"""Data-parallel calibration: how the layer-wise engine splits a block's work across ranks.

The unit of work is the engine's batch of calibration sequences (`engine.BATCH`): rank r owns
global batches r, r + W, r + 2W, ... (W = world size), keeps only their block-input cache and
runs only them through each block. Everything here reduces to the engine's single-process code
when torch.distributed is not initialised (faircalib.distributed).

Statistics are exact: in step s every rank runs its batch s * W + r, summarises each linear's
inputs (`LayerInputsAccumulator.summarise`: Gram matrix, abs sums, abs-max, weight sum, row
count), the summaries are all-gathered and every rank folds them into its own accumulators in
global batch order, the order one process adds them in. The float64 Hessian then has the same
bits as one process's (the float32 Gram of a batch does not depend on which rank formed it).
Sample keys come from each accumulator's seeded stream, drawn in batch order on every rank;
the owner of a batch sends only the rows whose keys can still enter the bottom-k sample.

A block's linears are then quantized in parallel: each linear is assigned to one rank (longest
job first, see `map_linears`), its owner quantizes it and broadcasts the result, so every rank
holds the same QuantResult - its bits come from one rank, never recomputed elsewhere.
Replicated statistics make any rank able to own any linear. The largest linear bounds this
stage: LLaDA-8B's ff_out (12,288 of a block's 36,864 GPTQ columns) caps it at 3x.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import nn

from faircalib import distributed
from faircalib.errors import ConfigError
from faircalib.models.base import BlockContext
from faircalib.quant.stats import LayerInputsAccumulator, RowBatch

R = TypeVar("R")


def local_batches(batches: list[slice]) -> list[slice]:
    """This rank's batches of the engine's global batch list (all of them in one process)."""
    return distributed.shard(batches)


def row_ids(batches: Sequence[slice]) -> list[int]:
    """Global calibration-row indices of the rows in `batches`, in order."""
    return [i for sl in batches for i in range(sl.start, sl.stop)]


def collect_stats(
    block: nn.Module,
    linears: list[tuple[str, nn.Linear]],
    accs: dict[str, LayerInputsAccumulator],
    cache: list[torch.Tensor],
    contexts: list[BlockContext],
    weights: torch.Tensor,
    batches: list[slice],
    device: torch.device,
    n_batches: int,
) -> None:
    """Run `block` on this rank's cached batches (`batches`: their rows of `weights` [N, L]) and
    feed every quantizable linear's inputs into accs[name]; with several ranks every rank's
    accumulators end holding the statistics of all `n_batches` batches."""
    if not distributed.active():
        _run_hooked(block, linears, accs, cache, contexts, weights, batches, device, add=True)
        return
    world = distributed.world_size()
    for step in range((n_batches + world - 1) // world):
        mine = step < len(batches)
        summaries = (
            _run_hooked(
                block,
                linears,
                accs,
                cache[step : step + 1],
                contexts[step : step + 1],
                weights,
                batches[step : step + 1],
                device,
                add=False,
            )
            if mine
            else {}
        )
        for name, _ in linears:
            _exchange(accs[name], summaries.pop(name, None))


def _run_hooked(block, linears, accs, cache, contexts, weights, batches, device, *, add: bool):
    """Run the block on the cached batches with a pre-hook on every linear: add its inputs to
    the accumulator (add=True, one process) or return their summaries (one batch)."""
    current: dict[str, torch.Tensor] = {}
    summaries: dict[str, RowBatch] = {}
    last: list = [None, None, -1]  # the latest input, its summary, its version counter

    def hook(name: str, x: torch.Tensor) -> None:
        if add:
            # Linears fed the same tensor (q/k/v, gate/up) share one summary: its Gram matrix
            # is the costly part, and accumulators of one block draw identical key streams,
            # so each folds exactly what its own `add` would have.
            acc = accs[name]
            if last[0] is not x or last[2] != x._version:  # a new tensor, or changed in place
                last[0], last[1], last[2] = x, acc.summarise(x, current["w"]), x._version
            batch = last[1]
            acc.fold(batch, *batch.candidates(acc.draw_keys(batch.n_rows)))
            return
        if name in summaries:  # the exchange sends one summary per linear and batch
            raise ConfigError(f"{name} runs twice in one forward: not supported with torchrun")
        summaries[name] = accs[name].summarise(x, current["w"])

    hooks = [
        lin.register_forward_pre_hook(lambda _m, args, name=name: hook(name, args[0]))
        for name, lin in linears
    ]
    try:
        for j, sl in enumerate(batches):
            current["w"] = weights[sl].to(device)
            block(cache[j].to(device), contexts[j])
            last[:] = [None, None, -1]  # nothing outlives its batch
    finally:
        for h in hooks:
            h.remove()
    return summaries


def _exchange(acc: LayerInputsAccumulator, mine: RowBatch | None) -> None:
    """All-gather one step's batch summaries of one linear and fold them in rank (= global
    batch) order. Keys for every batch of the step are drawn in that order on every rank, so
    the stream stays where one process would have it."""
    n_in, dev = acc.in_features, acc.device
    counts = distributed.all_gather_object(None if mine is None else mine.n_rows)
    keys = [None if c is None else acc.draw_keys(c) for c in counts]
    stats = cands = scalars = None
    if mine is not None:
        own = keys[distributed.rank()]
        # [in + 3, in]: the Gram matrix, then abs-max, abs-sum and row sum as three more rows
        stats = torch.cat([mine.gram, mine.absmax[None], mine.abs_sum[None], mine.row_sum[None]])
        scalars = torch.tensor([mine.n_rows, mine.weight_sum], dtype=torch.float64)
        k, rows, w = mine.candidates(own, acc.max_sample_rows)
        cands = torch.cat([rows, k[:, None], w[:, None]], dim=1)  # [c, in + 2]
    like_f = torch.empty(0, n_in, device=dev)
    all_stats = distributed.all_gather(stats, like_f)
    all_scalars = distributed.all_gather(scalars, torch.empty(0, dtype=torch.float64))
    all_cands = distributed.all_gather(cands, torch.empty(0, n_in + 2, device=dev))
    for st, sc, cd in zip(all_stats, all_scalars, all_cands, strict=True):
        if st is None:
            continue
        rows, k, w = cd[:, :n_in], cd[:, n_in], cd[:, n_in + 1]
        batch = RowBatch(
            int(sc[0]), st[n_in], float(sc[1]), st[n_in + 1], st[:n_in], rows, w, st[n_in + 2]
        )
        acc.fold(batch, k, rows, w)


def map_linears(
    linears: list[tuple[str, nn.Linear]],
    work: Callable[[str, nn.Linear], R],
    device: torch.device,
) -> list[R]:
    """work(name, linear) for every linear, in order. With several ranks each linear's work
    runs on one rank (all of them at once) and its result is broadcast to the others, tensors
    landing on `device`."""
    if not distributed.active():
        return [work(name, lin) for name, lin in linears]
    # GPTQ sweeps the input columns one at a time, and on a GPU each column costs about the
    # same at these widths (kernel launches: benchmarks/results/offload, 9.2 s for a 4096-wide
    # block's 28,672 columns, the cubic terms a small part): a linear's time ~ in_features
    costs = [float(lin.in_features) for _, lin in linears]
    owner = distributed.owners(costs)
    me = distributed.rank()
    local = {i: work(*linears[i]) for i in range(len(linears)) if owner[i] == me}
    return [distributed.broadcast_tree(local.get(i), owner[i], device) for i in range(len(linears))]
