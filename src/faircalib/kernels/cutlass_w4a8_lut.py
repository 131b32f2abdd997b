"""W4A8 (FP8 activations) on Hopper with the INT4 weight converted to e4m3 in registers
(csrc/w4a8_lut_sm90.cu: CUTLASS's mixed-input GEMM in its lookup-table mode).

Each (output, group) has a table of 8 e4m3 levels, -8 r ... -1 r, r the group's scale relative
to the output's; the positive levels are their negations. The K loop is then a plain FP8 GEMM:
no per-call e4m3 temporary (cutlass_w4a8 unpacks one) and no per-group rescaling of the float
accumulator. The levels are exact e4m3 numbers when r is a power of two, so the weight grid this
kernel computes exactly is symmetric INT4 with power-of-two group scales (QuantConfig
scale_dtype "e8m0", scheme w4a8fp8-e8m0): each row's scales are split into a float scale per
output, applied in the epilogue with the per-token one, and powers of two per group
(`split_scales`), whose levels k r are e4m3 numbers.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from faircalib.kernels import cutlass_lib

NAME = "w4a8_lut_sm90"  # csrc/w4a8_lut_sm90.cu
CONFIGS = 9
TILE_K = 128  # the K tile: a group must be a multiple of it
# the shuffle atom (compute_memory_reordering_atom<e4m3>): 16 rows x 32 columns, laid out
# rows first like the W4A16 kernel's
ATOM_ROWS, ATOM_COLS = 16, 32
MIN_REL = 2.0**-9  # the smallest r whose levels k r (k <= 8) are all e4m3 numbers (subnormal)
MAX_REL = 2.0**5  # the largest kept: 8 r = 256 <= 448, e4m3's largest number
# by index: (weight rows x token rows) 128x128 and 128x256 cooperative, 64x128 and 64x256
# ping-pong, 128x128 and 128x256 stream-K, 128x64 and 128x32 cooperative, 128x64 stream-K
COOP_128x128, COOP_128x256, PINGPONG_64x128, PINGPONG_64x256, STREAMK_128x128 = 0, 1, 2, 3, 4
STREAMK_128x256, COOP_128x64, COOP_128x32, STREAMK_128x64 = 5, 6, 7, 8


def _declare(lib: ctypes.CDLL) -> None:
    """Check the library's version (its configuration count) and declare its C signatures."""
    p, i, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t
    lib.fc_w4a8_lut_sm90_configs.restype = i
    cutlass_lib.check_version(NAME, lib.fc_w4a8_lut_sm90_configs(), CONFIGS)
    lib.fc_w4a8_lut_sm90_config_name.argtypes = [i]
    lib.fc_w4a8_lut_sm90_config_name.restype = ctypes.c_char_p
    lib.fc_w4a8_lut_sm90_error.restype = ctypes.c_char_p
    lib.fc_w4a8_lut_sm90_workspace.argtypes = [i, i, i, i, i]
    lib.fc_w4a8_lut_sm90_workspace.restype = size
    lib.fc_w4a8_lut_sm90_gemm.argtypes = [i, p, p, p, p, p, p, i, i, i, i, p, size, p]
    lib.fc_w4a8_lut_sm90_gemm.restype = i
    lib.fc_w4a8_lut_sm90_shuffled_offset.argtypes = [i, i, i, i]
    lib.fc_w4a8_lut_sm90_shuffled_offset.restype = ctypes.c_int64


def load_library() -> ctypes.CDLL:
    """The lookup-table W4A8 library (cutlass_lib.load), its C signatures declared (once)."""
    return cutlass_lib.load(NAME, _declare)


def dequantize_values(
    values: torch.Tensor, out_scale: torch.Tensor, rel: torch.Tensor
) -> torch.Tensor:
    """The weight the kernel computes with: values [n, k] in [-8, 7] * out_scale [n] * rel
    [n, G] (float32; exact for power-of-two rel)."""
    group = values.shape[1] // rel.shape[1]
    step = (out_scale[:, None] * rel).repeat_interleave(group, dim=1)
    return values.float() * step


def encode(codes: torch.Tensor) -> torch.Tensor:
    """Signed values in [-8, 7] -> the kernel's nibbles: v < 0 two's complement (the sign bit
    and v + 8 as the table index), v > 0 as 8 - v (index 8 - v, sign clear: the table's
    -(8 - (8 - v)) r negated), 0 as 0."""
    v = codes.to(torch.int16)
    return torch.where(v < 0, v + 16, torch.where(v > 0, 8 - v, 0)).to(torch.uint8)


