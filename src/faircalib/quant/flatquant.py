"""FlatQuant-style learned transforms (Sun et al. 2024, "FlatQuant: Flatness Matters for LLM
Quantization"): per linear, an invertible affine transform of the input learned against the
quantized layer output.

For a linear y = x W^T with input rows x [n, in], learn a channel scaling s [in] and an
invertible P = P1 (x) P2 (Kronecker product, P1 [a, a], P2 [b, b], a * b = in) and set

    x~ = (x / s) P        W~ = (W diag(s)) P^-T        so  x~ W~^T = x W^T  exactly.

Both sides are then quantized - activations per token (Q_a, with a learned clip ratio c_a),
weights per output channel or group (Q_w, a learned clip ratio per row and group) - and the
parameters minimise the row-weighted relative output error on calibration rows,

    L = sum_r w_r ||x_r W^T - Q_a(x~_r) Q_w(W~)^T||^2 / sum_r w_r ||x_r W^T||^2,

with rounding passed straight through (STE). Optionally (`FlatQuantConfig.shift`) a channel
shift z [in] is subtracted first, x~ = ((x - z) / s) P, and its share z W^T (float W) is
added back exactly after the GEMM: Q_a(x~) Q_w(W~)^T + z W^T. On a dLLM the rows share large channels
(every [MASK] row carries the same outliers, docs/activation-quant.md), so centring them
frees per-token INT4 levels for what differs between rows (OmniQuant's and Outlier
Suppression+'s shift, here row-weighted: FAIR-Calib's weights choose the centre).
The Kronecker form keeps the online cost at
O(in (a + b)) per row instead of O(in^2) and the inverse at two small matrix inverses. Row
weights w_r are where FAIR-Calib enters (frontier-instability weights; uniform = FlatQuant).

Initialisation: P = I or P = H_a (x) H_b / sqrt(in) (a Hadamard rotation when a and b are powers
of two), s = SmoothQuant's max|x|^alpha / max|W|^(1 - alpha) (alpha None: ones), clips 1. The
result keeps the best of the initial and the trained parameters on all sample rows, so it is
never worse than its initialisation there.

FlatQuant itself trains all transforms of a transformer block jointly on the block's output
error; `TrainableTransformLinear` is the piece that makes that possible here: it restarts from
a per-layer result bit for bit and runs the same STE forward inside a block, and `freeze`
turns it back into a FlatQuantResult (the block loop lives in `calib.activations`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from faircalib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.quant.activations import (
    ActQuantConfig,
    quantize_fp8_rows,
    quantize_int_per_token,
    ste_round,
)
from faircalib.quant.primitives import (
    QuantResult,
    compute_qparams,
    dequantize,
    grouped,
    quantize,
    round_to_dtype,
)
from faircalib.quant.rotation import hadamard_matrix, is_power_of_two
from faircalib.quant.smoothquant import smoothing_scales

MIN_CLIP = 0.3  # smallest learned clip ratio
SHIFTS = ("none", "mean", "learned")


@dataclass
class FlatQuantConfig:
    """The learned-transform optimiser for one linear layer."""

    steps: int = 200
    lr: float = 5e-3  # Adam, on P1, P2 and log s
    lr_clip: float = 1e-2  # Adam, on the clip ratios
    batch_rows: int = 512  # calibration rows per step
    init: Literal["identity", "hadamard"] = "hadamard"
    smooth_alpha: float | None = 0.5  # SmoothQuant initialisation of s; None: ones
    learn_clip: bool = True
    seed: int = 0
    # channel shift z: none; mean (the default) = the row-weighted mean of the sampled rows the
    # transform learns on, fixed; learned = that mean as the start, trained with P1, P2 and
    # log s. At W4A4 on mdlm-small `mean` took flatquant-gptq from +5.8% to +3.8% and fair-gptq
    # from +5.5% to +3.6% (docs/activation-quant.md)
    shift: Literal["none", "mean", "learned"] = "mean"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_rows < 1 or min(self.lr, self.lr_clip) < 0:
            raise ConfigError("flatquant steps >= 0, batch_rows >= 1 and lr >= 0 are required")
        if self.init not in ("identity", "hadamard"):
            raise ConfigError(f"flatquant init must be identity or hadamard, got {self.init!r}")
        if self.shift not in SHIFTS:
            raise ConfigError(f"flatquant shift must be one of {SHIFTS}, got {self.shift!r}")


@dataclass
class LearnedTransform:
    """x -> ((x - shift) / smooth) (p1 (x) p2): what runs online in front of the quantized
    linear; the shift's share of the output, shift W^T (`output_offset`), is added after the
    GEMM (`calib.activations.ActQuantLinear.offset`)."""

    p1: torch.Tensor  # [a, a]
    p2: torch.Tensor  # [b, b]
    smooth: torch.Tensor  # [in], > 0
    shift: torch.Tensor | None = None  # [in], in the input's own basis

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> x~ [..., in]."""
        if self.shift is not None:
            x = x - self.shift.to(x)
        return self.linear(x)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """The linear part, x -> (x / smooth) (p1 (x) p2), without the shift."""
        return kron_apply(x / self.smooth.to(x), self.p1.to(x), self.p2.to(x))

    def output_offset(self, weight: torch.Tensor) -> torch.Tensor | None:
        """shift W^T [out] (float64 product, float32 result) for the float weight W [out, in]:
        what the shifted input no longer carries; None without a shift."""
        if self.shift is None:
            return None
        return (weight.double() @ self.shift.double().to(weight.device)).float()

    def fold(self, weight: torch.Tensor) -> torch.Tensor:
        """W [out, in] -> W~ = W diag(s) P^-T (float64 inverses, float32 result)."""
        inv1 = torch.linalg.inv(self.p1.double()).T
        inv2 = torch.linalg.inv(self.p2.double()).T
        w = weight.double() * self.smooth.double()
        return kron_apply(w, inv1, inv2).float()

    def to(self, device: torch.device | str) -> LearnedTransform:
        shift = None if self.shift is None else self.shift.to(device)
        return LearnedTransform(
            self.p1.to(device), self.p2.to(device), self.smooth.to(device), shift
        )


