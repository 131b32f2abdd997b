"""Issue 14 wired into the tool: `quantize --scheme`, fake-quant save/load of activation-quantized
models, the activation schemes in `bench`, and the shared FAIR-Calib row split."""

import contextlib
import copy
import io
import json
from pathlib import Path

import pytest
import torch

from faircalib import bench, hub
from faircalib.calib import activations
from faircalib.calib.activations import (
    ActCalibConfig,
    ActQuantLinear,
    quantize_activations,
    quantize_activations_model,
)
from faircalib.calib.fakequant_io import ACT_LINEARS, save_quantized
from faircalib.calib.inputs import masked_inputs
from faircalib.cli import main
from faircalib.commands import quantize as qcmd
from faircalib.config import CalibConfig
from faircalib.data import calibration_batch
from faircalib.data.sources import load_source
from faircalib.errors import CheckpointError, ConfigError
from faircalib.quant.activations import fake_quantize_activations
from faircalib.quant.flatquant import FlatQuantConfig

torch.set_num_threads(1)


def calib_text(directory: Path) -> Path:
    path = directory / "calib.txt"
    docs = [
        f"Document {i}: the river flows north past the old mill, and the town council meets "
        f"on the {i}th day to discuss bridges, schools, music and the price of bread."
        for i in range(40)
    ]
    path.write_text("\n\n".join(docs))
    return path


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny():
    model = hub.load("mdlm-tiny")
    tok = hub.load_tokenizer("mdlm-tiny")
    tokens = calibration_batch(tok, "c4", "train", 4, 32, seed=0)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=4, seed=7))
    return model, tokens, x_t, t


def test_names_agree_across_cli_bench_and_library():
    assert set(qcmd.ACT_SCHEMES) == set(activations.SCHEMES) - {"w16a4"}
    assert set(bench.ACT_SCHEMES) == set(qcmd.ACT_SCHEMES)
    assert tuple(activations.METHODS) == qcmd.ACT_METHODS == bench.ACT_METHODS
    for name, grid in bench.ACT_SCHEMES.items():  # the bench's sizes use the library's grid
        scheme = activations.SCHEMES[name]
        assert (grid["bits"], grid["group_size"]) == (scheme.w_bits, scheme.w_group)


def test_fair_inputs_is_public_and_the_old_name_stays():
    import faircalib.calib as calib

    assert calib._fair_inputs is calib.fair_inputs and "fair_inputs" in calib.__all__


@pytest.mark.parametrize(
    ("scheme", "method"), [("w8a8", "rtn"), ("w4a4", "quarot"), ("w4a4", "flatquant")]
)
def test_save_load_gives_identical_log_probs(tiny, tmp_path, scheme, method):
    model, tokens, x_t, t = tiny
    q = copy.deepcopy(model)
    cfg = ActCalibConfig(scheme, method, flat=FlatQuantConfig(steps=3))
    report = quantize_activations(q, tokens, cfg, CalibConfig(n_samples=4, seq_len=32))
    with torch.no_grad():
        ref = q.log_probs(x_t, t)
    in_memory = {n: m for n, m in q.named_modules() if isinstance(m, ActQuantLinear)}
    assert len(in_memory) == 16
    save_quantized(q, report, tmp_path / "q", None)
    loaded = hub.load(tmp_path / "q")
    with torch.no_grad():
        got, float_lp = loaded.log_probs(x_t, t), model.log_probs(x_t, t)
    assert torch.equal(ref, got)
    assert not torch.equal(ref, float_lp)  # activations and weights really are quantized
    rebuilt = {n: m for n, m in loaded.named_modules() if isinstance(m, ActQuantLinear)}
    assert rebuilt.keys() == in_memory.keys()
    for name, m in in_memory.items():
        r = rebuilt[name]
        assert torch.equal(r.weight, m.weight) and r.act == m.act
        assert (r.rotation is None) == (m.rotation is None)
        assert (r.transform is None) == (m.transform is None)
    # the float directory holds each layer's weight-only equivalent: a plain reader's linear is
    # the module with its activation quantizer off
    from faircalib.models import load_model

    plain = load_model(tmp_path / "q")
    for name, m in list(in_memory.items())[:4]:
        x = torch.randn(5, m.in_features)
        lin = plain.get_submodule(name)
        assert isinstance(lin, torch.nn.Linear) and not isinstance(lin, ActQuantLinear)
        # (the linear part: a learned transform shifts its input, an affine map)
        linear = m.transform_input(x.double()) - m.transform_input(torch.zeros_like(x.double()))
        expected = linear @ m.weight.double().T
        torch.testing.assert_close(x @ lin.weight.T, expected.float(), rtol=1e-4, atol=1e-4)
    record = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert record["activation_quant"]["layers"].keys() == in_memory.keys()
    assert "pickle" not in (tmp_path / "q" / ACT_LINEARS).read_bytes()[:200].decode("latin-1")


