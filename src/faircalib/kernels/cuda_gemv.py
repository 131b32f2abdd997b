"""INT4 group-wise weights x bf16 activations for 1-8 token rows: our CUDA GEMV
(csrc/w4a16_gemv.cu), loaded like the CUTLASS libraries (kernels/cutlass_lib: built once by
`faircalib build-kernels`, plain C ABI, ctypes).

Why: at M = 1 a W4A16 layer only has to read its weights. torch's int4 kernel and our Triton GEMV
read them at 1.2-1.6 TB/s on an H200 (benchmarks/results/kernels), where issue 16's 2.5x of
bf16 needs about 2.1 TB/s. The kernel reads QuantLinear's packing as it is (no relayout) and turns
a code into 1 + q / 16 with two integer ops (`one_plus_q16_reference` is that algebra in torch).
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from faircalib.kernels import cutlass_lib

NAME = "w4a16_gemv"  # csrc/w4a16_gemv.cu
CHUNK = 32  # codes a thread loads at once: K and the group must be multiples of it
MAX_M = 8
ROWS_PER_BLOCK = 16  # 4 warps x 4 weight rows (the kernel's kWarps x kRows)


def load_library() -> ctypes.CDLL:
    """The GEMV library (cutlass_lib.load), its C signatures declared; one built from another
    version of the source (a stale $FAIRCALIB_CUTLASS_DIR) is refused."""
    lib = cutlass_lib.load(NAME)
    cutlass_lib.check_version(NAME, lib.fc_w4a16_gemv_rows_per_block(), ROWS_PER_BLOCK)
    lib.fc_w4a16_gemv.argtypes = [*[ctypes.c_void_p] * 5, *[ctypes.c_int] * 5]
    lib.fc_w4a16_gemv.argtypes += [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.fc_w4a16_gemv_workspace.argtypes = [ctypes.c_int] * 3
    lib.fc_w4a16_gemv_workspace.restype = ctypes.c_size_t
    lib.fc_w4a16_gemv_error.restype = ctypes.c_char_p
    return lib


def check_shape(in_features: int, group: int) -> None:
    """ValueError naming what the kernel cannot take."""
    if in_features % CHUNK or group % CHUNK or in_features % group:
        raise ValueError(
            f"the CUDA GEMV needs in_features and the group size to be multiples of {CHUNK}, "
            f"the group dividing in_features (in_features {in_features}, group {group})"
        )


def splits_for(n: int, k: int, sm_count: int) -> int:
    """How many parts K is split into: enough blocks for two per SM, each lane of a warp still
    with a chunk of its own (a split holds at least 32 chunks)."""
    blocks = -(-n // ROWS_PER_BLOCK)
    want = -(-2 * sm_count // blocks)
    return max(1, min(want, k // (CHUNK * 32)))


@dataclass
class GemvWeight:
    """A layer's operands as the kernel reads them."""

    qweight: torch.Tensor  # [out, in / 2] uint8, QuantLinear's packing
    scale: torch.Tensor  # [out, groups] float32
    zero: torch.Tensor  # [out, groups] float32
    group: int

    @classmethod
    def prepare(
        cls, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
    ) -> GemvWeight:
        check_shape(qweight.shape[1] * 2, group)
        return cls(
            qweight.contiguous(), scale.float().contiguous(), zero.float().contiguous(), group
        )

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2


def one_plus_q16_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
) -> torch.Tensor:
    """The kernel's algebra in float32 torch: per 32-code chunk a = sum x (1 + q / 16) with the
    code as the float whose top mantissa bits it is, xs = sum x, and the group's term
    16 scale a - scale (16 + zero) xs. [m, k] x -> [m, n] float32."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    low, high = (qweight & 0xF).int(), (qweight >> 4).int()
    codes = torch.stack([low, high], dim=-1).reshape(n, k)  # even column in the low nibble
    one_plus = ((codes << 19) | 0x3F800000).view(torch.float32)  # exactly 1 + q / 16
    xf = x.float()
    a = torch.einsum("mcj,ncj->mnc", xf.view(-1, k // CHUNK, CHUNK), one_plus.view(n, -1, CHUNK))
    xs = xf.view(-1, k // CHUNK, CHUNK).sum(-1)  # [m, chunks]
    per_chunk_group = torch.arange(k // CHUNK) * CHUNK // group
    s = scale.float()[:, per_chunk_group]  # [n, chunks]
    z = zero.float()[:, per_chunk_group]
    return (16 * s * a - (s * (16 + z)) * xs[:, None, :]).sum(-1)


def w4a16_gemv(x: torch.Tensor, weight: GemvWeight) -> torch.Tensor:
    """x [..., in] bf16 (at most 8 rows) @ W^T -> [..., out] bf16, on the current stream
    (graph-capturable once a call of the size ran eagerly: the workspace is made then)."""
    m = x.numel() // x.shape[-1] if x.dim() else 0
    if (
        x.dtype != torch.bfloat16
        or x.device.type != "cuda"
        or x.shape[-1] != weight.in_features
        or not 1 <= m <= MAX_M
    ):
        raise ValueError(
            f"the CUDA GEMV takes 1 to {MAX_M} bf16 CUDA rows of width {weight.in_features} "
            f"(got {m} {x.dtype} rows of width {x.shape[-1] if x.dim() else 0} on {x.device})"
        )
    x2 = x.reshape(m, weight.in_features).contiguous()
    if x2.data_ptr() % 16 or weight.qweight.data_ptr() % 16:  # the kernel's 16-byte loads
        x2, weight.qweight = x2.clone(), weight.qweight.clone()
    lib = load_library()
    n, k = weight.out_features, weight.in_features
    splits = splits_for(n, k, cutlass_lib.sm_count(x.device))
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        space = cutlass_lib.workspace(x.device, lib.fc_w4a16_gemv_workspace(m, n, splits))
        status = lib.fc_w4a16_gemv(
            x2.data_ptr(), weight.qweight.data_ptr(), weight.scale.data_ptr(),
            weight.zero.data_ptr(), out.data_ptr(), m, n, k, weight.group, splits,
            space.data_ptr(), space.numel(), stream,
        )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CUDA W4A16 GEMV: {lib.fc_w4a16_gemv_error().decode()}")
    return out.reshape(*x.shape[:-1], n)
