"""The block-wise stage of the learned-transform methods (flatquant, fair) on mdlm-tiny:
never worse than per-layer on held-out rows, exactly per-layer with zero steps, row weights
enter its loss, and the trained transforms stay exact in float."""

import contextlib
import copy
import io
import json

import pytest
import torch

from faircalib import hub
from faircalib.calib.activations import (
    ActCalibConfig,
    ActQuantLinear,
    _collect_inputs,
    block_loss,
    quantize_activations_model,
    quantize_layer,
)
from faircalib.calib.inputs import masked_inputs
from faircalib.calib.recon import split_rows
from faircalib.cli import main
from faircalib.config import CalibConfig, QuantConfig
from faircalib.data import calibration_batch
from faircalib.quant.activations import ActQuantConfig
from faircalib.quant.flatquant import FlatQuantConfig, TrainableTransformLinear, learn_transform

torch.set_num_threads(1)
FLAT = FlatQuantConfig(steps=20)  # a short per-layer stage: the block stage has room to help


@pytest.fixture(scope="module")
def tiny():
    model = hub.load("mdlm-tiny")
    tok = hub.load_tokenizer("mdlm-tiny")
    tokens = calibration_batch(tok, "c4", "train", 8, 32, seed=0)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=8))
    return model, x_t, t


def _quantized(model, x_t, t, **knobs):
    q, log = copy.deepcopy(model), []
    cfg = ActCalibConfig("w4a4", knobs.pop("method", "flatquant"), flat=FLAT, **knobs)
    with torch.no_grad():
        quantize_activations_model(q, x_t, t, cfg, block_log=log)
    return q, log


def _held_out_block0_loss(model, q, x_t, t, holdout: float, seed: int) -> float:
    """Uniformly weighted MSE of block 0's output against the float block 0, on the rows the
    stage held out (block 0's input is the stem output in both models)."""
    _, val = split_rows(len(x_t), holdout, seed)
    with torch.no_grad():
        h, ctx = model.stem(x_t[val], t[val])
        ref, got = model.blocks[0](h, ctx), q.blocks[0](h, ctx)
    return float(((got - ref) ** 2).sum(-1).mean())


@pytest.mark.parametrize("lr", [2e-3, 1.0])  # a sane rate, and one that wrecks the transforms
def test_block_stage_never_raises_the_held_out_block_loss(tiny, lr):
    model, x_t, t = tiny
    per_layer, _ = _quantized(model, x_t, t, block_steps=0)
    tuned, log = _quantized(model, x_t, t, block_steps=30, block_lr=lr, block_eval_every=10)
    before = _held_out_block0_loss(model, per_layer, x_t, t, 0.125, seed=0)
    after = _held_out_block0_loss(model, tuned, x_t, t, 0.125, seed=0)
    assert log[0]["initial_val"] == pytest.approx(before, rel=1e-4)
    assert log[0]["best_val"] == pytest.approx(after, rel=1e-4)
    assert after <= before
    for b in log:  # a block whose transforms diverged keeps what it had before they did
        assert "diverged_step" not in b or b["best_step"] < b["diverged_step"]
    if lr < 1:  # the sane rate does improve some block on held-out rows
        assert any(b["best_step"] > 0 and b["best_val"] < b["initial_val"] for b in log), log


def test_a_diverging_block_stage_stops_and_keeps_the_per_layer_modules(tiny):
    """A rate that drives the transforms to NaN / inf (1e30) ends the stage at its first
    evaluation, logged, with the per-layer modules in place: the model computes exactly what
    the per-layer result computes (before the fix, freezing a NaN clip ratio raised)."""
    model, x_t, t = tiny
    per_layer, _ = _quantized(model, x_t, t, block_steps=0)
    tuned, log = _quantized(model, x_t, t, block_steps=30, block_lr=1e30, block_eval_every=10)
    assert [(b["diverged_step"], b["best_step"]) for b in log] == [(10, 0)] * len(model.blocks)
    with torch.no_grad():
        assert torch.equal(tuned(x_t, t), per_layer(x_t, t))


