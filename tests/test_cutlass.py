"""The CUTLASS kernels' operand layouts, checks and build, on the CPU (the GEMMs themselves run
in tests/test_cuda.py on the H200)."""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import types
from pathlib import Path

import pytest
import torch

from faircalib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.kernels import (
    QuantLinear,
    cutlass_lib,
    cutlass_w4,
    cutlass_w4a8,
    cutlass_w4a8_lut,
    cutlass_w8a8,
)
from faircalib.kernels.backends import pack_codes
from faircalib.quant.primitives import compute_qparams, dequantize, quantize

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _layer(out_f: int = 48, in_f: int = 256, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen)
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=False))
    return quantize(w, qp), qp


def test_signed_nibbles_are_the_codes_minus_eight_in_the_same_order():
    codes, _ = _layer()
    int4 = cutlass_w4.signed_int4(pack_codes(codes, 4))
    low, high = (int4 & 0xF).int(), (int4 >> 4).int()
    signed = torch.stack((low, high), -1).reshape(codes.shape[0], -1)
    signed = torch.where(signed >= 8, signed - 16, signed)  # two's complement nibbles
    assert torch.equal(signed, codes.int() - 8)


def test_kernel_operands_stand_for_the_dequantized_weight_within_bf16_rounding():
    codes, qp = _layer()
    int4 = cutlass_w4.signed_int4(pack_codes(codes, 4))
    scale_t, zero_t = cutlass_w4.group_terms(qp.scale, qp.zero)
    assert scale_t.shape == zero_t.shape == (2, 48) and scale_t.dtype == torch.bfloat16
    got = cutlass_w4.reference_weight(int4, scale_t, zero_t, 128)
    want = dequantize(codes, qp).double()  # scale * (code - zero), the independent path
    # two bf16 roundings: the scale (times |code - 8| <= 8) and the zero term (<= 8 scales)
    bound = qp.scale.double().repeat_interleave(128, dim=1) * 16 * 2**-8
    assert ((got - want).abs() <= bound).all()
    assert (got - want).abs().max() > 0  # the roundings are real: the bound is not vacuous


def test_operands_are_exact_where_scale_and_zero_term_are_bf16_numbers():
    codes, qp = _layer(seed=1)
    qp.scale = torch.full_like(qp.scale, 2.0**-5)  # powers of two: every product exact
    layer = QuantLinear.from_codes(codes, qp)
    int4 = cutlass_w4.signed_int4(layer.qweight)
    scale_t, zero_t = cutlass_w4.group_terms(layer.scale, layer.zero)
    got = cutlass_w4.reference_weight(int4, scale_t, zero_t, 128)
    assert torch.equal(got, layer.dequantized_weight(torch.float64))


def test_the_token_tile_never_exceeds_the_one_that_holds_m():
    tiles = {c: t for t, c in cutlass_w4.TOKEN_TILE_CONFIG.items()}
    wide = 128 * 132 * 8  # so many weight tiles that every plan fills the GPU
    for m, tile in ((1, 32), (32, 32), (33, 64), (64, 64), (65, 128), (256, 256), (9000, 256)):
        assert tiles[cutlass_w4.config_for(m, wide)] == tile


def test_a_layer_of_few_output_tiles_splits_k():
    """Dream's K / V (512 outputs: 4 weight tiles) fills few of 132 SMs with output tiles."""
    for m in (1, 64, 256, 1024):
        assert cutlass_w4.config_for(m, 512) in cutlass_w4.STREAM_K_CONFIG.values()
    assert cutlass_w4.config_for(4096, 512, sm_count=16) in cutlass_w4.TOKEN_TILE_CONFIG.values()


def test_fewer_waves_beat_a_larger_tile():
    """96 weight tiles at M = 512: 256-row tiles (192 of them, spread by stream-K or in two
    waves) rather than three waves of 128-row ones; 32 weight tiles at M = 64: one wave of
    64-row tiles."""
    assert cutlass_w4.config_for(512, 12288) in (
        cutlass_w4.TOKEN_TILE_CONFIG[128],
        cutlass_w4.STREAM_K_CONFIG[256],
    )
    assert cutlass_w4.config_for(64, 12288) == cutlass_w4.TOKEN_TILE_CONFIG[64]


def test_deep_layers_of_few_tiles_split_k_above_m_64():
    """An MLP down projection (4096 outputs: 32 weight tiles) at M = 128 has 32 output tiles of
    128 rows for 132 SMs: stream-K."""
    assert cutlass_w4.config_for(128, 4096) in cutlass_w4.STREAM_K_CONFIG.values()
    assert cutlass_w4.config_for(128, 128 * 132 * 4) == cutlass_w4.TOKEN_TILE_CONFIG[128]


def _recorded_ms(*names: str) -> dict:
    """(shape, M, backend) -> ms of the recorded H200 sweeps in benchmarks/results/NAME."""
    spec = importlib.util.spec_from_file_location("kernels_bench", BENCH / "kernels.py")
    kernels = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = kernels
    spec.loader.exec_module(kernels)
    rows = [
        r
        for n in names
        for r in kernels.load_result(BENCH / "results" / n / "kernels.json")["rows"]
    ]
    return {
        (r["shape"], r["M"], r["backend"]): r["ms"]
        for r in rows
        if r.get("correct") and r.get("ms")
    }


