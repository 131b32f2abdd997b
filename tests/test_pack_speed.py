"""The fast packed-checkpoint writer and loader checks give exactly what the slow ones gave.

References: compressed-tensors' own `pack_to_int32` (on the signed values it expects), the
plain `dequantize` decode, `torch.isfinite`, and a verbatim copy of the writer's previous
per-layer path (`old_pack_layer`, `old_check_reproduces_weight`), through which the same
model must produce byte-identical files.
"""

import filecmp
from dataclasses import replace

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from faircalib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.formats import packed as packed_module
from faircalib.formats.packed import pack_codes, reproduces_weight, save_packed_model
from faircalib.kernels import check_codes
from faircalib.models import MDLM, MDLMConfig
from faircalib.models.io import all_finite
from faircalib.quant import quantize_rtn
from faircalib.quant.primitives import (
    compute_qparams,
    dequantize,
    quantize,
    round_scales,
    scales_representable,
)

SHAPES = [(1, 1), (3, 5), (7, 31), (5, 32), (4, 33), (2, 100), (16, 128), (9, 257), (40, 64)]


def signed(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """What compressed-tensors packs: int8 values code - 2^(bits-1)."""
    return (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("packed_dim", [0, 1])
def test_pack_codes_matches_compressed_tensors_bit_for_bit(bits, packed_dim):
    gen = torch.Generator().manual_seed(bits)
    for rows, cols in SHAPES:
        codes = torch.randint(0, 2**bits, (rows, cols), generator=gen, dtype=torch.uint8)
        ours = pack_codes(codes, bits, packed_dim)
        theirs = pack_to_int32(signed(codes, bits), bits, packed_dim)
        assert ours.dtype == theirs.dtype == torch.int32
        assert ours.shape == theirs.shape and ours.is_contiguous()
        assert torch.equal(ours, theirs), (bits, rows, cols, packed_dim)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_codes_extremes_and_wider_integer_input(bits):
    """All-zero and all-maxq codes (every bit of the stream 0 / 1 up to the padding), and
    codes handed in as int64 (what a caller may hold) give compressed-tensors' words."""
    for fill in (0, 2**bits - 1):
        codes = torch.full((6, 77), fill, dtype=torch.uint8)
        assert torch.equal(pack_codes(codes, bits), pack_to_int32(signed(codes, bits), bits))
    codes = torch.randint(0, 2**bits, (8, 96), generator=torch.Generator().manual_seed(1))
    expected = pack_to_int32(signed(codes, bits), bits)
    assert torch.equal(pack_codes(codes, bits), expected)


def grouped_layer(out_f, in_f, bits, group, sym, dtype, seed=0):
    """Codes, bf16-rounded qparams and the fake-quant weight in `dtype`, as calibration
    leaves them."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * 0.05
    qp = compute_qparams(w, QuantConfig(bits=bits, group_size=group, symmetric=sym))
    qp = round_scales(qp, torch.bfloat16)
    codes = quantize(w, qp)
    return codes, qp, dequantize(codes, qp).to(dtype)


def one_ulp_up(weight: torch.Tensor, row: int, col: int) -> torch.Tensor:
    """The weight with one element moved to the next representable value of its dtype."""
    changed = weight.clone()
    value = changed[row, col].float().unsqueeze(0)
    up = torch.nextafter(value.to(weight.dtype).float(), torch.tensor([float("inf")]))
    nudged = up.to(weight.dtype)
    if nudged == changed[row, col]:  # rounded back in a narrow dtype: step its bits instead
        bits = changed[row, col : col + 1].view(torch.int16) + 1
        nudged = bits.view(weight.dtype)
    changed[row, col] = nudged.squeeze()
    return changed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("bits", "group", "sym"), [(4, 32, False), (3, None, True), (8, 64, True)])
def test_reproduces_weight_agrees_with_the_plain_decode(monkeypatch, dtype, bits, group, sym):
    # a few rows per block, so every row of the layer crosses a block boundary somewhere
    monkeypatch.setattr(packed_module, "_CHECK_ELEMENTS", 3 * 128)
    codes, qp, weight = grouped_layer(37, 128, bits, group, sym, dtype)
    reference = dequantize(codes, qp).to(dtype)
    assert torch.equal(reference, weight)
    assert reproduces_weight(codes, qp, weight)
    for row, col in [(0, 0), (36, 127), (3, 64), (4, 0), (35, 1)]:
        changed = one_ulp_up(weight, row, col)
        assert not torch.equal(reference, changed)
        assert not reproduces_weight(codes, qp, changed), (row, col)


def test_reproduces_weight_with_default_blocks_and_a_wrong_shape():
    codes, qp, weight = grouped_layer(300, 4096, 4, 128, False, torch.bfloat16)
    assert reproduces_weight(codes, qp, weight)  # 256 rows a block: two blocks, the last short
    assert not reproduces_weight(codes, qp, one_ulp_up(weight, 299, 4095))
    assert not reproduces_weight(codes, qp, weight[:, :-1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_finite_agrees_with_isfinite(dtype):
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 33, 1000, 65_537):
        clean = torch.randn(n, generator=gen).to(dtype)
        assert all_finite(clean) == bool(torch.isfinite(clean).all()) is True
        for pos in (0, n // 2, n - 1):
            for bad in (float("nan"), float("inf"), float("-inf")):
                t = clean.clone()
                t[pos] = bad
                assert all_finite(t) == bool(torch.isfinite(t).all()) is False
    assert all_finite(torch.empty(0, 4, dtype=dtype))


# --- the whole writer against its previous per-layer path ------------------------------------
def old_pack_layer(codes, qp, dtype=torch.bfloat16, *, name="layer"):
    """The writer's pack_layer before the fast packer, verbatim."""
    check_codes(codes, qp)
    if not scales_representable(qp, dtype):
        raise ConfigError(f"{name}: scales are not exactly representable")
    offset = 2 ** (qp.bits - 1)
    values = (codes.to(torch.int16) - offset).to(torch.int8)
    tensors = {
        "weight_packed": pack_to_int32(values.cpu(), qp.bits),
        "weight_scale": qp.scale.detach().float().cpu().to(dtype).contiguous(),
        "weight_shape": torch.tensor(tuple(codes.shape), dtype=torch.int64),
    }
    if not qp.symmetric:
        zp = (qp.zero.detach().cpu().round().to(torch.int16) - offset).to(torch.int8)
        tensors["weight_zero_point"] = pack_to_int32(zp, qp.bits, packed_dim=0)
    return tensors


def old_check_reproduces_weight(name, res):
    """The writer's exactness check before chunking, verbatim (less the message)."""
    decoded = dequantize(res.codes.cpu(), res.qparams.to("cpu")).to(res.weight.dtype)
    if not torch.equal(decoded, res.weight.detach().cpu()):
        raise ConfigError(f"{name}: codes and scales do not reproduce the fake-quant weight")


def mdlm_with_results(weight_dtype: torch.dtype):
    """A small MDLM (bf16-valued weights) and RTN results of mixed schemes for every block
    linear, their fake-quant weights in `weight_dtype` (bf16: a model calibrated in bf16)."""
    torch.manual_seed(0)
    cfg = MDLMConfig(
        vocab_size=48, mask_id=47, seq_len=16, hidden_dim=96, cond_dim=16, n_blocks=2, n_heads=4
    )
    model = MDLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p).mul(0.2).bfloat16())
    schemes = [(4, 32, False), (3, None, False), (8, None, True), (2, 32, True), (5, 32, False)]
    results = {}
    for i, block in enumerate(model.blocks):
        for j, (name, linear) in enumerate(model.quantizable_linears(block)):
            bits, group, sym = schemes[(i + j) % len(schemes)]
            qcfg = QuantConfig(bits=bits, group_size=group, symmetric=sym)
            res = quantize_rtn(linear.weight.detach(), replace(qcfg, scale_dtype="bfloat16"))
            results[f"blocks.{i}.{name}"] = replace(res, weight=res.weight.to(weight_dtype))
    return model.eval(), results


