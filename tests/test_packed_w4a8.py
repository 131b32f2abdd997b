"""Packed W4A8 / W4AFP8 / W4A4 checkpoints (issue 14, item 6): INT4 weights written as the
weight-only export writes them (compressed-tensors `pack-quantized`), the config group carrying
the `input_activations` of compressed-tensors' own presets, reloaded as QuantLinear(act_bits=8 /
4) bit for bit against the fake-quant model; grid recovery against hand-written RTN; QuantLinear's
FP8-activation form; the CLI path and its one-line refusals."""

import contextlib
import copy
import io
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.quant_scheme import W4A4, W4A8, W4AFP8

from faircalib import hub
from faircalib.calib.activations import ActQuantLinear
from faircalib.calib.inputs import masked_inputs
from faircalib.cli import main
from faircalib.commands import quantize as quantize_cmd
from faircalib.config import CalibConfig, GPTQConfig
from faircalib.errors import ConfigError
from faircalib.formats import unpack_layer
from faircalib.formats.packed import packed_act_layer_from_weight
from faircalib.kernels import QuantLinear
from faircalib.models.io import load_tensors
from faircalib.quant import quantize_gptq
from faircalib.quant.stats import LayerInputs

torch.set_num_threads(1)
PRESETS = {"w4a8": W4A8, "w4a8fp8": W4AFP8, "w4a4": W4A4}


