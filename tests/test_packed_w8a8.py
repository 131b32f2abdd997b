"""Packed W8A8 checkpoints (issue 14, item 6): compressed-tensors `int-quantized` (INT8) and
`float-quantized` (FP8 e4m3) with dynamic per-token input activations, written from the
activation-quantized (ActQuantLinear) model, reloaded bit for bit, read by transformers, and
matched by vLLM's scheme-selection rules; the CLI path (quantize -> eval -> generate)."""

import contextlib
import copy
import io
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from faircalib import hub
from faircalib.calib.activations import ActCalibConfig, ActQuantLinear, quantize_activations
from faircalib.calib.fakequant_io import packed_act_config, save_quantized, w8a8_results
from faircalib.calib.inputs import masked_inputs
from faircalib.calib.select import restrict
from faircalib.cli import main
from faircalib.config import CalibConfig, RTNConfig
from faircalib.data import calibration_batch
from faircalib.data.sources import load_source
from faircalib.errors import CheckpointError, ConfigError
from faircalib.formats.packed import (
    FP8ActLinear,
    checkpoint_tensor_bytes,
    packed_checkpoint_bytes,
    packed_weight_bytes,
    w8a8_layer_from_weight,
    w8a8_quant_linear,
    write_packed,
)
from faircalib.kernels import QuantLinear, backends
from faircalib.kernels.backends import auto_backend, fp8_quantize_activations, quantize_rows_int8
from faircalib.quant import quantize_gptq, quantize_rtn
from faircalib.quant.activations import ActQuantConfig
from faircalib.quant.primitives import ACT_ABSMAX_FLOOR
from faircalib.quant.stats import LayerInputs
from llama_like_ckpt import write_family
from test_formats_interop import LLAMA_FUSED, hf_linears, tiny_llama, vllm_layer_groups
from test_formats_interop import vllm_llama_linears as vllm_llama_layers

torch.set_num_threads(1)
CALIB = CalibConfig(n_samples=4, seq_len=32)


# --- vLLM's scheme selection -----------------------------------------------------------------
# Re-implemented from vllm-project/vllm, vllm/model_executor/layers/quantization/
# compressed_tensors/compressed_tensors.py (commit 004dadbe): `_quantization_scheme_map_from_config`
# reads input_activations only when the top-level format is an activation-quantization format
# (naive-, int-, float-quantized); `_get_scheme_from_parts` then picks W8A8Fp8 (float weights and
# activations, symmetric static per-tensor/channel weights, dynamic activations) or W8A8Int8
# (8-bit, symmetric static tensor/channel weights, dynamic per-token activations), else fails.
ACTIVATION_FORMATS = ("naive-quantized", "int-quantized", "float-quantized")


def vllm_scheme(qc: dict, group: str) -> str:
    scheme = qc["config_groups"][group]
    w = scheme["weights"]
    a = scheme.get("input_activations") if qc["format"] in ACTIVATION_FORMATS else None
    if a is None:
        return "weight-only"
    fp8 = w["type"] == a["type"] == "float" and w["symmetric"] and not w["dynamic"]
    if fp8 and w["strategy"] in ("tensor", "channel") and a["dynamic"]:
        return "CompressedTensorsW8A8Fp8"
    int8 = w["num_bits"] == a["num_bits"] == 8 and w["strategy"] in ("tensor", "channel")
    if int8 and a["strategy"] == "token" and w["symmetric"] and not w["dynamic"] and a["dynamic"]:
        return "CompressedTensorsW8A8Int8"
    raise AssertionError("No compressed-tensors compatible scheme was found.")


def test_the_vllm_scheme_helper_refuses_what_vllm_refuses():
    args = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
    act = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    qc = {
        "format": "int-quantized",
        "config_groups": {"g": {"weights": {**args, "dynamic": False}}},
    }
    qc["config_groups"]["g"]["input_activations"] = act
    assert vllm_scheme(qc, "g") == "CompressedTensorsW8A8Int8"
    qc["config_groups"]["g"]["weights"]["symmetric"] = False  # asymmetric INT8 weights
    with pytest.raises(AssertionError, match="No compressed-tensors"):
        vllm_scheme(qc, "g")
    assert vllm_scheme({**qc, "format": "pack-quantized"}, "g") == "weight-only"


