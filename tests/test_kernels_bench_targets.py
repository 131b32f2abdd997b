"""benchmarks/kernels.py's selection, time budget, per-shape writes and issue-16 target checks."""

import json
import math

import pytest

from test_kernels_bench import load_script


@pytest.fixture(scope="module")
def kernels():
    return load_script("kernels")


def _row(kernels, shape, m, backend, speed, correct=True):
    in_f, out_f = (int(v) for v in shape.split("x"))
    return kernels._row(
        in_f, out_f, m, backend, ms=1.0 / speed, correct=correct, speedup_vs_bf16=speed,
        tflops=1.0, gbs=2.0, roofline_pct=50.0, bound="math",
    )  # fmt: skip


def test_targets_take_the_fastest_correct_backend_per_cell_and_the_worst_cell(kernels):
    rows = [
        # FP8 at M >= 1024 on two shapes: per cell the faster backend counts
        _row(kernels, "4096x4096", 1024, "fp8_w8a8", 1.7),
        _row(kernels, "4096x4096", 1024, "fp8_triton", 1.2),
        _row(kernels, "14336x4096", 1024, "fp8_w8a8", 1.1),
        _row(kernels, "14336x4096", 1024, "fp8_triton", 1.65),
        _row(kernels, "14336x4096", 4096, "fp8_triton", 1.61),
        _row(kernels, "14336x4096", 256, "fp8_triton", 0.5),  # below the target's M range
        # INT8: a faster cell that failed its correctness check does not count
        _row(kernels, "4096x4096", 2048, "int8_w8a8", 3.0, correct=False),
        _row(kernels, "4096x4096", 2048, "int8_intmm", 0.6),
        # W4A16 at M = 1
        _row(kernels, "4096x4096", 1, "auto_w4", 2.0),
        _row(kernels, "4096x4096", 1, "triton_w4", 2.6),
    ]
    checks = {t["target"]: t for t in kernels.targets(rows)}
    fp8 = checks["FP8 W8A8"]
    # the grid also has 4096x4096 at M = 2048 (an INT8 row), where no FP8 cell was measured
    assert fp8["cells"] == 3 and fp8["missing"] == 1 and not fp8["met"]
    full = kernels.targets([*rows, _row(kernels, "4096x4096", 2048, "fp8_w8a8", 1.9)])
    assert next(t for t in full if t["target"] == "FP8 W8A8")["met"]
    assert (fp8["worst"]["shape"], fp8["worst"]["M"], fp8["worst"]["backend"]) == (
        "14336x4096", 4096, "fp8_triton"
    )  # fmt: skip
    int8 = checks["INT8 W8A8"]
    assert not int8["met"] and int8["worst"]["backend"] == "int8_intmm"
    assert [s["speedup_vs_bf16"] for s in int8["shortfalls"]] == [0.6]
    assert checks["W4A16 M = 1"]["met"] and checks["W4A16 M = 1"]["worst"]["speedup_vs_bf16"] == 2.6
    # no W4A8 row at all: not met, and said so
    assert checks["W4A8"]["worst"] is None and not checks["W4A8"]["met"]
    md = "\n".join(kernels.targets_markdown(list(checks.values()), ["3584x512"]))
    assert "| W4A8 | >= 1024 | 1.5x | not measured" in md
    assert "Shapes not run (time budget): 3584x512." in md


def test_backend_selection_keeps_the_baseline_and_refuses_unknown_names(kernels):
    import torch

    cands = kernels.candidates(torch.device("cpu"))
    picked = kernels.select(cands, "int8_intmm")
    assert [c.name for c in picked] == ["bf16", "int8_intmm"]
    with pytest.raises(SystemExit, match="unknown"):
        kernels.select(cands, "int8_intmm,nope")
    assert kernels.parse_shapes("4096x4096,3584x512") == [(4096, 4096), (3584, 512)]
    with pytest.raises(SystemExit, match="--shapes"):
        kernels.parse_shapes("4096by4096")