@dataclass
class FlatQuantResult:
    """A transformed, quantized linear: x -> Q_a(transform(x)) @ weight.T."""

    result: QuantResult  # weight = fake-quantized W~ (in the transformed basis)
    transform: LearnedTransform
    act: ActQuantConfig  # with the learned clip ratio
    info: dict[str, float] = field(default_factory=dict)
    # the trainable state it was frozen from (P1, P2, log s, clips): the block-wise stage
    # restarts from exactly this point (exp(log s) is not always s to the last bit)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


def kron_apply(x: torch.Tensor, p1: torch.Tensor, p2: torch.Tensor) -> torch.Tensor:
    """x [..., a*b] -> x (p1 (x) p2): with X = x viewed as [a, b], the product is p1^T X p2."""
    a, b = p1.shape[0], p2.shape[0]
    xs = x.reshape(*x.shape[:-1], a, b)
    return (p1.T @ xs @ p2).reshape(x.shape)  # two small matmuls, O(in (a + b)) per row


def kron_factors(n: int) -> tuple[int, int]:
    """(a, b) with a * b = n and a the divisor of n closest to sqrt(n) from below."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _init_matrix(n: int, init: str) -> torch.Tensor:
    if init == "hadamard" and is_power_of_two(n):
        return hadamard_matrix(n, torch.float32) / math.sqrt(n)
    return torch.eye(n)


def fake_quantize_weight_ste(
    w: torch.Tensor, wcfg: QuantConfig, clip: torch.Tensor | float
) -> torch.Tensor:
    """Min-max fake quantization in primitives' convention (`compute_qparams`) with clip ratios
    clip [out, n_groups], differentiable through the rounding (STE) and the range. Scales are
    not rounded to the config's scale dtype (bf16's rounding is below the training's noise)
    except e8m0's powers of two, a step of up to 1.5x that the clip ratios must learn with
    (rounded straight through, as `compute_qparams` rounds the final weight's)."""
    g = grouped(w, wcfg.group_size)  # [out, G, width]
    maxq = 2**wcfg.bits - 1
    w_max = (g.amax(dim=2) * clip).clamp(min=0)  # [out, G]
    w_min = (g.amin(dim=2) * clip).clamp(max=0)
    if wcfg.symmetric:
        scale = (torch.maximum(-w_min, w_max) / (maxq / 2)).clamp(min=1e-8)[..., None]
        zero = torch.full_like(scale, float(2 ** (wcfg.bits - 1)))
    else:
        scale = ((w_max - w_min) / maxq).clamp(min=1e-8)[..., None]
        zero = torch.round(-w_min[..., None] / scale).detach()
    if wcfg.scale_dtype == "e8m0":
        scale = scale + (round_to_dtype(scale.detach(), "e8m0") - scale).detach()
        if not wcfg.symmetric:
            zero = torch.round(-w_min[..., None] / scale).clamp(0, maxq).detach()
    q = torch.clamp(ste_round(g / scale) + zero, 0, maxq)
    return ((q - zero) * scale).reshape(w.shape)


class _Params(nn.Module):
    """The trainable state: P1, P2, log s, the shift, clip ratios."""

    def __init__(
        self,
        in_features: int,
        out_groups: tuple[int, int],
        learn_clip: bool,
        shift: str = "none",
    ) -> None:
        super().__init__()
        a, b = kron_factors(in_features)
        self.p1 = nn.Parameter(torch.eye(a))
        self.p2 = nn.Parameter(torch.eye(b))
        self.log_s = nn.Parameter(torch.zeros(in_features))
        self.shift = nn.Parameter(torch.zeros(in_features))  # used unless shift_mode "none"
        self.shift_mode = shift
        # clip ratios held directly (no sigmoid, which would start saturated near 1), clamped
        # to [MIN_CLIP, 1]; clamp passes the gradient at the bounds, so 1 can move down
        self.w_clip = nn.Parameter(torch.ones(out_groups))
        self.a_clip = nn.Parameter(torch.tensor(1.0))
        self.learn_clip = learn_clip

    @classmethod
    def initial(cls, weight, x, cfg: FlatQuantConfig, wcfg: QuantConfig, rw=None) -> _Params:
        """FlatQuantConfig's initialisation for weight [out, in] and its input rows x (row
        weights rw [n], None: ones). With a shift, s is SmoothQuant's on the centred rows."""
        n_groups = grouped(weight, wcfg.group_size).shape[1]
        params = cls(weight.shape[1], (weight.shape[0], n_groups), cfg.learn_clip, cfg.shift)
        a, b = params.p1.shape[0], params.p2.shape[0]
        shift = torch.zeros(weight.shape[1])
        if cfg.shift != "none":
            w = torch.ones(len(x)) if rw is None else rw.float()
            shift = (w[:, None] * x).sum(dim=0) / w.sum().clamp(min=1e-30)
        s = (
            torch.ones(weight.shape[1])
            if cfg.smooth_alpha is None
            else smoothing_scales((x - shift).abs().amax(dim=0), weight, cfg.smooth_alpha)
        )
        with torch.no_grad():
            params.p1.copy_(_init_matrix(a, cfg.init))
            params.p2.copy_(_init_matrix(b, cfg.init))
            params.log_s.copy_(s.log())
            params.shift.copy_(shift)
        return params

    @classmethod
    def from_state(
        cls, state: dict[str, torch.Tensor], learn_clip: bool, shift: str = "none"
    ) -> _Params:
        """The parameters a FlatQuantResult was frozen from, bit for bit."""
        params = cls(state["log_s"].shape[0], tuple(state["w_clip"].shape), learn_clip, shift)
        params.load_state_dict({k: v.detach().clone() for k, v in state.items()})
        return params

    def transform_groups(self) -> list[nn.Parameter]:
        """What trains at the transform's learning rate (the shift only when learned)."""
        extra = [self.shift] if self.shift_mode == "learned" else []
        return [self.p1, self.p2, self.log_s, *extra]

    def weight_clip(self) -> torch.Tensor | float:
        return self.w_clip.clamp(MIN_CLIP, 1.0) if self.learn_clip else 1.0

    def act_clip(self) -> torch.Tensor | float:
        return self.a_clip.clamp(MIN_CLIP, 1.0) if self.learn_clip else 1.0

    def transform(self) -> LearnedTransform:
        shift = None if self.shift_mode == "none" else self.shift
        return LearnedTransform(self.p1, self.p2, self.log_s.exp(), shift)


WeightQuant = Literal["int", "fp8", "none"]  # how W~ is fake-quantized while training


def quantized_output(
    params: _Params,
    weight: torch.Tensor,
    x: torch.Tensor,
    wcfg: QuantConfig,
    act: ActQuantConfig,
    weight_quant: WeightQuant = "int",
) -> torch.Tensor:
    """Q_a(x~) Q_w(W~)^T (+ shift W^T) for rows x [n, in], differentiable in the parameters
    (STE)."""
    tf = params.transform()
    x_t = tf.apply(x)
    # W~ = W diag(s) P^-T, differentiable (torch.linalg.inv has a gradient)
    w_t = kron_apply(weight * tf.smooth, torch.linalg.inv(tf.p1).T, torch.linalg.inv(tf.p2).T)
    if weight_quant == "int":
        w_t = fake_quantize_weight_ste(w_t, wcfg, params.weight_clip())
    elif weight_quant == "fp8":
        w_t = quantize_fp8_rows(w_t, ste=True)
    x_q = _clipped_act(x_t, act, params.act_clip()) if act.fmt else x_t
    y = x_q @ w_t.T
    return y if tf.shift is None else y + tf.shift @ weight.T  # the shift's exact share


def _loss(params: _Params, weight, x, rw, ref, wcfg: QuantConfig, act: ActQuantConfig):
    err = ((ref - quantized_output(params, weight, x, wcfg, act)) ** 2).sum(dim=1)  # [n]
    return (rw * err).sum() / (rw * (ref**2).sum(dim=1)).sum().clamp(min=1e-30)


def _clipped_act(x: torch.Tensor, act: ActQuantConfig, clip: torch.Tensor) -> torch.Tensor:
    if act.fmt == "fp8":
        return quantize_fp8_rows(x, clip, ste=True)
    return quantize_int_per_token(x, act.bits, clip, ste=True)


def learn_transform(
    weight: torch.Tensor,
    x: torch.Tensor,
    wcfg: QuantConfig,
    act: ActQuantConfig,
    cfg: FlatQuantConfig,
    row_weights: torch.Tensor | None = None,
) -> FlatQuantResult:
    """Learn the transform of one linear: weight [out, in], calibration rows x [n, in] with
    optional weights [n]; returns the quantized transformed layer."""
    if act.fmt is not None and act.granularity != "token":
        raise ConfigError("flatquant learns per-token activation clipping only")
    weight, x = weight.detach().float(), x.detach().float()
    rw = torch.ones(len(x)) if row_weights is None else row_weights.detach().float().cpu()
    rw = rw.to(x.device)
    ref = x @ weight.T  # [n, out]
    with torch.enable_grad():
        params = _Params.initial(weight.cpu(), x.cpu(), cfg, wcfg, rw.cpu()).to(x.device)
        groups = [{"params": params.transform_groups(), "lr": cfg.lr}]
        if cfg.learn_clip:
            groups.append({"params": [params.w_clip, params.a_clip], "lr": cfg.lr_clip})
        opt = torch.optim.Adam(groups)
        gen = torch.Generator().manual_seed(cfg.seed)
        with torch.no_grad():
            initial = float(_loss(params, weight, x, rw, ref, wcfg, act))
        best, best_state = initial, _snapshot(params)
        for step in range(cfg.steps):
            idx = torch.randperm(len(x), generator=gen)[: cfg.batch_rows].to(x.device)
            loss = _loss(params, weight, x[idx], rw[idx], ref[idx], wcfg, act)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == cfg.steps - 1 or (step + 1) % 50 == 0:
                with torch.no_grad():
                    full = float(_loss(params, weight, x, rw, ref, wcfg, act))
                if math.isfinite(full) and full < best:
                    best, best_state = full, _snapshot(params)
    params.load_state_dict(best_state)
    return _finish(params, weight, wcfg, act, {"initial_loss": initial, "final_loss": best})


def _snapshot(params: _Params) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in params.state_dict().items()}