def test_zero_block_steps_is_the_per_layer_result(tiny):
    model, x_t, t = tiny
    got, log = _quantized(model, x_t, t, block_steps=0)
    assert log == []
    # today's per-layer loop, written out: each block's linears calibrated on the outputs of
    # the already-quantized earlier blocks, then the block run forward
    ref = copy.deepcopy(model)
    cfg = ActCalibConfig("w4a4", "flatquant", flat=FLAT, block_steps=0)
    with torch.no_grad():
        h, ctx = ref.stem(x_t, t)
        for i, block in enumerate(ref.blocks):
            linears = ref.quantizable_linears(block)
            stats = _collect_inputs(block, linears, [h], [ctx], [torch.ones(x_t.shape)], cfg, i)
            for j, (name, lin) in enumerate(linears):
                module, _ = quantize_layer(name, lin, stats[name], cfg, 1000 * i + j)
                parent, _, child = name.rpartition(".")
                setattr(block.get_submodule(parent) if parent else block, child, module)
            h = block(h, ctx)
        assert torch.equal(got.log_probs(x_t, t), ref.log_probs(x_t, t))


def test_trainable_starts_exactly_at_the_per_layer_result():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 32, generator=gen)
    x[:, 3] *= 20
    w = torch.randn(24, 32, generator=gen) / 6
    wcfg, act = QuantConfig(bits=4, group_size=None), ActQuantConfig("int", 4)
    start = learn_transform(w, x, wcfg, act, FlatQuantConfig(steps=30, batch_rows=128))
    frozen = TrainableTransformLinear(w, None, start, wcfg).freeze()
    assert torch.equal(frozen.result.weight, start.result.weight)
    assert torch.equal(frozen.transform.p1, start.transform.p1)
    assert torch.equal(frozen.transform.smooth, start.transform.smooth)
    assert frozen.act.clip_ratio == start.act.clip_ratio
    # its STE forward is the frozen layer's forward up to float rounding of the fold
    offset = start.transform.output_offset(w)  # the default mean shift's exact share
    module = ActQuantLinear(
        start.result.weight, None, start.act, transform=start.transform, offset=offset
    )
    trainable = TrainableTransformLinear(w, None, start, wcfg)
    with torch.no_grad():
        rel = (trainable(x) - module(x)).norm() / module(x).norm()
    assert rel < 1e-2, rel


def test_a_frozen_result_does_not_move_when_training_goes_on():
    """The block stage freezes candidates mid-training and keeps the best; the frozen transform
    must be a copy, or later Adam steps rewrite it under codes quantized for the old one."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(128, 32, generator=gen)
    w = torch.randn(16, 32, generator=gen) / 6
    wcfg, act = QuantConfig(bits=4, group_size=None), ActQuantConfig("int", 4)
    start = learn_transform(w, x, wcfg, act, FlatQuantConfig(steps=5, batch_rows=64))
    trainable = TrainableTransformLinear(w, None, start, wcfg)
    frozen = trainable.freeze()
    before = {k: v.clone() for k, v in vars(frozen.transform).items() if torch.is_tensor(v)}
    assert {"p1", "p2"} <= before.keys()
    opt = torch.optim.Adam([p for p in trainable.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        trainable(x).pow(2).mean().backward()
        opt.step()
    assert not torch.equal(trainable.freeze().transform.p1, before["p1"])  # training moved
    for name, value in before.items():
        assert torch.equal(getattr(frozen.transform, name), value), name


def _trainable_block(model, x_t, t):
    """Block 0 with every declared linear a TrainableTransformLinear (per-layer init, 5 steps),
    its stem input, and the float block's output."""
    block = copy.deepcopy(model.blocks[0])
    with torch.no_grad():
        h, ctx = model.stem(x_t, t)
        target = model.blocks[0](h, ctx)
    rows = {}
    hooks = [
        lin.register_forward_pre_hook(lambda m, a, n=name: rows.__setitem__(n, a[0]))
        for name, lin in model.quantizable_linears(model.blocks[0])
    ]
    with torch.no_grad():
        model.blocks[0](h, ctx)
    for hook in hooks:
        hook.remove()
    wcfg, act = QuantConfig(bits=4, group_size=None), ActQuantConfig("int", 4)
    for name, lin in model.quantizable_linears(block):
        x = rows[name].reshape(-1, lin.in_features)
        start = learn_transform(lin.weight, x, wcfg, act, FlatQuantConfig(steps=5))
        parent, _, child = name.rpartition(".")
        trainable = TrainableTransformLinear(lin.weight, lin.bias, start, wcfg)
        setattr(block.get_submodule(parent) if parent else block, child, trainable)
    for p in block.parameters():
        p.requires_grad_(p.dim() == 2 and p.shape[0] == p.shape[1])  # P1, P2 only
    return block, h, ctx, target