def test_spent_time_budget_runs_no_further_shape_and_says_which(kernels, tmp_path):
    argv = ["--smoke", "--out", str(tmp_path), "--backends", "int4_torch", "--time-budget", "0"]
    result = kernels.main(argv)
    # the budget is checked before each shape: 0 s lets none run
    assert result["rows"] == [] and result["shapes_not_run"] == ["256x512", "512x256"]
    on_disk = json.loads((tmp_path / "kernels.json").read_text())
    assert on_disk["shapes_not_run"] == ["256x512", "512x256"]


def test_selected_run_and_rerender_agree(kernels, tmp_path):
    argv = ["--smoke", "--out", str(tmp_path / "a"), "--backends", "int4_torch,auto_w4"]
    argv += ["--shapes", "256x512", "--ms", "1,16"]
    result = kernels.main(argv)
    assert {r["backend"] for r in result["rows"]} == {"bf16", "int4_torch", "auto_w4"}
    assert {(r["shape"], r["M"]) for r in result["rows"]} == {("256x512", 1), ("256x512", 16)}
    assert result["record"]["seconds"] > 0 and result["shapes_not_run"] == []
    again = kernels.main(
        ["--rerender", str(tmp_path / "a" / "kernels.json"), "--out", str(tmp_path / "b")]
    )
    # the report recomputed from the written rows (floats kept to 6 significant digits)
    for got, want in zip(again["targets"], result["targets"], strict=True):
        assert (got["target"], got["met"], got["cells"]) == (
            want["target"],
            want["met"],
            want["cells"],
        )
        if want["worst"] is None:  # no backend of this target on the CPU
            assert got["worst"] is None
            continue
        for key in ("shape", "M", "backend"):
            assert got["worst"][key] == want["worst"][key]
        assert got["worst"]["speedup_vs_bf16"] == pytest.approx(
            want["worst"]["speedup_vs_bf16"], rel=1e-5
        )
    on_disk = json.loads((tmp_path / "a" / "kernels.json").read_text())
    assert set(on_disk["rows"]) == {"columns", "values"}  # packed: keys once per row kind
    assert again["rows"] == kernels.load_result(tmp_path / "a" / "kernels.json")["rows"]
    # the rows came back as written (to the 6 digits floats are kept to), in order
    assert [(r["shape"], r["M"], r["backend"]) for r in again["rows"]] == [
        (r["shape"], r["M"], r["backend"]) for r in result["rows"]
    ]
    assert again["rows"][0]["ms"] == pytest.approx(result["rows"][0]["ms"], rel=1e-5)
    assert (tmp_path / "b" / "kernels.md").read_text().count("## Targets (issue 16)") == 1
    assert math.isfinite(result["rows"][0]["ms"])


def test_packed_rows_round_trip_every_kind_in_order(kernels, tmp_path):
    rows = [
        {"shape": "4x4", "M": 1, "backend": "bf16", "ms": 0.5, "roofline_pct": None},
        {"shape": "4x4", "M": 1, "backend": "triton_gemv", "skipped": "needs CUDA"},
        {"shape": "4x4", "M": 16, "backend": "bf16", "ms": 0.25, "roofline_pct": 12.5},
    ]
    packed = kernels.pack_rows(rows)
    assert len(packed["columns"]) == 2 and [v[0] for v in packed["values"]] == [0, 1, 0]
    assert kernels.unpack_rows(json.loads(json.dumps(packed))) == rows  # None stays None
    assert kernels.unpack_rows(rows) == rows  # files written before packing: a list of dicts
    path = tmp_path / "kernels.json"
    path.write_text(json.dumps({"rows": packed}))
    assert kernels.load_result(path)["rows"] == rows


