"""GPTQ (Frantar et al., 2023): quantize one column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer loss
||X W^T - X Q^T||^2. Follows the reference implementation (IST-DASLab/gptq):

* damping lambda = damp * mean(diag H) added to the diagonal so H is safely invertible;
* the upper Cholesky factor U of H^-1 replaces repeated inverse updates: after quantizing
  column i, its error (w_i - q_i) / U_ii spreads to later columns through row i of U;
* "lazy batch" blocks of `block_size` columns: updates inside a block are applied at once,
  updates to later columns once per block (a rewrite for speed, the result is the same);
* dead inputs (diag H == 0, never active in calibration) get H_ii = 1 and a zero weight.

Speed (the result is the same on every path, code for code):
* the column loop inside a block reads each block's scale/zero columns once and accumulates
  the loss once per block from the scaled errors e = (w - q) / U_ii (a column's loss is
  sum(e^2) / 2); on CUDA it is one fused Triton kernel (quant/gptq_triton.py), the torch
  loop `sweep_columns_torch` being its reference and the fallback;
* `quantize_gptq_many` quantizes linears that read the same input (q/k/v; gate/up) as one
  GPTQ on their stacked rows: rows are independent given H, and act_order, the damping and U
  depend on H only. The lazy update stays a matmul per linear, so the bits match separate
  calls.

act_order quantizes columns by decreasing diag(H) (most active inputs first, while many
columns remain to absorb their error). With groups it uses static groups: qparams are computed
per contiguous group on the un-updated weight before reordering, so codes keep the plain
contiguous-group layout (the reference's `static_groups=True`). Without act_order, a group's
qparams are computed from the updated weights when the sweep reaches the group's first column.

Where this differs from the reference, on purpose:
* Which weights a dynamic group's range is read from. The reference calls
  `find_params(W[:, c:c + groupsize])` on the full matrix W, which receives the lazy update
  only at the end of each `blocksize` block; inside a block the updates go to the copy W1.
  For a group starting at the first column of a block (groupsize = blocksize = 128, aligned)
  W and W1 agree there and both readings are identical. For a group starting inside a block
  (groupsize 32 or 64 with blocksize 128) the reference's range misses the error feedback of
  the block's earlier columns: it is the range of weights that will never be quantized as
  such, and it changes with `blocksize`, a knob meant only for speed. Here blocks never
  straddle a group and the range is read from the block copy `w1`, i.e. from exactly the
  weights the unbatched algorithm (quantize column j, push its error onto every later column
  at once) holds when it reaches the group. The result is the unbatched GPTQ, whatever the
  block size (tests/test_gptq_reference.py checks codes against a column-by-column
  implementation with no lazy batching).
* Per-channel qparams are computed after dead columns are zeroed (the reference computes
  them before), so an input never seen in calibration does not widen its row's range.
"""

from __future__ import annotations

import importlib.util
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Literal

import torch

from faircalib.config import GPTQConfig
from faircalib.errors import ConfigError, DataError
from faircalib.quant.primitives import (
    QParams,
    QuantResult,
    check_weight,
    compute_qparams,
    config_scale_dtype,
    decode,
    encode,
    scale_zero_from_range,
)
from faircalib.quant.stats import LayerInputs, check_inputs