# --- grid recovery from a fake-quant weight ---------------------------------------------------
def test_int8_grid_is_recovered_exactly_from_rtn_and_gptq_weights():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 96, generator=gen)
    rtn = quantize_rtn(w, RTNConfig(bits=8, group_size=None, symmetric=True))
    layer = w8a8_layer_from_weight("int8", rtn.weight)
    assert torch.equal(layer.values.to(torch.int16) + 128, rtn.codes.to(torch.int16))
    assert torch.equal(layer.scale, rtn.qparams.scale)  # RTN's own scales, found again
    gptq = quantize_gptq(
        w, LayerInputs.from_rows(torch.randn(256, 96, generator=gen)), _gptq_int8()
    )
    layer = w8a8_layer_from_weight("int8", gptq.weight)
    assert layer is not None and torch.equal(layer.values.float() * layer.scale, gptq.weight)
    asym = quantize_rtn(w, RTNConfig(bits=8, group_size=None, symmetric=False))
    assert w8a8_layer_from_weight("int8", asym.weight) is None  # zero points: no W8A8 form


def _gptq_int8():
    from faircalib.config import GPTQConfig

    return GPTQConfig(bits=8, group_size=None, symmetric=True)


def test_fp8_grid_is_torchs_e4m3_cast_of_the_row_scaled_weight():
    """Independent reference: torch's float8_e4m3fn cast of w / (abs-max / 448) per row."""
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    scale = w.abs().amax(dim=1, keepdim=True) / 448
    ref_values = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    fake = ref_values.float() * scale
    layer = w8a8_layer_from_weight("fp8", fake)
    assert torch.equal(layer.values.float() * layer.scale, fake)
    assert torch.equal(layer.values.view(torch.uint8), ref_values.view(torch.uint8))


