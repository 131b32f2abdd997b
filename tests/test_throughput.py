"""benchmarks/throughput.py: generation throughput of bf16 vs fake-quant vs packed models."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
VARIANTS = ("bf16", "fake_w4g128", "packed_w4g128", "packed_w8")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_throughput_smoke_measures_every_variant_and_batch(tmp_path):
    result = load_script("throughput").main(["--smoke", "--out", str(tmp_path)])
    on_disk = json.loads((tmp_path / "throughput.json").read_text())
    assert on_disk == json.loads(json.dumps(result))
    assert on_disk["record"]["command"].startswith("python benchmarks/throughput.py --smoke")
    assert {"git_commit", "device", "date", "torch"} <= set(on_disk["record"])
    cfg = on_disk["config"]
    assert cfg["model"] == "mdlm-tiny" and cfg["group_size"] == 128
    assert cfg["group_size_note"] is None  # mdlm-tiny's widths (128, 512) take g128

    variants = on_disk["variants"]
    assert tuple(variants) == VARIANTS
    bf16 = variants["bf16"]
    for name, v in variants.items():
        assert set(v["batches"]) == {"1", "2"}, name
        for row in v["batches"].values():
            assert row["tokens_per_s"] > 0 and row["seconds_per_step"] > 0
            assert len(row["seconds_all"]) == 3
            assert row["peak_gpu_bytes"] is None  # CPU
            assert 0.0 <= row["agreement_vs_bf16"] <= 1.0
            assert row["speed_vs_bf16"] > 0
            # packed models run QuantLinear (a backend per layer); the others plain nn.Linear
            assert bool(row["backends"]) == name.startswith("packed_")
            if name.startswith("packed_"):
                assert sum(row["backends"].values()) == 4 * 4  # 4 blocks x 4 linears
    for b, row in bf16["batches"].items():
        # bf16 against its own warm-up run under the same seed: generation is deterministic
        assert row["agreement_vs_bf16"] == 1.0 and row["repeat_consistent"], b
        assert row["speed_vs_bf16"] == 1.0
        # tokens/s is batch x gen_length / median seconds
        assert row["tokens_per_s"] == pytest.approx(int(b) * 16 / row["seconds"])
    for name in ("packed_w4g128", "packed_w8"):
        assert variants[name]["weight_bytes"] < bf16["weight_bytes"]
        assert variants[name]["checkpoint_bytes"] < bf16["checkpoint_bytes"]
    assert variants["packed_w4g128"]["weight_bytes"] < variants["packed_w8"]["weight_bytes"]
    assert variants["fake_w4g128"]["weight_bytes"] == bf16["weight_bytes"]  # dequantized bf16

    table = (tmp_path / "throughput.md").read_text()
    for name in VARIANTS:
        assert table.count(f"| {name} | ") == 3, name  # two batch rows + the description row
    assert (tmp_path / "throughput.png").stat().st_size > 1000
    assert not list(tmp_path.glob(".*tmp*")) and not list(tmp_path.glob("*.tmp"))


def test_group_size_falls_back_when_the_width_is_not_a_multiple():
    from faircalib.models.mdlm import MDLM, MDLMConfig

    script = load_script("throughput")

    def model(width: int):
        cfg = MDLMConfig(32, 1, seq_len=8, hidden_dim=width, cond_dim=8, n_blocks=1, n_heads=4)
        return MDLM(cfg)

    group, note = script.choose_group_size(model(448), 128)  # mdlm-small v1's width
    assert group == 64 and "fell back to 64" in note
    assert script.choose_group_size(model(512), 128) == (128, None)
    assert script.choose_group_size(model(224), 128)[0] == 32
    assert script.choose_group_size(model(448), 64) == (64, None)