def tables(rel: torch.Tensor) -> torch.Tensor:
    """rel [n, G] -> [G, n, 8] e4m3: -8 r, -7 r, ..., -1 r (N-major, as CUTLASS reads them)."""
    levels = -(8 - torch.arange(8, device=rel.device, dtype=torch.float32))
    return (rel.t()[:, :, None] * levels).to(torch.float8_e4m3fn).contiguous()


def config_for(m: int, n: int, k: int) -> int:
    """The tile for M token rows, N outputs and K inputs, fitted to the H200 sweeps of every
    configuration (benchmarks/results/cutlass-w4a8-lut and cutlass-w4a8-lut-small: the seven
    large 8B shapes and 3584 x 512, M = 1-4096): 128 x 256 cooperative from M = 1024; below,
    on deep layers (K > N), whose few output tiles stream-K spreads over K, 128 x 64 stream-K
    up to M = 64 and 128 x 128 above; on wide ones (N > K) the token tile that M fills
    (128 x 32, 128 x 64, 128 x 128 cooperative; 128 x 256 from M = 256); 64 x 128 ping-pong on
    square ones; narrow layers (N <= 1024) 64 x 128 ping-pong, 64 x 256 from M = 4096."""
    if n <= 1024:
        return PINGPONG_64x256 if m >= 4096 else PINGPONG_64x128
    if m >= 1024:
        return COOP_128x256
    if k > n:
        return STREAMK_128x64 if m <= 64 else STREAMK_128x128
    if n > k:
        if m <= 32:
            return COOP_128x32
        if m <= 64:
            return COOP_128x64
        return COOP_128x128 if m < 256 else COOP_128x256
    return PINGPONG_64x128


