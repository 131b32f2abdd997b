"""CI-sized smoke run of the comparison harness: structure and finiteness, not values."""

import json
import math

import pytest
import torch

from benchmark_scripts import load_benchmark
from faircalib.cli import main

torch.set_num_threads(1)


def test_bench_smoke(tmp_path, capsys):
    out = tmp_path / "bench"
    code = main(
        [
            "bench",
            "--model",
            "mdlm-tiny",
            "--methods",
            "rtn,gptq,fair",
            "--schemes",
            "w4g64,w8pc",
            "--nsamples",
            "4",
            "--seq-len",
            "64",
            "--eval-limit",
            "4",
            "--eval-data",
            "wikitext2:test",
            "--flip-prompts",
            "2",
            "--flip-gen-length",
            "16",
            "--flip-steps",
            "8",
            "--recon-steps",
            "4",
            "--e2e-steps",
            "4",
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in result["rows"]] == ["float"] + ["rtn", "gptq", "fair"] * 2
    fair = [r for r in result["rows"] if r["method"] == "fair"]
    assert all({"recon_s", "e2e_s"} <= set(r["timings"]) for r in fair)  # stage 2 ran
    for entry in result["summary"]:
        assert math.isfinite(entry["wikitext2:test_ppl"])
        if entry["method"] != "float":
            assert 0.0 <= entry["flip_rate"] <= 1.0
            assert entry["weight_bytes"] < result["summary"][0]["weight_bytes"]
    for name in ("bench.json", "bench.md", "ppl_vs_bits.png", "flip_rate_by_step.png"):
        assert (out / name).stat().st_size > 0
    assert "Table 1" in (out / "bench.md").read_text()


def test_bench_offload_gives_the_same_rows(tmp_path, capsys):
    args = ["bench", "--model", "mdlm-tiny", "--methods", "gptq", "--schemes", "w4g64"]
    args += ["--nsamples", "2", "--seq-len", "32", "--eval-limit", "2"]
    args += ["--eval-data", "wikitext2:test", "--flip-prompts", "1", "--flip-gen-length", "8"]
    args += ["--flip-steps", "4", "--json"]
    results = []
    for extra in ([], ["--offload"]):
        assert main([*args, *extra]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[1]["config"]["offload"] is True
    for a, b in zip(results[0]["summary"], results[1]["summary"], strict=True):
        assert a["wikitext2:test_ppl"] == b["wikitext2:test_ppl"]
        assert a.get("flip_rate") == b.get("flip_rate")


def load_offload_script():
    return load_benchmark("offload")


def test_offload_benchmark_smoke(tmp_path):
    result = load_offload_script().main(["--smoke", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "offload.json").read_text())
    assert on_disk["record"]["command"].startswith("python benchmarks/offload.py --smoke")
    assert {"git_commit", "device", "date", "torch"} <= set(on_disk["record"])
    assert [m["mode"] for m in result["modes"]] == ["offload", "on_device"]
    for mode in result["modes"]:
        assert mode["peak_gpu_bytes"] is None  # the CPU has no GPU memory to measure
        assert mode["wall_s"] > 0 and mode["engine_timings"]["quantize_s"] > 0
        assert mode["model_ends_on"] == ["cpu"]
    sizes = result["sizes"]
    assert sizes["model_bytes"] > sizes["block_bytes"] > 0 and sizes["stem_head_bytes"] > 0
    assert result["comparison"]["identical_weights"] and result["comparison"]["identical_codes"]
    assert result["comparison"]["quantized_layers"] == 4 * result["shape"]["blocks"]
    assert result["checks"]["identical"] and result["checks"]["offload_ends_on_cpu"]
    assert result["checks"]["offload_peak_below_model_bytes"] is None
    md = (tmp_path / "offload.md").read_text()
    assert "| offload | - |" in md and "Identical quantized weights in both modes: yes" in md


def test_offload_benchmark_needs_cuda_without_smoke(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit):
        load_offload_script().main(["--out", str(tmp_path)])
    assert "--smoke" in capsys.readouterr().err


def test_a_per_channel_only_bench_labels_its_headline_table_by_scheme(tmp_path, capsys):
    # Table 1's grid was labelled g{group size}: "gNone" with only per-channel schemes, and
    # the INT8 column repeated the main one
    out = tmp_path / "bench"
    args = ["bench", "--model", "mdlm-tiny", "--methods", "rtn", "--schemes", "w8pc"]
    args += ["--nsamples", "2", "--seq-len", "32", "--eval-limit", "2", "--flip-prompts", "1"]
    args += ["--eval-data", "wikitext2:test", "--flip-gen-length", "8", "--flip-steps", "4"]
    assert main([*args, "--out", str(out)]) == 0
    capsys.readouterr()
    table = (out / "bench.md").read_text().split("## Table 1")[1].split("## Table 2")[0]
    header = next(line for line in table.splitlines() if line.startswith("| Model"))
    assert "gNone" not in table and "(RTN W8PC)" in header
    assert header.count("W8PC") == 2 and header.count("|") == 5
