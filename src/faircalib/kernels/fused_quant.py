"""The ops that write a block's 8-bit-quantized inputs, fused with that quantization.

Why: with per-token 8-bit activations, the RMSNorm before q, k, v (gate, up) writes its output,
and a second kernel reads it back to quantize it; the same for SwiGLU's output before the down
projection, at the MLP's width. One kernel can do both (`triton_w8a8.rms_norm_quantize_rows`,
`swiglu_quantize_rows`): the output is still written for any other reader, the 8-bit rows and
their scales come from the same pass over the inputs.

How it is wired, without the kernels knowing the model: a model module that computes one of
these ops says so with a class attribute `fusable_op` ("rms_norm": `weight` and `eps`
attributes, y = weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype); "swiglu":
forward(gate, up) = silu(gate) * up). `fuse_activation_quantization(blocks)` swaps those modules
for the ones below (the same parameters, so the same state-dict keys). Inside a block's
sharing scope (`shared_activations`), such a module watches its output: the kinds its readers
ask `quantize_once` for are learned per input shape on the first call, and later calls compute
the first of them in the fused kernel and hand it over with `share_result`. Outside a scope, with
a gradient, without Triton on the device, or before a kind is learned, the op runs as before
(compiled by `fusion` on CUDA). The readers' results are the same bits either way: q and s are
`quantize_rows(y)` of the y returned.

The contract's one rule beyond the math: nothing writes the op's output in place before its
readers quantize it. Without the fusion, a reader quantized what it found; with it, q and s are
made with y, and under inference_mode (generation) a tensor has no version counter that would
reveal a later write. No faircalib block writes these outputs in place.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.nn import functional as F

from faircalib.fusion import fused_for_inference
from faircalib.kernels.shared_activations import in_scope, share_result, watch

FUSED_KINDS = ("fp8", "int8")  # the row quantizers' kinds (`triton_w8a8.quantize_rows`)
_COMPILED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_INTERPRETED_DTYPES = (torch.float16, torch.float32)  # the Triton interpreter has no bfloat16


def _triton_runs_on(inputs: tuple[torch.Tensor, ...]) -> bool:
    """Whether the fused kernels can take these inputs: on CUDA (or the CPU interpreter),
    one device, dtypes the kernels (or the interpreter) handle."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    device = inputs[0].device
    if not (device.type == "cuda" or interpreted) or any(t.device != device for t in inputs):
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    dtypes = _INTERPRETED_DTYPES if interpreted else _COMPILED_DTYPES
    return all(t.dtype in dtypes for t in inputs)


class _FusedProducer(nn.Module):
    """Runs `plain` or, once its readers' kind is learned, `fused(kind) -> (y, q, s)`."""

    def __init__(self) -> None:
        super().__init__()
        self._kinds: dict[tuple, set[str]] = {}  # (device, dtype, shape) -> kinds asked of y

    def _produce(
        self,
        inputs: tuple[torch.Tensor, ...],
        plain: Callable[[], torch.Tensor],
        fused: Callable[[str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    ) -> torch.Tensor:
        x = inputs[0]
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in inputs)
        if needs_grad or not in_scope() or not self._fits(*inputs) or not _triton_runs_on(inputs):
            return plain()
        wanted = self._kinds.setdefault((x.device, x.dtype, tuple(x.shape)), set())
        kind = next((k for k in FUSED_KINDS if k in wanted), None)
        if kind is None:
            y = plain()
        else:
            y, q, s = fused(kind)
            share_result(kind, y.reshape(-1, y.shape[-1]), (q, s))
        watch(y.reshape(-1, y.shape[-1]), wanted)  # as the readers' linears reshape it
        return y

    def _fits(self, *inputs: torch.Tensor) -> bool:
        """Whether the fused kernel computes this call (else the plain op, which broadcasts)."""
        return True


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The "rms_norm" fusable op's contract (normalise in float32, cast back, then scale)."""
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The "swiglu" fusable op's contract."""
    return F.silu(gate) * up


class QuantizingRMSNorm(_FusedProducer):
    """An RMSNorm whose output's 8-bit rows come from the norm's own kernel."""

    def __init__(self, weight: nn.Parameter, eps: float) -> None:
        super().__init__()
        self.weight = weight  # the swapped module's own parameter: the same state-dict key
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from faircalib.kernels.triton_w8a8 import rms_norm_quantize_rows  # imports triton

        return self._produce(
            (x, self.weight),
            lambda: fused_for_inference(rms_norm, x, self.weight)(x, self.weight, self.eps),
            lambda kind: rms_norm_quantize_rows(x, self.weight, self.eps, kind),
        )

    def _fits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        return weight.dim() == 1 and x.dim() >= 1 and weight.shape[0] == x.shape[-1]

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, fused 8-bit output"


class QuantizingSwiGLU(_FusedProducer):
    """silu(gate) * up whose output's 8-bit rows come from the same kernel."""

    def _fits(self, gate: torch.Tensor, up: torch.Tensor) -> bool:
        return gate.dim() >= 1 and gate.shape == up.shape and gate.dtype == up.dtype

    def forward(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        from faircalib.kernels.triton_w8a8 import swiglu_quantize_rows  # imports triton

        return self._produce(
            (gate, up),
            lambda: fused_for_inference(swiglu, gate, up)(gate, up),
            lambda kind: swiglu_quantize_rows(gate, up, kind),
        )


def _replacement(module: nn.Module) -> nn.Module | None:
    op = getattr(type(module), "fusable_op", None)
    if op == "rms_norm":
        return QuantizingRMSNorm(module.weight, float(module.eps))
    if op == "swiglu":
        return QuantizingSwiGLU()
    return None


def fuse_activation_quantization(blocks: Iterable[nn.Module]) -> int:
    """Swap every module inside `blocks` that declares a `fusable_op` for its quantizing form.
    Returns how many were swapped."""
    swapped = 0
    for block in blocks:
        for name, module in list(block.named_modules()):
            new = _replacement(module)
            if new is None or not name:
                continue
            new.train(module.training)
            parent, _, child = name.rpartition(".")
            setattr(block.get_submodule(parent), child, new)
            swapped += 1
    return swapped
