"""Reconstruction: learn quantization parameters by gradient descent on a weighted loss.

GPTQ picks integer codes one column at a time against a layer-local, linearised loss. The
optimisation half of FAIR-Calib keeps GPTQ's (or RTN's) integer grid as the starting point and
then descends on a loss the caller defines over several layers at once (a block's output
error, or the whole model's output KL), with per-token weights:

    w_hat = scale0 * exp(gain) * clamp(round(c0 - z0 + offset), -z0, maxq - z0)

* `gain` [out, groups]: a multiplicative correction of each group's scale (Adam);
* `offset` [out, in] in [-0.5, 0.5]: a rounding offset that can move a code one step up or
  down (signed gradient descent, as AutoRound does: the sign step is robust to the tiny,
  noisy gradients that rounding variables receive);
* the zero point z0 stays the base method's integer, so the result is plain integer codes plus
  a per-group scale and zero: every packed format and kernel reads it unchanged.

Rounding passes gradients straight through (STE). At the end `LearnableQuantLinear.to_result`
freezes the parameters into a `QuantResult` whose weight is exactly `dequantize(codes, qparams)`.

`optimise` is the loop shared by every loss: linear learning-rate decay, and early stopping on
a held-out loss evaluated every few steps - the best state, the initialisation included, is
restored at the end, so reconstruction never returns parameters worse (on held-out rows) than
the ones it started from.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from faircalib import distributed
from faircalib.quant.primitives import (
    QParams,
    QuantResult,
    dequantize,
    quantize_activations_per_token,
)


def ste_round(x: torch.Tensor) -> torch.Tensor:
    """round(x) forward, identity backward."""
    return (x.round() - x).detach() + x


class LearnableQuantLinear(nn.Module):
    """A quantized linear layer whose scales (and optionally rounding) are trainable."""

    def __init__(
        self,
        result: QuantResult,
        bias: torch.Tensor | None,
        *,
        rounding: bool,
        scale_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.scale_dtype = scale_dtype  # scales live in this dtype (bf16 in packed checkpoints)
        self.store_dtype = result.weight.dtype  # the frozen layer's weight dtype (the model's)
        qp = result.qparams
        self.bits, self.group_size, self.symmetric = qp.bits, qp.group_size, qp.symmetric
        out_f, in_f = result.codes.shape
        self.out_features, self.in_features = out_f, in_f
        width = in_f if qp.group_size is None else qp.group_size
        self.groups, self.width = in_f // width, width
        device = result.weight.device
        zero = qp.zero.float().to(device)  # [out, G]
        q0 = result.codes.float().to(device).view(out_f, self.groups, width) - zero[..., None]
        self.register_buffer("q0", q0)  # [out, G, width] signed integer levels
        self.register_buffer("zero", zero)
        self.register_buffer("scale0", qp.scale.float().to(device))  # [out, G]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        scale = result.input_scale
        self.register_buffer("input_scale", None if scale is None else scale.detach().clone())
        self.act_bits = result.act_bits
        self.info = dict(result.info or {})
        self.gain = nn.Parameter(torch.zeros(out_f, self.groups, device=device))
        self.offset = nn.Parameter(torch.zeros_like(q0)) if rounding else None

    def levels(self) -> torch.Tensor:
        """[out, G, width] signed integer levels (float), differentiable in `offset`."""
        if self.offset is None:
            return self.q0
        maxq = 2**self.bits - 1
        low, high = -self.zero[..., None], maxq - self.zero[..., None]
        return torch.clamp(ste_round(self.q0 + self.offset), low, high)

    def scale(self) -> torch.Tensor:
        """[out, G]; rounded to `scale_dtype` in the forward pass (straight through), so the
        loss sees the scales a checkpoint will store."""
        scale = self.scale0 * torch.exp(self.gain)
        if self.scale_dtype is None:
            return scale
        return (scale.to(self.scale_dtype).float() - scale).detach() + scale

    def weight(self) -> torch.Tensor:
        """[out, in] dequantized weight."""
        w = self.levels() * self.scale()[..., None]
        return w.reshape(self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.act_bits is not None:
            x = quantize_activations_per_token(x, self.act_bits)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.weight().to(x.dtype), bias)

    def clamp_(self) -> None:
        """Keep offsets in [-0.5, 0.5]: a code moves at most one step from the base method's."""
        if self.offset is not None:
            with torch.no_grad():
                self.offset.clamp_(-0.5, 0.5)

    @torch.no_grad()
    def to_result(self) -> QuantResult:
        """Freeze into integer codes + qparams; the weight is exactly their dequantization
        (scales exactly representable in `scale_dtype` when one is set)."""
        maxq = 2**self.bits - 1
        scale = self.scale()
        codes = (self.levels() + self.zero[..., None]).round().clamp(0, maxq)
        codes = codes.reshape(self.out_features, self.in_features).to(torch.uint8)
        qp = QParams(scale, self.zero.clone(), self.bits, self.group_size, self.symmetric)
        moved = float((self.levels() != self.q0).float().mean()) if self.offset is not None else 0.0
        info = {
            **self.info,
            "recon_codes_moved": moved,
            "recon_mean_abs_gain": float(self.gain.abs().mean()),
        }
        return QuantResult(
            dequantize(codes, qp), codes, qp, self.input_scale, self.act_bits, info=info
        )


