"""Hadamard rotations: orthogonality, FWHT = dense matmul, exact folding."""

import math

import pytest
import torch

from faircalib.errors import ConfigError
from faircalib.quant.rotation import (
    fold_input_rotation,
    fold_output_rotation,
    fwht,
    hadamard_matrix,
    pow2_factor,
    random_hadamard,
    rotate,
)


def _naive_hadamard(n: int) -> torch.Tensor:
    """H[i, j] = (-1)^popcount(i & j): Sylvester's matrix written entrywise."""
    return torch.tensor(
        [[(-1.0) ** bin(i & j).count("1") for j in range(n)] for i in range(n)], dtype=torch.float64
    )


@pytest.mark.parametrize("n", [1, 2, 8, 64])
def test_fwht_equals_dense_hadamard(n):
    assert torch.equal(hadamard_matrix(n), _naive_hadamard(n))
    x = torch.randn(5, 3, n, dtype=torch.float64)
    torch.testing.assert_close(fwht(x), x @ _naive_hadamard(n) / math.sqrt(n), rtol=0, atol=1e-12)


@pytest.mark.parametrize("width", [64, 24, 96, 12])
def test_rotation_is_orthogonal_and_rotate_is_its_matmul(width):
    rot = random_hadamard(width, seed=width)
    assert rot.block == pow2_factor(width) and width % rot.block == 0
    q = rot.matrix()
    torch.testing.assert_close(q @ q.T, torch.eye(width, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(7, width, dtype=torch.float64)
    torch.testing.assert_close(rotate(x, rot), x @ q, rtol=0, atol=1e-12)


def test_rotation_spreads_an_outlier_channel():
    x = torch.zeros(1, 256)
    x[0, 17] = 100.0
    y = rotate(x, random_hadamard(256, seed=1))
    torch.testing.assert_close(y.abs(), torch.full((1, 256), 100.0 / 16))  # 100 / sqrt(256)


def test_folding_preserves_the_linear_output():
    gen = torch.Generator().manual_seed(0)
    for width in (128, 48):
        rot = random_hadamard(width, seed=3)
        w = torch.randn(32, width, generator=gen, dtype=torch.float64)
        x = torch.randn(20, width, generator=gen, dtype=torch.float64)
        ref = x @ w.T
        got = rotate(x, rot) @ fold_input_rotation(w, rot).T
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)  # float64: exact up to rounding
        got32 = rotate(x.float(), rot) @ fold_input_rotation(w.float(), rot).T
        assert (got32.double() - ref).abs().max() < 1e-4 * ref.abs().max()


def test_producer_consumer_fold_needs_no_online_rotation():
    """y = x A^T + a feeds z = y B^T: fold Q^T into A's rows and Q into B's columns."""
    gen = torch.Generator().manual_seed(1)
    a, bias = (
        torch.randn(64, 16, generator=gen, dtype=torch.float64),
        torch.randn(64, dtype=torch.float64),
    )
    b = torch.randn(8, 64, generator=gen, dtype=torch.float64)
    x = torch.randn(10, 16, generator=gen, dtype=torch.float64)
    rot = random_hadamard(64, seed=2)
    a_r, bias_r = fold_output_rotation(a, bias, rot)
    torch.testing.assert_close(x @ a_r.T + bias_r, rotate(x @ a.T + bias, rot), rtol=0, atol=1e-10)
    z = (x @ a_r.T + bias_r) @ fold_input_rotation(b, rot).T
    torch.testing.assert_close(z, (x @ a.T + bias) @ b.T, rtol=0, atol=1e-10)


def test_errors():
    with pytest.raises(ConfigError):
        fwht(torch.randn(2, 12))
    with pytest.raises(ConfigError):
        hadamard_matrix(6)
    with pytest.raises(ConfigError):
        rotate(torch.randn(2, 8), random_hadamard(16))
