"""Review of the activation-quantized exports (issue 14) on layouts the shipped tiny models do
not have: LLaDA / Dream, whose blocks sit below the model's top level (`model.transformer.
blocks.<i>`, `model.layers.<i>`), so a layer's report name (`blocks.<i>.q_proj`) and its module
path differ. Each test checks against references written out here (min-max RTN with bf16
scales, torch's own float8 cast), never against what the code under test produced."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn import functional as F

from faircalib import hub
from faircalib.calib.activations import ActQuantLinear
from faircalib.cli import main
from faircalib.kernels import QuantLinear
from faircalib.quant.rotation import random_hadamard, rotate
from llama_like_ckpt import write_family

torch.set_num_threads(1)

# LLaDA with q/k/v biases and GQA, Dream with a tied output layer: widths of 128 so g128 fits
LAYOUTS = {
    "llada": dict(d_model=128, n_heads=4, n_kv_heads=2, mlp_hidden_size=256, include_qkv_bias=True),
    "dream": dict(
        hidden_size=128,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=256,
        tie_word_embeddings=True,
    ),
}


# --- independent references ---------------------------------------------------------------------
def bf16_up(x: torch.Tensor) -> torch.Tensor:
    """Positive float32 values rounded up to the next bfloat16 value (exact ones kept)."""
    down = x.bfloat16()
    bumped = (down.view(torch.int16) + 1).view(torch.bfloat16)
    return torch.where(down.float() < x, bumped, down).float()


def rtn_int4_sym_g128(w: torch.Tensor) -> torch.Tensor:
    """Symmetric INT4 g128 min-max RTN with bf16 scales (scale = max|w| / 7.5, zero 8), the
    fake-quant weight."""
    rows, cols = w.shape
    g = w.reshape(rows, -1, 128)
    scale = bf16_up(g.abs().amax(2, keepdim=True) / 7.5)
    codes = torch.clamp(torch.round(g / scale) + 8, 0, 15)
    return (scale * (codes - 8)).reshape(rows, cols)


def e4m3_rows(x: torch.Tensor) -> torch.Tensor:
    """Per-row e4m3 fake quantization by torch's own float8 cast: abs-max -> 448."""
    scale = x.abs().amax(-1, keepdim=True).clamp(min=1e-8) / 448
    return (x / scale).clamp(-448, 448).to(torch.float8_e4m3fn).float() * scale


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def code_calibration(directory: Path) -> Path:
    """Calibration text of another domain than the shipped corpora: Python source."""
    path = directory / "code.txt"
    path.write_text(
        "\n\n".join(
            f"def f{i}(xs):\n    return [x * {i} for x in xs if x % {i + 2}]" for i in range(40)
        )
    )
    return path


# --- defect 1: packed W4A8 / W4AFP8 on LLaDA and Dream ---------------------------------------------
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_packed_w4afp8_on_nested_blocks_is_rtn_of_the_float_weights(tmp_path: Path, family):
    """Was: the INT4 grids were looked up by report name (`blocks.0.q_proj`) under module paths
    (`model.transformer.blocks.0.q_proj`), missed, and every layer was refused as 'not on a FP8
    e4m3 per-channel grid'. Now every block linear is packed INT4 g128 and reloads as the
    hand-written RTN of its float weight, running e4m3 per-token activations."""
    src = write_family(tmp_path / "src", family, **LAYOUTS[family])
    argv = ["quantize", str(src), "--scheme", "w4a8fp8", "--method", "rtn", "--format"]
    argv += ["packed", "--nsamples", "4", "--seq-len", "32", "--calib"]
    argv += [str(code_calibration(tmp_path)), "--out", str(tmp_path / "q"), "--json"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    float_model = hub.load(src).float()
    loaded = hub.load(tmp_path / "q")
    names = [
        f"{prefix}.{name}"
        for prefix, block in (
            (p, b)
            for p, b in float_model.named_modules()
            if any(b is blk for blk in float_model.blocks)
        )
        for name, _ in float_model.quantizable_linears(block)
    ]
    assert len(names) == 2 * 7
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(3))
    for name in names:
        ref = float_model.get_submodule(name)
        layer = loaded.get_submodule(name)
        assert type(layer) is QuantLinear and (layer.bits, layer.act_format) == (4, "fp8"), name
        want_w = rtn_int4_sym_g128(ref.weight.detach().float())
        assert torch.equal(layer.dequantized_weight().float(), want_w), name
        x_in = (
            x[:, : ref.in_features] if ref.in_features <= 128 else torch.randn(5, ref.in_features)
        )
        bias = None if ref.bias is None else ref.bias.detach().float().bfloat16().float()
        want = F.linear(e4m3_rows(x_in), want_w, bias)
        with torch.no_grad():
            got = layer(x_in).float()
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-4), name
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    targets = {t for g in qc["config_groups"].values() for t in g["targets"]}
    assert targets == set(names)


