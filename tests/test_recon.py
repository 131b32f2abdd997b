"""FAIR-Calib stage 2: learnable quantizers, block reconstruction, the end-to-end stage."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from faircalib import hub
from faircalib.calib import quantize
from faircalib.calib.engine import FakeQuantLinear, quant_results
from faircalib.calib.inputs import masked_inputs
from faircalib.calib.recon import SequenceRows, masked_kl, reconstruct_block, split_rows
from faircalib.config import (
    CalibConfig,
    FairCalibConfig,
    GPTQConfig,
    QuantConfig,
    ReconConfig,
    ReconMethodConfig,
)
from faircalib.data import calibration_batch
from faircalib.errors import ConfigError
from faircalib.formats.packed import pack_layer, quantization_args, unpack_layer
from faircalib.models.base import BlockContext
from faircalib.quant import LayerInputs, quantize_gptq, quantize_rtn
from faircalib.quant.primitives import dequantize
from faircalib.quant.recon import LearnableQuantLinear

torch.set_num_threads(1)


def test_learnable_layer_starts_exactly_at_the_base_solution():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(24, 64, generator=gen)
    x = torch.randn(300, 64, generator=gen)
    base = quantize_gptq(w, LayerInputs.from_rows(x), GPTQConfig(bits=3, group_size=32))
    layer = LearnableQuantLinear(base, None, rounding=True)
    assert torch.equal(layer.weight(), base.weight)
    frozen = layer.to_result()
    assert torch.equal(frozen.codes, base.codes)
    assert torch.equal(frozen.qparams.scale, base.qparams.scale)
    assert torch.equal(frozen.weight, dequantize(base.codes, base.qparams))


def test_rounding_offsets_move_codes_at_most_one_step_and_stay_on_the_grid():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    base = quantize_rtn(w, QuantConfig(bits=2, group_size=32))
    layer = LearnableQuantLinear(base, None, rounding=True)
    with torch.no_grad():
        layer.offset.uniform_(-3.0, 3.0)  # far outside the allowed range
        layer.gain.fill_(0.1)
    layer.clamp_()
    res = layer.to_result()
    moved = (res.codes.int() - base.codes.int()).abs()
    assert int(moved.max()) <= 1 and int(res.codes.max()) <= 3
    assert torch.allclose(res.qparams.scale, base.qparams.scale * torch.exp(torch.tensor(0.1)))
    assert torch.equal(res.weight, dequantize(res.codes, res.qparams))


class TwoLayerBlock(nn.Module):
    """A stand-in block with the engine's call signature: h + W2 gelu(W1 h)."""

    def __init__(self, dim: int, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.up = nn.Linear(dim, 2 * dim, bias=False)
        self.down = nn.Linear(2 * dim, dim, bias=False)
        with torch.no_grad():
            self.up.weight.copy_(torch.randn(2 * dim, dim, generator=gen) / dim**0.5)
            self.down.weight.copy_(torch.randn(dim, 2 * dim, generator=gen) / (2 * dim) ** 0.5)

    def forward(self, h: torch.Tensor, ctx: BlockContext) -> torch.Tensor:
        return h + self.down(F.gelu(self.up(h)))


def _quantized_block(bits: int = 2):
    """A float block, its RTN-quantized twin, inputs [N, L, D] and float targets."""
    block = TwoLayerBlock(32, seed=0)
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(12, 16, 32, generator=gen)
    with torch.no_grad():
        target = block(h, BlockContext())
    qblock = copy.deepcopy(block)
    for name in ("up", "down"):
        lin = getattr(qblock, name)
        res = quantize_rtn(lin.weight.detach(), QuantConfig(bits=bits, group_size=32))
        setattr(qblock, name, FakeQuantLinear.from_result(res, None))
    return qblock, h, target


def _row_error(block, h, target) -> torch.Tensor:
    with torch.no_grad():
        return ((block(h, BlockContext()) - target) ** 2).sum(-1).mean(-1)  # [N]


def _reconstruct(qblock, h, target, weights, steps=150):
    cfg = ReconConfig(steps=steps, batch=4, eval_every=10, lr_scale=5e-3, lr_round=1e-2)
    ctx = [BlockContext()]
    rows, goal = SequenceRows([h], ctx), SequenceRows([target], ctx)
    return reconstruct_block(qblock, rows, goal, weights, cfg, torch.device("cpu"), seed=0)


def test_reconstruction_lowers_the_weighted_block_loss_and_keeps_integer_codes():
    qblock, h, target = _quantized_block()
    before = _row_error(qblock, h, target)
    log = _reconstruct(qblock, h, target, torch.ones(12, 16))
    after = _row_error(qblock, h, target)
    assert log["best_val"] < log["initial_val"]
    assert float(after.mean()) < 0.9 * float(before.mean())
    for name in ("up", "down"):  # frozen back into plain codes + per-group scales
        layer = getattr(qblock, name)
        assert isinstance(layer, FakeQuantLinear)
        assert torch.equal(layer.weight, dequantize(layer.result.codes, layer.result.qparams))


def test_a_heavily_weighted_row_ends_with_lower_error_than_under_uniform_weights():
    train, _ = split_rows(12, ReconConfig().holdout, seed=0)
    row = train[0]  # a training row: held-out rows never drive the optimiser
    errors = {}
    for label, heavy in (("uniform", 1.0), ("weighted", 50.0)):
        qblock, h, target = _quantized_block()
        weights = torch.ones(12, 16)
        weights[row] = heavy
        _reconstruct(qblock, h, target, weights)
        errors[label] = float(_row_error(qblock, h, target)[row])
    assert errors["weighted"] < 0.9 * errors["uniform"]


def test_split_rows_keeps_every_view_of_a_text_on_one_side():
    text_ids = torch.arange(10).repeat(3)  # 3 views of 10 texts
    train, val = split_rows(30, 0.2, seed=3, text_ids=text_ids)
    assert sorted(train + val) == list(range(30))
    assert not set(text_ids[train].tolist()) & set(text_ids[val].tolist())
    assert len(set(text_ids[val].tolist())) == 2


def test_masked_kl_matches_a_direct_computation():
    gen = torch.Generator().manual_seed(0)
    logits_p, logits_q = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    logits_p[..., 0] = logits_q[..., 0] = float("-inf")  # the mask token: probability 0
    lp, lq = logits_p.log_softmax(-1), logits_q.log_softmax(-1)
    x_t = torch.tensor([[0, 3, 0, 0, 2], [1, 0, 0, 4, 0]])  # mask id 0
    got = masked_kl(lp, lq, x_t, mask_id=0)
    p, q = lp.exp()[..., 1:], lq.exp()[..., 1:]
    expected = (p * (p / q).log()).sum(-1) * (x_t == 0)
    assert torch.allclose(got, expected, atol=1e-6)
    assert bool((got[x_t != 0] == 0).all()) and bool((got[x_t == 0] > 0).all())


@pytest.fixture(scope="module")
def tiny():
    model = hub.load("mdlm-tiny")
    tok = hub.load_tokenizer("mdlm-tiny")
    return model, calibration_batch(tok, n_samples=8, seq_len=32, seed=0)


def _fast_recon(**knobs) -> dict:
    stage2 = ReconConfig(steps=6, eval_every=3, e2e_steps=4, batch=2, e2e_batch=2)
    return {"bits": 3, "group_size": 32, "steps": 4, "prefix_len": 8, "recon": stage2, **knobs}


def test_recon_is_fair_with_every_weight_one(tiny):
    model, tokens = tiny
    calib = CalibConfig(n_samples=8, seq_len=32, seed=0)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    quantize(a, ReconMethodConfig(**_fast_recon()), tokens, calib, progress=False)
    quantize(b, FairCalibConfig(**_fast_recon(weighting="uniform")), tokens, calib, progress=False)
    ra, rb = quant_results(a), quant_results(b)
    assert ra.keys() == rb.keys() and len(ra) == 16
    for name in ra:
        assert torch.equal(ra[name].codes, rb[name].codes)
        assert torch.equal(ra[name].qparams.scale, rb[name].qparams.scale)
    with pytest.raises(ConfigError, match="recon weights every token 1"):
        ReconMethodConfig(weighting="instability")


def test_fair_full_preset_runs_both_stages_and_packs_losslessly(tiny):
    model, tokens = tiny
    q = copy.deepcopy(model)
    cfg = FairCalibConfig(**_fast_recon(scale_dtype="bfloat16"))
    report = quantize(q, cfg, tokens, CalibConfig(n_samples=8, seq_len=32, seed=0), progress=False)
    assert [r["block"] for r in report.recon] == [0, 1, 2, 3, "e2e"]
    assert "recon_s" in report.timings and "e2e_s" in report.timings
    args = quantization_args(3, 32, symmetric=False)
    for name, res in quant_results(q).items():
        tensors = pack_layer(res.codes, res.qparams, torch.bfloat16, name=name)
        codes, qp = unpack_layer(tensors, args)
        assert torch.equal(codes, res.codes), name
        assert torch.equal(dequantize(codes, qp), res.weight), name


def test_fast_preset_is_the_weighted_base_method_alone(tiny):
    model, tokens = tiny
    q = copy.deepcopy(model)
    cfg = FairCalibConfig(**_fast_recon(preset="fast"))
    report = quantize(q, cfg, tokens, CalibConfig(n_samples=8, seq_len=32, seed=0), progress=False)
    assert report.recon == [] and "recon_s" not in report.timings


def test_offload_skips_the_end_to_end_stage_and_says_so(tiny, capsys):
    model, tokens = tiny
    q = copy.deepcopy(model)
    calib = CalibConfig(n_samples=8, seq_len=32, seed=0, offload=True)
    report = quantize(q, FairCalibConfig(**_fast_recon()), tokens, calib, progress=False)
    assert report.recon[-1] == {"block": "e2e", "skipped": "offload"}
    assert "skipping the end-to-end scale stage" in capsys.readouterr().err


def test_masked_views_cover_each_text_at_several_noise_levels(tiny):
    model, tokens = tiny
    x_t, t = masked_inputs(model, tokens, CalibConfig(seed=0, views=4))
    assert x_t.shape == (32, 32) and t.shape == (32,)
    kept = x_t != model.mask_id
    for i in range(8):  # row v * 8 + i is view v of text i: same text where unmasked
        rows = x_t[i::8]
        text = tokens[i].expand(4, -1)
        assert torch.equal(torch.where(kept[i::8], rows, text), text)
        # stratified: the 4 views of a text sit a quarter of the [t_min, 1] range apart
        u = (t[i::8] - 0.05) / 0.95
        spacing = torch.remainder(u - u[0], 1.0)
        assert torch.allclose(spacing, torch.tensor([0.0, 0.25, 0.5, 0.75]), atol=1e-5)


def test_held_out_loss_is_the_weighted_mse_over_held_out_texts():
    """The log's initial loss (the base solution, before any step) against a direct float64
    computation over the held-out rows: the held-out loss is summed in one pass over batches of
    8 rows with weights summed once, so it must equal the weighted mean over all of them."""
    qblock, h, target = _quantized_block()
    h, target = torch.cat([h, h + 0.1]), torch.cat([target, target])  # 24 rows: 3 held out
    weights = torch.rand(24, 16, generator=torch.Generator().manual_seed(5))
    text_ids = torch.arange(24) // 2
    with torch.no_grad():
        err = ((qblock(h, BlockContext()).double() - target.double()) ** 2).sum(-1)  # [N, L]
    cfg = ReconConfig(steps=1, batch=4, eval_every=1, holdout=0.4)
    _, held = split_rows(24, cfg.holdout, 0, text_ids)
    assert len(held) > 8  # more than one evaluation batch
    expected = float((err[held] * weights[held]).sum() / weights[held].double().sum())
    ctx = [BlockContext()]
    rows, goal = (
        SequenceRows([h[:10], h[10:]], ctx * 2),
        SequenceRows([target[:10], target[10:]], ctx * 2),
    )
    log = reconstruct_block(qblock, rows, goal, weights, cfg, torch.device("cpu"), 0, text_ids)
    assert log["initial_val"] == pytest.approx(expected, rel=1e-5)
