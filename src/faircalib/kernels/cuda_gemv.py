"""INT4 group-wise weights x bf16 activations for 1-8 token rows: our tensor-core GEMV
(csrc/w4a16_gemv.cu), loaded like the CUTLASS libraries (kernels/cutlass_lib: built once by
`faircalib build-kernels`, plain C ABI, ctypes).

Why: at M = 1 a W4A16 layer only has to read its weights. torch's int4 kernel, our Triton GEMV
and a CUDA-core GEMV read them at 1.2-1.7 TB/s on an H200 (benchmarks/results/kernels and
cuda-gemv-v1), where issue 16's 2.5x of bf16 needs about 2.3 TB/s. The kernel reads QuantLinear's
packing as it is (no relayout), turns two codes into the bf16 pair (128 + q, 128 + q') with one
LOP3 and lets an mma.sync sum them against the activations, the tokens being the mma's N = 8.
`fragment_reference` is that arithmetic emulated register by register in float64.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from faircalib.kernels import cutlass_lib

NAME = "w4a16_gemv"  # csrc/w4a16_gemv.cu
VERSION = 5  # the kernel's kVersion: bf16 scales, uint8 zeros, L2 prefetch, the cp.async ring
STEP = 128  # K columns a warp takes at once: K and the group must be multiples of it
# warps a block, each on its own part of the block's K: 8 (4 ran 1.00-2.00x of bf16 at M = 1
# where 8 ran 1.66-2.09x, benchmarks/results/cuda-gemv-warps; the deep layers lost most)
WARPS = 8
# the code loads ask L2 for the 256-byte block around them (csrc/w4a16_gemv.cu, load_codes)
# when each warp walks at least this many steps of K (prefetch_for)
PREFETCH_MIN_STEPS = 8
TILE_ROWS = 16  # weight rows an mma covers
# depths of the cp.async ring the library is built with (0: the register path)
RING_STAGES = (0, 4, 6)
MAX_M = 8


def load_library() -> ctypes.CDLL:
    """The GEMV library (cutlass_lib.load), its C signatures declared; one built from another
    version of the source (a stale $FAIRCALIB_CUTLASS_DIR) is refused."""
    lib = cutlass_lib.load(NAME)
    version = getattr(lib, "fc_w4a16_gemv_version", None)
    cutlass_lib.check_version(NAME, version() if version is not None else 1, VERSION)
    lib.fc_w4a16_gemv.argtypes = [*[ctypes.c_void_p] * 5, *[ctypes.c_int] * 9]
    lib.fc_w4a16_gemv.argtypes += [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.fc_w4a16_gemv_workspace.argtypes = [ctypes.c_int] * 3
    lib.fc_w4a16_gemv_workspace.restype = ctypes.c_size_t
    lib.fc_w4a16_gemv_error.restype = ctypes.c_char_p
    return lib


def check_shape(in_features: int, group: int) -> None:
    """ValueError naming what the kernel cannot take."""
    if in_features % STEP or group % STEP or in_features % group:
        raise ValueError(
            f"the CUDA GEMV needs in_features and the group size to be multiples of {STEP}, "
            f"the group dividing in_features (in_features {in_features}, group {group})"
        )


def tiles_for(n: int, sm_count: int) -> int:
    """16-row tiles a warp takes: two (each activation register feeds two mma) unless that
    leaves fewer blocks than half the SMs. On the H200 two tiles were the faster on all seven
    large 8B shapes at M = 1 and 8, 4096 x 4096's 128 blocks included (1.90x of bf16 against
    1.82x at M = 1); Dream's 512-wide K / V ran 1.32x on one tile and 1.18x on two
    (benchmarks/results/cuda-gemv-tiles)."""
    return 2 if -(-n // (2 * TILE_ROWS)) >= sm_count // 2 else 1


def splits_for(n: int, k: int, sm_count: int, tiles: int) -> int:
    """How many parts K is split into across blocks: none unless the layer has fewer blocks
    than half the SMs, then enough for one a SM, each warp of a block still with a step of its
    own. A split costs a second kernel and a float round trip: two splits took 4096 x 4096 at
    M = 1 from 1.82x of bf16 to 1.32x, while four took the 512-wide K / V (32 blocks) from
    1.32x to 1.53x (benchmarks/results/cuda-gemv-tiles)."""
    blocks = -(-n // (tiles * TILE_ROWS))
    if blocks >= sm_count // 2:
        return 1
    return max(1, min(-(-sm_count // blocks), k // STEP // WARPS))


def prefetch_for(k: int, splits: int, warps: int = WARPS) -> bool:
    """Whether the code loads fetch 256 bytes into L2: where a warp walks a long stretch of K.
    On the H200 it took the deep layers (K = 12288-18944, 12-19 steps a warp) from 1.63-1.90x
    of bf16 to 1.80-1.94x at M = 1, and the K = 3584-4096 ones (4 steps a warp) from 1.87-2.07x
    down to 1.65-1.82x (benchmarks/results/cuda-gemv-l2)."""
    per_split = -(-(k // STEP) // splits)
    return -(-per_split // warps) >= PREFETCH_MIN_STEPS


def stages_for(k: int, splits: int, warps: int = WARPS) -> int:
    """The feed of a warp: 0, the register path (one step in flight), until the H200 sweep
    of the cp.async ring has chosen (benchmarks/results/cuda-gemv-ring)."""
    return 0


@dataclass
class GemvWeight:
    """A layer's operands as the kernel reads them."""

    qweight: torch.Tensor  # [out, in / 2] uint8, QuantLinear's packing
    scale: torch.Tensor  # [out, groups] bf16: a bf16 model's own scales
    zero: torch.Tensor  # [out, groups] uint8 codes
    group: int

    @classmethod
    def prepare(
        cls, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
    ) -> GemvWeight:
        """The scales as bf16 (what QuantLinear holds once its model is cast to bf16: other
        dtypes are rounded to it once) and the zero points as uint8 codes."""
        check_shape(qweight.shape[1] * 2, group)
        if zero.dtype != torch.uint8 and (
            not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > 255
        ):
            raise ValueError("the CUDA GEMV takes zero points that are integer codes 0-255")
        scale = scale.to(torch.bfloat16).contiguous()
        return cls(qweight.contiguous(), scale, zero.to(torch.uint8).contiguous(), group)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2