def test_the_sweep_says_where_gemlite_leads_int8_w8a8(kernels):
    """int8_gemm_by_m compares int8_w8a8's cells (gemlite's kernels where INT8_W8A8_GEMM names
    them) with int8_triton's (ours): gemlite only where the rule sends the cell there and it
    is faster; ours where it is slower, and where both cells ran ours."""

    def cell(backend, m, speed):
        return {"shape": "8x8", "M": m, "backend": backend, "correct": True,
                "speedup_vs_bf16": speed}  # fmt: skip

    rows = [cell("int8_w8a8", 1, 1.7), cell("int8_triton", 1, 0.5)]
    rows += [cell("int8_w8a8", 16, 0.6), cell("int8_triton", 16, 0.9)]
    rows += [cell("int8_w8a8", 4096, 1.5), cell("int8_triton", 4096, 1.4)]
    got = kernels.suggested_w8a8(rows)["int8_gemm_by_m"]
    assert kernels.int8_w8a8_kernel(1) == kernels.int8_w8a8_kernel(16) == "gemlite"
    assert kernels.int8_w8a8_kernel(4096) == "triton"
    assert got == {1: "gemlite", 16: "triton", 4096: "triton"}


def test_shortfalls_say_what_holds_each_cell(kernels, monkeypatch):
    """A cell below its target carries the time the target asks for and, for a layer that
    quantizes its own activations, its GEMM alone (same cell) and the per-token pass: the
    numbers recomputed here from the shapes and the H200's datasheet peaks."""
    monkeypatch.setattr(kernels, "DEVICE_PEAKS", "h200")
    m, k, n = 1024, 4096, 4096

    def timed(backend, us, weight_bytes):
        nbytes = k * n * weight_bytes + 2 * m * (k + n)
        return kernels._row(
            k, n, m, backend, ms=us / 1e3, correct=True, speedup_vs_bf16=50.0 / us,
            tflops=2 * m * k * n / us / 1e6, gbs=nbytes / us / 1e3,
            pct_peak_gbs=100 * nbytes / us / 1e3 / 4800.0,
        )  # fmt: skip

    rows = [timed("bf16", 50.0, 2), timed("fp8_w8a8", 40.0, 1), timed("fp8_prequant", 30.0, 1)]
    check = next(t for t in kernels.targets(rows) if t["target"] == "FP8 W8A8")
    (cell,) = check["shortfalls"]
    assert cell["backend"] == "fp8_w8a8" and cell["need_us"] == pytest.approx(50.0 / 1.6)
    assert cell["alone_backend"] == "fp8_prequant" and cell["pass_us"] == pytest.approx(10.0)
    pass_us = (m * k * 2 + m * k + 4 * m) / 4.8e12 * 1e6  # bf16 in, e4m3 + float32 scales out
    assert cell["pass_us_at_peak"] == pytest.approx(pass_us)
    assert cell["speed_with_pass_at_peak"] == pytest.approx(50.0 / (30.0 + pass_us))
    # 31.25 us would move the same bytes 40/31.25 times as fast
    nbytes = k * n + 2 * m * (k + n)
    assert cell["need_gbs"] == pytest.approx(nbytes / 31.25e-6 / 1e9)
    assert cell["need_pct_peak_gbs"] == pytest.approx(100 * nbytes / 31.25e-6 / 4.8e12)
    # the GEMM alone met its own target (50 / 30 = 1.67x): no shortfall there
    alone = next(t for t in kernels.targets(rows) if t["target"] == "FP8 W8A8, GEMM alone")
    assert alone["met"] and alone["shortfalls"] == []
    md = "\n".join(kernels.shortfalls_markdown(kernels.targets(rows)))
    assert (
        f"| FP8 W8A8 | {k}x{n} M={m} | fp8_w8a8 | 1.25x | 1.6x | 40.0 | 30.0 (fp8_prequant)" in md
    )
    assert f"| {pass_us:.1f} | {50.0 / (30.0 + pass_us):.2f}x |" in md
    # without a GEMM-alone cell the layer's shortfall still says what its time would take
    (bare,) = next(t for t in kernels.targets(rows[:2]) if t["target"] == "FP8 W8A8")["shortfalls"]
    assert "alone_us" not in bare and bare["need_us"] == pytest.approx(31.25)
