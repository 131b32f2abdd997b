"""quantize_gptq against a slow, readable GPTQ written here: one column at a time, every
column's error pushed onto all later columns at once (no lazy blocks). The codes must be
identical: lazy batching is a rewrite for speed, and a dynamic group's range is the range of
the error-updated weights when the sweep reaches the group (see quant/gptq.py's docstring for
how that differs from IST-DASLab/gptq inside a block)."""

import pytest
import torch

from faircalib.config import GPTQConfig
from faircalib.quant import LayerInputs, compute_qparams, quantize_gptq
from faircalib.quant.primitives import (
    config_scale_dtype,
    decode,
    encode,
    scale_zero_from_range,
)

OUT, IN, ROWS = 48, 256, 1024


def _layer(seed: int) -> tuple[torch.Tensor, LayerInputs]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=g) / IN**0.5
    x = torch.randn(ROWS, IN, generator=g) @ mix + 0.3 * torch.randn(ROWS, IN, generator=g)
    x[:, [3, 77, 200]] *= 10.0  # outlier inputs: act_order moves them to the front
    x[:, 150] = 0.0  # a dead input
    w = torch.randn(OUT, IN, generator=g) * 0.05
    return w, LayerInputs.from_rows(x, max_sample_rows=ROWS)


def _upper_inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """U with U^T U = (H + damp * mean(diag H) I)^-1, U upper triangular."""
    damped = h + damp * torch.diag(h).mean() * torch.eye(h.shape[0])
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(damped))
    return torch.linalg.cholesky(inverse, upper=True)


def slow_gptq_codes(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig) -> torch.Tensor:
    """Column-by-column GPTQ; returns uint8 codes [out, in] in the original column order."""
    return slow_gptq(w, h, cfg)[0]


def slow_gptq(w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, float]:
    """Column-by-column GPTQ: uint8 codes [out, in] in the original column order, and the
    loss sum_j ||w_j - q_j||^2 / (2 U_jj^2) (w_j: column j when the sweep reaches it)."""
    w, h = w.float().clone(), h.float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    gs = cfg.group_size
    fixed = compute_qparams(w, cfg)  # per-channel, or act_order's static groups
    scale, zero = fixed.scale.clone(), fixed.zero.clone()
    order = torch.arange(IN)
    if cfg.act_order:
        order = torch.argsort(torch.diag(h), descending=True, stable=True)
    w, h = w[:, order], h[order][:, order]
    u = _upper_inverse_factor(h, cfg.damp)
    codes = torch.zeros(w.shape, dtype=torch.uint8)
    loss = 0.0
    for j in range(IN):
        col = int(order[j])
        g = 0 if gs is None else col // gs
        if gs is not None and not cfg.act_order and j % gs == 0:
            group = w[:, j : j + gs]  # every earlier column's error is already in here
            scale[:, g], zero[:, g] = scale_zero_from_range(
                group.amin(1), group.amax(1), cfg.bits, cfg.symmetric, config_scale_dtype(cfg)
            )
        c = encode(w[:, j], scale[:, g], zero[:, g], cfg.bits)
        diff = w[:, j] - decode(c, scale[:, g], zero[:, g])
        loss += float((diff.double() ** 2).sum() / float(u[j, j]) ** 2 / 2)
        w[:, j:] -= (diff / u[j, j])[:, None] * u[j, j:][None, :]
        codes[:, col] = c.to(torch.uint8)
    return codes, loss


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [32, 64, 128, None])
def test_codes_match_column_by_column_gptq(group_size, act_order, symmetric):
    w, inputs = _layer(seed=group_size or 7)
    cfg = GPTQConfig(bits=3, group_size=group_size, act_order=act_order, symmetric=symmetric)
    ours = quantize_gptq(w, inputs, cfg)
    codes, loss = slow_gptq(w, inputs.hessian, cfg)
    assert torch.equal(ours.codes, codes)
    # ours sums the scaled errors e = (w - q) / U_jj per block: the same loss up to rounding
    assert ours.info["gptq_loss"] == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("block_size", [32, 96, 256])
def test_small_groups_do_not_depend_on_the_block_size(block_size):
    """The reference's group ranges inside a lazy block change with blocksize; ours do not."""
    w, inputs = _layer(seed=3)
    cfg = GPTQConfig(bits=3, group_size=32, act_order=False)
    other = GPTQConfig(bits=3, group_size=32, act_order=False, block_size=block_size)
    assert torch.equal(quantize_gptq(w, inputs, cfg).codes, quantize_gptq(w, inputs, other).codes)