@dataclass
class OptimSettings:
    steps: int
    lr_scale: float
    lr_round: float
    eval_every: int
    progress: str | None = None  # a progress bar (stderr) with this name; None: silent


@dataclass
class OptimLog:
    """What one optimisation did: held-out loss at the start and at the best step."""

    initial_val: float
    best_val: float
    best_step: int
    steps: int
    train_first: float | None = None
    train_last: float | None = None
    val_curve: list[tuple[int, float]] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {
            "initial_val": self.initial_val,
            "best_val": self.best_val,
            "best_step": self.best_step,
            "steps": self.steps,
            "train_first": self.train_first,
            "train_last": self.train_last,
            "val_curve": self.val_curve,
        }


def optimise(
    layers: list[LearnableQuantLinear],
    train_loss: Callable[[int], torch.Tensor],
    val_loss: Callable[[], float],
    settings: OptimSettings,
) -> OptimLog:
    """Minimise `train_loss(step)` over the layers' gains (Adam) and offsets (signed gradient),
    both with linearly decaying learning rates; restore the parameters of the step with the
    lowest `val_loss()` (checked every `eval_every` steps and at the end; step 0 included)."""
    gains = [layer.gain for layer in layers]
    offsets = [layer.offset for layer in layers if layer.offset is not None]
    adam = torch.optim.Adam(gains, lr=settings.lr_scale) if settings.lr_scale > 0 else None
    best = OptimLog(val_loss(), 0.0, 0, settings.steps)
    best.best_val = best.initial_val
    best.val_curve.append((0, best.initial_val))
    snapshot = [p.detach().clone() for p in gains + offsets]
    steps = tqdm(
        range(1, settings.steps + 1),
        desc=settings.progress,
        disable=settings.progress is None or not distributed.is_main(),
        file=sys.stderr,
    )
    for step in steps:
        decay = 1.0 - (step - 1) / settings.steps
        loss = train_loss(step)
        for p in gains + offsets:
            p.grad = None
        loss.backward()
        # torchrun: each rank's loss is its share of the global one (calib.recon), so summed
        # gradients and values are the global ones; one process: no-ops
        distributed.all_reduce_grads(gains + offsets)
        if step in (1, settings.steps):  # two host syncs per run, not one per step
            value = distributed.sum_float(float(loss.detach()))
            best.train_first = value if best.train_first is None else best.train_first
            best.train_last = value
        if adam is not None:
            for group in adam.param_groups:
                group["lr"] = settings.lr_scale * decay
            adam.step()
        with torch.no_grad():
            for p in offsets:
                if p.grad is not None:
                    p -= settings.lr_round * decay * p.grad.sign()
        for layer in layers:
            layer.clamp_()
        if step % settings.eval_every == 0 or step == settings.steps:
            val = val_loss()
            best.val_curve.append((step, val))
            if val < best.best_val:
                best.best_val, best.best_step = val, step
                snapshot = [p.detach().clone() for p in gains + offsets]
    with torch.no_grad():
        for p, saved in zip(gains + offsets, snapshot, strict=True):
            p.copy_(saved)
    # every rank took the same steps on the same summed gradients; rank 0's values make the
    # ranks' models identical even if a backend's reduction differed in the last bit
    distributed.broadcast_params(gains + offsets)
    return best


def weighted_mse(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """sum_r w_r ||out_r - target_r||^2 / sum_r w_r over rows (all but the last dim)."""
    num, den = weighted_sq_sums(out, target, weights)
    return num / den.clamp(min=1e-12)


def weighted_sq_sums(
    out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_r w_r ||out_r - target_r||^2, sum_r w_r): `weighted_mse`'s numerator and
    denominator, for losses whose denominator is summed over ranks."""
    err = ((out.float() - target.float()) ** 2).sum(-1)  # [...]
    return (err * weights).sum(), weights.sum()
