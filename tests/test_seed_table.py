"""benchmarks/seed_table.py --smoke: the seed table's every column on shipped tiny models (CPU).

The table's numbers are checked against independent entry points: the float column against
`faircalib.evaluate`, the INT4 RTN column against `faircalib.quantize` + `faircalib.evaluate`
(RTN needs no calibration data, so both paths must give the same model and, with the same
evaluation noise, the same bound), the fingerprint against the files' bytes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import faircalib
from benchmark_scripts import load_benchmark
from faircalib import hub
from faircalib.training import directory_fingerprint

ROOT = Path(__file__).parents[1]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("seed-table")
    script = load_benchmark("seed_table")
    # a masked family and a Gaussian one (no mask token): both sides of the model interface
    argv = ["--smoke", "--out", str(out), "--model", "mdlm-tiny", "--model", "diffusionlm-tiny"]
    return script, script.main(argv), out


def test_writes_every_column_for_every_model(smoke):
    script, result, out = smoke
    saved = json.loads((out / "seed_table.json").read_text())
    assert [r["name"] for r in saved["rows"]] == ["mdlm-tiny", "diffusionlm-tiny"]
    assert [r["family"] for r in saved["rows"]] == ["mdlm", "diffusion_lm"]
    for row in saved["rows"]:
        assert list(row["columns"]) == list(script.COLUMNS)
        for c in row["columns"].values():
            assert math.isfinite(c["ppl"]) and c["ppl"] > 1 and c["bits_per_byte"] > 0
        float_ppl = row["columns"]["float"]["ppl"]
        for column, pct in row["degradation_pct"].items():
            assert pct == pytest.approx(100 * (row["columns"][column]["ppl"] / float_ppl - 1))
    assert saved["record"]["git_commit"] is not None and "command" in saved["record"]
    assert saved["published"]["mdlm"]["int4_fair"] == 13.4
    md = (out / "seed_table.md").read_text()
    assert "INT8 FAIR-Calib" in md and "Diffusion-LM base" in md and "PLANNER small" in md
    assert not (out / "seed_table.partial.json").exists()


def test_float_and_rtn_columns_match_the_public_api(smoke):
    _, result, _ = smoke
    row = result["rows"][0]
    common = dict(data="wikitext2", split="test", limit=4, mc_samples=1, seed=0)
    assert row["columns"]["float"]["ppl"] == pytest.approx(
        faircalib.evaluate("mdlm-tiny", **common)["ppl"], rel=1e-6
    )
    q = faircalib.quantize(
        "mdlm-tiny", method="rtn", bits=4, group_size=128, nsamples=4, seq_len=32, format="fake"
    )
    assert row["columns"]["int4_rtn"]["ppl"] == pytest.approx(
        faircalib.evaluate(q, **common)["ppl"], rel=1e-5
    )


def test_rows_record_the_weight_fingerprint(smoke):
    _, result, _ = smoke
    for row in result["rows"]:
        assert row["weight_fingerprint_sha256"] == directory_fingerprint(hub.resolve(row["name"]))
        assert len(row["weight_fingerprint_sha256"]) == 64


def test_published_degradations_follow_from_the_claims():
    script = load_benchmark("seed_table")
    deg = script.published_degradation(script.PUBLISHED["planner"])
    assert deg["int4_fair"] == pytest.approx(100 * (26.1 / 24.3 - 1))
    assert deg["int4_standard_ptq"] == pytest.approx(100 * (41.5 / 24.3 - 1))