def test_the_w4_tile_rule_picks_near_the_fastest_configuration_measured():
    """On the recorded H200 sweeps (every configuration, the seven large 8B shapes, M = 1 to
    4096) the rule's configuration ran within 10% of the fastest in at least 9 cells of 10 and
    within 25% in every one."""
    ms = _recorded_ms("cutlass-w4", "cutlass-w4-sk")
    names = {c: f"cutlass_w4_{t}" for t, c in cutlass_w4.TOKEN_TILE_CONFIG.items()}
    names |= {c: f"cutlass_w4_sk{t}" for t, c in cutlass_w4.STREAM_K_CONFIG.items()}
    ratios = []
    for shape, m in {(s, m) for s, m, _ in ms}:
        n = int(shape.split("x")[1])
        times = {c: ms.get((shape, m, name)) for c, name in names.items()}
        if n >= 1024 and None not in times.values():
            ratios.append(times[cutlass_w4.config_for(m, n)] / min(times.values()))
    assert len(ratios) == 70
    assert sum(r <= 1.10 for r in ratios) >= 0.9 * len(ratios) and max(ratios) <= 1.25


def test_the_int8_tile_rule_picks_near_the_fastest_configuration_measured():
    ms = _recorded_ms("cutlass-w8a8", "cutlass-w8a8-sk")
    ratios = []
    for shape, m in {(s, m) for s, m, _ in ms}:
        n = int(shape.split("x")[1])
        times = {c: ms.get((shape, m, f"cutlass_int8_prequant_c{c}")) for c in range(7)}
        if None not in times.values():
            ratios.append(times[cutlass_w8a8.config_for(m, n)] / min(times.values()))
    assert len(ratios) == 40  # eight shapes, M = 256 to 4096
    assert sum(r <= 1.10 for r in ratios) >= 0.9 * len(ratios) and max(ratios) <= 1.25


@pytest.mark.parametrize(
    ("out_f", "in_f", "group", "what"),
    [(64, 256, 32, "multiple of 64"), (64, 320, 128, "divide in_features"), (40, 256, 128, "% 16")],
)
def test_shapes_the_kernel_cannot_take_are_named(out_f, in_f, group, what):
    with pytest.raises(ValueError, match=what):
        cutlass_w4.check_shape(out_f, in_f, group)


def test_without_cutlass_headers_the_build_names_the_package(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "cutlass_library" else real(name, *a),
    )
    with pytest.raises(cutlass_lib.CutlassUnavailable, match="pip install nvidia-cutlass"):
        cutlass_lib.build_command(cutlass_w4.NAME, Path("x.so"))