def test_a_damaged_act_linears_file_is_refused_in_one_line(tiny, tmp_path):
    model, tokens, _, _ = tiny
    q = copy.deepcopy(model)
    cfg = ActCalibConfig("w8a8", "rtn")
    report = quantize_activations(q, tokens, cfg, CalibConfig(n_samples=4, seq_len=32))
    save_quantized(q, report, tmp_path / "q", None)
    record_path = tmp_path / "q" / "quantization.json"
    record = json.loads(record_path.read_text())
    record["activation_quant"]["layers"]["blocks.0.mlp.0"]["tensors"].append("rotation_signs")
    record_path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError) as err:
        hub.load(tmp_path / "q")
    assert "blocks.0.mlp.0" in str(err.value) and "\n" not in str(err.value)


@pytest.fixture(scope="module")
def quarot_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("act")
    calib = calib_text(root)
    argv = ["quantize", "mdlm-tiny", "--scheme", "w4a4", "--method", "quarot", "--nsamples"]
    argv += ["4", "--seq-len", "32", "--calib", str(calib), "--exclude", "blocks.[01].*"]
    code, out, err = run_cli([*argv, "--out", str(root / "a"), "--json"])
    assert code == 0, err
    return root, calib, json.loads(out)


def test_quantize_scheme_matches_the_library_and_reloads(quarot_run, tiny):
    root, calib, summary = quarot_run
    model, _, x_t, t = tiny
    assert summary["format"] == "fake" and summary["scheme"] == "w4a4"
    names = [f"blocks.{i}.{n}" for i in (2, 3) for n in ("attn_qkv", "attn_out", "mlp.0", "mlp.2")]
    assert [r["layer"] for r in summary["layers"]] == names
    assert summary["quantized_layers"] == 8 and len(summary["float_layers"]) == 8
    rel = [r["rel_error"] for r in summary["layers"]]
    assert summary["error"]["mean"] == pytest.approx(sum(rel) / len(rel))
    # independent reference: the library on the same texts, the same layers
    tok = hub.load_tokenizer("mdlm-tiny")
    tokens = calibration_batch(tok, load_source(str(calib), None, "text"), None, 4, 32, 0)
    ref = copy.deepcopy(model)
    x_c, t_c = masked_inputs(ref, tokens, CalibConfig(n_samples=4, seq_len=32))
    from faircalib.calib.select import restrict

    with restrict(ref, None, ["blocks.[01].*"]):
        quantize_activations_model(ref, x_c, t_c, ActCalibConfig("w4a4", "quarot"))
    loaded = hub.load(root / "a")
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x_t, t), ref.log_probs(x_t, t))
    assert isinstance(loaded.blocks[0].mlp[0], torch.nn.Linear)  # excluded: float
    assert not isinstance(loaded.blocks[0].mlp[0], ActQuantLinear)


def test_recipe_replays_bit_identically(quarot_run):
    root, _, _ = quarot_run
    recipe = json.loads((root / "a" / "recipe.json").read_text())
    assert recipe["args"]["scheme"] == "w4a4" and recipe["args"]["format"] == "fake"
    code, _, err = run_cli(["quantize", "--config", str(root / "a"), "--out", str(root / "b")])
    assert code == 0, err
    files = sorted(p.name for p in (root / "a").glob("*.safetensors"))
    assert ACT_LINEARS in files
    for name in files:
        assert (root / "a" / name).read_bytes() == (root / "b" / name).read_bytes(), name


def test_fair_scheme_summary_and_text(tmp_path):
    calib = calib_text(tmp_path)
    argv = ["quantize", "mdlm-tiny", "--scheme", "w8a8", "--method", "fair", "--nsamples", "4"]
    argv += ["--seq-len", "32", "--calib", str(calib), "--flat-steps", "2", "--fair-steps", "4"]
    argv += ["--fair-prefix-len", "8", "--include", "blocks.3.*", "--out", str(tmp_path / "f")]
    code, out, err = run_cli(argv)
    assert code == 0, err
    assert "quantized 4 layers with fair W8A8" in out and "fair:" in out
    record = json.loads((tmp_path / "f" / "quantization.json").read_text())
    assert record["method"]["fair_rows"]["steps"] == 4
    assert record["method"]["flat"]["steps"] == 2 and record["format"] == "fake"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--scheme", "w4a4", "--method", "quarot", "--format", "packed"], "--format packed"),
        (["--scheme", "w4a4", "--method", "awq"], "--method awq"),
        (["--method", "quarot"], "needs --scheme"),
        (["--scheme", "w4a4", "--bits", "4"], "--bits"),
        (["--scheme", "w4a4", "--method", "quarot", "--flat-steps", "3"], "--flat-steps"),
        (["--scheme", "w4a4", "--method", "quarot", "--flat-shift", "mean"], "--flat-shift"),
        (["--method", "gptq", "--flat-shift", "mean"], "--flat-shift"),
        (["--scheme", "w4a4", "--resume"], "--resume"),
        (["--method", "gptq", "--clip-search"], "--clip-search"),
        (["--scheme", "w4a4", "--method", "fair", "--recon-steps", "3"], "--recon-steps"),
    ],
)
def test_refusals_are_one_line_before_any_work(tmp_path, extra, needle):
    out = tmp_path / "never"
    code, stdout, err = run_cli(["quantize", "mdlm-tiny", *extra, "--out", str(out)])
    assert code == 2 and needle in err and err.count("\n") == 1 and not stdout
    assert not out.exists()


