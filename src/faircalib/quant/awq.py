"""AWQ (Lin et al., 2024): protect salient input channels by scaling them up before rounding.

The layer is rewritten as (x / s) @ (W * s)^T, which is exact in float; rounding W * s
instead of W shrinks the relative rounding error of channels with large s. Salience is the
mean |x| per channel, s = mean|x|^alpha (normalised so max(s) * min(s) = 1), and alpha is
chosen on a grid by the layer's output error. A per-group clipping search then shrinks each
group's range where that lowers the group's share of the output error.

Differences from the reference (mit-han-lab/llm-awq auto_scale.py / auto_clip.py), on purpose:
* the loss is THIS layer's output error, row-weighted by `sample_weights`; the reference
  measures the output of the enclosing module (e.g. the whole attention block for q/k/v,
  which share one scale folded into the preceding norm). Here s stays per layer and is applied
  as the layer's `input_scale`.
* losses are quadratic forms in the sample's weighted Gram matrix G = sum_r w_r x_r x_r^T /
  sum_r w_r: sum_r w_r ||x_r D^T||^2 = sum(D G * D) exactly, without re-running the rows
  for each grid point.
* clipping shrinks both ends of a group's min-max range by the ratio (the reference clamps to
  +-ratio * max|w|); clipping is kept only if it lowers the layer loss, since groups are
  searched independently and cross-group terms can, rarely, make the sum worse.
* the reference never clips query/key projections: auto_clip_block skips every linear whose
  name contains "q_" or "k_" ("due to qk bmm, it is hard to clip precisely": a clipped q or k
  changes the attention logits q.k multiplicatively, which the per-layer output error does
  not see). A substring test misses fused projections such as MDLM's `attn_qkv`, whose output
  rows are [q; k; v]. Here the layer's `name` is matched (fnmatch) against the config's
  `no_clip_rows` patterns ({pattern: (parts, of)}: the leading parts/of of the output rows are
  query/key rows). Those rows keep their min-max range; the remaining rows (v) may be clipped.
  The default covers MDLM's fused qkv (first 2/3 of the rows) and LLaMA-style q_proj/k_proj
  (all rows). A config without the field uses config.AWQ_NO_CLIP_ROWS.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

import torch

from faircalib.config import AWQ_NO_CLIP_ROWS, AWQConfig
from faircalib.errors import ConfigError
from faircalib.quant.primitives import (
    QuantResult,
    check_weight,
    compute_qparams,
    dequantize,
    fake_quantize,
    grouped,
    quantize,
)
from faircalib.quant.stats import LayerInputs, check_inputs


def no_clip_rows(name: str, n_out: int, patterns: dict[str, tuple[int, int]]) -> int:
    """How many leading output rows of layer `name` are query/key rows (never clipped)."""
    rows = 0
    for pattern, (parts, of) in patterns.items():
        if not fnmatchcase(name, pattern):
            continue
        if not 0 < parts <= of or (n_out * parts) % of:
            raise ConfigError(
                f"no_clip_rows[{pattern!r}] = ({parts}, {of}) does not split "
                f"{name}'s {n_out} output rows into whole query/key rows"
            )
        rows = max(rows, n_out * parts // of)
    return rows


def sample_gram(inputs: LayerInputs) -> torch.Tensor:
    """Row-weighted second moment of the sample: [in, in]."""
    x, w = inputs.sample, inputs.sample_weights  # [n, in], [n]
    return (x.T @ (w[:, None] * x)) / w.sum()


def quadratic_error(d: torch.Tensor, gram: torch.Tensor) -> float:
    """Mean weighted squared output error of a weight difference d [out, in]."""
    return float(((d @ gram) * d).sum())


def awq_scales(absmean: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = mean|x|^alpha, floored (dead channels) and normalised to geometric mid-range 1."""
    s = absmean.pow(alpha).clamp(min=1e-4)  # [in]
    return s / (s.max() * s.min()).sqrt()


