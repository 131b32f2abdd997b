"""Elementwise chains compiled into one kernel on CUDA; plain eager code everywhere else.

A chain like RMSNorm's (cast, square, mean, rsqrt, multiply, cast, scale) runs as one kernel
per op in eager PyTorch, each reading and writing the whole activation; on a 1024-token LLaDA
step those passes cost as much as a third of the block (benchmarks/results/e2e/).
torch.compile fuses such a chain into one Triton kernel. Both the quantized kernels
(kernels/backends.py) and the model blocks (models/llama_like.py) use this one helper, so the
fallback rules live in one place: the CPU always runs eager (calibration stays bit-exact and
deterministic there), and FAIRCALIB_NO_COMPILE=1 or a compiler failure falls back to eager.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_compiled: dict[Callable, Callable] = {}
_compile_failed: set[Callable] = set()
_eager_depth = [0]  # > 0 inside `eager()`


@contextmanager
def eager() -> Iterator[None]:
    """Within this block every `fused` lookup returns the eager function (benchmarks time the
    unfused model beside the fused one; a CUDA graph captured inside keeps eager kernels)."""
    _eager_depth[0] += 1
    try:
        yield
    finally:
        _eager_depth[0] -= 1


def fused(
    fn: Callable[..., torch.Tensor], device_type: str, dynamic: bool | None = None
) -> Callable[..., torch.Tensor]:
    """`fn` compiled by torch.compile into fused kernels on CUDA, where a chain of eager
    elementwise ops and reductions would each read and write the whole tensor; eager on other
    devices, where compilation is unavailable or failed, or with FAIRCALIB_NO_COMPILE=1.
    `dynamic`: torch.compile's flag (None: specialise, then generalise shapes that change)."""
    if (
        device_type != "cuda"
        or fn in _compile_failed
        or _eager_depth[0]
        or os.environ.get("FAIRCALIB_NO_COMPILE")
    ):
        return fn
    if fn not in _compiled:
        compiled = torch.compile(fn, dynamic=dynamic)

        def guarded(*args: object) -> torch.Tensor:
            try:
                return compiled(*args)
            except torch.cuda.OutOfMemoryError:
                raise  # not a compiler failure: eager would not fit either
            except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
                _compile_failed.add(fn)
                _compiled[fn] = fn
                warnings.warn(f"torch.compile of {fn.__name__} failed ({exc}); eager", stacklevel=2)
                return fn(*args)

        _compiled[fn] = guarded
    return _compiled[fn]


def fused_for_inference(fn: Callable[..., torch.Tensor], *tensors: torch.Tensor) -> Callable:
    """`fused(fn)` where nothing needs a gradient (generation, evaluation, calibration's
    forward passes), else `fn` itself: a compiled graph with autograd would recompile for the
    backward and hold its own saved tensors, for a layer that is trained or optimised."""
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return fn
    return fused(fn, tensors[0].device.type)