@torch.no_grad()
def _finish(
    params: _Params, weight, wcfg: QuantConfig, act: ActQuantConfig, info
) -> FlatQuantResult:
    """Freeze the transform; quantize W~ with primitives (exact codes, the learned clip)."""
    shift = None if params.shift_mode == "none" else params.shift.detach().clone()
    # copies, not views: the block stage keeps training these parameters in place after a
    # freeze, and a frozen result must stay the transform its codes were quantized under
    tf = LearnedTransform(
        params.p1.detach().clone(), params.p2.detach().clone(), params.log_s.exp().detach(), shift
    )
    w_t = tf.fold(weight)
    w_clip = params.weight_clip()
    w_clip = w_clip.detach() if isinstance(w_clip, torch.Tensor) else w_clip
    qp = compute_qparams(w_t, wcfg, clip_ratio=w_clip)
    codes = quantize(w_t, qp)
    clip = float(params.act_clip())
    act_out = ActQuantConfig(act.fmt, act.bits, act.granularity, clip) if act.fmt else act
    info = {**info, "act_clip": clip, "weight_clip_mean": float(torch.as_tensor(w_clip).mean())}
    result = QuantResult(dequantize(codes, qp), codes, qp, info=info)
    return FlatQuantResult(result, tf, act_out, info, _snapshot(params))