def _grads(block, loss):
    params = [p for p in block.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params)


def test_a_zero_weight_row_does_not_move_the_gradients(tiny):
    model, x_t, t = tiny
    block, h, ctx, target = _trainable_block(model, x_t[:2], t[:2])
    weights = torch.rand(x_t[:2].shape, generator=torch.Generator().manual_seed(1)) + 0.5
    weights[0, 5] = 0.0
    num, den = block_loss(block(h, ctx), target, weights)
    stage = _grads(block, num / den)
    # the same loss recomputed without that row (and with its target moved far away)
    keep = torch.ones_like(weights, dtype=torch.bool)
    keep[0, 5] = False
    moved = target.clone()
    moved[0, 5] += 100.0
    err = ((block(h, ctx) - moved) ** 2).sum(-1)
    manual = _grads(block, (err[keep] * weights[keep]).sum() / weights[keep].sum())
    for a, b in zip(stage, manual, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    # ...while a weight on that row does change them (the weights are in the loss)
    weights[0, 5] = 1.0
    num, den = block_loss(block(h, ctx), moved, weights)
    changed = _grads(block, num / den)
    assert max(float((a - b).abs().max()) for a, b in zip(stage, changed, strict=True)) > 1e-3


def test_trained_transforms_stay_exact_in_float(tiny):
    model, x_t, t = tiny
    tuned, log = _quantized(model, x_t, t, block_steps=30, block_lr=2e-3, block_eval_every=10)
    per_layer, _ = _quantized(model, x_t, t, block_steps=0)
    x = torch.randn(64, 512, generator=torch.Generator().manual_seed(2))
    for i, (block, ref_block) in enumerate(zip(tuned.blocks, model.blocks, strict=True)):
        lins = dict(model.quantizable_linears(ref_block))
        start = dict(per_layer.quantizable_linears(per_layer.blocks[i]))
        for name, module in tuned.quantizable_linears(block):
            lin, tf = lins[name], module.transform
            xi = x[:, : lin.in_features] * 3
            offset = tf.output_offset(lin.weight)
            float_module = ActQuantLinear(
                tf.fold(lin.weight), lin.bias, None, transform=tf, offset=offset
            )
            with torch.no_grad():
                ref = lin(xi)
                err = (float_module(xi) - ref).norm() / ref.norm()
            assert err < 1e-4, (i, name, float(err))
            if i == 0:  # same inputs in both runs: trained iff the stage kept a later step
                same = torch.equal(tf.p1, start[name].transform.p1)
                assert same == (log[0]["best_step"] == 0)
    assert any(b["best_step"] > 0 for b in log)


def _cli(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, err.getvalue()


def test_cli_flag_runs_the_stage_and_is_refused_where_it_does_not_apply(tmp_path):
    out = tmp_path / "q"
    argv = ["quantize", "mdlm-tiny", "--scheme", "w4a4", "--method", "flatquant"]
    argv += ["--nsamples", "8", "--seq-len", "32", "--flat-steps", "2"]
    code, err = _cli([*argv, "--flat-block-steps", "3", "--out", str(out)])
    assert code == 0, err
    record = json.loads((out / "quantization.json").read_text())
    assert record["method"]["block_steps"] == 3
    assert [b["block"] for b in record["blocks"]] == [0, 1, 2, 3]
    assert all(b["best_val"] <= b["initial_val"] for b in record["blocks"])
    base = ["quantize", "mdlm-tiny", "--nsamples", "8", "--seq-len", "32"]
    for args in ([*base, "--method", "gptq"], [*base, "--scheme", "w4a4", "--method", "quarot"]):
        code, err = _cli([*args, "--flat-block-steps", "3", "--out", str(tmp_path / "x")])
        assert code == 2 and "--flat-block-steps" in err, err
