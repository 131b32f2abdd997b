"""Issue 20, items 3-5: quantize's closing summary (and --json), progress bars named after what
runs, outputs others can use (packed by default, the source dtype, 0755/0644, provenance), and
recipe.json replayed bit-identically."""

import contextlib
import io
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from faircalib import atomic, hub
from faircalib.cli import main

ASSET = hub.ASSETS / "models" / "mdlm-tiny"
GPTQ = ["quantize", "mdlm-tiny", "--method", "gptq", "--group-size", "32"]
GPTQ += ["--nsamples", "2", "--seq-len", "32", "--exclude", "blocks.[01].*"]


def calib_text(directory: Path) -> Path:
    """A small calibration file (tokenizing the shipped C4 split costs seconds per run)."""
    path = directory / "calib.txt"
    docs = [
        f"Document {i}: the river flows north past the old mill, and the town council meets "
        f"on the {i}th day to discuss bridges, schools, music and the price of bread."
        for i in range(40)
    ]
    path.write_text("\n\n".join(docs))
    return path


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("model-*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def gptq_run(tmp_path_factory):
    """One default-format GPTQ run: (output directory, --json summary, stderr)."""
    root = tmp_path_factory.mktemp("quantize")
    out = root / "gptq"
    old = os.umask(0o022)
    stdout, stderr = io.StringIO(), io.StringIO()  # capsys is per test; this runs once
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            calib = ["--calib", str(calib_text(root))]
            assert main([*GPTQ, *calib, "--out", str(out), "--json"]) == 0
    finally:
        os.umask(old)
    return out, json.loads(stdout.getvalue()), stderr.getvalue()


def test_default_format_is_packed(gptq_run):
    out, summary, _ = gptq_run
    assert summary["format"] == "packed" and hub.is_packed(out)
    record = json.loads((out / "quantization.json").read_text())
    assert record["format"] == "packed"


def test_summary_has_sizes_errors_diagnostics_timings_and_next_command(gptq_run):
    out, s, _ = gptq_run
    layers = s["layers"]
    assert len(layers) == 8 and s["quantized_layers"] == 8
    names = ("attn_qkv", "attn_out", "mlp.0", "mlp.2")
    assert s["float_layers"] == [f"blocks.{i}.{n}" for i in (0, 1) for n in names]
    assert s["bytes"]["source"] == sum(p.stat().st_size for p in ASSET.glob("*.safetensors"))
    assert s["bytes"]["output"] == sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert 0 < s["bytes"]["ratio"] < 1
    rel = [r["rel_error"] for r in layers]
    assert s["error"]["mean"] == pytest.approx(sum(rel) / len(rel))
    assert s["error"]["worst"] == max(rel)
    assert s["error"]["worst_layer"] == max(layers, key=lambda r: r["rel_error"])["layer"]
    assert s["error"]["rtn_mean"] == pytest.approx(sum(r["rtn_rel_error"] for r in layers) / 8)
    d = s["diagnostics"]
    assert d["gptq_loss"]["mean"] > 0 and d["damp_configured"] == 0.01
    assert d["damp"]["min"] >= 0.01 and isinstance(d["damp_raised"], dict)  # damping used
    for stage in ("load_s", "stats_s", "quantize_s", "propagate_s", "save_s", "command_s"):
        assert s["timings"][stage] >= 0, stage
    assert s["out"] == str(out) and s["recipe"] == str(out / "recipe.json")
    assert s["next"] == f"faircalib eval {out} --data wikitext2"


def test_text_summary_selection_and_fake_quant_in_the_source_dtype(tmp_path: Path, capsys):
    out = tmp_path / "r"
    args = ["quantize", "mdlm-tiny", "--method", "rtn", "--nsamples", "1", "--seq-len", "32"]
    args += ["--calib", str(calib_text(tmp_path))]
    assert main([*args, "--include", "blocks.3.*", "--format", "fake", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "quantized 4 layers with rtn W4 g128 (12 left in float)" in text
    assert "output error: mean" in text and "size:" in text and "time: load" in text
    assert "of RTN" not in text  # RTN is not compared with itself
    from faircalib.data.sources import load_source

    calib = load_source(str(calib_text(tmp_path)))
    assert f"calibration data: {calib.name}, {len(calib.docs):,} documents, sha256 " in text
    assert calib.sha256[:12] in text
    assert text.rstrip().endswith(f"next: faircalib eval {out} --data wikitext2")
    record = json.loads((out / "quantization.json").read_text())
    assert {r["layer"] for r in record["layers"]} == {
        f"blocks.3.{n}" for n in ("attn_qkv", "attn_out", "mlp.0", "mlp.2")
    }
    # the source is bf16: so is the fake-quant directory (it was float32, twice the size)
    assert record["dtype"] == "bfloat16"
    assert all(t.dtype == torch.bfloat16 for t in tensors(out).values())
    size = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    assert size <= sum(p.stat().st_size for p in ASSET.glob("*.safetensors"))


def test_summary_says_where_gptq_raised_its_damping():
    from faircalib.commands.quantize import Result, diagnostics, summary_text
    from faircalib.config import GPTQConfig

    infos = {
        "blocks.0.mlp.2": {"gptq_loss": 2.0, "damp": 1.0, "dead_columns": 0.0},
        "blocks.0.mlp.0": {"gptq_loss": 1.0, "damp": 0.01, "dead_columns": 0.0},
    }
    result = Result(infos=infos, config=GPTQConfig(), report={"calib": {}, "recon": []})
    d = diagnostics(result)
    assert d["damp_raised"] == {"blocks.0.mlp.2": 1.0} and d["gptq_loss"]["mean"] == 1.5
    summary = {
        "method": {"method": "gptq", "bits": 4, "group_size": 128},
        "quantized_layers": 2,
        "float_layers": [],
        "error": {"mean": None},
        "diagnostics": d,
        "bytes": {"source": 2**20, "output": 2**19, "ratio": 0.5},
        "format": "packed",
        "timings": {"load_s": 1.0, "command_s": 2.0},
        "out": "q",
        "recipe": "q/recipe.json",
        "next": "faircalib eval q --data wikitext2",
    }
    text = summary_text(summary)
    assert "damping 0.01 raised on 1 layer(s) (up to 1" in text
    assert "size: 1.0 MiB -> 0.5 MiB (0.50x), packed" in text


def test_outputs_are_readable_by_others(gptq_run):
    out, _, _ = gptq_run
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_sharing_honours_the_umask(tmp_path: Path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_text("x")
    os.chmod(d, 0o700)
    os.chmod(d / "sub" / "f", 0o600)
    old = os.umask(0o027)
    try:
        atomic.share(d)
    finally:
        os.umask(old)
    assert stat.S_IMODE(d.stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "sub").stat().st_mode) == 0o750
    assert stat.S_IMODE((d / "sub" / "f").stat().st_mode) == 0o640


def test_records_carry_provenance(gptq_run):
    out, _, _ = gptq_run
    record = json.loads((out / "quantization.json").read_text())
    for key in ("faircalib_version", "git_commit", "torch", "device", "run_device", "date"):
        assert key in record, key
    assert record["faircalib_version"] == __import__("faircalib").__version__
    assert record["torch"] == torch.__version__ and record["run_device"] == "cpu"
    assert record["command"].startswith("faircalib quantize mdlm-tiny")


def test_recipe_replays_bit_identically(gptq_run, tmp_path: Path, capsys):
    out, _, _ = gptq_run
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["model"] == "mdlm-tiny" and recipe["args"]["method"] == "gptq"
    assert recipe["args"]["format"] == "packed" and recipe["args"]["nsamples"] == 2
    again = tmp_path / "again"
    assert main(["quantize", "--config", str(out / "recipe.json"), "--out", str(again)]) == 0
    capsys.readouterr()
    first, second = tensors(out), tensors(again)
    assert first.keys() == second.keys()
    for name, value in first.items():
        assert torch.equal(value, second[name]), name
    assert json.loads((again / "recipe.json").read_text())["args"] == recipe["args"]


def test_recipe_flags_on_the_command_line_win(gptq_run, tmp_path: Path, capsys):
    out, _, _ = gptq_run
    other = tmp_path / "rtn"
    argv = ["quantize", "--config", str(out), "--method", "rtn", "--format", "fake"]
    assert main([*argv, "--dtype", "float32", "--out", str(other), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["method"]["method"] == "rtn" and summary["format"] == "fake"
    assert summary["method"]["group_size"] == 32 and summary["quantized_layers"] == 8  # recipe
    assert all(t.dtype == torch.float32 for t in tensors(other).values())


def test_block_progress_bar_is_named_after_what_runs(capsys):
    from faircalib.calib.engine import quantize_model
    from faircalib.config import CalibConfig, RTNConfig

    model = hub.load("mdlm-tiny")
    x = torch.randint(2, 100, (2, 16))
    t = torch.full((2,), 0.5)
    quantize_model(model, RTNConfig(), x, t, torch.ones(2, 16), calib_cfg=CalibConfig())
    err = capsys.readouterr().err
    assert "weighted rtn" in err


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_an_mdlm_calibrates_in_half_precision(tmp_path: Path, dtype: str):
    """--calib-dtype bfloat16 on an MDLM: its time embedding's float32 features met bf16
    weights (a traceback). Now the half-precision model computes what the float32 one does,
    within its rounding, and GPTQ calibrates in it."""
    model = hub.load("mdlm-tiny")
    x_t = torch.randint(0, 200, (2, 32), generator=torch.Generator().manual_seed(0))
    x_t[:, ::3] = model.mask_id
    t = torch.full((2,), 0.6)
    with torch.no_grad():
        want = model.log_probs(x_t, t).softmax(-1)
        got = model.to(getattr(torch, dtype)).log_probs(x_t, t).float().softmax(-1)
    assert (got - want).abs().max() < 0.05
    out = tmp_path / "q"
    argv = ["quantize", "mdlm-tiny", "--method", "gptq", "--nsamples", "2", "--seq-len", "16"]
    assert main([*argv, "--calib-dtype", dtype, "--out", str(out)]) == 0
    assert (out / "config.json").is_file()