def byte_perm(a: torch.Tensor, b: torch.Tensor, selector: int) -> torch.Tensor:
    """CUDA's __byte_perm on int64 tensors holding 32-bit words: byte i of the result is byte
    (selector's nibble i) of the eight bytes b:a."""
    out = torch.zeros_like(a)
    for i in range(4):
        pick = (selector >> (4 * i)) & 7
        source = a if pick < 4 else b
        out |= ((source >> (8 * (pick % 4))) & 0xFF) << (8 * i)
    return out


def _bf16_halves(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two bf16 of 32-bit words (low half first) as float64."""

    def value(bits: torch.Tensor) -> torch.Tensor:
        return (bits << 16).to(torch.int32).view(torch.float32).double()

    return value(words & 0xFFFF), value((words >> 16) & 0xFFFF)


def fragment_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
) -> torch.Tensor:
    """The kernel's arithmetic emulated register by register, in float64: lane t of a step
    reads the 32-bit words of its 32 codes and activations, makes the A pairs with the LOP3
    ((word >> 4e) & 0x000F000F) | 0x43004300 and the B pairs with __byte_perm, places them
    where PTX's m16n8k16 fragments put them, and each step folds
    scale * sum - scale * (128 + zero) * xs, the scale rounded to bf16 as the kernel reads it.
    [m, k] x -> [m, n] float64."""
    m, k = x.shape
    n = qweight.shape[0]
    b = qweight.to(torch.int64).reshape(n, k // 8, 4)
    codes = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24  # [n, k / 8]
    xbits = x.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    xwords = torch.zeros(MAX_M, k // 2, dtype=torch.int64)  # token rows past m are zeros
    xwords[:m] = xbits[:, 0::2] | xbits[:, 1::2] << 16  # word j: columns (2j, 2j + 1)
    out = torch.zeros(n, MAX_M, dtype=torch.float64)
    for step in range(k // STEP):
        s = scale[:, step * STEP // group].to(torch.bfloat16).double()  # as the kernel reads it
        shift = s * (128 + zero[:, step * STEP // group].double())
        total = torch.zeros(n, MAX_M, dtype=torch.float64)
        xs = torch.zeros(MAX_M, dtype=torch.float64)
        for v in range(4):  # word v of each lane's 16 code bytes
            for half in range(2):  # mma 2v + half
                a = torch.zeros(n, 16, dtype=torch.float64)
                bmat = torch.zeros(16, MAX_M, dtype=torch.float64)
                for t in range(4):
                    column = step * STEP + 32 * t + 8 * v  # the word's first column
                    word = codes[:, column // 8]
                    for slot, e in ((2 * t, 2 * half), (2 * t + 8, 2 * half + 1)):
                        a[:, slot], a[:, slot + 1] = _bf16_halves(
                            ((word >> (4 * e)) & 0x000F000F) | 0x43004300
                        )
                    first, second = xwords[:, column // 2 + half], xwords[:, column // 2 + half + 2]
                    for slot, selector in ((2 * t, 0x5410), (2 * t + 8, 0x7632)):
                        bmat[slot], bmat[slot + 1] = _bf16_halves(
                            byte_perm(first, second, selector)
                        )
                total += a @ bmat
                xs += bmat.sum(0)  # the all-ones A
        out += s[:, None] * total - shift[:, None] * xs[None, :]
    return out[:, :m].T


def w4a16_gemv(
    x: torch.Tensor,
    weight: GemvWeight,
    tiles: int | None = None,
    splits: int | None = None,
    warps: int = WARPS,
    l2_prefetch: bool | None = None,
    stages: int | None = None,
) -> torch.Tensor:
    """x [..., in] bf16 (at most 8 rows) @ W^T -> [..., out] bf16, on the current stream
    (graph-capturable once a call of the size ran eagerly: the workspace is made then).
    `tiles` and `splits` override tiles_for and splits_for (the tests run every path);
    `warps` is a block's, 4 or 8; `l2_prefetch` overrides prefetch_for; `stages` overrides
    stages_for (0: the register path, 4 or 6: the cp.async ring's depth)."""
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
    sm_count = cutlass_lib.sm_count(x.device)
    tiles = tiles or tiles_for(n, sm_count)
    splits = splits or splits_for(n, k, sm_count, tiles)
    l2_prefetch = prefetch_for(k, splits, warps) if l2_prefetch is None else l2_prefetch
    stages = stages_for(k, splits, warps) if stages is None else stages
    if stages not in RING_STAGES:
        raise ValueError(f"the CUDA GEMV's ring takes {RING_STAGES} stages, not {stages}")
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        space = cutlass_lib.workspace(x.device, lib.fc_w4a16_gemv_workspace(m, n, splits))
        status = lib.fc_w4a16_gemv(
            x2.data_ptr(), weight.qweight.data_ptr(), weight.scale.data_ptr(),
            weight.zero.data_ptr(), out.data_ptr(), m, n, k, weight.group, tiles, warps,
            int(l2_prefetch), stages, splits,
            space.data_ptr(), space.numel(), stream,
        )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CUDA W4A16 GEMV: {lib.fc_w4a16_gemv_error().decode()}")
    return out.reshape(*x.shape[:-1], n)