@pytest.mark.parametrize("weight_dtype", [torch.float32, torch.bfloat16])
def test_written_directory_is_byte_identical_to_the_previous_writer(
    tmp_path, monkeypatch, weight_dtype
):
    model, results = mdlm_with_results(weight_dtype)
    assert any(not r.qparams.symmetric for r in results.values())  # zero points are packed
    new = save_packed_model(model, results, tmp_path / "new", extra_files={"t.json": "{}"})
    monkeypatch.setattr(
        packed_module, "_pack_checked", lambda c, qp, dt, name: old_pack_layer(c, qp, dt)
    )
    monkeypatch.setattr(packed_module, "_check_reproduces_weight", old_check_reproduces_weight)
    old = save_packed_model(model, results, tmp_path / "old", extra_files={"t.json": "{}"})
    names = sorted(p.name for p in new.iterdir())
    assert names == sorted(p.name for p in old.iterdir())
    assert any(n.endswith(".safetensors") for n in names)
    match, mismatch, errors = filecmp.cmpfiles(new, old, names, shallow=False)
    assert (mismatch, errors) == ([], []) and match == names


def test_writer_still_refuses_a_weight_one_ulp_off(tmp_path):
    model, results = mdlm_with_results(torch.bfloat16)
    name = next(iter(results))
    moved = replace(results[name], weight=one_ulp_up(results[name].weight, 1, 2))
    with pytest.raises(ConfigError, match="do not reproduce the fake-quant weight"):
        save_packed_model(model, {**results, name: moved}, tmp_path / "x")


def test_pack_codes_refuses_what_it_cannot_pack():
    with pytest.raises(ConfigError, match="1..8 bits"):
        pack_codes(torch.zeros(2, 8, dtype=torch.uint8), 9)
    with pytest.raises(ConfigError, match="2-D"):
        pack_codes(torch.zeros(8, dtype=torch.uint8), 4)