# --- library round trips ----------------------------------------------------------------------
def bf16_valued(model):
    """Parameters rounded to bf16 values: the bf16 checkpoint then stores the float tensors
    losslessly, so the reload can be compared bit for bit."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.bfloat16())
    return model


@pytest.fixture(scope="module")
def tiny():
    model = bf16_valued(hub.load("mdlm-tiny"))
    tokens = calibration_batch(hub.load_tokenizer("mdlm-tiny"), "c4", "train", 4, 32, seed=0)
    x_t, t = masked_inputs(model, tokens, CalibConfig(n_samples=4, seed=7))
    return model, tokens, x_t, t


def calibrated(model, tokens, scheme, method):
    q = copy.deepcopy(model)
    report = quantize_activations(
        q, tokens, packed_act_config(ActCalibConfig(scheme, method)), CALIB
    )
    return q, report


@pytest.mark.parametrize(
    ("scheme", "method", "module_type"),
    [("w8a8", "rtn", QuantLinear), ("w8a8", "gptq", QuantLinear), ("w8a8fp8", "rtn", FP8ActLinear)],
)
def test_mdlm_packed_reload_equals_the_fake_quant_model(
    tiny, tmp_path, scheme, method, module_type
):
    model, tokens, x_t, t = tiny
    q, report = calibrated(model, tokens, scheme, method)
    save_quantized(q, report, tmp_path / "p", None, fmt="packed")
    loaded = hub.load(tmp_path / "p")
    with torch.no_grad():
        want, got, float_lp = q.log_probs(x_t, t), loaded.log_probs(x_t, t), model.log_probs(x_t, t)
    assert torch.equal(got, want)
    assert not torch.equal(got, float_lp)  # weights and activations really are quantized
    act_layers = [n for n, m in q.named_modules() if isinstance(m, ActQuantLinear)]
    assert len(act_layers) == 16
    for name in act_layers:
        layer = loaded.get_submodule(name)
        assert type(layer) is module_type
        if module_type is QuantLinear:  # what the int8 W8A8 backends take
            assert (layer.bits, layer.group_size, layer.symmetric) == (8, None, True)
            assert layer.act_bits == 8
            assert torch.equal(layer.dequantized_weight(), q.get_submodule(name).weight)
    config = json.loads((tmp_path / "p" / "config.json").read_text())["quantization_config"]
    assert config["format"] == ("int-quantized" if scheme == "w8a8" else "float-quantized")
    assert vllm_scheme(config, "group_0").endswith("Int8" if scheme == "w8a8" else "Fp8")


def test_llada_layout_packed_reload_equals_the_fake_quant_model(tmp_path):
    model = hub.load(write_family(tmp_path / "src", "llada"))  # bf16 tensors: exact in bf16
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randint(0, 256, (4, 32), generator=gen)
    x_t = torch.randint(0, 256, (2, 24), generator=gen)
    x_t[torch.rand(x_t.shape, generator=gen) < 0.5] = model.mask_id
    t = torch.full((2,), 0.5)
    for scheme in ("w8a8", "w8a8fp8"):
        q, report = calibrated(model, tokens, scheme, "rtn")
        save_quantized(q, report, tmp_path / scheme, None, fmt="packed")
        loaded = hub.load(tmp_path / scheme)
        with torch.no_grad():
            assert torch.equal(loaded.log_probs(x_t, t), q.log_probs(x_t, t)), scheme
        config = json.loads((tmp_path / scheme / "config.json").read_text())
        assert config["model_type"] == "llada"
        groups = vllm_layer_groups(config["quantization_config"], hf_linears(q), {})
        assert [n for n, g in groups.items() if g is None] == ["model.transformer.ff_out"]


def test_byte_accounting_matches_the_written_files(tiny, tmp_path):
    model, tokens, _, _ = tiny
    for scheme, scale_bytes in (("w8a8", 2), ("w8a8fp8", 4)):  # bf16 / float32 scales
        q, report = calibrated(model, tokens, scheme, "rtn")
        layers = w8a8_results(q)
        save_quantized(q, report, tmp_path / scheme, None, fmt="packed")
        written = checkpoint_tensor_bytes(tmp_path / scheme)
        assert packed_checkpoint_bytes(q, layers)["total"] == written
        expected = sum(
            o * i + o * scale_bytes for o, i in (v.values.shape for v in layers.values())
        )
        assert packed_weight_bytes(tmp_path / scheme) == expected


def test_what_has_no_w8a8_form_is_refused_in_one_line(tiny, tmp_path):
    model, tokens, _, _ = tiny
    q = copy.deepcopy(model)
    quantize_activations(q, tokens, ActCalibConfig("w8a8", "quarot"), CALIB)
    with pytest.raises(ConfigError, match="Hadamard rotation") as err:
        save_quantized(q, {}, tmp_path / "a", None, fmt="packed")
    q = copy.deepcopy(model)  # calibrated for fake-quant: float32 scales the bf16 file can't hold
    quantize_activations(q, tokens, ActCalibConfig("w8a8", "rtn"), CALIB)
    with pytest.raises(ConfigError, match="not exactly representable in bfloat16") as err2:
        save_quantized(q, {}, tmp_path / "b", None, fmt="packed")
    assert "\n" not in str(err.value) + str(err2.value)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_damaged_w8a8_directory_is_refused(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    model, tokens, _, _ = tiny
    q, report = calibrated(model, tokens, "w8a8", "rtn")
    save_quantized(q, report, tmp_path / "p", None, fmt="packed")
    shard = next((tmp_path / "p").glob("*.safetensors"))
    tensors = load_file(shard)
    tensors["blocks.0.mlp.0.weight"] = tensors["blocks.0.mlp.0.weight"].to(torch.int16)
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="dtype"):
        hub.load(tmp_path / "p")


def test_int8_layers_are_routed_to_the_w8a8_backends_on_cuda(tiny, tmp_path):
    """The routing rule itself (no GPU needed): auto picks W8A8_AUTO's int8 backend for the
    reloaded layers at M >= 17 on CUDA; on the CPU the same `int8` backend, asked by name,
    computes what the exact dequant backend computes."""
    model, tokens, x_t, _ = tiny
    q, report = calibrated(model, tokens, "w8a8", "rtn")
    save_quantized(q, report, tmp_path / "p", None, fmt="packed")
    layer = hub.load(tmp_path / "p").blocks[0].mlp[0]
    # W8A8_AUTO's first choice needs triton (the dev extra brings it on Linux), else _int_mm
    want = backends.W8A8_AUTO["cuda"][0][1][0] if backends._HAS_TRITON else "int8"
    assert auto_backend(layer, "cuda", torch.bfloat16, 64) == want
    assert auto_backend(layer, "cpu", torch.float32, 64) == "dequant"  # CPU: the exact one
    x = torch.randn(40, layer.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = layer(x)
        layer.backend = "int8"
        layer._forget_plans()
        fast = layer(x)
    assert layer.last_backend == "int8"
    torch.testing.assert_close(fast, exact, rtol=1e-5, atol=1e-5)


# --- FP8 layers: the real FP8 GEMM next to the reference ----------------------------------------
E4M3 = torch.float8_e4m3fn


def e4m3_rows(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Independent per-row e4m3 grid: torch's cast of t / (abs-max / 448) (nonzero rows)."""
    scale = t.float().abs().amax(dim=-1, keepdim=True) / 448
    return (t.float() / scale).to(E4M3), scale