def split_scales(scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Power-of-two group scales [n, G] -> (out_scale [n], rel [n, G]) with scale = out_scale *
    rel: out_scale the row's largest scale / MAX_REL, so rel spans MIN_REL..MAX_REL (14
    octaves below the row's largest scale stay exact), clamped there."""
    out_scale = scale.float().amax(1) / MAX_REL
    rel = (scale.float() / out_scale[:, None]).clamp(MIN_REL, MAX_REL)
    return out_scale.contiguous(), rel.contiguous()


def grid_why(
    codes: Callable[[], torch.Tensor], scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> str | None:
    """Why a layer's weight scale * (codes - zero) is not on the grid this kernel computes
    exactly (None: it is): symmetric codes of at most 4 bits, power-of-two scales, and every
    group that holds a nonzero value within 14 octaves of its row's largest scale. `codes`
    ([out, in] codes on demand) is called only when some group's scale is that far down."""
    if bits > 4:
        return f"needs codes of at most 4 bits, the layer has {bits}"
    if not bool((zero == 2 ** (bits - 1)).all()):
        return "needs symmetric weights (zero point 2^(bits-1), scheme w4a8fp8-e8m0)"
    scale = scale.float()
    if not bool((scale > 0).all()) or not torch.equal(
        scale.to(torch.float8_e8m0fnu).float(), scale
    ):
        return "needs power-of-two weight scales (scheme w4a8fp8-e8m0)"
    far = scale / scale.amax(1, keepdim=True) * MAX_REL < MIN_REL  # [n, G]
    if not bool(far.any()):
        return None
    values = codes()
    n = values.shape[0]
    used = (values.reshape(n, scale.shape[1], -1) != zero.reshape(n, -1, 1)).any(-1)
    if bool((used & far).any()):
        return "a group's scale is more than 2^14 below its row's largest (e4m3's range)"
    return None


def decode(nibbles: torch.Tensor) -> torch.Tensor:
    """`encode`'s inverse: the kernel's nibbles -> signed values in [-8, 7] (int8)."""
    v = nibbles.to(torch.int16)
    return torch.where(v >= 8, v - 16, torch.where(v > 0, 8 - v, 0)).to(torch.int8)


@functools.cache
def _atom_offsets() -> torch.Tensor:
    lib = load_library()
    offsets = [
        [lib.fc_w4a8_lut_sm90_shuffled_offset(ATOM_ROWS, ATOM_COLS, i, j) for j in range(ATOM_COLS)]
        for i in range(ATOM_ROWS)
    ]
    return torch.tensor(offsets, dtype=torch.int64)


def shuffle_offsets(
    n: int, k: int, device: torch.device | None = None, rows: range | None = None
) -> torch.Tensor:
    """[len(rows), k] int64: where element (i, j) of an [n, k] weight goes in the kernel's
    layout (the library's atom, tiled rows first), for the rows `rows` (default all)."""
    atom = _atom_offsets().to(device)
    rows = range(n) if rows is None else rows
    i = torch.arange(rows.start, rows.stop, device=device)[:, None]
    j = torch.arange(k, device=device)[None, :]
    inner = atom[i % ATOM_ROWS, j % ATOM_COLS]
    return inner + ATOM_ROWS * ATOM_COLS * (i // ATOM_ROWS + (j // ATOM_COLS) * (n // ATOM_ROWS))


# rows whose int64 offsets are made at once: 1024 x K x 8 bytes (29 MB at K = 3584), where all
# of an 18944 x 3584 layer's would take 543 MB of the GPU for a moment
SHUFFLE_ROWS = 1024


def _row_blocks(n: int) -> list[range]:
    return [range(r, min(r + SHUFFLE_ROWS, n)) for r in range(0, n, SHUFFLE_ROWS)]


@dataclass
class LutWeight:
    """One layer's weight in the kernel's layouts."""

    int4: torch.Tensor  # [n, k / 2] uint8, shuffled nibbles
    lut: torch.Tensor  # [G, n, 8] e4m3
    out_scale: torch.Tensor  # [n] float32
    out_features: int
    in_features: int
    group: int

    @classmethod
    def prepare(cls, codes: torch.Tensor, out_scale: torch.Tensor, rel: torch.Tensor) -> LutWeight:
        n, k = codes.shape
        group = k // rel.shape[1]
        flat = torch.empty(n * k, dtype=torch.uint8, device=codes.device)
        for rows in _row_blocks(n):
            offsets = shuffle_offsets(n, k, codes.device, rows).reshape(-1)
            flat[offsets] = encode(codes[rows.start : rows.stop]).reshape(-1)
        packed = (flat[0::2] | (flat[1::2] << 4)).reshape(n, k // 2)
        return cls(packed, tables(rel), out_scale.float().contiguous(), n, k, group)

    def values(self) -> torch.Tensor:
        """The signed values [n, k] the shuffled nibbles hold (the layout is lossless)."""
        n, k = self.out_features, self.in_features
        flat = torch.stack((self.int4 & 0xF, self.int4 >> 4), dim=-1).reshape(-1)
        out = torch.empty(n, k, dtype=torch.int8, device=self.int4.device)
        for rows in _row_blocks(n):
            offsets = shuffle_offsets(n, k, self.int4.device, rows)
            out[rows.start : rows.stop] = decode(flat[offsets])
        return out


def check_operands(x8: torch.Tensor, x_scale: torch.Tensor, weight: LutWeight) -> None:
    """ValueError naming what the kernel would misread (types, shapes, devices)."""
    problems = []
    if x8.dim() != 2 or x8.dtype != torch.float8_e4m3fn:
        problems.append(f"e4m3 rows [m, k] (got {x8.dtype} {tuple(x8.shape)})")
    elif x8.shape[1] != weight.in_features or x_scale.numel() != x8.shape[0]:
        problems.append(
            f"{weight.in_features} columns and one scale a row (got {tuple(x8.shape)}, "
            f"{x_scale.numel()} scales)"
        )
    devices = {t.device for t in (x8, x_scale, weight.int4, weight.lut, weight.out_scale)}
    if {d.type for d in devices} != {"cuda"} or len(devices) > 1:
        problems.append(f"CUDA tensors on one device (got {sorted(map(str, devices))})")
    if problems:
        raise ValueError("the CUTLASS W4A8 lookup-table GEMM needs " + "; ".join(problems))


def gemm(
    x8: torch.Tensor, x_scale: torch.Tensor, weight: LutWeight, config: int = 0
) -> torch.Tensor:
    """x8 [m, k] e4m3, x_scale [m] float32 -> [m, n] bf16 = (x8 * x_scale) @ W^T."""
    check_operands(x8, x_scale, weight)
    if not 0 <= config < CONFIGS:
        raise ValueError(f"no CUTLASS W4A8 lookup-table configuration {config} (0-{CONFIGS - 1})")
    lib = load_library()
    m, k = x8.shape
    n = weight.out_features
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x8.device)
    if m == 0:
        return out
    x8 = x8.contiguous()
    x_scale = x_scale.float().contiguous()
    with torch.cuda.device(x8.device):
        space = cutlass_lib.workspace(
            x8.device, lib.fc_w4a8_lut_sm90_workspace(config, m, n, k, weight.group)
        )
        status = lib.fc_w4a8_lut_sm90_gemm(
            config, x8.data_ptr(), x_scale.data_ptr(), weight.int4.data_ptr(),
            weight.lut.data_ptr(), weight.out_scale.data_ptr(), out.data_ptr(), m, n, k,
            weight.group, space.data_ptr(), space.numel(), torch.cuda.current_stream(x8.device).cuda_stream,
        )  # fmt: skip
    if status != 0:
        raise RuntimeError(f"CUTLASS W4A8 LUT GEMM: {lib.fc_w4a8_lut_sm90_error().decode()}")
    return out
