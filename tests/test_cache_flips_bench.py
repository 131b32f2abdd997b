"""benchmarks/cache_flips.py on the CPU (--smoke: mdlm-tiny, 2 prompts): every (scheme, cache)
row, rows run by each cache as counted from the block schedule, and the tables written."""

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "cache_flips.py"


def _script():
    spec = importlib.util.spec_from_file_location("bench_cache_flips", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def expected_row_fraction(cache: str, prompt: int, gen: int, block: int, steps: int) -> float:
    """Token rows a cached run sends through the model over an uncached run's, from the block
    schedule: each block's first step runs the canvas; its other steps run the block and what
    follows it (prefix) or the block alone (dual)."""
    blocks, per_block = gen // block, steps // (gen // block)
    canvas = prompt + gen
    if cache == "none":
        return 1.0
    rows = 0
    for b in range(blocks):
        rest = gen - b * block if cache == "prefix" else block
        rows += canvas + (per_block - 1) * rest
    return rows / (steps * canvas)


def test_smoke_rows_follow_the_block_schedule(tmp_path):
    result = _script().main(["--smoke", "--out", str(tmp_path)])
    s = result["settings"]
    rows = {(r["scheme"], r["cache"]): r for r in result["rows"]}
    assert set(rows) == {
        (m, c) for m in ("float", "gptq_w4g128") for c in ("none", "prefix", "dual")
    }
    for (scheme, cache), r in rows.items():
        want = expected_row_fraction(cache, s["prompt_len"], s["gen"], s["block"], s["steps"])
        assert r["row_fraction"] == pytest.approx(want)
        assert 0.0 <= r["flip_vs_own_uncached"] <= 1.0 and r["tokens_per_s"] > 0
        if cache == "none":  # a run against itself
            assert r["flip_vs_own_uncached"] == 0.0 and r["identical_prompts_vs_own"] == 1.0
        # the flip rates recounted from the recorded tokens, position by position
        gen, own = r["generated"], rows[scheme, "none"]["generated"]
        ref = rows["float", "none"]["generated"]
        cells = [(i, j) for i in range(len(gen)) for j in range(len(gen[i]))]
        differ = [gen[i][j] != own[i][j] for i, j in cells]
        assert r["flip_vs_own_uncached"] == pytest.approx(sum(differ) / len(cells))
        assert r["flip_vs_float_uncached"] == pytest.approx(
            sum(gen[i][j] != ref[i][j] for i, j in cells) / len(cells)
        )
        same_rows = [gen[i] == own[i] for i in range(len(gen))]
        assert r["identical_prompts_vs_own"] == pytest.approx(sum(same_rows) / len(gen))
        assert len(gen) == s["prompts"] and all(len(g) == s["gen"] for g in gen)
    md = (tmp_path / "cache_flips.md").read_text()
    assert md.count("| gptq_w4g128 |") == 3 and (tmp_path / "cache_flips.json").is_file()
