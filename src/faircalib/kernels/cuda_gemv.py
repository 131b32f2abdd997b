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
VERSION = 9  # the kernel's kVersion: meta words, the next step loaded ahead, up to 16 warps
STEP = 128  # K columns a warp takes at once: K and the group must be multiples of it
WARP_CHOICES = (4, 8, 16)  # warps a block (warps_for), each on its own part of the block's K
# a thread's registers (128: two steps' operands, csrc/w4a16_gemv.cu) leave an SM this many warps
RESIDENT_WARPS = 16
SPLIT_WARPS = 8  # warps a block where K is split (splits_for): as measured in cuda-gemv-tiles
MANY_WAVES_WARPS = 8  # warps a block where no count fits a layer in one wave (warps_for)
TILE_ROWS = 16  # weight rows an mma covers
MAX_ZERO = 127  # 128 + zero must be a bf16 integer
MAX_M = 8


def load_library() -> ctypes.CDLL:
    """The GEMV library (cutlass_lib.load), its C signatures declared once; one built from
    another version of the source (a stale $FAIRCALIB_CUTLASS_DIR) is refused."""
    return cutlass_lib.load(NAME, _declare)


def _declare(lib: ctypes.CDLL) -> None:
    version = getattr(lib, "fc_w4a16_gemv_version", None)
    cutlass_lib.check_version(NAME, version() if version is not None else 1, VERSION)
    lib.fc_w4a16_gemv.argtypes = [*[ctypes.c_void_p] * 4, *[ctypes.c_int] * 7]
    lib.fc_w4a16_gemv.argtypes += [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    lib.fc_w4a16_gemv_workspace.argtypes = [ctypes.c_int] * 3
    lib.fc_w4a16_gemv_workspace.restype = ctypes.c_size_t
    lib.fc_w4a16_gemv_error.restype = ctypes.c_char_p


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
    return 2 if _blocks(n, 2) >= sm_count // 2 else 1


def _blocks(n: int, tiles: int) -> int:
    """Blocks of a layer of n outputs along its rows (one split of K)."""
    return -(-n // (tiles * TILE_ROWS))


def splits_for(n: int, k: int, sm_count: int, tiles: int) -> int:
    """How many parts K is split into across blocks: none unless the layer has fewer blocks
    than an eighth of the SMs, then enough for one a SM, each warp of a block still with a step
    of its own. A split costs a second kernel and a float round trip, and 16 warps a block now
    cover a narrow layer's K without one: Dream's 512-wide K / V (32 one-tile blocks) ran 1.79x
    of bf16 at M = 1 unsplit on 16 warps, 1.35x in 3 splits on 8
    (benchmarks/results/cuda-gemv-feed: cuda_gemv_t1f0_w16 against cuda_gemv)."""
    blocks = _blocks(n, tiles)
    if blocks >= sm_count // 8:
        return 1
    return max(1, min(-(-sm_count // blocks), k // STEP // SPLIT_WARPS))


def warps_for(n: int, sm_count: int, tiles: int, splits: int) -> int:
    """Warps a block: the most that still let every block run at once (a GPU of 16-warp SMs
    holds sm_count * 16 / warps blocks), else 8. On the H200 at M = 1
    (benchmarks/results/cuda-gemv-warps16): 16 for the 112-128 blocks of the K >= 12288 layers
    (2.45-2.71x of bf16, against 2.13-2.34x on 8) and of 4096 x 4096 (2.16x, 2.10x on 8); 4 for
    the 384-448 blocks of 4096 x 12288 / 14336 (2.48-2.59x, 2.07-2.18x on 8); 8 for Dream's
    592 blocks of 3584 x 18944, which no count fits in one wave (2.32x, 2.13x on 4, 1.84x
    on 16). A layer whose K is split runs SPLIT_WARPS."""
    if splits > 1:
        return SPLIT_WARPS
    blocks = _blocks(n, tiles)
    for warps in sorted(WARP_CHOICES, reverse=True):
        if blocks <= sm_count * (RESIDENT_WARPS // warps):
            return warps
    return MANY_WAVES_WARPS


@dataclass
class GemvWeight:
    """A layer's operands as the kernel reads them."""

    qweight: torch.Tensor  # [out, in / 2] uint8, QuantLinear's packing
    meta: torch.Tensor  # [out, groups] int32: bf16 scale << 16 | bf16 (128 + zero)
    group: int

    @classmethod
    def prepare(
        cls, qweight: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group: int
    ) -> GemvWeight:
        """Each group's scale, rounded to bf16 (what QuantLinear holds once its model is cast
        to bf16), and 128 + its zero point, a bf16 integer (exact for zero points 0-127), as
        the two halves of one 32-bit word: the kernel reads a row's group in one load."""
        check_shape(qweight.shape[1] * 2, group)
        zero = zero.float()
        if not torch.equal(zero, zero.round()) or zero.min() < 0 or zero.max() > MAX_ZERO:
            raise ValueError(f"the CUDA GEMV takes zero points that are integer codes 0-{MAX_ZERO}")
        return cls(qweight.contiguous(), pack_meta(scale, zero), group)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * 2


def _bf16_bits(values: torch.Tensor) -> torch.Tensor:
    return values.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF


def pack_meta(scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """[out, groups] int32 words: the scale's bf16 bits high, those of 128 + zero low."""
    words = _bf16_bits(scale) << 16 | _bf16_bits(128 + zero.float())
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).contiguous()


def unpack_meta(meta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's reading of the words, in float64: (scale, 128 + zero) from the high and
    the low half, each a bf16 widened by 16 zero bits."""
    words = meta.to(torch.int64) & 0xFFFFFFFF

    def value(bits: torch.Tensor) -> torch.Tensor:
        return (bits << 16).to(torch.int32).view(torch.float32).double()

    return value(words >> 16), value(words & 0xFFFF)


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
    scale * sum - scale * (128 + zero) * xs, scale and 128 + zero read from pack_meta's words.
    [m, k] x -> [m, n] float64."""
    m, k = x.shape
    n = qweight.shape[0]
    b = qweight.to(torch.int64).reshape(n, k // 8, 4)
    codes = b[..., 0] | b[..., 1] << 8 | b[..., 2] << 16 | b[..., 3] << 24  # [n, k / 8]
    xbits = x.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    xwords = torch.zeros(MAX_M, k // 2, dtype=torch.int64)  # token rows past m are zeros
    xwords[:m] = xbits[:, 0::2] | xbits[:, 1::2] << 16  # word j: columns (2j, 2j + 1)
    out = torch.zeros(n, MAX_M, dtype=torch.float64)
    scales, offsets = unpack_meta(pack_meta(scale, zero))  # the words the kernel reads
    for step in range(k // STEP):
        s = scales[:, step * STEP // group]
        shift = (s * offsets[:, step * STEP // group]).float().double()  # a float32 product
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
    warps: int | None = None,
) -> torch.Tensor:
    """x [..., in] bf16 (at most 8 rows) @ W^T -> [..., out] bf16, on the current stream
    (graph-capturable once a call of the size ran eagerly: the workspace is made then).
    `tiles` and `splits` override tiles_for and splits_for (the tests run every path);
    `warps` (4, 8 or 16 a block) overrides warps_for."""
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
    warps = warps or warps_for(n, sm_count, tiles, splits)
    if warps not in WARP_CHOICES:
        raise ValueError(f"the CUDA GEMV runs {WARP_CHOICES} warps a block, not {warps}")
    out = torch.empty(m, n, device=x.device, dtype=torch.bfloat16)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    with torch.cuda.device(x.device):
        space = cutlass_lib.workspace(x.device, lib.fc_w4a16_gemv_workspace(m, n, splits))
        status = lib.fc_w4a16_gemv(
            x2.data_ptr(), weight.qweight.data_ptr(), weight.meta.data_ptr(), out.data_ptr(),
            m, n, k, weight.group, tiles, warps, splits,
            space.data_ptr(), space.numel(), stream,
        )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CUDA W4A16 GEMV: {lib.fc_w4a16_gemv_error().decode()}")
    return out.reshape(*x.shape[:-1], n)