def rtn_int4_asym_channel(w: torch.Tensor) -> torch.Tensor:
    """Asymmetric INT4 per-channel min-max RTN with bf16 scales (the range widened to include
    0, scale = range / 15, zero = round(-min / scale)), the fake-quant weight."""
    lo, hi = w.amin(1, keepdim=True).clamp(max=0), w.amax(1, keepdim=True).clamp(min=0)
    scale = bf16_up((hi - lo) / 15)
    zero = torch.round(-lo / scale).clamp(0, 15)
    return scale * (torch.clamp(torch.round(w / scale) + zero, 0, 15) - zero)


def test_packed_w4a4_with_excluded_layers_on_dream(tmp_path: Path):
    """Same defect, W4A4 (its missed grid made every layer 'INT4 activations with 8-bit
    weights'), with a block left in float: quantized layers are the hand-written asymmetric
    per-channel RTN, excluded ones the checkpoint's own weights, untouched."""
    src = write_family(tmp_path / "src", "dream", hidden_size=96, intermediate_size=192)
    argv = ["quantize", str(src), "--scheme", "w4a4", "--method", "rtn", "--format", "packed"]
    argv += ["--exclude", "blocks.1.*", "--nsamples", "4", "--seq-len", "32", "--calib"]
    argv += [str(code_calibration(tmp_path)), "--out", str(tmp_path / "q"), "--json"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    float_model, loaded = hub.load(src).float(), hub.load(tmp_path / "q")
    for i, block in enumerate(float_model.blocks):
        for name, ref in float_model.quantizable_linears(block):
            layer = loaded.get_submodule(f"model.layers.{i}.{name}")
            if i == 1:
                assert type(layer) is torch.nn.Linear, name
                assert torch.equal(layer.weight.float(), ref.weight.float()), name
                continue
            assert type(layer) is QuantLinear and (layer.act_bits, layer.act_format) == (4, "int")
            want = rtn_int4_asym_channel(ref.weight.detach().float())
            assert torch.equal(layer.dequantized_weight().float(), want), name


# --- a guard, not a defect: QuaRot's fold with readers of the stream left out of quantization ----
def float32_checkpoint(directory: Path, family: str, **config) -> Path:
    """A tiny checkpoint stored in float32 with values off the bf16 grid (a genuinely float32
    model: its folded weights are then kept in float32)."""
    write_family(directory, family, **config)
    gen = torch.Generator().manual_seed(9)
    for shard in directory.glob("*.safetensors"):
        tensors = load_file(str(shard))
        save_file(
            {
                k: v.float() * (1 + 1e-3 * torch.randn(v.shape, generator=gen))
                for k, v in tensors.items()
            },
            str(shard),
            metadata={"format": "pt"},
        )
    config_path = directory / "config.json"
    stored = json.loads(config_path.read_text())
    if "torch_dtype" in stored:  # Dream's config names its dtype; LLaDA's does not
        config_path.write_text(json.dumps({**stored, "torch_dtype": "float32"}))
    return directory


class _Reader(torch.nn.Module):
    """A quantized reader of the rotated stream, seen from the unrotated model: its input
    there is g * rms(h); in the rotated model rms(h) Q (the norm scale folded into it)."""

    def __init__(self, inner: torch.nn.Module, scale: torch.Tensor, rot: torch.Tensor):
        super().__init__()
        self.inner, self.scale, self.rot = inner, scale, rot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x / self.scale) @ self.rot)