def test_weight_only_recipe_has_no_activation_fields(tmp_path):
    calib = calib_text(tmp_path)
    argv = ["quantize", "mdlm-tiny", "--method", "rtn", "--nsamples", "2", "--seq-len", "32"]
    argv += ["--calib", str(calib), "--format", "fake", "--include", "blocks.0.*"]
    code, _, err = run_cli([*argv, "--out", str(tmp_path / "w")])
    assert code == 0, err
    recipe = json.loads((tmp_path / "w" / "recipe.json").read_text())
    assert set(recipe["args"]) == set(qcmd.RECIPE_FLAGS)
    record = json.loads((tmp_path / "w" / "quantization.json").read_text())
    assert "activation_quant" not in record and not (tmp_path / "w" / ACT_LINEARS).exists()


def test_bench_runs_activation_schemes(tmp_path, capsys):
    args = ["bench", "mdlm-tiny", "--schemes", "w4a4", "--methods", "rtn,quarot"]
    args += ["--nsamples", "2", "--seq-len", "32", "--limit", "2", "--data", "wikitext2:test"]
    args += ["--flip-prompts", "1", "--flip-gen-length", "8", "--flip-steps", "4"]
    assert main([*args, "--out", str(tmp_path / "b"), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["scheme"]) for r in result["rows"]] == [
        ("float", "bf16"),
        ("rtn", "w4a4"),
        ("quarot", "w4a4"),
    ]
    for row in result["rows"][1:]:
        assert 0 <= row["flips"]["flip_rate"] <= 1
        assert row["weight_bytes"] == bench.weight_bytes(hub.load("mdlm-tiny"), 4, None)
        assert (
            row["ppl"]["wikitext2:test"]["ppl"] != result["rows"][0]["ppl"]["wikitext2:test"]["ppl"]
        )
    assert "act" not in result["config"]
    md = (tmp_path / "b" / "bench.md").read_text()
    assert "QuaRot (Hadamard, GPTQ weights)" in md and "W4A4" in md


def test_bench_config_refuses_mismatched_methods_and_schemes():
    with pytest.raises(ConfigError, match="quantize activations"):
        bench.BenchConfig(schemes=["w4g128"], methods=["quarot"])
    with pytest.raises(ConfigError, match="no form for the activation schemes"):
        bench.BenchConfig(schemes=["w4a4"], methods=["awq"])
    with pytest.raises(ConfigError, match="need an activation scheme"):
        bench.BenchConfig(schemes=["w4g128"], methods=["rtn"], act={"flat_steps": 2})
    cfg = bench.BenchConfig(schemes=["w4g128"], methods=["rtn"])
    assert "act" not in bench.config_dict(cfg)  # weight-only bench.json's config as before


def test_act_quant_linear_reference_forward():
    """The reloaded module's forward is the documented one: Q_a(transform(x)) W^T + b."""
    lin = torch.nn.Linear(16, 4)
    from faircalib.quant.activations import ActQuantConfig

    act = ActQuantConfig("int", 4)
    m = ActQuantLinear(lin.weight, lin.bias, act, smooth=torch.full((16,), 2.0))
    x = torch.randn(3, 16)
    expected = fake_quantize_activations(x / 2.0, act) @ lin.weight.T + lin.bias
    torch.testing.assert_close(m(x), expected, rtol=0, atol=1e-6)


def test_activation_bench_headline_is_w4a4_whatever_the_scheme_order():
    """Table 1 of an activation bench reports W4A4 (and W8A8 as its INT8 column) even when
    W8A8 is listed first - it once reported the first scheme under an 'INT4' heading."""
    path = Path(__file__).parents[1] / "benchmarks/results/bench-mdlm-small-act/bench.json"
    result = json.loads(path.read_text())
    assert result["config"]["schemes"][0] == "w8a8"
    by = {(e["scheme"], e["method"]): e["wikitext2:test_ppl"] for e in result["summary"]}
    row = next(line for line in bench.markdown_tables(result).splitlines() if "(measured)" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2].startswith(f"{by[('w4a4', 'rtn')]:.2f}")
    assert cells[3].startswith(f"{by[('w4a4', 'fair')]:.2f}")
    assert cells[4].startswith(f"{by[('w8a8', 'fair')]:.2f}")
