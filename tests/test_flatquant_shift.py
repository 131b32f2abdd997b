"""The learned transform's channel shift (FlatQuantConfig.shift): x~ = ((x - z) / s) P with z W^T
added back as a bias. Exact in float, centred on the row-weighted mean, lower W4A4 error on rows
that share large channels, GPTQ's Hessian of the shifted rows, the block-wise restart, and the
fake-quant checkpoint (save, reload, plain readers, old readers refused)."""

import copy
import json
from pathlib import Path

import pytest
import torch

from faircalib import hub
from faircalib.calib.activations import (
    ActCalibConfig,
    ActQuantLinear,
    quantize_activations,
    shifted_inputs,
)
from faircalib.calib.fakequant_io import save_quantized
from faircalib.calib.inputs import masked_inputs
from faircalib.config import CalibConfig, QuantConfig
from faircalib.data import calibration_batch
from faircalib.errors import CheckpointError, ConfigError
from faircalib.models import load_model
from faircalib.quant.activations import ActQuantConfig, quantize_int_per_token
from faircalib.quant.flatquant import (
    FlatQuantConfig,
    LearnedTransform,
    TrainableTransformLinear,
    learn_transform,
)
from faircalib.quant.gptq import inverse_hessian_factor
from faircalib.quant.stats import LayerInputs

torch.set_num_threads(1)
WCFG, A4 = QuantConfig(bits=4, group_size=None), ActQuantConfig("int", 4)


def _shared_channel_rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows that all carry the same large channels (as every [MASK] row of a dLLM does) plus
    small row-specific parts."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.zeros(64)
    common[[3, 17, 40]] = torch.tensor([25.0, -18.0, 30.0])
    x = common + torch.randn(400, 64, generator=gen)
    w = torch.randn(32, 64, generator=gen) / 8
    return x, w


def _relative_error(x, w, result) -> float:
    """||x W^T - (Q_a(x~) W_q^T + z W^T)||^2 / ||x W^T||^2, computed here from the parts."""
    tf = result.transform
    ref = x.double() @ w.double().T
    got = quantize_int_per_token(tf.apply(x), 4, result.act.clip_ratio).double()
    got = got @ result.result.weight.double().T
    if tf.shift is not None:
        got = got + tf.shift.double() @ w.double().T
    return float(((ref - got) ** 2).sum() / (ref**2).sum())


def test_the_shift_and_its_bias_are_exact_in_float():
    gen = torch.Generator().manual_seed(1)
    p1 = torch.randn(8, 8, generator=gen, dtype=torch.float64) + 3 * torch.eye(8)
    p2 = torch.randn(8, 8, generator=gen, dtype=torch.float64) + 3 * torch.eye(8)
    smooth = torch.rand(64, generator=gen, dtype=torch.float64) + 0.5
    shift = 10 * torch.randn(64, generator=gen, dtype=torch.float64)
    tf = LearnedTransform(p1, p2, smooth, shift)
    w = torch.randn(16, 64, generator=gen, dtype=torch.float64)
    b = torch.randn(16, generator=gen, dtype=torch.float64)
    x = torch.randn(9, 64, generator=gen, dtype=torch.float64)
    offset = tf.output_offset(w).double()
    module = ActQuantLinear(tf.fold(w).double(), b, None, transform=tf, offset=offset)
    torch.testing.assert_close(module(x), x @ w.T + b, rtol=1e-5, atol=1e-4)
    assert tf.output_offset(w) is not None and LearnedTransform(p1, p2, smooth).shift is None


def test_the_mean_shift_is_the_row_weighted_mean():
    x, w = _shared_channel_rows()
    rw = torch.linspace(0.1, 3.0, len(x))
    res = learn_transform(w, x, WCFG, A4, FlatQuantConfig(steps=0, shift="mean"), rw)
    expected = (rw.double()[:, None] * x.double()).sum(0) / rw.double().sum()
    torch.testing.assert_close(res.transform.shift.double(), expected, rtol=1e-5, atol=1e-5)
    unshifted = learn_transform(w, x, WCFG, A4, FlatQuantConfig(steps=0, shift="none"))
    assert unshifted.transform.shift is None