class TrainableTransformLinear(nn.Module):
    """A linear whose learned transform and clip ratios keep training (STE), started from a
    per-layer FlatQuantResult: the block-wise stage's stand-in for the frozen layer.

    forward(x) = Q_a(x~) Q_w(W~)^T + b with the float weight W [out, in] kept in the original
    basis; `freeze` quantizes W~ exactly as `learn_transform` does."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        start: FlatQuantResult,
        wcfg: QuantConfig,
        learn_clip: bool = True,
        weight_quant: WeightQuant = "int",
        shift: str | None = None,
    ) -> None:
        super().__init__()
        if shift is None:  # the start's own: a shifted start keeps its shift fixed
            shift = "none" if start.transform.shift is None else "mean"
        if (shift == "none") != (start.transform.shift is None):
            raise ConfigError(f"shift {shift!r} does not match the per-layer result it starts from")
        self.params = _Params.from_state(start.state, learn_clip, shift).to(weight.device)
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        base = start.act
        # the learned activation clip lives in params.a_clip; the config keeps only the format
        self.act = ActQuantConfig(base.fmt, base.bits, base.granularity) if base.fmt else base
        self.wcfg, self.weight_quant = wcfg, weight_quant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        y = quantized_output(self.params, self.weight, rows, self.wcfg, self.act, self.weight_quant)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], y.shape[-1]).to(x.dtype)

    def param_groups(self, lr: float, lr_clip: float) -> list[dict]:
        """Adam groups: the transform at `lr`, the clip ratios (if learned) at `lr_clip`."""
        p = self.params
        groups = [{"params": p.transform_groups(), "lr": lr}]
        if p.learn_clip:
            groups.append({"params": [p.w_clip, p.a_clip], "lr": lr_clip})
        return groups

    def freeze(self, info: dict[str, float] | None = None) -> FlatQuantResult:
        """The current parameters as a FlatQuantResult (exact weight codes)."""
        return _finish(self.params, self.weight, self.wcfg, self.act, info or {})