def fp8_layers(values, scale, bias):
    return (
        FP8ActLinear(values, scale, bias, backend="fp8_w8a8"),
        FP8ActLinear(values, scale, bias, backend="reference"),
    )


@pytest.mark.parametrize(
    ("lead", "n_in", "n_out", "with_bias"),
    [((3, 7), 32, 48, True), ((1,), 160, 16, False), ((33,), 64, 96, True)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_gemm_path_matches_the_reference_path(lead, n_in, n_out, with_bias, dtype):
    """torch._scaled_mm runs e4m3 on the CPU (torch 2.13), so the fast path is checked here.
    Both paths multiply the same e4m3 operands (rebuilt independently below) exactly, so each
    differs from the float64 result of those operands only by float rounding: a float32 dot
    product of K exact products plus <= 4 more roundings (two scales, bias, output) is within
    gamma_(K+4) * sum|terms| (Higham); bf16 adds its unit roundoff 2^-8 on the GEMM output,
    the bias and their sum (fast path: the float32 accumulator is rounded once) or on x_q,
    the weight and the output (reference path: the fake-quant model's ops in bf16)."""
    gen = torch.Generator().manual_seed(n_in + n_out)
    values, w_scale = e4m3_rows(torch.randn(n_out, n_in, generator=gen))
    bias = torch.randn(n_out, generator=gen) if with_bias else None
    x = torch.randn(*lead, n_in, generator=gen) * torch.logspace(-2, 2, n_in)  # outlier channels
    x = x.to(dtype)
    fast, ref = fp8_layers(values, w_scale, bias)
    with torch.no_grad():
        y_fast, y_ref = fast(x), ref(x)
    assert (fast.last_backend, ref.last_backend) == ("fp8_w8a8", "reference")
    assert y_fast.shape == y_ref.shape == (*lead, n_out) and y_fast.dtype == dtype

    x8, x_scale = e4m3_rows(x.reshape(-1, n_in))
    terms_x = x8.double() * x_scale.double()  # [M, K] the activation operand, exactly
    w = values.double() * w_scale.double()  # [N, K]
    b = torch.zeros(n_out, dtype=torch.float64) if bias is None else bias.double()
    exact = terms_x @ w.T + b
    magnitude = terms_x.abs() @ w.abs().T + b.abs()  # sum |terms|: the dot product's scale
    k = n_in + 4
    gamma = k * 2.0**-24 / (1 - k * 2.0**-24)
    fast_tol, ref_tol = gamma * magnitude, gamma * magnitude
    if dtype == torch.bfloat16:
        u = 2.0**-8
        fast_tol = u * (exact.abs() + 2 * magnitude) + (1 + u) * fast_tol
        ref_tol = u * (exact.abs() + 3 * magnitude) + 2 * ref_tol
    y_fast, y_ref = y_fast.double().reshape(-1, n_out), y_ref.double().reshape(-1, n_out)
    assert bool(((y_fast - exact).abs() <= fast_tol).all())
    assert bool(((y_ref - exact).abs() <= ref_tol).all())
    assert bool(((y_fast - y_ref).abs() <= fast_tol + ref_tol).all())


def test_fp8_paths_are_chosen_by_device_shape_and_name():
    gen = torch.Generator().manual_seed(3)
    values, scale = e4m3_rows(torch.randn(32, 64, generator=gen))
    cuda, cpu = torch.device("cuda"), torch.device("cpu")  # the rule only: nothing runs here
    auto = FP8ActLinear(values, scale, None)
    assert auto.backend == "auto"
    assert auto.choose_backend(cuda, torch.bfloat16, 64) == "fp8_w8a8"
    assert auto.choose_backend(cuda, torch.float32, 1) == "fp8_w8a8"
    # the CPU keeps the exact (and there faster) reference; so does an empty call
    assert auto.choose_backend(cpu, torch.float32, 64) == "reference"
    assert auto.choose_backend(cpu, torch.bfloat16, 64) == "reference"
    assert auto.choose_backend(cuda, torch.bfloat16, 0) == "reference"
    auto.backend = "reference"  # a changed choice is not served from the cache
    assert auto.choose_backend(cuda, torch.bfloat16, 64) == "reference"
    # _scaled_mm takes in and out divisible by 16 only: auto falls back, a named path refuses
    values, scale = e4m3_rows(torch.randn(24, 40, generator=gen))
    assert FP8ActLinear(values, scale, None).choose_backend(cuda, torch.bfloat16, 64) == (
        "reference"
    )
    named = FP8ActLinear(values, scale, None, backend="fp8_w8a8")
    with pytest.raises(ConfigError, match="divisible by 16"):
        named(torch.randn(3, 40))
    with pytest.raises(ConfigError, match="unknown FP8ActLinear backend"):
        FP8ActLinear(values, scale, None, backend="int8")


def test_reloaded_fp8_layers_take_the_fp8_gemm_on_cuda_and_stay_exact_on_cpu(tiny, tmp_path):
    """`eval` and `generate` load through hub.load -> the packed loader: every FP8 layer it
    builds is on `auto`, routed to the FP8 GEMM for CUDA calls and to the exact reference
    here (the reload's log-probs equal the fake-quant model's: test above)."""
    model, tokens, x_t, t = tiny
    q, report = calibrated(model, tokens, "w8a8fp8", "rtn")
    save_quantized(q, report, tmp_path / "p", None, fmt="packed")
    loaded = hub.load(tmp_path / "p")
    layers = [m for m in loaded.modules() if isinstance(m, FP8ActLinear)]
    assert len(layers) == 16
    with torch.no_grad():
        loaded.log_probs(x_t, t)
    for layer in layers:
        assert layer.backend == "auto" and layer.last_backend == "reference"
        assert layer.choose_backend(torch.device("cuda"), torch.bfloat16, 64) == "fp8_w8a8"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_runs_packed_fp8_on_the_fp8_gemm(tiny, tmp_path):
    """On the GPU the reloaded FP8 layers run torch._scaled_mm for bf16 input and the bf16
    log-probs stay close to the CPU float32 fake-quant model's."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    model, tokens, x_t, t = tiny
    q, report = calibrated(model, tokens, "w8a8fp8", "rtn")
    save_quantized(q, report, tmp_path / "p", None, fmt="packed")
    loaded = hub.load(tmp_path / "p", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = loaded.log_probs(x_t.cuda(), t.cuda()).float().cpu()
        want = q.log_probs(x_t, t)
    layers = [m for m in loaded.modules() if isinstance(m, FP8ActLinear)]
    assert len(layers) == 16 and {m.last_backend for m in layers} == {"fp8_w8a8"}
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert float((got[finite] - want[finite]).abs().mean()) < 0.05


# --- one activation abs-max floor on every path ---------------------------------------------------
# token rows of abs-max 1e-7 (above the floor), 3e-9 (below it: the floor sets the scale) and 0,
# padded to 16 features (what _scaled_mm takes)
TINY_ROWS = torch.nn.functional.pad(
    torch.tensor([[1.0, -0.3, 0.2, 0.004], [1.0, -0.5, 0.2, 0.01], [0.0] * 4])
    * torch.tensor([[1e-7], [3e-9], [0.0]]),
    (0, 12),
)
# by hand: INT8 code = round(x * 127 / max(abs-max, 1e-8)); e4m3 value of x * 448 / max(...)
# (row 0: 448, -134.4, 89.6, 1.792; row 1: 134.4, -67.2, 26.88, 1.344, to the nearest e4m3)
INT8_CODES = [[127, -38, 25, 1], [38, -19, 8, 0], [0, 0, 0, 0]]
E4M3_VALUES = [[448.0, -128.0, 88.0, 1.75], [128.0, -64.0, 26.0, 1.375], [0.0] * 4]
ROW_ABSMAX = [1e-7, 1e-8, 1e-8]  # after the floor


def _expected(codes: list[list[float]], qmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    codes = torch.nn.functional.pad(torch.tensor(codes), (0, 12))
    return codes, torch.tensor(ROW_ABSMAX)[:, None] / qmax


def test_the_activation_floor_is_one_constant():
    assert ACT_ABSMAX_FLOOR == 1e-8  # the value the hand-computed codes below assume


def test_a_tiny_int8_row_gets_the_same_codes_on_every_path():
    """fake quant (ActQuantLinear), QuantLinear(act_bits=8) on its exact backend as the packed
    reload builds it, and the int8 kernels' row quantizer; the identity weight (exact on every
    grid) makes each layer's output its quantized input."""
    codes, scale = _expected(INT8_CODES, 127)
    eye = torch.eye(16)
    fake = ActQuantLinear(eye, None, ActQuantConfig("int", 8))
    reloaded = w8a8_quant_linear(w8a8_layer_from_weight("int8", eye), None, backend="dequant")
    assert isinstance(reloaded, QuantLinear) and reloaded.act_bits == 8
    with torch.no_grad():
        y_fake, y_reloaded = fake(TINY_ROWS), reloaded(TINY_ROWS)
    assert torch.equal(torch.round(y_fake / scale), codes)
    assert torch.equal(y_fake, codes * scale)
    assert torch.equal(y_reloaded, y_fake)
    q, q_scale = quantize_rows_int8(TINY_ROWS)  # int8 / int8_w8a8 backends' quantizer
    assert torch.equal(q.float(), codes) and torch.equal(q_scale, scale)


def test_a_tiny_fp8_row_gets_the_same_values_on_every_path():
    """fake quant (ActQuantLinear), the reloaded FP8ActLinear's reference path and its FP8
    GEMM path (whose quantizer is checked directly: its output rescales the product)."""
    values, scale = _expected(E4M3_VALUES, 448)
    eye = torch.eye(16)
    fake = ActQuantLinear(eye, None, ActQuantConfig("fp8"))
    layer = w8a8_layer_from_weight("fp8", eye)
    fast = w8a8_quant_linear(layer, None)
    fast.backend = "fp8_w8a8"
    reference = w8a8_quant_linear(layer, None)
    with torch.no_grad():
        y_fake, y_ref, y_fast = fake(TINY_ROWS), reference(TINY_ROWS), fast(TINY_ROWS)
    assert reference.last_backend == "reference" and fast.last_backend == "fp8_w8a8"
    assert torch.equal(y_fake, values * scale)
    assert torch.equal(y_ref, y_fake)
    x8, x_scale = fp8_quantize_activations(TINY_ROWS)
    assert torch.equal(x8.float(), values) and torch.equal(x_scale, scale)
    # the GEMM rescales by x_scale * w_scale (w = 448 * fl(1/448)): float32 rounding only
    torch.testing.assert_close(y_fast, y_fake, rtol=4 * 2.0**-24, atol=0)


# --- stock readers: transformers ----------------------------------------------------------------
def llama_w8a8(kind: str, out):
    """Every decoder linear of a tiny Llama, W8A8 `kind` (RTN symmetric bf16-scale INT8, or
    per-row e4m3), written packed."""
    model = tiny_llama(seed=4)
    layers = {}
    for name in hf_linears(model):
        if name == "lm_head":
            continue
        w = model.get_submodule(name).weight.detach().float()
        if kind == "int8":
            cfg = RTNConfig(bits=8, group_size=None, symmetric=True, scale_dtype="bfloat16")
            fake = quantize_rtn(w, cfg).weight
        else:
            scale = w.abs().amax(dim=1, keepdim=True) / 448
            fake = (w / scale).to(torch.float8_e4m3fn).float() * scale
        layers[name] = w8a8_layer_from_weight(kind, fake)
    write_packed(model, layers, model.config.to_dict(), out)
    return model, layers


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_transformers_loads_packed_w8a8_llama(tmp_path, kind):
    model, layers = llama_w8a8(kind, tmp_path / kind)
    qc = json.loads((tmp_path / kind / "config.json").read_text())["quantization_config"]
    fused = vllm_layer_groups(qc, vllm_llama_layers(model), LLAMA_FUSED)
    assert len(fused) == 8 and set(fused.values()) == {"group_0"}
    assert vllm_scheme(qc, "group_0") == f"CompressedTensorsW8A8{kind.title()}"
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / kind)
    ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        logits = loaded(ids).logits
    assert torch.isfinite(logits).all()
    for name, layer in layers.items():
        module = loaded.get_submodule(name)
        act = module.quantization_scheme.input_activations
        assert act.dynamic and act.strategy == "token" and act.num_bits == 8
        if kind == "int8":  # bf16 scales: our weight rounded to bf16, bit for bit
            expected = layer.weight.bfloat16()
        else:  # float32 scales, which transformers keeps in bf16: values * bf16(scale)
            expected = (layer.values.float() * layer.scale.bfloat16().float()).bfloat16()
        assert torch.equal(module.weight, expected), name