Sweep = Literal["auto", "torch", "triton"]
SweepFn = Callable[..., None]
# Widest lazy block the fused kernel takes: wider register tiles would spill (torch loop then).
FUSED_SWEEP_MAX_COLS = 256


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of (H + lambda I)^-1: [in, in]. If H is still not positive
    definite (too few calibration rows for the width), retry with 10x and 100x damping rather
    than fail; the damping used is returned for the layer log."""
    mean_diag = float(torch.diag(h).mean())
    for factor in (1.0, 10.0, 100.0):
        h_damped = h.clone()
        h_damped.diagonal().add_(damp * factor * mean_diag)
        chol, info = torch.linalg.cholesky_ex(h_damped)
        if int(info) == 0:
            upper, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
            if int(info) == 0:
                return upper, damp * factor
    raise DataError(
        f"layer Hessian is not positive definite even with damping {100 * damp}; "
        "calibrate with more rows or a larger --damp"
    )


def quantize_gptq(
    weight: torch.Tensor,
    inputs: LayerInputs,
    cfg: GPTQConfig,
    *,
    name: str = "weight",
    sweep: Sweep = "auto",
) -> QuantResult:
    """GPTQ of one [out, in] weight. `sweep` picks the inner column loop: "torch" (the
    reference), "triton" (the fused kernel, CUDA or TRITON_INTERPRET=1) or "auto" (the kernel
    where `triton_sweep_available` says it applies); both give the same codes."""
    return quantize_gptq_many([weight], inputs, cfg, names=[name], sweep=sweep)[0]


def quantize_gptq_many(
    weights: Sequence[torch.Tensor],
    inputs: LayerInputs,
    cfg: GPTQConfig,
    *,
    names: Sequence[str] | None = None,
    sweep: Sweep = "auto",
) -> list[QuantResult]:
    """GPTQ of several weights that read the same input (q/k/v; gate/up) as one sweep over
    their row-stacked matrix: rows are independent given H, and the column order, the damping
    and U depend only on H. Equal to separate `quantize_gptq` calls, code for code (the lazy
    update is a matmul per original weight, so even its summation order is the same)."""
    names = list(names) if names is not None else [f"weight{k}" for k in range(len(weights))]
    if not weights or len(names) != len(weights):
        raise ConfigError(f"got {len(weights)} weights and {len(names)} names")
    for weight, name in zip(weights, names, strict=True):
        check_weight(weight, name)
        if weight.shape[1] != weights[0].shape[1] or weight.device != weights[0].device:
            raise ConfigError(f"{name} does not share the input width and device of {names[0]}")
        cfg.check_layer(name, weight.shape[1])
    inputs = check_inputs(inputs, weights[0].shape[1], weights[0].device)
    sizes = [weight.shape[0] for weight in weights]
    # the stacked float32 copy [sum(out), in] is built inline so that only _gptq_rows holds
    # it and can drop it once permuted (one [out, in] matrix less at the peak)
    q, codes, qp, row_loss, info = _gptq_rows(
        torch.cat([weight.float() for weight in weights]), inputs.hessian, cfg, sizes, sweep
    )
    if len(weights) == 1:  # no split, no copies
        return [QuantResult(q, codes, qp, info={"gptq_loss": float(row_loss.sum()) / 2, **info})]
    results = []
    for rows in _row_slices(sizes):
        layer_qp = replace(qp, scale=qp.scale[rows].clone(), zero=qp.zero[rows].clone())
        layer_info = {"gptq_loss": float(row_loss[rows].sum()) / 2, **info}
        results.append(QuantResult(q[rows].clone(), codes[rows].clone(), layer_qp, info=layer_info))
    return results


def group_shared_hessians(inputs: Mapping[str, LayerInputs]) -> list[list[str]]:
    """Names of linears grouped by bit-identical Hessians, in first-seen order: GPTQ reads its
    inputs only through H, so each group can go to `quantize_gptq_many` with the same result
    as separate calls (q/k/v, gate/up: one input tensor, one summary, identical H)."""
    groups: list[list[str]] = []
    for name, layer_inputs in inputs.items():
        h = layer_inputs.hessian
        for group in groups:
            other = inputs[group[0]].hessian
            if other.shape == h.shape and other.device == h.device and torch.equal(other, h):
                group.append(name)
                break
        else:
            groups.append([name])
    return groups


def _row_slices(sizes: Sequence[int]) -> list[slice]:
    starts = [0, *itertools.accumulate(sizes)]
    return [slice(a, b) for a, b in itertools.pairwise(starts)]


def _gptq_rows(
    w: torch.Tensor, hessian: torch.Tensor, cfg: GPTQConfig, sizes: Sequence[int], sweep: Sweep
) -> tuple[torch.Tensor, torch.Tensor, QParams, torch.Tensor, dict[str, float]]:
    """GPTQ of the float32 matrix w [out, in] (overwritten): dequantized weight, uint8 codes,
    qparams, per-row loss sums (x2) and the shared diagnostics. `sizes` are the row counts of
    the weights stacked in w (the lazy update runs per weight)."""
    n_in = w.shape[1]
    h = hessian.float().clone()  # [in, in]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    gs = cfg.group_size
    dynamic_groups = gs is not None and not cfg.act_order
    # Static (or per-channel) qparams from the original weight; dynamic groups overwrite theirs.
    qp = compute_qparams(w, cfg)
    perm = (
        torch.argsort(torch.diag(h), descending=True, stable=True)
        if cfg.act_order
        else torch.arange(n_in, device=w.device)
    )
    w, h = w[:, perm], h[perm][:, perm]
    # Group of each (permuted) column in the contiguous layout of the original order.
    col_group = perm // gs if gs is not None else torch.zeros_like(perm)
    u, damp_used = inverse_hessian_factor(h, cfg.damp)

    # Blocks never straddle a dynamic group, so a group's range is read from fully updated
    # weights (the block size only changes speed, not the result).
    block = cfg.block_size if gs is None else gs * max(1, cfg.block_size // gs)
    sweep_fn = _pick_sweep(sweep, w.device, min(block, n_in))
    q_all = torch.zeros_like(w)  # [out, in] dequantized, permuted order
    codes = torch.zeros_like(w)  # [out, in] codes as float, permuted order
    row_loss = torch.zeros(w.shape[0], device=w.device)  # sum over columns of e^2
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1 = w[:, i1:i2].clone()  # [out, B] the block, updated column by column
        err1 = torch.zeros_like(w1)  # [out, B] scaled errors, for the lazy update
        u1 = u[i1:i2, i1:i2]
        out_views = (q_all[:, i1:i2], codes[:, i1:i2], err1)
        if dynamic_groups:
            for c0 in range(0, i2 - i1, gs):  # one segment per group: its range comes first
                scale, zero = _dynamic_group_qparams(w1[:, c0 : c0 + gs], qp, i1 + c0, cfg)
                sweep_fn(w1, u1, scale, zero, out_views, c0, min(c0 + gs, i2 - i1), cfg.bits)
        else:
            groups = col_group[i1:i2]
            scale, zero = qp.scale[:, groups], qp.zero[:, groups]  # [out, B] gathered once
            sweep_fn(w1, u1, scale, zero, out_views, 0, i2 - i1, cfg.bits)
        row_loss += (err1**2).sum(dim=1)  # e = (w - q) / d: the column's loss is sum(e^2) / 2
        for rows in _row_slices(sizes):  # lazy update of all later columns, per weight
            w[rows, i2:] -= err1[rows] @ u[i1:i2, i2:]

    inv = torch.argsort(perm)
    info = {"damp": damp_used, "dead_columns": float(dead.sum())}
    return q_all[:, inv], codes[:, inv].to(torch.uint8), qp, row_loss, info


def _dynamic_group_qparams(
    chunk: torch.Tensor, qp: QParams, first_col: int, cfg: GPTQConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Set the qparams of the group starting at (unpermuted) column `first_col` from the
    current, error-updated weights `chunk` [out, gs]; returns them as [out, gs] views."""
    g = first_col // cfg.group_size
    qp.scale[:, g], qp.zero[:, g] = scale_zero_from_range(
        chunk.amin(dim=1), chunk.amax(dim=1), cfg.bits, cfg.symmetric, config_scale_dtype(cfg)
    )
    width = chunk.shape[1]
    return qp.scale[:, g : g + 1].expand(-1, width), qp.zero[:, g : g + 1].expand(-1, width)


