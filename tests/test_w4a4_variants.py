"""W4A4 variants of the learned-transform methods: fair-gptq (fair's transform, GPTQ weights on
the FAIR-weighted transformed Hessian), and benchmarks/w4a4.py's variant specs."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from torch import nn

from benchmark_scripts import load_benchmark
from faircalib.calib.activations import (
    FAIR_METHODS,
    METHODS,
    ActCalibConfig,
    learned_module,
)
from faircalib.cli import main
from faircalib.config import GPTQConfig
from faircalib.quant.activations import ActQuantConfig, quantize_int_per_token
from faircalib.quant.flatquant import FlatQuantConfig, learn_transform
from faircalib.quant.gptq import quantize_gptq
from faircalib.quant.primitives import compute_qparams, dequantize, quantize
from faircalib.quant.stats import LayerInputsAccumulator

torch.set_num_threads(1)
A4 = ActQuantConfig("int", 4)
W4 = GPTQConfig(bits=4, group_size=None)


def _layer(seed: int = 0, n: int = 256, d_in: int = 32, d_out: int = 24):
    """A linear with outlier input channels and its input rows."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen)
    x[:, :3] *= 12.0  # outlier channels, the A4 problem
    lin = nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(d_out, d_in, generator=gen) / d_in**0.5)
        lin.bias.copy_(torch.randn(d_out, generator=gen))
    return lin, x


def _inputs(x: torch.Tensor, w: torch.Tensor | None = None):
    acc = LayerInputsAccumulator(x.shape[1], len(x), 0, torch.device("cpu"))
    acc.add(x, w)
    return acc.finish()


def _learned(lin, x, w=None):
    cfg = FlatQuantConfig(steps=20, batch_rows=128)
    return learn_transform(lin.weight, x, W4, A4, cfg, w)


def test_fair_gptq_is_a_fair_rows_method_with_gptq_weights():
    assert METHODS["fair-gptq"] == ("gptq", "learned") == METHODS["flatquant-gptq"]
    assert "fair-gptq" in FAIR_METHODS and "flatquant-gptq" not in FAIR_METHODS


def test_fair_gptq_weight_is_gptq_of_the_folded_weight_on_the_transformed_hessian():
    """Reference: fold W with the learned transform by hand, build the Hessian of the
    transformed rows x~ = T(x) from scratch, run plain GPTQ; the module must hold that weight."""
    lin, x = _layer()
    learned = _learned(lin, x)
    cfg = ActCalibConfig(scheme="w4a4", method="fair-gptq")
    module = learned_module("l", lin, _inputs(x), learned, cfg)
    tf = learned.transform
    w_t = tf.fold(lin.weight.detach().float())
    ref = quantize_gptq(w_t, _inputs(tf.apply(x)), W4).weight
    torch.testing.assert_close(module.weight, ref, rtol=1e-4, atol=1e-5)
    # INT4 per channel: at most 16 levels per row, and not the RTN weight fair keeps
    assert all(len(torch.unique(row)) <= 16 for row in module.weight)
    assert not torch.equal(module.weight, learned.result.weight)


def test_fair_gptq_row_weights_count_like_repeated_rows():
    """A row of weight 2 must act on the GPTQ Hessian as that row taken twice."""
    lin, x = _layer(seed=1)
    learned = _learned(lin, x)
    cfg = ActCalibConfig(scheme="w4a4", method="fair-gptq")
    w = torch.ones(len(x))
    w[:40] = 2.0
    weighted = learned_module("l", lin, _inputs(x, w), learned, cfg)
    repeated = learned_module("l", lin, _inputs(torch.cat([x, x[:40]])), learned, cfg)
    torch.testing.assert_close(weighted.weight, repeated.weight, rtol=1e-4, atol=1e-5)
    uniform = learned_module("l", lin, _inputs(x), learned, cfg)
    assert not torch.equal(weighted.weight, uniform.weight)  # the weights did move GPTQ


def test_fair_gptq_with_uniform_weights_is_flatquant_gptq():
    lin, x = _layer(seed=2)
    learned = _learned(lin, x)
    fair = learned_module("l", lin, _inputs(x), learned, ActCalibConfig(method="fair-gptq"))
    flat = learned_module("l", lin, _inputs(x), learned, ActCalibConfig(method="flatquant-gptq"))
    assert torch.equal(fair.weight, flat.weight)