# --- the CLI ------------------------------------------------------------------------------------
def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_w8a8(tmp_path_factory):
    root = tmp_path_factory.mktemp("w8a8cli")
    calib = root / "calib.txt"
    calib.write_text(
        "\n\n".join(
            f"Document {i}: the mill by the river, bread and bridges." * 3 for i in range(30)
        )
    )
    argv = ["quantize", "mdlm-tiny", "--scheme", "w8a8", "--nsamples", "4", "--seq-len", "32"]
    argv += ["--calib", str(calib), "--exclude", "blocks.0.*", "--out", str(root / "q"), "--json"]
    code, out, err = run_cli(argv)
    assert code == 0, err
    return root, calib, json.loads(out)


def test_cli_auto_writes_packed_w8a8_equal_to_the_library(cli_w8a8, tiny):
    root, calib, summary = cli_w8a8
    _, _, x_t, t = tiny
    assert summary["format"] == "packed" and summary["method"]["weight_scale_dtype"] == "bfloat16"
    recipe = json.loads((root / "q" / "recipe.json").read_text())
    assert recipe["args"]["format"] == "packed"
    # independent reference: the library on the same texts, floats rounded as bf16 stores them
    model = hub.load("mdlm-tiny")
    tokens = calibration_batch(
        hub.load_tokenizer("mdlm-tiny"), load_source(str(calib), None, "text"), None, 4, 32, 0
    )
    with restrict(model, None, ["blocks.0.*"]):
        quantize_activations(model, tokens, packed_act_config(ActCalibConfig("w8a8", "rtn")), CALIB)
    act_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    with torch.no_grad():  # the checkpoint's tensors (state dict), not recomputed buffers
        for key, value in model.state_dict().items():
            if value.is_floating_point() and key not in act_weights:
                value.copy_(value.bfloat16())
    loaded = hub.load(root / "q")
    assert isinstance(loaded.blocks[0].mlp[0], torch.nn.Linear)  # excluded: float
    assert loaded.blocks[1].mlp[0].act_bits == 8
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x_t, t), model.log_probs(x_t, t))


