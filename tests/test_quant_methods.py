"""RTN, GPTQ, AWQ and SmoothQuant on one synthetic layer: 64x128 weight, 2048 correlated
activation rows with a few outlier channels. Errors are weighted_output_error (relative)."""

import pytest
import torch

from faircalib.config import AWQConfig, GPTQConfig, QuantConfig, RTNConfig, SmoothQuantConfig
from faircalib.errors import ConfigError, DataError
from faircalib.quant import (
    METHODS,
    LayerInputs,
    compute_qparams,
    dequantize,
    fake_quantize,
    quantize,
    quantize_awq,
    quantize_gptq,
    quantize_linear,
    quantize_rtn,
    quantize_smoothquant,
    weighted_output_error,
)

OUT, IN, ROWS = 64, 128, 2048


def _activations(seed: int, shift: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(IN, IN, generator=g) / IN**0.5
    x = torch.randn(ROWS, IN, generator=g) @ mix + 0.3 * torch.randn(ROWS, IN, generator=g)
    x[:, [5, 40, 99]] *= 12.0  # outlier channels, as in real transformer activations
    return x + shift


def _layer(seed: int = 0) -> tuple[torch.Tensor, LayerInputs]:
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(OUT, IN, generator=g) * 0.05  # [out, in]
    return w, LayerInputs.from_rows(_activations(seed), max_sample_rows=ROWS, seed=seed)


def _err(result, w, inputs) -> float:
    return weighted_output_error(result.weight, w, inputs, result.input_scale, result.act_bits)


def _check_codes(result, w) -> None:
    """Codes in range, reproduce the weight exactly, and use at most 2^bits levels per group."""
    qp = result.qparams
    assert result.codes.dtype == torch.uint8 and result.codes.shape == w.shape
    assert int(result.codes.max()) <= 2**qp.bits - 1
    assert torch.equal(dequantize(result.codes, qp), result.weight)
    width = w.shape[1] if qp.group_size is None else qp.group_size
    groups = result.codes.reshape(w.shape[0], -1, width)
    assert (
        max(len(torch.unique(groups[o, g])) for o in range(4) for g in range(groups.shape[1]))
        <= 2**qp.bits
    )


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("group_size", [None, 32])
def test_gptq_beats_rtn(bits, act_order, group_size):
    w, inputs = _layer()
    cfg = GPTQConfig(bits=bits, group_size=group_size, act_order=act_order)
    gptq = quantize_gptq(w, inputs, cfg)
    rtn = quantize_rtn(w, cfg)
    _check_codes(gptq, w)
    assert _err(gptq, w, inputs) < 0.8 * _err(rtn, w, inputs)


def test_gptq_loss_is_the_damped_quadratic_error_and_block_size_is_irrelevant():
    """GPTQ's accumulated per-column losses equal the exact layer loss tr(D H D^T) / 2 of the
    damped Hessian - the identity behind the Cholesky formulation - for any block size."""
    w, inputs = _layer(1)
    for act_order in (False, True):
        cfg = GPTQConfig(bits=3, group_size=32, act_order=act_order)
        a = quantize_gptq(w, inputs, cfg)
        b = quantize_gptq(
            w, inputs, GPTQConfig(bits=3, group_size=32, act_order=act_order, block_size=32)
        )
        assert torch.equal(a.codes, b.codes)
        h = inputs.hessian.double().clone()
        h.diagonal().add_(cfg.damp * float(torch.diag(h).mean()))
        d = (w - a.weight).double()
        exact = float(((d @ h) * d).sum()) / 2
        assert abs(a.info["gptq_loss"] - exact) < 1e-4 * exact


def test_gptq_static_groups_keep_contiguous_layout():
    """With act_order the group qparams are those of the original weight, so packers can
    store the codes group by group without a permutation index."""
    w, inputs = _layer(2)
    cfg = GPTQConfig(bits=4, group_size=32, act_order=True)
    res = quantize_gptq(w, inputs, cfg)
    ref = compute_qparams(w, cfg)
    assert torch.equal(res.qparams.scale, ref.scale) and torch.equal(res.qparams.zero, ref.zero)


def test_gptq_with_identity_hessian_is_rtn():
    """Uncorrelated unit-variance inputs leave no error to compensate: GPTQ rounds like RTN."""
    w, inputs = _layer(3)
    inputs.hessian = torch.eye(IN)
    for cfg in (
        GPTQConfig(bits=4, group_size=32, act_order=False),
        GPTQConfig(bits=3, group_size=None),
    ):
        assert torch.equal(quantize_gptq(w, inputs, cfg).codes, quantize_rtn(w, cfg).codes)


def test_gptq_dead_inputs_get_zero_weight():
    w, inputs = _layer(4)
    inputs.hessian[:, 7] = 0.0
    inputs.hessian[7, :] = 0.0
    res = quantize_gptq(w, inputs, GPTQConfig(bits=4, group_size=32))
    assert float(res.weight[:, 7].abs().max()) == 0.0
    assert res.info["dead_columns"] == 1.0


def test_gptq_rejects_mismatched_statistics():
    w, inputs = _layer()
    with pytest.raises(DataError, match="input features"):
        quantize_gptq(w[:, :64], inputs, GPTQConfig(group_size=32))


def test_row_weights_steer_gptq_towards_the_emphasised_rows():
    """Two row populations; weighting population B 20x makes GPTQ fit B better than an
    unweighted calibration does. This is the lever FAIR-Calib pulls."""
    w, _ = _layer()
    x = torch.cat([_activations(10), _activations(11, shift=2.0)])  # A, then B (shifted)
    row_w = torch.cat([torch.ones(ROWS), torch.full((ROWS,), 20.0)])
    cfg = GPTQConfig(bits=3, group_size=None, act_order=False)
    weighted = quantize_gptq(w, LayerInputs.from_rows(x, row_w, max_sample_rows=4096), cfg)
    plain = quantize_gptq(w, LayerInputs.from_rows(x, max_sample_rows=4096), cfg)
    only_b = LayerInputs.from_rows(x[ROWS:], max_sample_rows=ROWS)
    assert _err(weighted, w, only_b) < 0.9 * _err(plain, w, only_b)


@pytest.mark.parametrize("bits", [4, 3])
@pytest.mark.parametrize("group_size", [None, 32])
def test_awq_beats_rtn_and_its_scale_is_consistent(bits, group_size):
    w, inputs = _layer()
    cfg = AWQConfig(bits=bits, group_size=group_size)
    awq = quantize_awq(w, inputs, cfg)
    _check_codes(awq, w)
    rtn_err = _err(quantize_rtn(w, cfg), w, inputs)
    assert _err(awq, w, inputs) < 0.7 * rtn_err  # measured 0.33-0.48
    assert awq.info["loss_final"] <= awq.info["loss_scaled"] <= awq.info["loss_rtn"]
    assert abs(awq.info["loss_rtn"] - rtn_err) < 1e-3 * rtn_err  # same loss, two routes
    assert abs(awq.info["loss_final"] - _err(awq, w, inputs)) < 1e-3 * _err(awq, w, inputs)
    # weight lives in the smoothed basis: it is the fake-quantized W * s.
    assert torch.equal(awq.weight, fake_quantize(w * awq.input_scale, awq.qparams))
    assert float(awq.input_scale.min()) > 0 and 0 <= awq.info["alpha"] < 1


def test_awq_without_search_is_rtn():
    w, inputs = _layer()
    cfg = AWQConfig(bits=4, group_size=32, n_grid=1, clip_search=False)  # alpha = 0 only
    awq = quantize_awq(w, inputs, cfg)
    assert torch.allclose(awq.input_scale, torch.ones(IN))
    assert torch.equal(awq.codes, quantize_rtn(w, cfg).codes)


def test_smoothquant_rescaling_is_exact_in_float_and_helps_w8a8():
    w, inputs = _layer()
    cfg = SmoothQuantConfig(bits=8, group_size=None, alpha=0.5, act_bits=8)
    res = quantize_smoothquant(w, inputs, cfg)
    _check_codes(res, w)
    x, s = inputs.sample, res.input_scale
    ref = x @ w.T
    smoothed = (x / s) @ (w * s).T
    assert float((smoothed - ref).abs().max() / ref.abs().max()) < 1e-5
    assert res.act_bits == 8
    assert res.info["act_outlier_after"] < 0.5 * res.info["act_outlier_before"]
    # W8A8 without smoothing: same weights, per-token int8 activations with the outliers.
    plain = quantize_rtn(w, cfg)
    plain_err = weighted_output_error(plain.weight, w, inputs, None, act_bits=8)
    assert _err(res, w, inputs) < 0.5 * plain_err


def test_smoothquant_rejects_bad_alpha():
    w, inputs = _layer()
    with pytest.raises(ConfigError, match="alpha"):
        quantize_smoothquant(w, inputs, SmoothQuantConfig(alpha=1.5))


def test_eight_bit_rtn_is_nearly_lossless():
    w, inputs = _layer()
    res = quantize_rtn(w, RTNConfig(bits=8, group_size=None))
    assert _err(res, w, inputs) < 1e-4  # measured 3e-5; the bar for 'tiny' is 1e-2


def test_registry_dispatch_and_determinism():
    w, inputs = _layer()
    cfgs = {
        "rtn": RTNConfig(bits=4, group_size=32),
        "gptq": GPTQConfig(bits=4, group_size=32),
        "awq": AWQConfig(bits=4, group_size=32, n_grid=5, n_clip_grid=10),
        "smoothquant": SmoothQuantConfig(bits=8, group_size=None),
    }
    assert set(METHODS) == set(cfgs)
    for name, cfg in cfgs.items():
        a = quantize_linear(w, inputs, cfg, name=f"layer.{name}")
        b = METHODS[name](
            w.clone(), LayerInputs.from_rows(_activations(0), max_sample_rows=ROWS), cfg
        )
        assert torch.equal(a.codes, b.codes), name
        assert torch.equal(a.weight, b.weight), name
    # A plain QuantConfig means RTN; RTN needs no statistics.
    assert torch.equal(
        quantize_linear(w, None, QuantConfig(bits=4)).codes,
        quantize(w, compute_qparams(w, QuantConfig(bits=4))),
    )
    with pytest.raises(ConfigError, match="needs calibration"):
        quantize_linear(w, None, GPTQConfig())
    bogus = RTNConfig()
    bogus.method = "nope"
    with pytest.raises(ConfigError, match="unknown quantization method"):
        quantize_linear(w, inputs, bogus)


def _heavy_tailed_layer(n_out: int) -> tuple[torch.Tensor, LayerInputs]:
    """Weights with a few large entries per row: their groups gain from a clipped range."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(n_out, IN, generator=g) * 0.05
    spikes = torch.rand(n_out, IN, generator=g) < 0.02
    w = torch.where(spikes, w * 8.0, w)
    return w, LayerInputs.from_rows(_activations(5), max_sample_rows=ROWS)


def _clipped_rows(res, w: torch.Tensor, cfg) -> torch.Tensor:
    """Rows whose range is narrower than the min-max range of the smoothed weight W * s."""
    full = compute_qparams(w * res.input_scale, cfg)
    assert bool((res.qparams.scale <= full.scale).all())
    return (res.qparams.scale < full.scale).any(dim=1)  # [out]


def test_awq_leaves_query_key_rows_of_a_fused_qkv_unclipped():
    """llm-awq never clips q/k (auto_clip_block skips them); in MDLM's fused attn_qkv the
    first 2/3 of the output rows are q and k, the last third v."""
    d = 32
    w, inputs = _heavy_tailed_layer(3 * d)
    cfg = AWQConfig(bits=3, group_size=32)
    res = quantize_awq(w, inputs, cfg, name="blocks.0.attn_qkv")
    clipped = _clipped_rows(res, w, cfg)
    assert not clipped[: 2 * d].any()  # q and k keep their min-max ranges
    assert clipped[2 * d :].any() and res.info["clip_kept"] == 1.0  # v does get clipped
    assert res.info["no_clip_rows"] == 2 * d
    # The same weight under a name that is not a query/key projection is clipped in q/k rows too.
    other = quantize_awq(w, inputs, cfg, name="blocks.0.mlp_in")
    assert _clipped_rows(other, w, cfg)[: 2 * d].any()


def test_awq_never_clips_llama_style_query_and_key_projections():
    w, inputs = _heavy_tailed_layer(OUT)
    cfg = AWQConfig(bits=3, group_size=32)
    for name in ("model.layers.3.self_attn.q_proj", "blocks.1.k_proj"):
        res = quantize_awq(w, inputs, cfg, name=name)
        assert not _clipped_rows(res, w, cfg).any(), name
        assert res.info["clip_kept"] == 0.0
    v = quantize_awq(w, inputs, cfg, name="model.layers.3.self_attn.v_proj")
    assert _clipped_rows(v, w, cfg).any()  # the control: v_proj may be clipped


def test_awq_rejects_a_fused_qkv_that_does_not_split_in_thirds():
    w, inputs = _heavy_tailed_layer(OUT + 1)
    with pytest.raises(ConfigError, match="no_clip_rows"):
        quantize_awq(w, inputs, AWQConfig(bits=4, group_size=32), name="blocks.0.attn_qkv")
