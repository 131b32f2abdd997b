"""Quantize an activation once for all the layers of a block that read it.

Why: a transformer block feeds one input to several projections (q, k and v; gate and up).
With per-token 8-bit activations, each of those layers used to quantize the same rows again. At
a LLaDA block, that is 7 activation passes where 4 suffice; each pass reads the 16-bit rows,
writes the 8-bit ones and is a kernel of its own in a CUDA graph.

`share_activations(blocks)` hooks each block so that a scope is open while its forward runs.
Inside a scope, `quantize_once(kind, x, quantize)` returns the first result computed for the same
rows. "The same rows" means the same tensor object (or view base: the layers reshape their
input), address, shape, strides, dtype and version counter, so an in-place write in between
makes a miss.
- The scope holds its inputs weakly: an input freed mid-block (the attention output after
  o_proj) takes its entry with it, so nothing lives longer than without the scope.
- Inference-mode tensors (generation) have no version counter and no view tracking. The scope
  holds those until the block returns, so their addresses cannot be reused within it, and
  sharing relies on the block not writing an input in place between two linears that read
  it; no faircalib block does.
- The scope closes when the forward returns or raises. Outside a scope nothing is remembered.
- Inputs that need a gradient are never shared.
- A CUDA graph captured around a block records the first layer's quantization kernel and the
  other layers reading its output, so every replay recomputes it first.
- The ops that write such an input (a block's RMSNorms, its SwiGLU) can compute the
  quantization in the same kernel (`kernels.fused_quant`): they `watch` their output, learn
  from the misses which kinds its readers ask for, and from the next call on hand those in
  with `share_result`.
- The block K/V cache's steps (`frontier.cache`) call `block.forward_cached` directly, outside
  the module hooks: those steps quantize as before, once per layer.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

T = TypeVar("T")


@dataclass
class _Scope:
    owner: nn.Module  # the block whose forward opened it
    parent: _Scope | None  # the scope it hides (a block inside another block)
    memo: dict = field(default_factory=dict)  # key -> (weakref to the input's base, result)
    watched: dict = field(default_factory=dict)  # rows' key without kind -> kinds asked of them


_SCOPE: ContextVar[_Scope | None] = ContextVar("faircalib_shared_activations", default=None)
_MARK = "_faircalib_shares_activations"


def quantize_once(kind: str, x: torch.Tensor, quantize: Callable[[torch.Tensor], T]) -> T:
    """`quantize(x)`, or, inside a block's scope, the result already computed for the same
    rows by the same `kind` of quantization (a name for `quantize`'s grid)."""
    scope = _SCOPE.get()
    if scope is None or (x.requires_grad and torch.is_grad_enabled()):
        return quantize(x)
    rows, holder, base = rows_identity(x)
    hit = scope.memo.get((kind, *rows))
    if hit is not None and (base is None or hit[0]() is base):
        return hit[1]
    dead = [k for k, (h, _) in scope.memo.items() if isinstance(h, weakref.ref) and h() is None]
    for stale in dead:
        del scope.memo[stale]  # its input was freed: so is the result
    if rows in scope.watched:
        scope.watched[rows].add(kind)
    result = quantize(x)
    scope.memo[(kind, *rows)] = (holder, result)
    return result


def rows_identity(x: torch.Tensor) -> tuple[tuple, Any, torch.Tensor | None]:
    """(key of x's rows, what to hold them by, their view base), the rule by which readers of
    one input recognise it: the same tensor (or view base: the layers reshape their input),
    address, shape, strides, dtype and version counter. Inference-mode tensors have no
    version counter and no view tracking: they are held (their address stays theirs while
    held) and the key alone identifies them."""
    if x.is_inference():
        version, holder, base = -1, x, None
    else:
        base = x if x._base is None else x._base
        version, holder = x._version, weakref.ref(base)
    return (x.device, x.dtype, x.data_ptr(), tuple(x.shape), x.stride(), version), holder, base


def in_scope() -> bool:
    """Whether a block's sharing scope is open (its forward is running)."""
    return _SCOPE.get() is not None


def share_result(kind: str, x: torch.Tensor, result: Any) -> None:
    """Inside a scope, make `result` what `quantize_once(kind, x, ...)` returns for these rows
    (a producer that computed it in the same kernel as x). The caller vouches that it is."""
    quantize_once(kind, x, lambda _: result)


def watch(x: torch.Tensor, kinds: set[str]) -> None:
    """Inside a scope, add to `kinds` every kind that `quantize_once` is asked to compute for
    these rows (x as its callers pass it) from now until the scope closes."""
    scope = _SCOPE.get()
    if scope is not None:
        scope.watched[rows_identity(x)[0]] = kinds


def _enter(module: nn.Module, args: Any) -> None:
    _SCOPE.set(_Scope(module, _SCOPE.get()))


def _leave(module: nn.Module, args: Any, output: Any) -> None:
    scope = _SCOPE.get()
    if scope is not None and scope.owner is module:  # not if its pre-hook never ran
        _SCOPE.set(scope.parent)


def share_activations(blocks: Iterable[nn.Module], fuse: bool = True) -> int:
    """Hook every block (once) so that its forward runs inside a sharing scope, and with `fuse`
    swap the ops that write the shared inputs for ones that quantize in the same kernel
    (`kernels.fused_quant.fuse_activation_quantization`). Returns how many blocks were newly
    hooked."""
    blocks = list(blocks)
    if fuse:
        from faircalib.kernels.fused_quant import fuse_activation_quantization

        fuse_activation_quantization(blocks)
    hooked = 0
    for block in blocks:
        if getattr(block, _MARK, False):
            continue
        block.register_forward_pre_hook(_enter)
        block.register_forward_hook(_leave, always_call=True)  # also when forward raises
        setattr(block, _MARK, True)
        hooked += 1
    return hooked