def test_cli_eval_and_generate_run_the_packed_w8a8_directory(cli_w8a8):
    root, _, _ = cli_w8a8
    code, out, err = run_cli(["eval", str(root / "q"), "--limit", "2", "--seq-len", "32", "--json"])
    assert code == 0, err
    ppl = json.loads(out)["ppl"]
    assert 1 < ppl < float("inf")
    code, out, err = run_cli(
        ["generate", str(root / "q"), "--gen-length", "8", "--steps", "4", "--json"]
    )
    assert code == 0, err
    assert len(json.loads(out)["tokens"][0]) == 8


def test_cli_fp8_packed_and_its_summary(tmp_path, cli_w8a8):
    _, calib, _ = cli_w8a8
    argv = ["quantize", "mdlm-tiny", "--scheme", "w8a8fp8", "--format", "packed", "--nsamples"]
    argv += ["4", "--seq-len", "32", "--calib", str(calib), "--include", "blocks.3.*"]
    code, out, err = run_cli([*argv, "--out", str(tmp_path / "f")])
    assert code == 0, err
    assert "packed (compressed-tensors float-quantized" in out
    assert isinstance(hub.load(tmp_path / "f").blocks[3].attn_qkv, FP8ActLinear)


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--scheme", "w8a8", "--method", "smoothquant"], "SmoothQuant"),
        (["--scheme", "w8a8", "--method", "quarot"], "Hadamard"),
        (["--scheme", "w8a8fp8", "--method", "flatquant"], "learned online transforms"),
        (["--scheme", "w4a8", "--method", "flatquant-gptq"], "learned online transforms"),
        (["--scheme", "w8a8", "--clip-search"], "clip ratio"),
    ],
)
def test_cli_packed_refusals_name_the_reason_in_one_line(tmp_path, extra, needle):
    out = tmp_path / "never"
    code, stdout, err = run_cli(
        ["quantize", "mdlm-tiny", *extra, "--format", "packed", "--out", str(out)]
    )
    assert code == 2 and needle in err and "--format fake" in err
    assert err.count("\n") == 1 and not stdout and not out.exists()


