"""INT4 group-wise weights x bf16 activations on Hopper through CUTLASS's mixed-input GEMM.

Why CUTLASS: the W4A16 target at M >= 256 needs the dequantization overlapped with the MMA.
Triton 3.6 on sm_90 feeds a dequantized tile back through shared memory (our fused GEMM runs
0.23-0.49x of bf16 there), while CUTLASS's mixed-input collective converts the INT4 operand in
registers and issues register-sourced wgmma (`csrc/w4a16_sm90.cu`).

The library is built and loaded by `cutlass_lib` (nvcc, the `nvidia-cutlass` wheel's headers,
a cache; ctypes over raw device pointers).

The math: QuantLinear's W = scale * (code - zero) with unsigned codes is written as
scale * (code - 8) + scale * (8 - zero): the codes XOR 8 are CUTLASS's signed int4 with the same
nibble order, and the kernel's per-group zero term is scale * (8 - zero), rounded to bf16 once.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from faircalib.kernels import cutlass_lib

NAME = "w4a16_sm90"  # csrc/w4a16_sm90.cu
GROUP_MULTIPLE = 64  # CUTLASS's K tile for bf16: a group must hold whole tiles
# the library's configurations (csrc/w4a16_sm90.cu): index by token tile, all shuffled
TOKEN_TILE_CONFIG = {32: 2, 64: 1, 128: 0, 256: 3}
UNSHUFFLED_CONFIG = 4


def load_library(build: bool = True) -> ctypes.CDLL:
    """The W4A16 library (cutlass_lib.load), its C signatures declared."""
    lib = cutlass_lib.load(NAME, build)
    lib.fc_w4a16_sm90_gemm.argtypes = [ctypes.c_int, *[ctypes.c_void_p] * 5, *[ctypes.c_int] * 4]
    lib.fc_w4a16_sm90_gemm.argtypes += [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.fc_w4a16_sm90_workspace.argtypes = [ctypes.c_int] * 5
    lib.fc_w4a16_sm90_workspace.restype = ctypes.c_size_t
    lib.fc_w4a16_sm90_reorder.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.fc_w4a16_sm90_reorder.argtypes += [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    lib.fc_w4a16_sm90_error.restype = ctypes.c_char_p
    lib.fc_w4a16_sm90_config_name.restype = ctypes.c_char_p
    return lib


def config_for(m: int) -> int:
    """The configuration for M token rows: the smallest token tile that holds them (up to 256)."""
    return next((c for tile, c in TOKEN_TILE_CONFIG.items() if m <= tile), TOKEN_TILE_CONFIG[256])


# --- the weight in the kernel's layout -------------------------------------------------------------
def signed_int4(qweight: torch.Tensor) -> torch.Tensor:
    """QuantLinear's packed unsigned codes ([out, in/2] uint8, even column in the low nibble)
    -> CUTLASS int4b_t bytes of code - 8 (the same nibble order: XOR 8 in each nibble)."""
    return qweight ^ 0x88


def group_terms(
    scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype = torch.bfloat16
) -> tuple[torch.Tensor, torch.Tensor]:
    """[out, groups] scale and integer zero -> the kernel's N-major [groups, out] scale and
    zero term scale * (8 - zero), each rounded to `dtype` once."""
    s = scale.float()
    term = s * (8.0 - zero.float())
    return s.to(dtype).t().contiguous(), term.to(dtype).t().contiguous()


def reference_weight(
    int4: torch.Tensor, scale_t: torch.Tensor, zero_t: torch.Tensor, group: int
) -> torch.Tensor:
    """[out, in] float64 weight the kernel's operands stand for: scale * q + zero term, q the
    signed nibbles (what the GEMM multiplies, before its own bf16 rounding)."""
    low = (int4 & 0xF).to(torch.int16)
    high = (int4 >> 4).to(torch.int16)
    q = torch.stack((low, high), dim=-1).reshape(int4.shape[0], -1)
    q = torch.where(q >= 8, q - 16, q).double()
    s = scale_t.t().double().repeat_interleave(group, dim=1)
    z = zero_t.t().double().repeat_interleave(group, dim=1)
    return s * q + z


@dataclass
class CutlassW4Weight:
    """One layer's weight in the kernel's layouts (prepared once, on the GPU)."""

    int4: torch.Tensor  # [out, in/2] int4b_t bytes, shuffled for the shuffled configs
    plain: torch.Tensor | None  # the unshuffled bytes, kept only when asked for
    scale: torch.Tensor  # [groups, out] bf16
    zero: torch.Tensor  # [groups, out] bf16
    out_features: int
    in_features: int
    group: int

    @classmethod
    def prepare(
        cls,
        qweight: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        group: int,
        keep_plain: bool = False,
    ) -> CutlassW4Weight:
        out_f, in_f = qweight.shape[0], qweight.shape[1] * 2
        check_shape(out_f, in_f, group)
        plain = signed_int4(qweight).contiguous()
        shuffled = torch.empty_like(plain)
        lib = load_library()
        status = lib.fc_w4a16_sm90_reorder(plain.data_ptr(), shuffled.data_ptr(), out_f, in_f, None)
        if status != 0:
            raise RuntimeError(f"CUTLASS reorder failed: {lib.fc_w4a16_sm90_error().decode()}")
        s, z = group_terms(scale, zero)
        return cls(shuffled, plain if keep_plain else None, s, z, out_f, in_f, group)


def check_shape(out_features: int, in_features: int, group: int) -> None:
    """ValueError naming what the kernel cannot take (TMA's 16-byte rows, whole K tiles)."""
    if group % GROUP_MULTIPLE or in_features % group:
        raise ValueError(
            f"the CUTLASS W4A16 kernel needs groups of a multiple of {GROUP_MULTIPLE} that "
            f"divide in_features (group {group}, in_features {in_features})"
        )
    if out_features % 8:
        raise ValueError(f"the CUTLASS W4A16 kernel needs out_features % 8 == 0 ({out_features})")


def w4a16_gemm(x: torch.Tensor, weight: CutlassW4Weight, config: int | None = None) -> torch.Tensor:
    """x [..., in] bf16 @ W^T -> [..., out] bf16 on the current stream (graph-capturable: the
    workspace is allocated before capture on first use of a size)."""
    if x.dtype != torch.bfloat16 or x.device.type != "cuda" or x.shape[-1] != weight.in_features:
        raise ValueError(
            f"the CUTLASS W4A16 GEMM takes bf16 CUDA activations of width {weight.in_features} "
            f"(got {x.dtype} on {x.device}, width {x.shape[-1]})"
        )
    lib = load_library()
    x2 = x.reshape(-1, weight.in_features).contiguous()
    m = x2.shape[0]
    config = config_for(m) if config is None else config
    w = weight.plain if config == UNSHUFFLED_CONFIG else weight.int4
    if w is None:
        raise ValueError("the unshuffled configuration needs CutlassW4Weight(keep_plain=True)")
    out = torch.empty(m, weight.out_features, device=x.device, dtype=torch.bfloat16)
    n, k, g = weight.out_features, weight.in_features, weight.group
    space = cutlass_lib.workspace(x.device, lib.fc_w4a16_sm90_workspace(config, m, n, k, g))
    stream = torch.cuda.current_stream(x.device).cuda_stream
    status = lib.fc_w4a16_sm90_gemm(
        config, x2.data_ptr(), w.data_ptr(), weight.scale.data_ptr(), weight.zero.data_ptr(),
        out.data_ptr(), m, n, k, g, space.data_ptr(), space.numel(), stream,
    )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CUTLASS W4A16 GEMM: {lib.fc_w4a16_sm90_error().decode()}")
    return out.reshape(*x.shape[:-1], n)
