"""Quantize an activation once for all the layers of a block that read it.

Why: a transformer block feeds one input to several projections (q, k and v; gate and up).
With per-token 8-bit activations, each of those layers used to quantize the same rows again. At
a LLaDA block, that is 7 activation passes where 4 suffice; each pass reads the 16-bit rows,
writes the 8-bit ones and is a kernel of its own in a CUDA graph.

`share_activations(blocks)` hooks each block so that a scope is open while its forward runs.
Inside a scope, `quantize_once(kind, x, quantize)` returns the first result computed for the same
rows. "The same rows" means the same device, dtype, address (storage and offset), shape, strides
and version counter, so an in-place write in between makes a miss.
- The scope keeps a reference to every input it saw, so that memory cannot be reused for another
  tensor while the scope lasts.
- The scope closes when the forward returns or raises. Outside a scope nothing is remembered.
- Inputs that need a gradient are never shared.
- A CUDA graph captured around a block records the first layer's quantization kernel and the
  other layers reading its output, so every replay recomputes it first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextvars import ContextVar
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")

_SCOPE: ContextVar[dict | None] = ContextVar("faircalib_shared_activations", default=None)
_MARK = "_faircalib_shares_activations"


def quantize_once(kind: str, x: torch.Tensor, quantize: Callable[[torch.Tensor], T]) -> T:
    """`quantize(x)`, or, inside a block's scope, the result already computed for the same
    rows by the same `kind` of quantization (a name for `quantize`'s grid)."""
    memo = _SCOPE.get()
    if memo is None or (x.requires_grad and torch.is_grad_enabled()):
        return quantize(x)
    key = (kind, x.device, x.dtype, x.data_ptr(), tuple(x.shape), x.stride(), x._version)
    if key not in memo:
        memo[key] = (x, quantize(x))  # x kept alive: its address names these rows alone
    return memo[key][1]


def share_activations(blocks: Iterable[nn.Module]) -> int:
    """Hook every block (once) so that its forward runs inside a sharing scope. Returns how
    many blocks were newly hooked."""
    hooked = 0
    for block in blocks:
        if getattr(block, _MARK, False):
            continue
        tokens: list[Any] = []  # one per forward in flight (a block may be re-entered)

        def enter(module: nn.Module, args: Any, tokens: list[Any] = tokens) -> None:
            tokens.append(_SCOPE.set({}))

        def leave(module: nn.Module, args: Any, output: Any, tokens: list[Any] = tokens) -> None:
            if tokens:
                _SCOPE.reset(tokens.pop())

        block.register_forward_pre_hook(enter)
        block.register_forward_hook(leave, always_call=True)  # also when forward raises
        setattr(block, _MARK, True)
        hooked += 1
    return hooked
