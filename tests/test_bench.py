"""CI-sized smoke run of the comparison harness: structure and finiteness, not values."""

import json
import math

import torch

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
            "--out",
            str(out),
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in result["rows"]] == ["float"] + ["rtn", "gptq", "fair"] * 2
    for entry in result["summary"]:
        assert math.isfinite(entry["wikitext2:test_ppl"])
        if entry["method"] != "float":
            assert 0.0 <= entry["flip_rate"] <= 1.0
            assert entry["weight_bytes"] < result["summary"][0]["weight_bytes"]
    for name in ("bench.json", "bench.md", "ppl_vs_bits.png", "flip_rate_by_step.png"):
        assert (out / name).stat().st_size > 0
    assert "Table 1" in (out / "bench.md").read_text()