def test_centring_rows_that_share_large_channels_lowers_the_w4a4_error():
    x, w = _shared_channel_rows()
    plain = learn_transform(w, x, WCFG, A4, FlatQuantConfig(steps=0, shift="none"))
    centred = learn_transform(w, x, WCFG, A4, FlatQuantConfig(steps=0, shift="mean"))
    e_plain, e_centred = _relative_error(x, w, plain), _relative_error(x, w, centred)
    assert e_centred < 0.5 * e_plain, (e_centred, e_plain)
    # the optimiser's own loss is the same quantity
    assert abs(e_centred - centred.info["final_loss"]) < 1e-3 * e_centred + 1e-7


def test_a_learned_shift_trains_and_reports_its_true_loss():
    x, w = _shared_channel_rows(2)
    cfg = FlatQuantConfig(steps=60, batch_rows=200, shift="learned")
    res = learn_transform(w, x, WCFG, A4, cfg)
    start = learn_transform(w, x, WCFG, A4, FlatQuantConfig(steps=0, shift="learned"))
    assert not torch.equal(res.transform.shift, start.transform.shift)  # it moved
    assert (
        abs(_relative_error(x, w, res) - res.info["final_loss"])
        < 1e-3 * res.info["final_loss"] + 1e-7
    )


def test_the_hessian_of_the_shifted_rows_is_the_direct_one():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(300, 16, generator=gen, dtype=torch.float64) + 4.0
    rw = torch.rand(300, generator=gen, dtype=torch.float64) + 0.2
    inputs = LayerInputs.from_rows(x.float(), rw.float(), max_sample_rows=1000)
    z = torch.randn(16, generator=gen, dtype=torch.float64)
    got = shifted_inputs(inputs, z.float())
    d = x - z
    direct = (rw[:, None] * d).T @ d / rw.sum()
    torch.testing.assert_close(got.hessian.double(), direct, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got.act_absmax.double(), d.abs().amax(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        got.mean.double(), (rw[:, None] * d).sum(0) / rw.sum(), atol=1e-5, rtol=1e-5
    )
    assert shifted_inputs(inputs, None) is inputs


def test_centring_rows_with_shared_large_channels_keeps_gptq_working():
    """Rows whose first channels are near-constant and large (every [MASK] row's), centred on
    a mean estimated from a small sample (as the learned shift starts): the shifted Hessian
    matches the direct float64 one and GPTQ factors it without raising its damping."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5000, 32, generator=gen, dtype=torch.float64)
    x[:, :4] = x[:, :4] * 0.1 + 30.0
    inputs = LayerInputs.from_rows(x.float(), None, max_sample_rows=64)
    z = inputs.sample.mean(0)  # the sample's mean, not the rows'
    got = shifted_inputs(inputs, z).hessian.double()
    d = x - z.double()
    direct = d.T @ d / len(x)
    assert (got - direct).norm() < 1e-3 * direct.norm()
    _, damp = inverse_hessian_factor(got.float(), 0.01)
    assert damp == 0.01


def test_the_block_stage_restarts_exactly_from_a_shifted_layer():
    x, w = _shared_channel_rows(4)
    start = learn_transform(w, x, WCFG, A4, FlatQuantConfig(steps=10, shift="learned"))
    frozen = TrainableTransformLinear(w, None, start, WCFG, shift="learned").freeze()
    assert torch.equal(frozen.transform.shift, start.transform.shift)
    assert torch.equal(frozen.result.weight, start.result.weight)
    with pytest.raises(ConfigError, match="shift"):
        TrainableTransformLinear(w, None, start, WCFG, shift="none")  # it has a shift


@pytest.fixture(scope="module")
def shifted_tiny():
    model = hub.load("mdlm-tiny")
    tok = hub.load_tokenizer("mdlm-tiny")
    tokens = calibration_batch(tok, "c4", "train", 4, 32, seed=0)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=4, seed=7))
    q = copy.deepcopy(model)
    cfg = ActCalibConfig("w4a4", "flatquant", flat=FlatQuantConfig(steps=3, shift="learned"))
    report = quantize_activations(q, tokens, cfg, CalibConfig(n_samples=4, seq_len=32))
    return model, q, report, x_t, t


def test_a_shifted_checkpoint_reloads_exactly_and_reads_as_plain_linears(shifted_tiny, tmp_path):
    model, q, report, x_t, t = shifted_tiny
    save_quantized(copy.deepcopy(q), report, tmp_path / "q", None)  # saving folds in place
    with torch.no_grad():
        ref, got = q.log_probs(x_t, t), hub.load(tmp_path / "q").log_probs(x_t, t)
        float_lp = model.log_probs(x_t, t)
    assert torch.equal(ref, got) and not torch.equal(ref, float_lp)
    record = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert record["activation_quant"]["version"] == 2
    plain = load_model(tmp_path / "q")
    modules = [(n, m) for n, m in q.named_modules() if isinstance(m, ActQuantLinear)]
    assert all(m.transform.shift is not None for _, m in modules)
    with_bias = 0
    for name, m in modules:
        x = torch.randn(5, m.in_features, dtype=torch.float64)
        lin = plain.get_submodule(name).double()
        on = m.transform_input(x) @ m.weight.double().T  # the module with A-quant off
        if m.bias is not None:  # exact: the shift's terms ride on the layer's own bias
            with_bias += 1
            expected = on + m.bias.double() + m.offset.double()
        else:  # no bias to carry them: the linear part alone
            expected = on - m.transform_input(torch.zeros_like(x)) @ m.weight.double().T
        torch.testing.assert_close(lin(x), expected, rtol=1e-4, atol=1e-4)
    assert 0 < with_bias < len(modules)  # mdlm-tiny has both kinds of layer


def test_an_old_version_file_listing_a_shift_is_refused(shifted_tiny, tmp_path):
    _, q, report, _, _ = shifted_tiny
    save_quantized(copy.deepcopy(q), report, tmp_path / "q", None)
    path = Path(tmp_path / "q" / "quantization.json")
    record = json.loads(path.read_text())
    record["activation_quant"]["version"] = 1  # a reader of version 1 would drop the shift
    path.write_text(json.dumps(record))
    with pytest.raises(CheckpointError, match="unknown tensors") as err:
        hub.load(tmp_path / "q")
    assert "\n" not in str(err.value)


def test_the_cli_flag_shifts_every_learned_layer_and_the_recipe_replays_it(tmp_path, capsys):
    from faircalib.cli import main

    out = tmp_path / "q"
    argv = ["quantize", "mdlm-tiny", "--scheme", "w4a4", "--method", "fair", "--flat-shift"]
    argv += ["mean", "--flat-steps", "2", "--nsamples", "4", "--seq-len", "32", "--fair-steps"]
    argv += ["4", "--fair-prefix-len", "8", "--out", str(out)]
    assert main(argv) == 0
    assert "input shift: mean" in capsys.readouterr().out  # the summary says what ran
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["args"]["flat_shift"] == "mean"
    loaded = hub.load(out)
    layers = [m for m in loaded.modules() if isinstance(m, ActQuantLinear)]
    assert layers and all(m.transform.shift is not None and m.offset is not None for m in layers)


@pytest.mark.parametrize(
    ("argv", "recorded", "method", "want"),
    [
        ([], {}, "fair", "none"),  # a recipe from before the flag: it ran unshifted
        (["--flat-shift", "learned"], {}, "fair", "learned"),  # a typed flag still wins
        ([], {"flat_shift": None}, "fair", None),  # a recipe with the flag: today's default
        ([], {}, "quarot", None),  # not a learned method: nothing to set (it would be refused)
    ],
)
def test_an_old_learned_recipe_replays_without_the_shift(argv, recorded, method, want):
    from faircalib.cli import build_parser
    from faircalib.commands.quantize import apply_recipe

    argv = ["quantize", "--config", "recipe.json", "--out", "o", *argv]
    args = build_parser().parse_args(argv)
    args.argv = argv[1:]
    recipe = {"model": "mdlm-tiny", "args": {"scheme": "w4a4", "method": method, **recorded}}
    apply_recipe(args, recipe)
    assert args.flat_shift == want and args.method == method
