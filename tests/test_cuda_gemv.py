"""The CUDA GEMV's algebra and host checks on the CPU (the kernel itself runs in
tests/test_cuda.py on the H200)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from faircalib.config import QuantConfig
from faircalib.kernels import QuantLinear, cuda_gemv
from faircalib.kernels.backends import pack_codes, supports
from faircalib.quant.primitives import compute_qparams, dequantize, quantize


def test_a_nibble_ored_into_0x4300_is_the_bf16_128_plus_the_nibble():
    codes = torch.arange(16, dtype=torch.int32)
    got = ((codes | 0x4300) << 16).view(torch.float32)  # the bf16 bits as a float32's top half
    assert torch.equal(got.double(), 128 + codes.double())  # all sixteen, exactly


def test_byte_perm_follows_cudas_definition():
    a = torch.tensor([0x44332211], dtype=torch.int64)
    b = torch.tensor([0x88776655], dtype=torch.int64)
    assert cuda_gemv.byte_perm(a, b, 0x5410).item() == 0x66552211  # low halves: a's, then b's
    assert cuda_gemv.byte_perm(a, b, 0x7632).item() == 0x88774433  # high halves
    assert cuda_gemv.byte_perm(a, b, 0x3210).item() == 0x44332211


@pytest.mark.parametrize(
    ("m", "n", "k", "group"), [(1, 48, 256, 128), (5, 40, 512, 128), (8, 16, 384, None)]
)
def test_the_kernels_fragments_give_the_dequantized_product(m, n, k, group):
    """The pairs (e, e + 4) of the weight words and the byte-permuted activations, placed as
    PTX's m16n8k16 fragments, permute K alike: the product is the plain one."""
    gen = torch.Generator().manual_seed(m + n)
    w = torch.randn(n, k, generator=gen)
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=group, symmetric=False))
    # the scales of a bf16 model, which the kernel reads
    qp = dataclasses.replace(qp, scale=qp.scale.to(torch.bfloat16).float())
    group = group or k  # per-channel: one group of the whole row
    codes = quantize(w, qp)
    layer = QuantLinear.from_codes(codes, qp)
    x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
    want = x.double() @ dequantize(codes, qp).double().T  # scale * (code - zero), independently
    got = cuda_gemv.fragment_reference(x, layer.qweight, layer.scale, layer.zero.float(), group)
    assert ((got - want).abs() <= 1e-6 * want.abs().max()).all()  # float32 scales