def test_cli_auto_keeps_fake_for_schemes_without_a_packed_form():
    from types import SimpleNamespace

    from faircalib.commands.quantize import act_format

    base = {"format": "auto", "clip_search": False}
    assert act_format(SimpleNamespace(**base, scheme="w8a8", method="gptq")) == "packed"
    assert act_format(SimpleNamespace(**base, scheme="w8a8fp8", method="rtn")) == "packed"
    for scheme, method in (("w8a8", "smoothquant"), ("w4a4", "rtn"), ("w4a8fp8", "quarot")):
        assert act_format(SimpleNamespace(**base, scheme=scheme, method=method)) == "fake"


def test_mixed_weight_only_and_w8a8_layers_share_one_mixed_precision_config(tiny, tmp_path):
    """A pack-quantized weight-only layer beside W8A8 ones: top-level format mixed-precision,
    each group naming its own; the reload gives each layer its own kind."""
    model, tokens, x_t, t = tiny
    q, _ = calibrated(model, tokens, "w8a8", "rtn")
    w = model.blocks[0].attn_qkv.weight.detach().float()
    weight_only = quantize_rtn(w, RTNConfig(bits=4, group_size=32, scale_dtype="bfloat16"))
    q.blocks[0].attn_qkv = copy.deepcopy(model.blocks[0].attn_qkv)
    results = {**w8a8_results(q), "blocks.0.attn_qkv": weight_only}  # now a float Linear in q
    from faircalib.formats.packed import save_packed_model

    save_packed_model(q, results, tmp_path / "mixed")
    qc = json.loads((tmp_path / "mixed" / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    assert sorted(g["format"] for g in qc["config_groups"].values()) == [
        "int-quantized",
        "pack-quantized",
    ]
    loaded = hub.load(tmp_path / "mixed")
    assert loaded.blocks[0].attn_qkv.act_bits is None and loaded.blocks[0].attn_qkv.bits == 4
    assert loaded.blocks[0].attn_out.act_bits == 8
    q.blocks[0].attn_qkv.weight.data.copy_(weight_only.weight)  # the fake-quant reference
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x_t, t), q.log_probs(x_t, t))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_auto_runs_packed_w8a8_on_the_int8_backend(tiny, tmp_path):
    """On the GPU, `auto` routes the reloaded INT8 layers to W8A8_AUTO's backend (M >= 17 rows)
    and the bf16 log-probs stay close to the CPU float32 fake-quant model's."""
    model, tokens, x_t, t = tiny
    q, report = calibrated(model, tokens, "w8a8", "rtn")
    save_quantized(q, report, tmp_path / "p", None, fmt="packed")
    loaded = hub.load(tmp_path / "p", device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        got = loaded.log_probs(x_t.cuda(), t.cuda()).float().cpu()
        want = q.log_probs(x_t, t)
    assert loaded.blocks[0].mlp[0].last_backend in ("int8", "int8_w8a8")
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert float((got[finite] - want[finite]).abs().mean()) < 0.05
