"""The CUDA GEMV's algebra and host checks on the CPU (the kernel itself runs in
tests/test_cuda.py on the H200)."""

from __future__ import annotations

import pytest
import torch

from faircalib.config import QuantConfig
from faircalib.kernels import QuantLinear, cuda_gemv
from faircalib.kernels.backends import pack_codes, supports
from faircalib.quant.primitives import compute_qparams, dequantize, quantize


def test_a_code_in_the_top_mantissa_bits_of_one_is_exactly_one_plus_q_over_16():
    codes = torch.arange(16, dtype=torch.int32)
    got = ((codes << 19) | 0x3F800000).view(torch.float32)
    assert torch.equal(got.double(), 1 + codes.double() / 16)  # all sixteen, exactly


@pytest.mark.parametrize(
    ("m", "n", "k", "group"), [(1, 48, 256, 128), (5, 40, 512, 64), (8, 16, 96, None)]
)
def test_the_kernels_algebra_equals_the_dequantized_product(m, n, k, group):
    gen = torch.Generator().manual_seed(m + n)
    w = torch.randn(n, k, generator=gen)
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=group, symmetric=False))
    group = group or k  # per-channel: one group of the whole row
    codes = quantize(w, qp)
    layer = QuantLinear.from_codes(codes, qp)
    x = torch.randn(m, k, generator=gen)
    want = x.double() @ dequantize(codes, qp).double().T  # scale * (code - zero), independently
    got = cuda_gemv.one_plus_q16_reference(x, layer.qweight, layer.scale, layer.zero.float(), group)
    assert ((got.double() - want).abs() <= 1e-4 * want.abs().max()).all()


def test_the_packing_read_is_quantlinears():
    """The kernel reads QuantLinear.qweight as stored: the even column in the low nibble."""
    codes = torch.tensor([[1, 2, 3, 4] * 8], dtype=torch.uint8)  # one row of 32
    packed = pack_codes(codes, 4)
    assert torch.equal(packed & 0xF, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])


def test_splits_fill_the_gpu_and_leave_every_lane_a_chunk():
    assert cuda_gemv.splits_for(14336, 4096, 132) == 1  # 896 blocks already
    narrow = cuda_gemv.splits_for(512, 3584, 132)  # Dream's K / V: 32 blocks for 132 SMs
    assert narrow == 3  # as many as K allows: 112 chunks, at least 32 (one a lane) a split
    assert cuda_gemv.splits_for(512, 14336, 132) == 9  # 448 chunks: 9 splits give 288 blocks
    assert cuda_gemv.splits_for(16, 1024, 132) == 1  # K of 32 chunks: one per lane, no split


def test_shapes_and_inputs_the_kernel_cannot_take_are_named():
    with pytest.raises(ValueError, match="multiples of 32"):
        cuda_gemv.check_shape(1000, 1000)
    with pytest.raises(ValueError, match="multiples of 32"):
        cuda_gemv.check_shape(256, 48)
    layer = QuantLinear(256, 64, bits=4, group_size=128, symmetric=False)
    why = supports(layer, "cuda_gemv", "cuda", torch.bfloat16, 9)
    assert "M <= 8" in why
    assert "Hopper" in supports(layer, "cuda_gemv", "cpu", torch.bfloat16, 1) or "CUDA" in supports(
        layer, "cuda_gemv", "cpu", torch.bfloat16, 1
    )