# --- independent references ---------------------------------------------------------------------
def bf16_up(x: torch.Tensor) -> torch.Tensor:
    """Positive float32 values rounded up to the next bfloat16 value (exact ones kept): the
    scale dtype the checkpoint stores, rounded so the grid still spans the range."""
    down = x.bfloat16()
    bumped = (down.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(down.float() < x, bumped, down).float()


def rtn_int4(w: torch.Tensor, group: int | None, symmetric: bool) -> tuple:
    """Min-max RTN on the INT4 grid with bf16 scales, written out here: (codes, scale, zero,
    fake-quant weight). Symmetric: scale = max|w| / 7.5, zero 8; asymmetric: the range widened
    to include 0, scale = range / 15, zero = round(-min / scale)."""
    rows, cols = w.shape
    g = w.reshape(rows, -1, group or cols)  # [rows, G, width]
    lo, hi = g.amin(2, keepdim=True).clamp(max=0), g.amax(2, keepdim=True).clamp(min=0)
    if symmetric:
        scale = bf16_up(torch.maximum(-lo, hi) / 7.5)
        zero = torch.full_like(scale, 8.0)
    else:
        scale = bf16_up((hi - lo) / 15)
        zero = torch.round(-lo / scale).clamp(0, 15)
    codes = torch.clamp(torch.round(g / scale) + zero, 0, 15)
    fake = (scale * (codes - zero)).reshape(rows, cols)
    return codes.reshape(rows, cols).to(torch.uint8), scale[..., 0], zero[..., 0], fake


def e4m3_rows(x: torch.Tensor) -> torch.Tensor:
    """Per-row e4m3 fake quantization by torch's own float8 cast: abs-max -> 448."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 448
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


# --- grid recovery --------------------------------------------------------------------------------
@pytest.mark.parametrize(("group", "symmetric"), [(128, True), (32, True), (None, False)])
def test_rtn_grids_are_recovered_as_rtn_chose_them(group, symmetric):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(0))
    codes, scale, zero, fake = rtn_int4(w, group, symmetric)
    layer = packed_act_layer_from_weight("int8", fake, 4, group, symmetric)
    assert torch.equal(layer.codes, codes)
    assert torch.equal(layer.qparams.scale, scale) and torch.equal(layer.qparams.zero, zero)
    assert (layer.qparams.group_size, layer.qparams.symmetric) == (group, symmetric)


@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_weights_are_recovered_exactly(symmetric):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 256, generator=gen)
    cfg = GPTQConfig(bits=4, group_size=128, symmetric=symmetric, scale_dtype="bfloat16")
    gptq = quantize_gptq(w, LayerInputs.from_rows(torch.randn(512, 256, generator=gen)), cfg)
    layer = packed_act_layer_from_weight("fp8", gptq.weight, 4, 128, symmetric)
    decoded = layer.qparams.scale.repeat_interleave(128, 1) * (
        layer.codes.float() - layer.qparams.zero.repeat_interleave(128, 1)
    )
    assert torch.equal(decoded, gptq.weight)
    if symmetric:  # zero fixed at 8: the codes are GPTQ's own
        assert torch.equal(layer.codes, gptq.codes)


def test_weights_off_the_grid_have_no_packed_form():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    assert packed_act_layer_from_weight("int8", w, 4, 128, True) is None  # float weights
    _, _, _, asym = rtn_int4(w, 128, symmetric=False)
    assert packed_act_layer_from_weight("int8", asym, 4, 128, True) is None  # zero points
    with pytest.raises(ConfigError, match="activation kind"):
        packed_act_layer_from_weight("int2", asym, 4, 128, False)


# --- QuantLinear with FP8 activations ------------------------------------------------------------
def fp8_act_layer(backend: str = "auto", bias: bool = True) -> tuple:
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 256, generator=gen)
    codes, scale, zero, fake = rtn_int4(w, 128, symmetric=True)
    layer = packed_act_layer_from_weight("fp8", fake, 4, 128, True)
    b = torch.randn(48, generator=gen) if bias else None
    ql = QuantLinear.from_codes(
        layer.codes, layer.qparams, bias=b, act_bits=8, act_format="fp8", backend=backend
    )
    return ql, fake, b


def test_fp8_activation_layer_computes_e4m3_tokens_times_the_int4_weight():
    ql, fake, b = fp8_act_layer()
    x = torch.randn(2, 5, 256, generator=torch.Generator().manual_seed(4)) * 3
    want = torch.nn.functional.linear(e4m3_rows(x), fake, b)
    assert torch.equal(ql(x), want) and ql.last_backend == "dequant"
    int_ql = QuantLinear.from_codes(ql.codes(), ql.qparams, bias=b, act_bits=8)
    assert not torch.equal(int_ql(x), want)  # the INT8 grid is another layer


def test_fp8_activation_layers_never_take_int8_activation_kernels():
    for name in ("int8", "int8_w8a8", "w4a8"):
        ql, _, _ = fp8_act_layer(backend=name)
        with pytest.raises(ConfigError, match="quantizes activations to INT8"):
            ql(torch.randn(3, 256))
    ql, _, _ = fp8_act_layer()
    for m in (1, 64, 4096):  # the rule itself (no GPU needed): never an INT8-activation kernel
        assert ql.choose_backend("cuda", torch.bfloat16, m) not in ("int8", "int8_w8a8", "w4a8")
    with pytest.raises(ConfigError, match="act_bits must be 8"):
        QuantLinear(256, 8, bits=4, group_size=128, symmetric=True, act_bits=4, act_format="fp8")


CHECK_W4A8_FP8 = textwrap.dedent(
    """
    import torch
    from test_packed_w4a8 import fp8_act_layer
    ref, _, _ = fp8_act_layer(backend="dequant")
    ker, _, _ = fp8_act_layer(backend="w4a8_fp8")
    x = torch.randn(17, 256, generator=torch.Generator().manual_seed(5)) * 3
    y, want = ker(x), ref(x)
    print(ker.last_backend, float((y - want).abs().max() / want.abs().max()))
    """
)


def test_the_w4a8_fp8_kernel_runs_the_fp8_activation_layer_on_its_own_grid():
    """Triton's interpreter (CPU): the kernel quantizes x once, onto the same e4m3 grid, so it
    matches the exact reference up to float32 accumulation order."""
    pytest.importorskip("triton")
    path = os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", CHECK_W4A8_FP8], capture_output=True, text=True, env=env, check=True
    )
    backend, rel = done.stdout.split()
    assert backend == "w4a8_fp8" and float(rel) < 1e-5


# --- the CLI path ------------------------------------------------------------------------------------
def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def quantize_and_keep_the_fake_model(argv: list[str]):
    """Run `faircalib quantize` and keep its in-memory fake-quant model (the reference), its
    float tensors rounded as the bf16 checkpoint stores them."""
    kept = {}

    def save(result, out, overwrite=False, dtype=None):
        path = original(result, out, overwrite, dtype)
        kept["model"] = result.model
        return path

    original = quantize_cmd.save
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quantize_cmd, "save", save)
        code, out, err = run_cli(argv)
    assert code == 0, err
    model = kept["model"]
    act = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, ActQuantLinear)}
    with torch.no_grad():
        for key, value in model.state_dict().items():
            if value.is_floating_point() and key not in act:
                value.copy_(value.bfloat16())
    return model, out


RUNS = {  # scheme, method, --format
    "w4a8": ("gptq", "packed"),
    "w4a8fp8": ("rtn", "auto"),
    "w4a4": ("rtn", "packed"),
}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("w4a8cli")
    calib = root / "calib.txt"
    calib.write_text("\n\n".join(f"Document {i}: mills, rivers and bread." * 3 for i in range(30)))
    runs = {}
    for scheme, (method, fmt) in RUNS.items():
        argv = ["quantize", "mdlm-tiny", "--scheme", scheme, "--method", method, "--format"]
        argv += [fmt, "--nsamples", "4", "--seq-len", "32", "--calib", str(calib), "--json"]
        model, out = quantize_and_keep_the_fake_model([*argv, "--out", str(root / scheme)])
        runs[scheme] = (root / scheme, model, json.loads(out))
    float_model = hub.load("mdlm-tiny")
    tokens = torch.randint(
        0, float_model.mask_id, (2, 32), generator=torch.Generator().manual_seed(6)
    )
    x_t, t = masked_inputs(float_model, tokens, CalibConfig(n_samples=2, seed=7))
    return runs, float_model, x_t, t


@pytest.mark.parametrize("scheme", list(RUNS))
def test_cli_packed_reload_equals_the_fake_quant_model(cli_runs, scheme):
    runs, float_model, x_t, t = cli_runs
    directory, fake, summary = runs[scheme]
    assert summary["format"] == "packed"
    loaded = hub.load(directory)
    with torch.no_grad():
        want, got = fake.log_probs(x_t, t), loaded.log_probs(x_t, t)
        assert torch.equal(got, want)
        assert not torch.equal(got, float_model.log_probs(x_t, t))  # really quantized
    act_bits, act_format = {"w4a8": (8, "int"), "w4a8fp8": (8, "fp8"), "w4a4": (4, "int")}[scheme]
    names = [n for n, m in fake.named_modules() if isinstance(m, ActQuantLinear)]
    assert len(names) == 16
    for name in names:
        layer = loaded.get_submodule(name)
        assert type(layer) is QuantLinear and layer.bits == 4
        assert (layer.act_bits, layer.act_format) == (act_bits, act_format)
        assert torch.equal(layer.dequantized_weight(), fake.get_submodule(name).weight)


@pytest.mark.parametrize("scheme", list(RUNS))
def test_cli_config_groups_are_compressed_tensors_presets(cli_runs, scheme):
    directory = cli_runs[0][scheme][0]
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "pack-quantized" and len(qc["config_groups"]) == 1
    group = qc["config_groups"]["group_0"]
    preset = QuantizationScheme(targets=["Linear"], **PRESETS[scheme]).model_dump(mode="json")
    assert group["format"] == "pack-quantized" and group["output_activations"] is None
    assert group["input_activations"] == preset["input_activations"]
    if scheme == "w4a4":  # our W4A4 weights: asymmetric per channel, the preset's are g128
        assert group["weights"] == {
            **preset["weights"],
            "strategy": "channel",
            "group_size": None,
            "symmetric": False,
        }
    else:
        assert group["weights"] == preset["weights"]


@pytest.mark.parametrize(
    ("scheme", "group", "symmetric"), [("w4a8fp8", 128, True), ("w4a4", None, False)]
)
def test_cli_rtn_codes_are_an_independent_rtn_of_the_float_weights(
    cli_runs, scheme, group, symmetric
):
    runs, float_model, _, _ = cli_runs
    directory = runs[scheme][0]
    qc = json.loads((directory / "config.json").read_text())["quantization_config"]
    args = QuantizationScheme.model_validate(qc["config_groups"]["group_0"]).weights
    tensors = load_tensors(directory)
    for name in ("blocks.0.attn_qkv", "blocks.1.mlp.2"):  # 128 and 512 inputs
        parts = {
            k.removeprefix(f"{name}."): v for k, v in tensors.items() if k.startswith(f"{name}.w")
        }
        codes, qp = unpack_layer(parts, args)
        want, scale, zero, _ = rtn_int4(
            float_model.get_submodule(name).weight.float(), group, symmetric
        )
        assert torch.equal(codes, want), name
        assert torch.equal(qp.scale, scale) and torch.equal(qp.zero, zero)


def test_cli_summary_names_the_packed_form(cli_runs):
    runs = cli_runs[0]
    assert runs["w4a8"][2]["method"]["weight_scale_dtype"] == "bfloat16"
    recipe = json.loads((runs["w4a8fp8"][0] / "recipe.json").read_text())
    assert recipe["args"]["format"] == "packed"  # auto resolved


def test_auto_picks_packed_for_w4a8_and_fake_where_no_stock_reader_runs_it():
    base = {"format": "auto", "clip_search": False}
    for scheme in ("w4a8", "w4a8fp8"):
        for method in ("rtn", "gptq"):
            args = SimpleNamespace(**base, scheme=scheme, method=method)
            assert quantize_cmd.act_format(args) == "packed"
    for scheme, method in (("w4a4", "rtn"), ("w4a8", "quarot"), ("w4a8fp8", "smoothquant")):
        args = SimpleNamespace(**base, scheme=scheme, method=method)
        assert quantize_cmd.act_format(args) == "fake"
    args = SimpleNamespace(**{**base, "format": "packed"}, scheme="w4a4", method="gptq")
    assert quantize_cmd.act_format(args) == "packed"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--scheme", "w4a8", "--method", "quarot"], "Hadamard"),
        (["--scheme", "w4a8fp8", "--method", "smoothquant"], "SmoothQuant"),
        (["--scheme", "w4a4", "--method", "fair"], "learned online transforms"),
        (["--scheme", "w4a8", "--clip-search"], "clip ratio"),
    ],
)
def test_cli_packed_refusals_are_one_line_and_write_nothing(tmp_path, extra, needle):
    out = tmp_path / "never"
    code, stdout, err = run_cli(
        ["quantize", "mdlm-tiny", *extra, "--format", "packed", "--out", str(out)]
    )
    assert code == 2 and needle in err and "--format fake" in err
    assert err.count("\n") == 1 and not stdout and not out.exists()


def test_a_layer_off_its_grid_is_refused_before_anything_is_written(cli_runs, tmp_path):
    """The writer's own check: a W4A8 result whose weight was changed after its codes were
    chosen is refused in one line and no directory is left."""
    from faircalib.formats.packed import save_packed_model

    runs = cli_runs[0]
    fake = copy.deepcopy(runs["w4a8"][1])
    name = "blocks.0.attn_qkv"
    layer = packed_act_layer_from_weight("int8", fake.get_submodule(name).weight, 4, 128, True)
    layer.weight = layer.weight.clone()
    layer.weight[0, 0] += 1e-3
    with pytest.raises(ConfigError, match="do not reproduce") as err:
        save_packed_model(fake, {name: layer}, tmp_path / "bad")
    assert "\n" not in str(err.value) and not (tmp_path / "bad").exists()


def test_planner_prior_layers_keep_their_own_grid_through_the_packed_round_trip(tmp_path):
    """PLANNER's 64-wide prior layers are quantized per row under W4A8 (the report names the
    group where it differs from the scheme's 128): the packed reload keeps each layer's grid and
    its weights bit for bit."""
    argv = ["quantize", "planner-tiny", "--scheme", "w4a8", "--method", "gptq", "--nsamples"]
    argv += ["4", "--seq-len", "32", "--json", "--out", str(tmp_path / "p")]
    fake, _ = quantize_and_keep_the_fake_model(argv)
    loaded = hub.load(tmp_path / "p")
    names = [n for n, m in fake.named_modules() if isinstance(m, ActQuantLinear)]
    assert any(n.startswith("prior_blocks.") for n in names)
    for name in names:
        layer, weight = loaded.get_submodule(name), fake.get_submodule(name).weight
        assert layer.group_size == (128 if weight.shape[1] >= 128 else None), name
        assert torch.equal(layer.dequantized_weight(), weight), name