def test_gptq_beats_rtn_on_the_transformed_hessian():
    """GPTQ's objective tr((W~ - Q) H~ (W~ - Q)^T), with min-max RTN of the same W~ (computed
    independently with primitives) as the bar."""
    lin, x = _layer(seed=3, n=512)
    learned = _learned(lin, x)
    module = learned_module("l", lin, _inputs(x), learned, ActCalibConfig(method="fair-gptq"))
    tf = learned.transform
    w_t, x_t = tf.fold(lin.weight.detach().float()), tf.apply(x)
    rtn = dequantize(quantize(w_t, qp := compute_qparams(w_t, W4)), qp)

    def loss(q: torch.Tensor) -> float:
        return float(((x_t @ (w_t - q).T) ** 2).sum())

    assert loss(module.weight) < loss(rtn)
    # and the module still computes Q_a(x~) Q_w(W~)^T + b on raw inputs
    want = quantize_int_per_token(x_t, 4, learned.act.clip_ratio) @ module.weight.T + lin.bias
    want = want + tf.shift @ lin.weight.detach().T  # the input shift's exact share
    torch.testing.assert_close(module(x), want, rtol=1e-4, atol=1e-4)


def test_variant_specs_parse_and_refuse():
    w4a4 = load_benchmark("w4a4")
    method, knobs = w4a4.parse_variant("fair-gptq+block100+gamma0.5+steps300+lr0.01")
    assert method == "fair-gptq"
    assert knobs == {"block_steps": 100, "gamma": 0.5, "flat_steps": 300, "flat_lr": 0.01}
    assert w4a4.parse_variant("fair+uniform+noclip")[1] == {
        "weighting": "uniform",
        "learn_clip": False,
    }
    assert w4a4.parse_variant("flatquant-gptq+meanshift")[1] == {"shift": "mean"}
    assert w4a4.parse_variant("fair-gptq+shift+gamma0.5")[1] == {"shift": "learned", "gamma": 0.5}
    for bad in ("nope", "fair+wat3", "quarot+block10", "flatquant+gamma0.5", "quarot+shift"):
        with pytest.raises(ValueError):
            w4a4.parse_variant(bad)
    # values are checked before any work, with the option named
    for bad in ("fair+blockx", "fair+block-5", "fair+steps0", "fair+lr-1", "fair-gptq+gamma-1"):
        with pytest.raises(ValueError, match=bad.split("+")[1]):
            w4a4.parse_variant(bad)
    argv = ["--methods", "quarot,fair-gptq,fair+block50", "--block-steps", "0,20", "--out", "x"]
    args = w4a4.parse(argv)
    labels = [label for label, _, _ in w4a4.method_variants(args)]
    assert labels == ["quarot", "fair-gptq", "fair-gptq+block20", "fair+block50"]
    cfg = w4a4.act_config("w4a4", "fair", {"flat_steps": 7, "learn_clip": False}, args)
    assert cfg.flat.steps == 7 and not cfg.flat.learn_clip and cfg.block_steps == 0
    assert w4a4.act_config("w4a4", "fair", {"shift": "learned"}, args).flat.shift == "learned"


def test_quantize_cli_runs_fair_gptq_w4a4(tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n\n".join(f"Document {i}: the river runs past the mill." for i in range(40)))
    argv = ["quantize", "mdlm-tiny", "--scheme", "w4a4", "--method", "fair-gptq"]
    argv += ["--nsamples", "4", "--seq-len", "32", "--calib", str(calib), "--flat-steps", "2"]
    argv += ["--fair-steps", "4", "--fair-prefix-len", "8", "--fair-gamma", "0.5", "--damp", "0.02"]
    argv += ["--include", "blocks.3.*", "--out", str(tmp_path / "q")]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    assert code == 0, err.getvalue()
    assert "fair-gptq W4A4" in out.getvalue()
    record = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert record["method"]["method"] == "fair-gptq" and record["method"]["damp"] == 0.02
    assert record["method"]["fair_rows"]["gamma"] == 0.5