def test_a_swapped_pairing_is_caught_by_the_reference():
    """The reference is not blind to the permutation: the same codes read in the natural pair
    order (e, e + 1) against the permuted activations give another product."""
    gen = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 16, (16, 128), generator=gen, dtype=torch.uint8)
    swapped = codes.view(16, 16, 8)[:, :, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(16, 128)
    scale, zero = torch.ones(16, 1), torch.full((16, 1), 8.0)
    x = torch.randn(2, 128, generator=gen).to(torch.bfloat16)
    want = x.double() @ (codes.double() - 8).T
    packed = pack_codes(swapped, 4)
    got = cuda_gemv.fragment_reference(x, packed, scale, zero, 128)
    assert (got - want).abs().max() > 1.0


def test_the_packing_read_is_quantlinears():
    """The kernel reads QuantLinear.qweight as stored: the even column in the low nibble."""
    codes = torch.tensor([[1, 2, 3, 4] * 8], dtype=torch.uint8)  # one row of 32
    packed = pack_codes(codes, 4)
    assert torch.equal(packed & 0xF, codes[:, 0::2]) and torch.equal(packed >> 4, codes[:, 1::2])


def test_tiles_and_splits_follow_the_measured_rules():
    # two tiles a warp while that leaves blocks for half the SMs (132 on an H200)
    assert cuda_gemv.tiles_for(14336, 132) == 2  # 448 blocks of 32 rows
    assert cuda_gemv.tiles_for(4096, 132) == 2  # 128 blocks of 32 rows: still the faster
    assert cuda_gemv.tiles_for(2112, 132) == 2 and cuda_gemv.tiles_for(2080, 132) == 1  # 66 / 65
    assert cuda_gemv.tiles_for(512, 132) == 1  # Dream's K / V
    # no split while blocks cover an eighth of the SMs: a split costs a second kernel
    assert cuda_gemv.splits_for(4096, 4096, 132, 2) == 1
    assert cuda_gemv.splits_for(3584, 18944, 132, 2) == 1  # 112 blocks
    assert cuda_gemv.splits_for(512, 3584, 132, 1) == 1  # Dream's K / V: 32 blocks of 16 warps
    assert cuda_gemv.splits_for(256, 3584, 132, 1) == 1  # 16 blocks
    # 8 blocks: splits for one a SM, each of 8 warps a block still with a step of K
    assert cuda_gemv.splits_for(128, 14336, 132, 1) == 14  # 112 steps: 14 of 8 steps
    assert cuda_gemv.splits_for(128, 3584, 132, 1) == 3  # 28 steps: 3 of 10 steps
    assert cuda_gemv.splits_for(16, 1024, 132, 1) == 1  # 8 steps: one a warp, no split


def test_warps_a_block_are_the_most_that_let_every_block_run_at_once():
    # the H200: 132 SMs of 16 resident warps; two-tile blocks of 32 rows
    assert cuda_gemv.warps_for(4096, 132, 2, 1) == 16  # 128 blocks: one an SM
    assert cuda_gemv.warps_for(3584, 132, 2, 1) == 16  # 112
    assert cuda_gemv.warps_for(14336, 132, 2, 1) == 4  # 448 blocks: 4 an SM, 528 fit
    assert cuda_gemv.warps_for(12288, 132, 2, 1) == 4  # 384
    assert cuda_gemv.warps_for(8448, 132, 2, 1) == 8  # 264 = 132 x 2: exactly two an SM
    assert cuda_gemv.warps_for(8480, 132, 2, 1) == 4  # 265
    assert cuda_gemv.warps_for(18944, 132, 2, 1) == 8  # 592 > 528: more than one wave
    assert cuda_gemv.warps_for(512, 132, 1, 1) == 16  # Dream's K / V: 32 one-tile blocks
    assert cuda_gemv.warps_for(128, 132, 1, 14) == cuda_gemv.SPLIT_WARPS  # K split


def test_shapes_and_inputs_the_kernel_cannot_take_are_named():
    with pytest.raises(ValueError, match="multiples of 128"):
        cuda_gemv.check_shape(1000, 1000)
    with pytest.raises(ValueError, match="multiples of 128"):
        cuda_gemv.check_shape(256, 64)  # group 64: a step would straddle two groups
    layer = QuantLinear(256, 64, bits=4, group_size=128, symmetric=False)
    why = supports(layer, "cuda_gemv", "cuda", torch.bfloat16, 9)
    assert "M <= 8" in why
    assert "Hopper" in supports(layer, "cuda_gemv", "cpu", torch.bfloat16, 1) or "CUDA" in supports(
        layer, "cuda_gemv", "cpu", torch.bfloat16, 1
    )


def test_prepare_packs_a_bf16_scale_and_128_plus_zero_in_a_word_and_refuses_other_zeros():
    packed = torch.zeros(16, 64, dtype=torch.uint8)
    scale = torch.full((16, 1), 0.1)
    scale[3] = -3.0e-3  # a negative scale sets the word's sign bit
    weight = cuda_gemv.GemvWeight.prepare(packed, scale, torch.full((16, 1), 8.0), 128)
    assert weight.meta.dtype == torch.int32 and weight.meta.shape == (16, 1)
    bits = scale.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    words = weight.meta.to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(words >> 16, bits)  # the scale's bf16 bits, high half
    assert torch.equal(words & 0xFFFF, torch.full((16, 1), 0x4308))  # bf16 136.0
    got_scale, got_offset = cuda_gemv.unpack_meta(weight.meta)
    assert torch.equal(got_scale, scale.to(torch.bfloat16).double())
    assert torch.equal(got_offset, torch.full((16, 1), 136.0, dtype=torch.float64))
    with pytest.raises(ValueError, match="integer codes"):
        cuda_gemv.GemvWeight.prepare(packed, scale, torch.full((16, 1), 7.5), 128)
    with pytest.raises(ValueError, match="integer codes 0-127"):
        cuda_gemv.GemvWeight.prepare(packed, scale, torch.full((16, 1), 128.0), 128)