def search_scale(
    w: torch.Tensor, absmean: torch.Tensor, gram: torch.Tensor, cfg: AWQConfig
) -> tuple[torch.Tensor, float, list[float]]:
    """Grid search of alpha in {0, 1/n, ..., (n-1)/n}; alpha = 0 is plain RTN (s = 1)."""
    best_s, best_alpha, losses = torch.ones_like(absmean), 0.0, []
    for i in range(cfg.n_grid):
        alpha = i / cfg.n_grid
        s = awq_scales(absmean, alpha)
        ws = w * s  # [out, in]
        loss = quadratic_error(w - fake_quantize(ws, compute_qparams(ws, cfg)) / s, gram)
        if not losses or loss < min(losses):
            best_s, best_alpha = s, alpha
        losses.append(loss)
    return best_s, best_alpha, losses


def search_clip(ws: torch.Tensor, gram_s: torch.Tensor, cfg: AWQConfig) -> torch.Tensor:
    """Per-group range shrink ratio in (1 - max_shrink, 1]: [out, n_groups].

    Each (row, group) is scored by the weighted error of its partial output, i.e. the
    quadratic form of its weight error with the group's diagonal block of the Gram matrix.
    """
    n_in = ws.shape[1]
    width = n_in if cfg.group_size is None else cfg.group_size
    n_groups = n_in // width
    blocks = gram_s.reshape(n_groups, width, n_groups, width).diagonal(dim1=0, dim2=2)
    blocks = blocks.permute(2, 0, 1)  # [G, width, width]
    g_ws = grouped(ws, cfg.group_size)  # [out, G, width]
    best_ratio = best_err = None
    for i in range(max(1, int(cfg.max_shrink * cfg.n_clip_grid))):
        ratio = 1.0 - i / cfg.n_clip_grid
        d = g_ws - grouped(fake_quantize(ws, compute_qparams(ws, cfg, ratio)), cfg.group_size)
        err = torch.einsum("ogi,gij,ogj->og", d, blocks, d)  # [out, G]
        if best_err is None:
            best_err, best_ratio = err, torch.ones_like(err)
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_ratio = torch.where(better, torch.full_like(err, ratio), best_ratio)
    return best_ratio


def quantize_awq(
    weight: torch.Tensor, inputs: LayerInputs, cfg: AWQConfig, *, name: str = "weight"
) -> QuantResult:
    """AWQ for one layer. `name` (the full module name, e.g. "blocks.0.attn_qkv") decides
    which output rows are query/key rows that clipping leaves alone (see the module docstring)."""
    check_weight(weight, name)
    cfg.check_layer(name, weight.shape[1])
    inputs = check_inputs(inputs, weight.shape[1], weight.device)
    w = weight.float()  # [out, in]
    gram = sample_gram(inputs)  # [in, in]
    energy = max(quadratic_error(w, gram), 1e-30)  # output energy, for relative losses
    s, alpha, losses = search_scale(w, inputs.act_absmean.float(), gram, cfg)
    ws = w * s  # [out, in] the weight in the smoothed basis
    gram_s = gram / (s[:, None] * s[None, :])  # Gram matrix of x / s

    qp = compute_qparams(ws, cfg)
    loss_scaled = quadratic_error(ws - fake_quantize(ws, qp), gram_s)
    loss_final, clip_kept = loss_scaled, 0.0
    qk_rows = no_clip_rows(name, w.shape[0], getattr(cfg, "no_clip_rows", AWQ_NO_CLIP_ROWS))
    if cfg.clip_search and qk_rows < w.shape[0]:
        ratio = search_clip(ws, gram_s, cfg)  # [out, G]
        ratio[:qk_rows] = 1.0  # query/key rows keep their full range
        qp_clip = compute_qparams(ws, cfg, ratio)
        loss_clip = quadratic_error(ws - fake_quantize(ws, qp_clip), gram_s)
        if loss_clip < loss_scaled:
            qp, loss_final, clip_kept = qp_clip, loss_clip, 1.0
    codes = quantize(ws, qp)
    info = {
        "alpha": alpha,
        "loss_rtn": losses[0] / energy,
        "loss_scaled": loss_scaled / energy,
        "loss_final": loss_final / energy,
        "clip_kept": clip_kept,
        "no_clip_rows": float(qk_rows),
    }
    return QuantResult(dequantize(codes, qp), codes, qp, input_scale=s, info=info)