def sweep_columns_torch(
    w1: torch.Tensor,
    u1: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    c0: int,
    c1: int,
    bits: int,
) -> None:
    """Quantize columns c0..c1-1 of the block w1 [out, B] in place: encode, decode, and push
    each column's scaled error e = (w - q) / U_ii onto the block's later columns through U's
    row. scale/zero: [out, *] with column i - c0 for block column i; out = (dequantized,
    codes, e), each [out, B]. The reference for the fused kernel (quant/gptq_triton.py)."""
    q_out, codes_out, err_out = out
    for i in range(c0, c1):
        wc, d, s, z = w1[:, i], u1[i, i], scale[:, i - c0], zero[:, i - c0]
        c = encode(wc, s, z, bits)  # [out]
        q = decode(c, s, z)
        e = (wc - q) / d
        w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
        codes_out[:, i], q_out[:, i], err_out[:, i] = c, q, e


def triton_sweep_available(device: torch.device, block_cols: int) -> bool:
    """Whether "auto" uses the fused kernel: a CUDA layer, triton installed, and lazy blocks
    narrow enough for the kernel's register tile."""
    return (
        device.type == "cuda"
        and block_cols <= FUSED_SWEEP_MAX_COLS
        and importlib.util.find_spec("triton") is not None
    )


def _pick_sweep(sweep: Sweep, device: torch.device, block_cols: int) -> SweepFn:
    if sweep not in ("auto", "torch", "triton"):
        raise ConfigError(f"GPTQ sweep must be auto, torch or triton, got {sweep!r}")
    if sweep == "torch" or (sweep == "auto" and not triton_sweep_available(device, block_cols)):
        return sweep_columns_torch
    from faircalib.quant.gptq_triton import sweep_columns_triton  # lazy: triton is optional

    return sweep_columns_triton
