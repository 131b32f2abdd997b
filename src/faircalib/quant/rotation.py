"""QuaRot-style orthogonal rotations of a linear layer's input.

For any orthogonal Q ([in, in], Q Q^T = I), (x Q)(W Q)^T = x Q Q^T W^T = x W^T: rotating the
input rows and folding the same rotation into the weight leaves the layer's output unchanged in
exact arithmetic. A (randomized) Hadamard Q spreads an outlier channel's energy evenly over all
channels, so per-token activation quantization (and the weight's per-row ranges) no longer pay
for a few huge channels: this is what makes W4A4 possible in QuaRot (Ashkboos et al. 2024).

The rotation used here is Q = D (I_m (x) H_b) / sqrt(b): D = diag of random signs (seeded),
H_b the Sylvester Hadamard matrix of size b = the largest power of two dividing `in`, m = in / b.

* Power-of-two `in` (m = 1): a full randomized Hadamard transform, applied online by the fast
  Walsh-Hadamard transform in O(in log in) per row.
* Other widths (documented fallback): block-diagonal Hadamard, m independent b-wide blocks. It
  is orthogonal and fast, but mixes channels only inside each block, so an outlier is spread
  over b channels, not all `in` (QuaRot instead uses H_12 or H_28 (x) H_2^k with a hand-listed
  non-power-of-two Hadamard matrix; for widths like 12288 = 3 * 4096, b = 4096 is already wide).

Where a rotation lives: `rotate` applies it online (x -> x Q); `fold_input_rotation` folds it
into the consuming linear offline (W -> W Q); `fold_output_rotation` folds it into a producing
linear (W -> Q^T W, b -> b Q) so its output arrives rotated and no online op is needed.

Residual-stream rotation (QuaRot's offline part, `calib.residual_rotation` applies it to a model
that declares its layout): an RMS norm y = g * x / rms(x) commutes with Q once its scale g is
folded into the linears that read it (`fold_norm_scale`: W -> W diag(g)), because
rms(x Q) = rms(x). The embedding's rows are then written rotated (`fold_embedding_rotation`:
E -> E Q), every writer into the stream outputs rotated (`fold_output_rotation`) and every
reader takes the rotated stream (`fold_input_rotation`): one Q for the whole stream, nothing
online.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from faircalib.errors import ConfigError


def is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def pow2_factor(n: int) -> int:
    """The largest power of two dividing n."""
    if n < 1:
        raise ConfigError(f"rotation width must be positive, got {n}")
    return n & -n


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Sylvester's unnormalised Hadamard matrix [n, n] (entries +-1), n a power of two."""
    if not is_power_of_two(n):
        raise ConfigError(f"Sylvester Hadamard matrices exist for powers of two, got {n}")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform over the last dim (a power of two):
    x [..., n] -> x H_n / sqrt(n), in log2(n) butterfly passes."""
    n = x.shape[-1]
    if not is_power_of_two(n):
        raise ConfigError(f"the fast Walsh-Hadamard transform needs a power-of-two width, got {n}")
    lead = x.shape[:-1]
    y = x.reshape(-1, n)
    h = 1
    while h < n:
        pairs = y.view(-1, n // (2 * h), 2, h)  # [rows, blocks, (a, b), h]
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        y = torch.stack([a + b, a - b], dim=2).reshape(-1, n)
        h *= 2
    return (y / math.sqrt(n)).reshape(*lead, n)


@dataclass
class Rotation:
    """Q = diag(signs) (I_m (x) H_block) / sqrt(block) on `width` channels."""

    signs: torch.Tensor  # [width] of +-1
    block: int  # Hadamard block size (a power of two dividing width)

    @property
    def width(self) -> int:
        return self.signs.shape[0]

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense Q [width, width] (tests, offline folding of small layers)."""
        m = self.width // self.block
        h = hadamard_matrix(self.block, dtype) / math.sqrt(self.block)
        return self.signs.to(dtype)[:, None] * torch.block_diag(*[h] * m)

    def to(self, device: torch.device | str) -> Rotation:
        return Rotation(self.signs.to(device), self.block)


def random_hadamard(width: int, seed: int = 0, randomized: bool = True) -> Rotation:
    """A (randomized) Hadamard rotation of `width` channels; `randomized` False: plain H."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (width,), generator=gen).float() * 2 - 1
    return Rotation(signs if randomized else torch.ones(width), pow2_factor(width))


def rotate(x: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """Online: x [..., width] -> x Q (signs, then the FWHT inside each Hadamard block)."""
    if x.shape[-1] != rot.width:
        raise ConfigError(f"rotation of width {rot.width} applied to rows of {x.shape[-1]}")
    y = x * rot.signs.to(x.device, x.dtype)
    blocks = y.reshape(*x.shape[:-1], rot.width // rot.block, rot.block)
    return fwht(blocks).reshape(x.shape)


def fold_input_rotation(weight: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """The consuming linear's weight [out, in] -> W Q: with inputs rotated online (x Q) the
    layer computes (x Q)(W Q)^T = x W^T. Row r of W Q is rotate(W[r]), so no dense Q is built."""
    return rotate(weight, rot)


def fold_output_rotation(
    weight: torch.Tensor, bias: torch.Tensor | None, rot: Rotation
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The producing linear y = x W^T + b ([out, in], [out]) -> (Q^T W, b Q): it then outputs
    y Q directly, so a consumer folded with `fold_input_rotation` needs no online rotation."""
    # Q^T W = (W^T Q)^T: rotate each column of W as a row vector
    w_rot = rotate(weight.T, rot).T.contiguous()
    return w_rot, None if bias is None else rotate(bias, rot)


def fold_norm_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A norm's per-channel scale g [in] folded into the linear reading the norm's output
    ([out, in] -> W diag(g)): (x * g) W^T = x (W diag(g))^T, so the norm may then run with
    g = 1 (and, being an RMS norm, commute with a rotation of its input)."""
    if scale.shape != weight.shape[-1:]:
        raise ConfigError(f"a norm of width {scale.shape[0]} read by a linear of {weight.shape}")
    return weight * scale.to(weight.dtype)


def fold_embedding_rotation(table: torch.Tensor, rot: Rotation) -> torch.Tensor:
    """An embedding table [V, D] whose rows start the residual stream -> E Q: every token's
    vector enters the stream already rotated (a tied output layer reading E Q then computes
    (h Q)(E Q)^T = h E^T unchanged)."""
    return rotate(table, rot)
