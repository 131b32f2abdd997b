"""Issue 20, item 2: configs validated on construction, one line each; method defaults that are
the method's own (SmoothQuant W8A8 unless --bits says otherwise); knobs a method lacks refused."""

import argparse
from pathlib import Path

import pytest

from faircalib.cli import build_parser, main
from faircalib.commands.common import fill_defaults
from faircalib.commands.quantize import method_config, resolve_format
from faircalib.config import (
    AWQConfig,
    CalibConfig,
    FairCalibConfig,
    GPTQConfig,
    ReconConfig,
    ReconMethodConfig,
    RTNConfig,
    SmoothQuantConfig,
    config_from_dict,
)
from faircalib.errors import ConfigError

BAD = {
    "fair base": (lambda: FairCalibConfig(base="nope"), "base"),
    "fair sampler": (lambda: FairCalibConfig(sampler="nope"), "sampler"),
    "fair steps": (lambda: FairCalibConfig(steps=0), "steps"),
    "fair n_prompts": (lambda: FairCalibConfig(n_prompts=-1), "n_prompts"),
    "fair recon": (lambda: FairCalibConfig(recon="fast"), "recon"),
    "fair inputs": (lambda: FairCalibConfig(inputs="both"), "inputs"),
    "negative damp": (lambda: GPTQConfig(damp=-5), "damp"),
    "nan damp": (lambda: GPTQConfig(damp=float("nan")), "damp"),
    "gptq block": (lambda: GPTQConfig(block_size=0), "block_size"),
    "fractional bits": (lambda: RTNConfig(bits=4.5), "bits"),
    "bool bits": (lambda: RTNConfig(bits=True), "bits"),
    "bits range": (lambda: RTNConfig(bits=9), "bit width"),
    "string symmetric": (lambda: RTNConfig(symmetric="yes"), "symmetric"),
    "method mismatch": (lambda: RTNConfig(method="gptq"), "method"),
    "awq grid": (lambda: AWQConfig(n_grid=0), "n_grid"),
    "awq shrink": (lambda: AWQConfig(max_shrink=1.5), "max_shrink"),
    "sq act bits": (lambda: SmoothQuantConfig(act_bits=1), "act_bits"),
    "sq alpha": (lambda: SmoothQuantConfig(alpha=2.0), "alpha"),
    "recon target": (lambda: ReconConfig(target="nope"), "target"),
    "recon steps": (lambda: ReconConfig(steps=-1), "steps"),
    "recon weighting": (lambda: ReconMethodConfig(weighting="margin"), "weight"),
    "calib masking": (lambda: CalibConfig(masking="gaussian"), "masking"),
    "calib t_min": (lambda: CalibConfig(t_min=1.5), "t_min"),
    "calib rows": (lambda: CalibConfig(max_rows_per_layer=0), "max_rows_per_layer"),
    "calib include": (lambda: CalibConfig(include=[""]), "include"),
    "unknown field": (lambda: config_from_dict({"method": "gptq", "dampening": 0.1}), "dampening"),
    "unknown method": (lambda: config_from_dict({"method": "hqq"}), "hqq"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_nonsense_configs_are_refused_in_one_line(case):
    make, word = BAD[case]
    with pytest.raises(ConfigError) as info:
        make()
    message = str(info.value)
    assert word in message and "\n" not in message


def test_recorded_configs_round_trip():
    for cfg in (GPTQConfig(bits=3, damp=0.1), AWQConfig(), FairCalibConfig(steps=4)):
        assert config_from_dict(cfg.to_dict()) == cfg


def quantize_args(*flags: str) -> argparse.Namespace:
    return fill_defaults(build_parser().parse_args(["quantize", "m", "--out", "o", *flags]))


def test_smoothquant_is_w8a8_per_channel_unless_asked():
    cfg = method_config(quantize_args("--method", "smoothquant"))
    assert (cfg.bits, cfg.group_size, cfg.act_bits) == (8, None, 8)
    cfg = method_config(quantize_args("--method", "smoothquant", "--bits", "4"))
    assert (cfg.bits, cfg.group_size) == (4, None)
    cfg = method_config(quantize_args("--method", "gptq"))
    assert (cfg.bits, cfg.group_size) == (4, 128)


def test_format_defaults_to_packed_where_the_method_has_one():
    for method, fmt in [("rtn", "packed"), ("gptq", "packed"), ("fair", "packed")]:
        cfg, got = resolve_format(quantize_args("--method", method))
        assert got == fmt and cfg.scale_dtype == "bfloat16", method
    for method in ("awq", "smoothquant"):
        cfg, got = resolve_format(quantize_args("--method", method))
        assert got == "fake" and cfg.scale_dtype is None
    _, got = resolve_format(quantize_args("--method", "fair", "--fair-base", "awq"))
    assert got == "fake"
    _, got = resolve_format(quantize_args("--method", "gptq", "--format", "fake"))
    assert got == "fake"
    with pytest.raises(ConfigError, match="--format fake"):
        resolve_format(quantize_args("--method", "awq", "--format", "packed"))


@pytest.mark.parametrize(
    "flags",
    [
        ["--method", "awq", "--damp", "0.1"],
        ["--method", "rtn", "--alpha", "0.5"],
        ["--method", "gptq", "--fair-steps", "4"],
        ["--method", "smoothquant", "--no-act-order"],
    ],
)
def test_knobs_the_method_lacks_are_refused_before_any_work(flags, tmp_path: Path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", "mdlm-tiny", *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not apply to --method" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_method_and_model_are_required_without_a_recipe(tmp_path: Path, capsys):
    assert main(["quantize", "mdlm-tiny", "--out", str(tmp_path / "q")]) == 2
    assert "--method is required" in capsys.readouterr().err
    assert main(["quantize", "--method", "rtn", "--out", str(tmp_path / "q")]) == 2
    assert "MODEL is required" in capsys.readouterr().err


def test_shipped_scheme_recipes_build_their_configs():
    from faircalib.commands.quantize import apply_recipe, read_recipe, shipped_recipes

    names = set(shipped_recipes())
    assert {"gptq-w4g128", "rtn-w4g128", "awq-w4g128", "smoothquant-w8a8", "fair-w4g128"} <= names
    for name in names:
        args = quantize_args("--nsamples", "8")
        args.argv = ["quantize", "m", "--out", "o", "--nsamples", "8"]
        args.option_dests = {"--nsamples": "nsamples", "--out": "out"}
        apply_recipe(args, read_recipe(name))
        cfg, fmt = resolve_format(args)
        assert args.nsamples == 8  # typed flags win over the recipe
        assert cfg.method == read_recipe(name)["args"]["method"]
        assert fmt == ("fake" if cfg.method in ("awq", "smoothquant") else "packed")
    args = quantize_args()
    args.argv, args.option_dests = [], {}
    apply_recipe(args, read_recipe("smoothquant-w8a8"))
    cfg, _ = resolve_format(args)
    assert (cfg.bits, cfg.group_size, cfg.act_bits) == (8, None, 8)
    with pytest.raises(ConfigError, match="shipped scheme"):
        read_recipe("gptq-w5g7")
