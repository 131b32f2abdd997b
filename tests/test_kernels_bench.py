"""The GPU benchmark scripts run end to end on the CPU with --smoke."""

import gzip
import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_kernels_smoke_writes_checked_results(tmp_path):
    result = load_script("kernels").main(["--smoke", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "kernels.json").read_text())
    # a record kept gzipped (the largest in benchmarks/results) reads back the same
    zipped = tmp_path / "zipped" / "kernels.json.gz"
    zipped.parent.mkdir()
    zipped.write_bytes(gzip.compress((tmp_path / "kernels.json").read_bytes()))
    kernels = sys.modules["bench_kernels"]
    plain = kernels.load_result(tmp_path / "kernels.json")
    assert kernels.load_result(zipped) == plain
    assert kernels.load_result(zipped.with_suffix("")) == plain  # the name without .gz finds it
    assert on_disk["record"]["command"].startswith("python benchmarks/kernels.py --smoke")
    assert {"git_commit", "device", "date", "torch", "gemlite"} <= set(on_disk["record"])
    assert (tmp_path / "kernels.png").stat().st_size > 1000
    assert "| M | bf16 (us) |" in (tmp_path / "kernels.md").read_text()
    rows = [r for r in result["rows"] if "ms" in r]
    # every CPU backend (7 + auto + auto eager) ran at every shape and M, and agreed with its float64 reference
    assert len(rows) == 2 * 3 * 9
    assert all(r["rel_err"] <= 1e-2 and r["correct"] for r in rows)
    assert all(r["ms"] > 0 and r["speedup_vs_bf16"] > 0 for r in rows)
    # roofline columns on every timed row (no peaks known for a CPU: shares left empty)
    assert all(r["tflops"] > 0 and r["gbs"] > 0 and r["roofline_pct"] is None for r in rows)
    assert {"int8_intmm", "fp8_scaled_mm"} <= {r["backend"] for r in rows}
    assert set(result["suggested_w8a8"]) == {
        "int8_by_m",
        "int8_gemm_by_m",
        "fp8_gemm_by_m",
        "w4a8_by_m",
        "w4a8_min_m",
    }
    assert result["crossover"]["per_shape"].keys() == {"256x512", "512x256"}
    assert result["int4_vs_bf16"]["per_shape"].keys() == {"256x512", "512x256"}
    # the bare kernels ran and matched their float64 references (checked for all rows above)
    assert {"int4_aten", "fp8_aten", "auto_w4"} <= {r["backend"] for r in rows}
    # the suggested W4_AUTO rows partition M: one open-ended last row, bounds increasing
    suggested = result["suggested_w4_auto"]
    assert suggested and suggested[-1][0] == "inf"
    bounds = [b for b, _ in suggested[:-1]]
    assert bounds == sorted(bounds) and all(isinstance(b, int) for b in bounds)


def test_kernels_merge_joins_runs_of_separate_shapes_and_refuses_unlike_ones(tmp_path):
    kernels = load_script("kernels")
    common = ["--smoke", "--ms", "1,16", "--backends", "int4_torch,dequant_bf16"]
    parts = {}
    for shape in ("256x512", "512x256"):
        parts[shape] = kernels.main([*common, "--shapes", shape, "--out", str(tmp_path / shape)])
    paths = [str(tmp_path / s / "kernels.json") for s in parts]
    merged = kernels.main(["--merge", *paths, "--out", str(tmp_path / "both")])
    assert merged["shapes"] == ["256x512", "512x256"] and merged["shapes_not_run"] == []
    assert len(merged["rows"]) == sum(len(p["rows"]) for p in parts.values())
    # per-shape results are each part's own, computed from its rows alone
    for shape, part in parts.items():
        own = part["crossover"]["per_shape"][shape]
        assert merged["crossover"]["per_shape"][shape] == own
    assert [p["command"] for p in merged["record"]["parts"]] == [
        json.loads(Path(p).read_text())["record"]["command"] for p in paths
    ]
    assert "| M | bf16 (us) |" in (tmp_path / "both" / "kernels.md").read_text()
    # a part timed with other backends, or the same shape twice: one clear refusal
    kernels.main([*common[:-1], "int4_torch", "--shapes", "256x512", "--out", str(tmp_path / "o")])
    for bad, words in (
        ([paths[0], str(tmp_path / "o" / "kernels.json")], "other backends"),
        ([paths[0], paths[0]], "overlap"),
    ):
        with pytest.raises(SystemExit, match=words):
            kernels.main(["--merge", *bad, "--out", str(tmp_path / "bad")])
    assert not (tmp_path / "bad").exists()