class _Writer(torch.nn.Module):
    """A quantized writer: its output lands on the rotated stream (y Q); unrotated: y Q Q^T."""

    def __init__(self, inner: torch.nn.Module, rot: torch.Tensor):
        super().__init__()
        self.inner, self.rot = inner, rot

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) @ self.rot.T


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_quarot_excluded_readers_keep_the_float_path_exact(tmp_path: Path, family):
    """quarot with q_proj and a whole block excluded, on a float32 checkpoint of width 96
    (block-diagonal Hadamard), GQA, biases, tied head (LLaDA: untied by the fold). Reference:
    the ORIGINAL float model, untouched except that each quantized layer of the reloaded
    directory is put in its place seen through a dense Q; activation quantization off in
    both (the same module objects), so the two must agree to float32 rounding. A wrong fold
    of an excluded reader, writer, norm or the head would show at the bf16-rounding level or
    worse."""
    tie = {"llada": {"weight_tying": True}, "dream": {}}[family]
    config = {**LAYOUTS[family], **tie}
    config = {k: (96 if v == 128 else v) for k, v in config.items()}
    src = float32_checkpoint(tmp_path / "src", family, **config)
    argv = ["quantize", str(src), "--scheme", "w8a8", "--method", "quarot", "--nsamples", "4"]
    argv += ["--seq-len", "32", "--exclude", "blocks.*.*q_proj", "--exclude", "blocks.1.*"]
    argv += ["--calib", str(code_calibration(tmp_path)), "--out", str(tmp_path / "q"), "--json"]
    code, _, err = run_cli(argv)
    assert code == 0, err
    record = json.loads((tmp_path / "q" / "quantization.json").read_text())
    assert record["residual_rotation"]["hadamard_block"] == 32
    ref, quant = hub.load(src).float().eval(), hub.load(tmp_path / "q").float().eval()
    rot = rotate(torch.eye(96, dtype=torch.float64), random_hadamard(96, 0)).float()
    assert torch.allclose(rot @ rot.T, torch.eye(96), atol=1e-6)
    layout = ref.residual_layout()
    readers = {path: nr.norm for nr in layout.norms for path in nr.readers}
    swapped = 0
    for name, module in list(quant.named_modules()):
        if not isinstance(module, ActQuantLinear):
            continue
        module.act = None  # the float path only
        if name in readers:
            scale = ref.get_submodule(readers[name]).weight.detach().float()
            module = _Reader(module, scale, rot)
        elif name in layout.writers:
            module = _Writer(module, rot)
        parent, _, child = name.rpartition(".")
        setattr(ref.get_submodule(parent), child, module)
        swapped += 1
    assert swapped == 6  # block 0 minus q_proj
    x = torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(1))
    x[:, ::2] = ref.mask_id
    with torch.no_grad():
        want, got = ref.log_probs(x).exp(), quant.log_probs(x).exp()
    assert (want - got).abs().max() < 1e-5


# --- defect 2: quantizing an activation-quantized directory again dropped its online maps -------
def quantize_cli(src: str, out: Path, calib: Path, *extra: str) -> tuple[int, str, str]:
    argv = ["quantize", src, *extra, "--nsamples", "4", "--seq-len", "32"]
    return run_cli([*argv, "--calib", str(calib), "--out", str(out)])


@pytest.mark.parametrize("method", ["quarot-rtn", "smoothquant"])
def test_requantizing_a_directory_with_online_input_maps_is_refused(tmp_path: Path, method):
    """Was: a warning, then a model whose rotated / smoothed layers had lost their online map
    (the quantizers read the weight alone). Measured on masked tokens, total variation from
    the float model: mdlm-tiny SmoothQuant W8A8 0.017 -> 0.87 after re-quantizing with RTN W8;
    a 96-wide LLaDA QuaRot W4A4 0.047 -> 0.998 after RTN W8A8. Now one line naming the
    problem, exit 2, nothing written."""
    calib = code_calibration(tmp_path)
    code, _, err = quantize_cli(
        "mdlm-tiny", tmp_path / "a", calib, "--scheme", "w8a8", "--method", method
    )
    assert code == 0, err
    for extra in (["--scheme", "w8a8", "--method", "rtn"], ["--method", "rtn", "--bits", "8"]):
        code, out, err = quantize_cli(str(tmp_path / "a"), tmp_path / "b", calib, *extra)
        assert code == 2 and out == ""
        lines = err.strip().splitlines()
        assert len(lines) == 1 and "online input transforms" in lines[0], err
        assert "Traceback" not in err and not (tmp_path / "b").exists()


def test_requantizing_an_activation_quantized_directory_without_maps_still_runs(tmp_path: Path):
    """The refusal is no wider than the defect: plain RTN W8A8 layers hold no online map, and
    quantizing them again still runs (with the compounding-errors warning)."""
    calib = code_calibration(tmp_path)
    code, _, err = quantize_cli(
        "mdlm-tiny", tmp_path / "a", calib, "--scheme", "w8a8", "--format", "fake"
    )
    assert code == 0, err
    code, _, err = quantize_cli(str(tmp_path / "a"), tmp_path / "b", calib, "--scheme", "w4a4")
    assert code == 0 and "already fake-quantized" in err