def test_without_nvcc_the_build_says_so(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(cutlass_lib.shutil, "which", lambda name: None)
    with pytest.raises(cutlass_lib.CutlassUnavailable, match="nvcc"):
        cutlass_lib.cuda_home()


@pytest.mark.parametrize("name", [cutlass_w4.NAME, cutlass_w8a8.NAME, cutlass_w4a8.NAME])
def test_the_build_targets_hopper_wgmma_with_the_wheels_headers(name, tmp_path, monkeypatch):
    (tmp_path / "include").mkdir()
    (tmp_path / "include" / "curand_kernel.h").touch()  # a toolkit with cuRAND
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    cmd = cutlass_lib.build_command(name, tmp_path / "x.so")
    assert cmd[0] == str(tmp_path / "bin" / "nvcc")
    assert "-gencode=arch=compute_90a,code=sm_90a" in cmd  # sm_90a: wgmma and setmaxnreg
    assert str(cutlass_lib.CSRC / f"{name}.cu") in cmd
    headers = [c[2:] for c in cmd if c.startswith("-I")]
    assert any((Path(h) / "cutlass" / "gemm" / "collective").is_dir() for h in headers)
    assert any((Path(h) / "cutlass" / "util" / "mixed_dtype_utils.hpp").is_file() for h in headers)


def test_a_toolkit_without_nvcc_is_named_before_any_build(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_HOME", str(tmp_path))
    monkeypatch.setenv("FAIRCALIB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(cutlass_lib.CutlassUnavailable, match=f"no nvcc at {tmp_path}"):
        cutlass_lib.build_library(cutlass_w8a8.NAME)
    assert not (tmp_path / "cache").exists()  # nothing half-written


def test_a_prebuilt_directory_without_the_library_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv(cutlass_lib.PREBUILT_ENV, str(tmp_path))
    monkeypatch.setattr(cutlass_lib, "_LOADED", {})
    monkeypatch.setattr(cutlass_lib, "_FAILED", {})
    with pytest.raises(cutlass_lib.CutlassUnavailable, match=f"no {cutlass_w8a8.NAME}.so"):
        cutlass_w8a8.load_library()
    (tmp_path / f"{cutlass_w8a8.NAME}.so").write_bytes(b"")  # the failure is remembered
    with pytest.raises(cutlass_lib.CutlassUnavailable, match=f"no {cutlass_w8a8.NAME}.so"):
        cutlass_w8a8.load_library()


def test_an_unloadable_library_is_one_clear_error(tmp_path, monkeypatch):
    (tmp_path / f"{cutlass_w4.NAME}.so").write_bytes(b"not an ELF file")
    monkeypatch.setenv(cutlass_lib.PREBUILT_ENV, str(tmp_path))
    monkeypatch.setattr(cutlass_lib, "_LOADED", {})
    monkeypatch.setattr(cutlass_lib, "_FAILED", {})
    with pytest.raises(cutlass_lib.CutlassUnavailable, match="cannot load"):
        cutlass_w4.load_library()


def test_an_unbuilt_library_names_the_build_command_and_never_compiles(tmp_path, monkeypatch):
    monkeypatch.delenv(cutlass_lib.PREBUILT_ENV, raising=False)
    monkeypatch.setenv("FAIRCALIB_CACHE", str(tmp_path))
    monkeypatch.setattr(cutlass_lib, "_LOADED", {})
    monkeypatch.setattr(cutlass_lib, "_FAILED", {})
    monkeypatch.setattr(cutlass_lib, "toolchain_key", lambda command: "t00lchain")
    monkeypatch.setattr(cutlass_lib.subprocess, "run", lambda *a, **k: pytest.fail("compiled"))
    with pytest.raises(cutlass_lib.CutlassUnavailable, match="faircalib build-kernels"):
        cutlass_w4.load_library()


def test_the_cache_serves_the_build_of_this_source_and_toolchain(tmp_path, monkeypatch):
    monkeypatch.delenv(cutlass_lib.PREBUILT_ENV, raising=False)
    monkeypatch.setenv("FAIRCALIB_CACHE", str(tmp_path))
    name, src = cutlass_w8a8.NAME, cutlass_lib.source_key(cutlass_w8a8.NAME)
    cache = tmp_path / "cutlass"
    cache.mkdir()
    (cache / f"{name}-{'0' * 12}-t00lchain.so").touch()  # another version of the source
    (cache / f"{name}-{src}-0ther000.so").touch()  # another nvcc
    monkeypatch.setattr(cutlass_lib, "toolchain_key", lambda command: "t00lchain")
    assert cutlass_lib.cached_library(name) is None
    (cache / f"{name}-{src}-t00lchain.so").touch()
    assert cutlass_lib.cached_library(name) == cache / f"{name}-{src}-t00lchain.so"

    def no_toolkit(command):
        raise cutlass_lib.CutlassUnavailable("no nvcc")

    monkeypatch.setattr(cutlass_lib, "toolchain_key", no_toolkit)  # a machine without nvcc
    os.utime(cache / f"{name}-{src}-0ther000.so", (2e9, 2e9))  # the newest build of the source
    assert cutlass_lib.cached_library(name) == cache / f"{name}-{src}-0ther000.so"


def test_a_header_change_changes_the_source_key(tmp_path, monkeypatch):
    (tmp_path / "w8a8_sm90.cu").write_text("// kernel")
    (tmp_path / "common.cuh").write_text("// one")
    monkeypatch.setattr(cutlass_lib, "CSRC", tmp_path)
    before = cutlass_lib.source_key("w8a8_sm90")
    (tmp_path / "common.cuh").write_text("// two")
    assert cutlass_lib.source_key("w8a8_sm90") != before


def test_the_int8_gemm_refuses_what_it_would_misread():
    a8, w8 = torch.zeros(4, 64, dtype=torch.int8), torch.zeros(24, 64, dtype=torch.int8)
    ok = (a8, torch.ones(4), w8, torch.ones(24))
    for bad, what in (
        ((a8.float(), *ok[1:]), "int8 operands"),
        ((a8, torch.ones(4, dtype=torch.float64), *ok[2:]), "float32 scales"),
        ((a8, torch.ones(3), *ok[2:]), "scales of 4 rows"),
        ((a8[:, :40], ok[1], w8[:, :40], ok[3]), "K % 16 == 0"),
        (ok, "CUDA tensors"),  # everything right but the device
    ):
        with pytest.raises(ValueError, match=what):
            cutlass_w8a8.check_operands(*bad)


def test_the_gemm_refuses_what_it_would_misread():
    weight = cutlass_w4.CutlassW4Weight(
        torch.zeros(8, 64, dtype=torch.uint8), None, torch.ones(1, 8), torch.ones(1, 8), 8, 128, 128
    )
    for x in (torch.zeros(2, 128), torch.zeros(2, 128, dtype=torch.bfloat16)):  # fp32; CPU
        with pytest.raises(ValueError, match="bf16 CUDA activations of width 128"):
            cutlass_w4.w4a16_gemm(x, weight)


def test_quantlinear_names_why_the_cutlass_backends_cannot_run_on_the_cpu():
    codes, qp = _layer()
    layer = QuantLinear.from_codes(codes, qp, backend="cutlass_w4")
    with pytest.raises(ConfigError, match="cutlass_w4 runs on a CUDA GPU"):
        layer(torch.randn(2, 256))
    w = torch.randn(16, 64)
    qp8 = compute_qparams(w, QuantConfig(bits=8, group_size=None, symmetric=True))
    int8 = QuantLinear.from_codes(quantize(w, qp8), qp8, act_bits=8, backend="cutlass_int8")
    with pytest.raises(ConfigError, match="cutlass_int8 runs on a CUDA GPU"):
        int8(torch.randn(2, 64))
    with pytest.raises(ConfigError, match="cutlass_w4 runs 4-bit weights with float"):
        QuantLinear.from_codes(quantize(w, qp8), qp8, backend="cutlass_w4")(torch.randn(2, 64))


def test_shuffle_offsets_are_the_layout_cutlass_printed():
    """Offsets of rows 0 and 1, columns 0-19, of a 256 x 128 weight, as CUTLASS 4.2 itself
    evaluated tile_to_shape(compute_memory_reordering_atom<bf16, 1x1, [0,2,4,6,1,3,5,7]>, ...)
    (a host program printed them); and the whole map is a permutation."""
    offsets = cutlass_w4.shuffle_offsets(256, 128)
    row0 = [0, 4, 8, 12, 16, 20, 24, 28, 2, 6, 10, 14, 18, 22, 26, 30, 4096, 4100, 4104, 4108]
    row1 = [32, 36, 40, 44, 48, 52, 56, 60, 34, 38, 42, 46, 50, 54, 58, 62, 4128, 4132, 4136]
    assert offsets[0, :20].tolist() == row0
    assert offsets[1, :19].tolist() == row1
    assert offsets[16, 0] == 256  # the next 16-row tile follows the first
    assert torch.equal(offsets.reshape(-1).sort().values, torch.arange(256 * 128))


def test_shuffled_bytes_hold_every_nibble_where_the_offsets_say():
    gen = torch.Generator().manual_seed(3)
    plain = torch.randint(0, 256, (32, 64), generator=gen, dtype=torch.uint8)  # [n, k / 2]
    shuffled = cutlass_w4.shuffle(plain)
    assert shuffled.shape == plain.shape and shuffled.dtype == torch.uint8
    nibbles = torch.stack((plain & 0xF, plain >> 4), -1).reshape(32, 128)
    flat = torch.stack((shuffled & 0xF, shuffled >> 4), -1).reshape(-1)
    assert torch.equal(flat[cutlass_w4.shuffle_offsets(32, 128)], nibbles)


def test_build_kernels_check_names_what_is_missing_and_unknown_names_are_one_line(
    tmp_path, monkeypatch, capsys
):
    from faircalib.cli import main

    monkeypatch.delenv(cutlass_lib.PREBUILT_ENV, raising=False)
    monkeypatch.setenv("FAIRCALIB_CACHE", str(tmp_path))
    monkeypatch.setattr(cutlass_lib, "_LOADED", {})
    monkeypatch.setattr(cutlass_lib, "_FAILED", {})
    monkeypatch.setattr(cutlass_lib, "toolchain_key", lambda command: "t00lchain")
    assert main(["build-kernels", "--check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in out] == cutlass_lib.library_names()
    assert all("faircalib build-kernels" in line for line in out)
    assert main(["build-kernels", "w9a9_sm90"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUTLASS library w9a9_sm90" in err[0]
    assert not list(tmp_path.iterdir())  # nothing built, nothing half-written


def test_a_library_from_another_version_is_refused_with_the_command_to_rebuild(monkeypatch):
    monkeypatch.setattr(cutlass_lib, "_LOADED", {cutlass_w4.NAME: object()})
    monkeypatch.setattr(cutlass_lib, "_FAILED", {})
    with pytest.raises(cutlass_lib.CutlassUnavailable, match="faircalib build-kernels"):
        cutlass_lib.check_version(cutlass_w4.NAME, 8, cutlass_w4.CONFIGS)  # an older build
    with pytest.raises(cutlass_lib.CutlassUnavailable, match="another version"):
        cutlass_lib.load(cutlass_w4.NAME)  # remembered: not loaded again
    cutlass_lib.check_version(cutlass_w4.NAME, cutlass_w4.CONFIGS, cutlass_w4.CONFIGS)


def test_a_library_is_declared_once_and_a_refused_one_every_call(monkeypatch):
    """`load`'s declare step (version check, C signatures) runs on the first call for a
    loaded library only; one that raises (a stale build) raises again on every call."""
    lib = types.SimpleNamespace()
    monkeypatch.setattr(cutlass_lib, "_LOADED", {"good": lib, "stale": types.SimpleNamespace()})
    monkeypatch.setattr(cutlass_lib, "_FAILED", {})
    calls = []
    for _ in range(3):
        assert cutlass_lib.load("good", calls.append) is lib
    assert calls == [lib]

    def refuse(_lib):
        raise cutlass_lib.CutlassUnavailable("built from another version")

    for _ in range(2):
        with pytest.raises(cutlass_lib.CutlassUnavailable, match="another version"):
            cutlass_lib.load("stale", refuse)


@pytest.mark.parametrize("group", [128, 256, None])
def test_w4a8_group_scales_and_e4m3_codes_make_the_dequantized_weight_exactly(group):
    """`group_scales` (one scale per 128-k tile) times code - zero in e4m3 (what `w4a8_unpack`
    writes: tests/test_kernels_w4a8_dq.py checks it against the codes) is the layer's weight
    scale * (code - zero), bit for bit, for groups of 128, 256 and one per channel."""
    gen = torch.Generator().manual_seed(3)
    n, k = 24, 512
    if group == 256:  # QuantConfig has no g256: codes and grids drawn
        codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
        scale = torch.rand(n, k // group, generator=gen) + 0.01
        zero = torch.randint(0, 16, (n, k // group), generator=gen).to(torch.uint8)
        want = (codes.float() - zero.float().repeat_interleave(group, 1)) * scale.repeat_interleave(
            group, 1
        )
    else:
        w = torch.randn(n, k, generator=gen)
        qp = compute_qparams(w, QuantConfig(bits=4, group_size=group, symmetric=False))
        codes, scale, zero = quantize(w, qp), qp.scale, qp.zero
        want = dequantize(codes, qp)  # float32: scale * (code - zero)
    per_tile = cutlass_w4a8.group_scales(scale, k)
    assert per_tile.shape == (n, k // 128) and per_tile.dtype == torch.float32
    minus_zero = codes.double() - zero.double().repeat_interleave(k // zero.shape[1], 1)
    e4m3 = minus_zero.to(torch.float8_e4m3fn)
    assert torch.equal(e4m3.double(), minus_zero)  # |code - zero| <= 15: exact in e4m3
    got = e4m3.float().view(n, -1, 128) * per_tile[..., None]  # the same float32 product
    assert torch.equal(got.view(n, k), want)


def test_w4a8_group_scales_refuse_groups_the_k_tile_cannot_hold():
    with pytest.raises(ValueError, match="groups of a multiple of 128 inputs, got 256 inputs"):
        cutlass_w4a8.group_scales(torch.ones(8, 4), 256)  # groups of 64


def test_the_w4a8_gemm_refuses_what_it_would_misread():
    e4m3 = torch.float8_e4m3fn
    a8, w8 = torch.zeros(4, 256, dtype=e4m3), torch.zeros(24, 256, dtype=e4m3)
    ok = (a8, torch.ones(4), w8, torch.ones(24, 2))
    for bad, what in (
        ((a8.to(torch.int8), *ok[1:]), "e4m3 operands"),
        ((a8, torch.ones(4, dtype=torch.float64), *ok[2:]), "float32 scales"),
        ((a8, ok[1], w8, torch.ones(2, 24)), r"w_scale \[24, 2\]"),
        ((a8[:, :192], ok[1], w8[:, :192], ok[3]), "K % 128 == 0"),
        (ok, "CUDA tensors on one device"),  # everything right but the device
    ):
        with pytest.raises(ValueError, match=what):
            cutlass_w4a8.check_operands(*bad)


def test_the_w4a8_tile_rule_picks_near_the_fastest_configuration_measured():
    """On the recorded H200 sweep (every configuration with its own quantization and unpack,
    eight shapes, M = 256 to 4096) the rule's tile ran within 10% of the fastest in 31 cells of
    32 and within 15% in every one (3584 x 512 at M = 4096: 64 x 128 ping-pong, 1.14x)."""
    ms = _recorded_ms("cutlass-w4a8")
    ratios = []
    for shape, m in {(s, m) for s, m, _ in ms}:
        k, n = map(int, shape.split("x"))
        times = {c: ms.get((shape, m, f"cutlass_w4a8_c{c}")) for c in range(4)}
        if None not in times.values():
            ratios.append(times[cutlass_w4a8.config_for(m, n, k)] / min(times.values()))
    assert len(ratios) == 32
    assert sum(r <= 1.10 for r in ratios) >= 31 and max(ratios) <= 1.15


def test_quantlinear_names_why_cutlass_w4a8_cannot_run_here(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    codes, qp = _layer()
    layer = QuantLinear.from_codes(codes, qp, act_bits=8, act_format="fp8", backend="cutlass_w4a8")
    with pytest.raises(ConfigError, match="cutlass_w4a8 runs on a CUDA GPU"):
        layer(torch.randn(2, 256))
    # as on a Hopper GPU with Triton: groups of 64 (which `w4a8` takes) are named
    from faircalib.kernels import backends

    monkeypatch.setattr(backends, "_triton_8bit_common", lambda *a, **k: None)
    monkeypatch.setattr(backends, "_cutlass_common", lambda *a, **k: None)
    w = torch.randn(16, 256)
    qp64 = compute_qparams(w, QuantConfig(bits=4, group_size=64, symmetric=False))
    small = QuantLinear.from_codes(quantize(w, qp64), qp64, act_bits=8, act_format="fp8")
    why = backends.supports(small, "cutlass_w4a8", "cuda", torch.bfloat16, 256)
    assert why is not None and "groups of a multiple of 128 inputs" in why and "group 64" in why
    wide = torch.randn(8, cutlass_w4a8.MAX_K + 128)  # more groups than the library's table
    qpw = compute_qparams(wide, QuantConfig(bits=4, group_size=128, symmetric=False))
    deep = QuantLinear.from_codes(quantize(wide, qpw), qpw, act_bits=8, act_format="fp8")
    why = backends.supports(deep, "cutlass_w4a8", "cuda", torch.bfloat16, 256)
    assert why is not None and "in_features <= 131072" in why and "131200 inputs" in why


def test_auto_takes_cutlass_w4a8_for_w4afp8_layers_from_m_256(monkeypatch):
    """As on a Hopper GPU with the libraries built: a W4AFP8 layer's `auto` runs `cutlass_w4a8`
    from M = 256 (where the H200 sweep measured it faster than the W4A16 path on the
    fake-quantized activations, narrow layers included), and the W4A16 rule below; an INT8
    layer never gets it."""
    from faircalib.kernels import backends

    monkeypatch.setattr(backends, "_cuda_capability", lambda: (9, 0))
    monkeypatch.setattr(backends, "_triton_8bit_common", lambda *a, **k: None)
    monkeypatch.setattr(backends, "_cutlass_library", lambda load: None)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    for out_f in (512, 4096):  # Dream's K / V width and a wide layer
        codes, qp = _layer(out_f=out_f)
        fp8 = QuantLinear.from_codes(codes, qp, act_bits=8, act_format="fp8")
        pick = lambda m, layer=fp8: layer.choose_backend("cuda", torch.bfloat16, m)  # noqa: E731
        assert pick(256) == pick(4096) == "cutlass_w4a8"
        assert pick(255) != "cutlass_w4a8"
        int8 = QuantLinear.from_codes(codes, qp, act_bits=8)
        assert int8.choose_backend("cuda", torch.bfloat16, 4096) != "cutlass_w4a8"


@pytest.mark.parametrize("module", [cutlass_w8a8, cutlass_w4a8])
def test_the_scaled_gemm_libraries_share_one_declaration(module, monkeypatch):
    """`declare_scaled_gemm` gives both 8-bit libraries their C signatures (12 GEMM
    arguments, the workspace size as size_t, strings for errors and names) and refuses a
    library of another configuration count."""
    monkeypatch.setattr(cutlass_lib, "_LOADED", {})
    monkeypatch.setattr(cutlass_lib, "_FAILED", {})
    fns = {s: types.SimpleNamespace() for s in ("gemm", "workspace", "error", "config_name")}
    lib = types.SimpleNamespace(**{f"fc_{module.NAME}_{k}": v for k, v in fns.items()})
    setattr(lib, f"fc_{module.NAME}_configs", lambda: module.CONFIGS)
    cutlass_lib.declare_scaled_gemm(lib, module.NAME, module.CONFIGS)
    assert len(fns["gemm"].argtypes) == 12 and fns["gemm"].argtypes[10] is ctypes.c_size_t
    assert fns["workspace"].restype is ctypes.c_size_t and fns["error"].restype is ctypes.c_char_p
    with pytest.raises(cutlass_lib.CutlassUnavailable, match="another version"):
        cutlass_lib.declare_scaled_gemm(lib, module.NAME, module.CONFIGS + 1)


# --- the lookup-table W4A8 kernel (csrc/w4a8_lut_sm90.cu) ----------------------------------------
E8M0 = QuantConfig(bits=4, group_size=128, symmetric=True, scale_dtype="e8m0")


def _e8m0_layer(out_f: int = 32, in_f: int = 512, seed: int = 0, bits: int = 4):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=gen) * torch.logspace(-3, 0, out_f)[:, None]
    qp = compute_qparams(
        w, QuantConfig(bits=bits, group_size=128, symmetric=True, scale_dtype="e8m0")
    )
    return w, quantize(w, qp), qp


def test_e8m0_scales_are_the_nearest_power_of_two_of_the_min_max_scale():
    """Each group's scale is 2^floor or 2^ceil of its min-max scale (max|w| / 7.5), whichever
    is nearer (ties up), whatever the weights' magnitude; codes are clamped where it rounded
    down."""
    w, codes, qp = _e8m0_layer()
    minmax = w.reshape(32, 4, 128).abs().amax(-1) / 7.5
    low = torch.exp2(torch.floor(torch.log2(minmax)))
    want = torch.where(minmax - low < 2 * low - minmax, low, 2 * low)
    assert torch.equal(qp.scale, want)
    assert codes.min() >= 0 and codes.max() <= 15 and bool((qp.zero == 8).all())


def test_the_lookup_tables_turn_the_codes_into_the_dequantized_weight():
    """The kernel's conversion, emulated as CUTLASS's lookup_table_convert does it (the low
    three bits index the group's table of -8 r ... -1 r, the top bit picks it or its
    negation, index 0 with the bit clear is zero), times the output scale, is exactly
    `dequantize` of the codes: for 4-bit codes and 3-bit ones (zero point 4)."""
    for bits in (4, 3):
        w, codes, qp = _e8m0_layer(bits=bits, seed=bits)
        assert cutlass_w4a8_lut.grid_why(lambda c=codes: c, qp.scale, qp.zero, bits) is None
        values = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        out_scale, rel = cutlass_w4a8_lut.split_scales(qp.scale)
        nibbles = cutlass_w4a8_lut.encode(values).long()
        table = cutlass_w4a8_lut.tables(rel).float()  # [G, n, 8]
        n, k = codes.shape
        group = (torch.arange(k) // 128)[None, :].expand(n, -1)
        neg = table[group, torch.arange(n)[:, None].expand(-1, k), nibbles & 7]
        level = torch.where(nibbles >= 8, neg, torch.where(nibbles & 7 > 0, -neg, 0.0))
        assert torch.equal(level * out_scale[:, None], dequantize(codes, qp))


def test_the_nibble_encoding_is_cutlass_unified_int4():
    """CUTLASS's unified_encode_int4b table: positive v stored as 8 - v (1 -> 0b0111, ...,
    7 -> 0b0001), negatives and zero as two's complement; decode inverts it."""
    values = torch.arange(-8, 8, dtype=torch.int8)
    want = [8, 9, 10, 11, 12, 13, 14, 15, 0, 7, 6, 5, 4, 3, 2, 1]
    assert cutlass_w4a8_lut.encode(values).tolist() == want
    assert torch.equal(cutlass_w4a8_lut.decode(cutlass_w4a8_lut.encode(values)), values)


def test_the_lookup_table_grid_check_names_what_is_off_the_grid():
    w, codes, qp = _e8m0_layer()

    def why(c, scale, zero, bits=4):
        return cutlass_w4a8_lut.grid_why(lambda: c, scale, zero, bits)

    assert why(codes, qp.scale * 1.25, qp.zero) == (
        "needs power-of-two weight scales (scheme w4a8fp8-e8m0)"
    )
    assert "symmetric" in why(codes, qp.scale, qp.zero - 1)
    assert "at most 4 bits" in why(codes, qp.scale, qp.zero, 8)
    edge = qp.scale.clone()
    edge[0, 1] = edge[0].max() * 2.0**-14  # 14 octaves down: level 1 is e4m3's 2^-9, exact
    assert why(codes, edge, qp.zero) is None
    far = qp.scale.clone()
    far[0, 1] = far[0].max() * 2.0**-15  # 15 octaves down: not exact
    assert "2^14" in why(codes, far, qp.zero)
    empty = codes.clone()
    empty[0, 128:256] = 8  # ... unless every value of that group is zero
    assert why(empty, far, qp.zero) is None

    def never():
        raise AssertionError("codes unpacked where the scales alone decide")

    assert cutlass_w4a8_lut.grid_why(never, qp.scale, qp.zero, 4) is None


def test_the_lookup_table_layout_holds_the_codes_losslessly(monkeypatch):
    """LutWeight.prepare's shuffle and values() invert each other for 4- and 3-bit codes, made
    in blocks of rows (the atom here is any permutation: the library's own one is checked on
    the GPU), and the backend's codes_from_layout gives the layer's codes back."""
    from faircalib.kernels import backends

    atom = torch.randperm(16 * 32, generator=torch.Generator().manual_seed(3)).reshape(16, 32)
    monkeypatch.setattr(cutlass_w4a8_lut, "_atom_offsets", lambda: atom)
    monkeypatch.setattr(cutlass_w4a8_lut, "SHUFFLE_ROWS", 32)  # 48 rows: two blocks, one short
    i, j = torch.meshgrid(torch.arange(48), torch.arange(512), indexing="ij")
    by_element = atom[i % 16, j % 32] + 512 * (i // 16 + (j // 32) * 3)  # the tiling, written out
    assert torch.equal(cutlass_w4a8_lut.shuffle_offsets(48, 512), by_element)
    for bits in (4, 3):
        _, codes, qp = _e8m0_layer(out_f=48, bits=bits, seed=bits)
        values = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
        out_scale, rel = cutlass_w4a8_lut.split_scales(qp.scale)
        weight = cutlass_w4a8_lut.LutWeight.prepare(values, out_scale, rel)
        assert weight.int4.shape == (48, 256) and not torch.equal(
            weight.int4, backends.pack_codes(cutlass_w4a8_lut.encode(values), 4)
        )  # shuffled
        assert torch.equal(weight.values(), values)
        layer = QuantLinear.from_codes(codes, qp, act_bits=8, act_format="fp8")
        prepared = backends._cutlass_w4a8_lut_prepare(layer, torch.device("cpu"), torch.bfloat16)
        assert torch.equal(backends._cutlass_w4a8_lut_codes(prepared), codes)


def test_the_grid_check_is_cached_until_the_layer_loads_new_weights(monkeypatch):
    """`_lut_why` runs grid_why once while the layer's plans live (no tensor versions: the
    samplers run under inference_mode) and again after load_state_dict."""
    from faircalib.kernels import backends

    _, codes, qp = _e8m0_layer()
    layer = QuantLinear.from_codes(codes, qp, act_bits=8, act_format="fp8")
    calls = []
    real = cutlass_w4a8_lut.grid_why
    monkeypatch.setattr(cutlass_w4a8_lut, "grid_why", lambda *a: calls.append(1) or real(*a))
    with torch.inference_mode():
        assert backends._lut_why(layer) is None and backends._lut_why(layer) is None
    assert len(calls) == 1
    state = layer.state_dict()
    state["scale"] = state["scale"] * 1.25
    layer.load_state_dict(state)
    assert "power-of-two" in backends._lut_why(layer) and len(calls) == 2


def test_the_e8m0_scheme_keeps_its_scales_through_the_packed_export_config():
    """Packed export asks for bf16 weight scales (packed_act_config); a w4a8fp8-e8m0 run keeps
    its power-of-two scales (exact in bf16), other schemes take bf16."""
    from faircalib.calib.activations import SCHEMES, ActCalibConfig
    from faircalib.calib.fakequant_io import packed_act_config

    for scheme, want in (("w4a8fp8-e8m0", "e8m0"), ("w4a8fp8", "bfloat16")):
        cfg = packed_act_config(ActCalibConfig(scheme=scheme, method="gptq"))
        wcfg = SCHEMES[scheme].weight_config("gptq")
        merged = {**{"scale_dtype": wcfg.scale_dtype}, **cfg.weight_overrides("gptq")}
        assert merged["scale_dtype"] == want


def test_the_lookup_table_tile_rule_picks_near_the_fastest_configuration_measured():
    """On the recorded H200 sweeps (every tile with its own quantization, eight shapes,
    M = 1-256 in one run with nine tiles, 1024-4096 in another with six) the rule's tile ran
    within 10% of the fastest in at least 79 cells of 80 and within 12% in every one."""
    ms = {
        key: t
        for key, t in _recorded_ms("cutlass-w4a8-lut").items()
        if key[1] > 256  # M <= 256: the small-M run below
    }
    ms |= _recorded_ms("cutlass-w4a8-lut-small")
    ratios = []
    for shape, m in {(s, m) for s, m, _ in ms}:
        k, n = map(int, shape.split("x"))
        times = {c: ms.get((shape, m, f"cutlass_w4a8_lut_c{c}")) for c in range(9)}
        times = {c: t for c, t in times.items() if t is not None}  # M > 256: tiles 0-5 ran
        if len(times) >= 6:
            ratios.append(times[cutlass_w4a8_lut.config_for(m, n, k)] / min(times.values()))
    assert len(ratios) == 80
    assert sum(r <= 1.10 for r in ratios) >= 79 and max(ratios) <= 1.12


def test_auto_prefers_the_lookup_table_kernel_for_e8m0_w4afp8_layers(monkeypatch):
    """As on a Hopper GPU with the libraries built: a W4AFP8 layer with power-of-two scales
    runs `cutlass_w4a8_lut` at every M; the same weights with float scales (or with zero
    points) `cutlass_w4a8` from M = 256; on the CPU the backend says it needs the GPU."""
    from faircalib.kernels import backends

    w, codes, qp = _e8m0_layer(out_f=64)
    layer = QuantLinear.from_codes(
        codes, qp, act_bits=8, act_format="fp8", backend="cutlass_w4a8_lut"
    )
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ConfigError, match="cutlass_w4a8_lut runs on a CUDA GPU"):
        layer(torch.randn(2, 512))
    monkeypatch.setattr(backends, "_cuda_capability", lambda: (9, 0))
    monkeypatch.setattr(backends, "_triton_8bit_common", lambda *a, **k: None)
    monkeypatch.setattr(backends, "_cutlass_library", lambda load: None)
    auto = QuantLinear.from_codes(codes, qp, act_bits=8, act_format="fp8")
    for m in (1, 255, 256, 4096):
        assert auto.choose_backend("cuda", torch.bfloat16, m) == "cutlass_w4a8_lut"
    for cfg in (
        QuantConfig(bits=4, group_size=128, symmetric=True),
        QuantConfig(bits=4, group_size=128, symmetric=False, scale_dtype="e8m0"),
    ):
        qp2 = compute_qparams(w, cfg)
        off = QuantLinear.from_codes(quantize(w, qp2), qp2, act_bits=8, act_format="fp8")
        assert off.choose_backend("cuda", torch.bfloat16, 256) == "cutlass_w4a8"
        assert off.choose_backend("cuda", torch.bfloat16, 255) != "cutlass_w4a8"
        why = backends.supports(off, "cutlass_w4a8_lut", "cuda", torch.bfloat16, 256)
        assert why is not None and why.startswith("cutlass_w4a8_lut needs")
