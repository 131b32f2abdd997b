"""benchmarks/llada_8b.py: the published 8B shapes, and its smoke run end to end on the CPU."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import llada_8b  # noqa: E402
from faircalib.models.io import probe_model  # noqa: E402


@pytest.mark.parametrize(
    ("config", "published"),
    # parameter counts as their model cards state them: LLaDA-8B 8.02 B, Dream-7B 7.62 B
    [(llada_8b.LLADA_8B, 8.02e9), (llada_8b.DREAM_7B, 7.62e9)],
)
def test_shapes_are_the_published_models(config, published):
    model = probe_model(config)  # meta device: no memory
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - published) / published < 0.005
    assert model.mask_id == config["mask_token_id"]


def test_stand_in_tokenizer_has_the_published_ids():
    tok = llada_8b.stand_in_tokenizer(126464, 126081, 126336, "<|mdm_mask|>")
    assert tok.get_vocab_size() == 126464
    assert tok.token_to_id("<|mdm_mask|>") == 126336 and tok.token_to_id(llada_8b.EOS) == 126081
    ids = tok.encode("Diffusion language models.").ids
    assert max(ids) < 256 and tok.decode(ids) == "Diffusion language models."


def test_smoke_run_writes_a_row_and_a_table(tmp_path):
    out = tmp_path / "out"
    argv = ["--smoke", "--work", str(tmp_path / "work"), "--out", str(out)]
    llada_8b.main(argv)
    llada_8b.main([*argv, "--family", "dream"])
    rows = json.loads((out / "llada_8b.json").read_text())["rows"]
    assert [(r["family"], r["method"]) for r in rows] == [("llada", "gptq"), ("dream", "gptq")]
    for r in rows:
        assert r["packed_bytes"] < 0.75 * r["bf16_bytes"]  # int4 blocks, bf16 embeddings/head
        assert r["peak_host_bytes"] > 0 and r["step_s"]["packed"] > 0
        assert r["timings"]["wall_s"] > 0
    assert (out / "llada_8b.md").read_text().count("| llada (smoke) | gptq |") == 1

    # jobs that ran side by side (one JSON each) merge into one table; a later file's row of
    # the same (family, method) replaces the earlier one, other rows stay
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = rows
    (tmp_path / "a" / "llada_8b.json").write_text(json.dumps({"rows": [first]}))
    newer = {**second, "wall_s": second["wall_s"] + 1.0}
    (tmp_path / "b" / "llada_8b.json").write_text(json.dumps({"rows": [second, newer]}))
    merged = tmp_path / "merged"
    llada_8b.main(["--out", str(merged), "--merge",
                   str(tmp_path / "a" / "llada_8b.json"), str(tmp_path / "b" / "llada_8b.json")])  # fmt: skip
    got = json.loads((merged / "llada_8b.json").read_text())["rows"]
    assert [(r["family"], r["wall_s"]) for r in got] == [
        ("llada", first["wall_s"]),
        ("dream", second["wall_s"] + 1.0),
    ]