def test_e2e_smoke_reports_latency_memory_and_bytes(tmp_path):
    result = load_script("e2e").main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path / "e2e.md").read_text().count("| int4_g128 |") == 2
    bytes_ = result["weight_bytes_per_block"]
    assert bytes_["ratio"] <= 0.28 and result["checks"]["int4_bytes_ratio_ok"]
    assert result["checks"]["int4_matches_fake_quant"]
    for name in ("bf16", "int4_g128", "w8a8_int8", "fp8"):
        for row in result["variants"][name]["batches"].values():
            assert row["per_block_ms"] > 0
            assert row["extrapolated_step_ms"] > 32 * row["per_block_ms"]
    # the exact W8A8 path on the CPU is the dequant reference itself
    for row in result["variants"]["w8a8_int8"]["batches"].values():
        assert row["rel_err_vs_fake_quant"] <= 1e-6
    fp8 = result["variants"]["fp8"]["batches"]["1"]
    assert fp8["backends"] == ["fp8"] and fp8["rel_err_vs_fake_quant"] <= 0.1
    # the FP8 step target: per batch the faster FP8 variant's eager step (no graphs on a CPU)
    v = result["variants"]
    for b in ("1", "8"):
        want = max(
            v["bf16"]["batches"][b]["extrapolated_step_ms"]
            / v[n]["batches"][b]["extrapolated_step_ms"]
            for n in ("fp8", "fp8_w8a8", "fp8_checkpoint")
        )
        assert result["checks"]["fp8_step_speedup_by_batch"][b] == pytest.approx(want)
    assert v["fp8_w8a8"]["batches"]["1"]["backends"] == ["fp8_w8a8"]
    # quantizing a shared input once changes no number: the same error as every layer alone
    for b in ("1", "8"):
        alone = v["fp8_w8a8_unshared"]["batches"][b]
        assert (
            alone["rel_err_vs_fake_quant"] == v["fp8_w8a8"]["batches"][b]["rel_err_vs_fake_quant"]
        )
    # an FP8 checkpoint as loaded: one e4m3 byte per weight and a float32 scale per output row
    # (the smoke block: d 128, MLP 384, 2 blocks; norms stay bf16 in every variant); the
    # INT8-grid QuantLinear on the FP8 GEMM keeps its codes beside the e4m3 layout
    ckpt = v["fp8_checkpoint"]
    weights = 2 * (4 * 128 * 128 + 3 * 128 * 384)
    rows = 2 * (4 * 128 + 2 * 384 + 128)
    norms = v["bf16"]["weights_resident_bytes"] - 2 * weights
    assert ckpt["weights_resident_bytes"] == weights + 4 * rows + norms
    assert v["fp8_w8a8"]["weights_resident_bytes"] > 1.9 * ckpt["weights_resident_bytes"]
    assert ckpt["batches"]["1"]["backends"] == ["reference"]  # CPU: the exact path
    assert not {"int8_w8a8", "w4a8_int8", "w4a8_fp8"} & set(v)  # CUDA-only kernels


@pytest.mark.parametrize("script", ["kernels", "e2e"])
def test_gpu_mode_without_cuda_is_refused_clearly(script, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        load_script(script).main(["--out", str(tmp_path)])
    assert "--smoke" in capsys.readouterr().err


def test_generation_8b_smoke_reports_tokens_per_second_per_scheme_and_cache(tmp_path):
    result = load_script("generation_8b").main(
        ["--smoke", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    )
    on_disk = json.loads((tmp_path / "out" / "generation_8b.json").read_text())
    assert on_disk["record"]["command"].startswith("python benchmarks/generation_8b.py --smoke")
    rows = result["rows"]
    cells = {(r["scheme"], r["batch"], r["cache"]) for r in rows}
    schemes = ("bf16", "w4_rtn", "w8a8_rtn")
    assert cells == {(s, b, c) for s in schemes for b in (1, 2) for c in ("none", "prefix", "dual")}
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["speedup_vs_bf16"] > 0
        assert 0.0 <= r["flip_rate"] <= 1.0
        if r["cache"] == "none":
            assert r["flip_rate"] == 0.0 and r["row_fraction"] == 1.0
            assert r["full_calls"] == r["model_calls"] == 16
        else:  # 4 blocks: one refresh each, the other steps run fewer rows
            assert r["full_calls"] == 4 and r["row_fraction"] < 1.0
    dual = [r["row_fraction"] for r in rows if r["cache"] == "dual"]
    prefix = [r["row_fraction"] for r in rows if r["cache"] == "prefix"]
    assert max(dual) < min(prefix)
    assert "| w4_rtn | 2 | dual |" in (tmp_path / "out" / "generation_8b.md").read_text()
    assert "| w8a8_rtn | 1 | prefix |" in (tmp_path / "out" / "generation_8b.md").read_text()


def test_generation_8b_runs_each_scheme_apart_and_stacked_side_by_side(tmp_path):
    bench = load_script("generation_8b")
    args = ["--smoke", "--stack-linears", "both", "--batch", "1", "--caches", "none"]
    result = bench.main([*args, "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out")])
    rows = {r["scheme"]: r for r in result["rows"]}
    assert set(rows) == {
        f"{s}{t}" for s in ("bf16", "w4_rtn", "w8a8_rtn") for t in ("", "+stacked")
    }
    # q/k/v and gate/up of every block: two groups a block, counted from the config
    n_blocks = {**bench.SHAPES["llada"][0], **bench.SMOKE_SIZES["llada"]}["n_layers"]
    for name, r in rows.items():
        assert r["stacked_groups"] == (2 * n_blocks if name.endswith("+stacked") else 0)
        assert ("same_tokens_as_apart" in r) == name.endswith("+stacked")
    md = (tmp_path / "out" / "generation_8b.md").read_text()
    assert "each scheme apart and with q/k/v and gate/up stacked" in md
    assert "- w4_rtn+stacked batch 1 cache none:" in md
