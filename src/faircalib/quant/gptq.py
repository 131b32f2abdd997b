"""GPTQ (Frantar et al., 2023): quantize one column at a time and push each column's rounding
error onto the columns not yet quantized, weighted by the inverse Hessian of the layer loss
||X W^T - X Q^T||^2. Follows the reference implementation (IST-DASLab/gptq):

* damping lambda = damp * mean(diag H) added to the diagonal so H is safely invertible;
* the upper Cholesky factor U of H^-1 replaces repeated inverse updates: after quantizing
  column i, its error (w_i - q_i) / U_ii spreads to later columns through row i of U;
* "lazy batch" blocks of `block_size` columns: updates inside a block are applied at once,
  updates to later columns once per block (a rewrite for speed, the result is the same);
* dead inputs (diag H == 0, never active in calibration) get H_ii = 1 and a zero weight.

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

import torch

from faircalib.config import GPTQConfig
from faircalib.errors import DataError
from faircalib.quant.primitives import (
    QuantResult,
    check_weight,
    compute_qparams,
    config_scale_dtype,
    decode,
    encode,
    scale_zero_from_range,
)
from faircalib.quant.stats import LayerInputs, check_inputs


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
    weight: torch.Tensor, inputs: LayerInputs, cfg: GPTQConfig, *, name: str = "weight"
) -> QuantResult:
    check_weight(weight, name)
    n_out, n_in = weight.shape
    cfg.check_layer(name, n_in)
    inputs = check_inputs(inputs, n_in, weight.device)
    w = weight.float().clone()  # [out, in]
    h = inputs.hessian.float().clone()  # [in, in]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0

    gs = cfg.group_size
    dynamic_groups = gs is not None and not cfg.act_order
    # Static (or per-channel) qparams from the original weight; dynamic groups overwrite theirs.
    qp = compute_qparams(w, cfg)
    scale_dtype = config_scale_dtype(cfg)  # dynamic group scales are rounded like static ones
    perm = (
        torch.argsort(torch.diag(h), descending=True, stable=True)
        if cfg.act_order
        else torch.arange(n_in, device=w.device)
    )
    w, h = w[:, perm], h[perm][:, perm]
    # Group of each (permuted) column in the contiguous layout of the original order.
    col_group = (perm // gs).tolist() if gs is not None else [0] * n_in
    u, damp_used = inverse_hessian_factor(h, cfg.damp)

    # Blocks never straddle a dynamic group, so a group's range is read from fully updated
    # weights (the block size only changes speed, not the result).
    block = cfg.block_size if gs is None else gs * max(1, cfg.block_size // gs)
    q_all = torch.zeros_like(w)  # [out, in] dequantized, permuted order
    codes = torch.zeros_like(w)  # [out, in] codes as float, permuted order
    loss = torch.zeros((), device=w.device)  # a tensor: no host sync per column on GPU
    for i1 in range(0, n_in, block):
        i2 = min(i1 + block, n_in)
        w1 = w[:, i1:i2].clone()  # [out, B] the block, updated column by column
        err1 = torch.zeros_like(w1)  # [out, B] scaled errors, for the lazy update
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = col_group[col]
            if dynamic_groups and col % gs == 0:
                chunk = w1[:, i : i + gs]  # [out, gs] current (error-updated) weights
                qp.scale[:, g], qp.zero[:, g] = scale_zero_from_range(
                    chunk.amin(dim=1), chunk.amax(dim=1), cfg.bits, cfg.symmetric, scale_dtype
                )
            wc, d = w1[:, i], u1[i, i]
            c = encode(wc, qp.scale[:, g], qp.zero[:, g], cfg.bits)  # [out]
            q = decode(c, qp.scale[:, g], qp.zero[:, g])
            codes[:, col], q_all[:, col] = c, q
            loss += ((wc - q) ** 2).sum() / d**2 / 2
            e = (wc - q) / d  # [out]
            w1[:, i:] -= e[:, None] * u1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ u[i1:i2, i2:]  # lazy update of all later columns

    inv = torch.argsort(perm)
    info = {"gptq_loss": float(loss), "damp": damp_used, "dead_columns": float(dead.sum())}
    return QuantResult(q_all[:, inv], codes[:, inv].to(torch.uint8), qp, info=info)
