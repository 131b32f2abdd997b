"""RMSNorm / SwiGLU fused with the per-token 8-bit quantization of their output
(kernels.fused_quant, triton_w8a8.rms_norm_quantize_rows / swiglu_quantize_rows)."""

import pytest
import torch

from faircalib import hub
from faircalib.errors import CheckpointError
from faircalib.kernels.fused_quant import (
    QuantizingRMSNorm,
    QuantizingSwiGLU,
    fuse_activation_quantization,
)
from faircalib.kernels.shared_activations import share_activations
from faircalib.models import MDLM, MDLMConfig
from faircalib.models.llama_like import rms_norm, swiglu
from interpreted import named_floats, run_interpreted
from llama_like_ckpt import write_family

KERNELS = r"""
import torch
from faircalib.kernels import triton_w8a8
from faircalib.kernels.triton_w8a8 import quantize_rows, rms_norm_quantize_rows, swiglu_quantize_rows

def same(a, b):
    return torch.equal(a.view(torch.uint8), b.view(torch.uint8)) if a.dtype != torch.int8 else torch.equal(a, b)

gen = torch.Generator().manual_seed(0)
# rows held in registers (the launch rule's limit), then rows over 64 wide taken in passes
whole_rule = triton_w8a8.WHOLE_ROW_MAX_K
for whole_max in (whole_rule, 64):
    triton_w8a8.WHOLE_ROW_MAX_K = whole_max
    for dtype in (torch.float16, torch.float32):
        for kind in ("fp8", "int8"):
            for k in (16, 300):  # one tile; three tiles, the last partial (in passes)
                x = torch.randn(4, 3, k, generator=gen).mul(3).to(dtype)
                w = (torch.rand(k, generator=gen) + 0.5).to(dtype)
                y, q, s = rms_norm_quantize_rows(x, w, 1e-5, kind)
                x64 = x.double()
                ref = w.double() * (x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5))
                q2, s2 = quantize_rows(y.reshape(-1, k), kind)
                tag = f"{str(dtype)[6:]}_{kind}_{k}_{whole_max}"
                print("norm_err_" + tag, float(((y.double() - ref) / ref.abs().clamp(min=1e-3)).abs().max()))
                print("norm_dtype_" + tag, float(y.dtype != dtype or y.shape != x.shape))
                print("norm_bits_" + tag, float(not (same(q, q2) and torch.equal(s, s2))))
                # gate and up as column slices of one wider tensor: rows with a stride
                gu = torch.randn(5, 2 * k + 8, generator=gen).mul(4).to(dtype)
                g, u = gu[:, :k], gu[:, k + 8:]
                y, q, s = swiglu_quantize_rows(g, u, kind)
                ref = torch.nn.functional.silu(g.double()) * u.double()
                q2, s2 = quantize_rows(y, kind)
                print("swiglu_err_" + tag, float((y.double() - ref).abs().max() / ref.abs().max()))
                print("swiglu_bits_" + tag, float(not (same(q, q2) and torch.equal(s, s2))))
triton_w8a8.WHOLE_ROW_MAX_K = whole_rule
y, q, s = rms_norm_quantize_rows(torch.zeros(0, 64), torch.ones(64), 1e-5, "fp8")
print("empty_rows", float(y.shape != (0, 64) or q.shape != (0, 64)))
# a float32 weight on float16 rows: y in float32, as torch promotes weight * x.to(float16)
x = torch.randn(6, 40, generator=gen).half()
w = torch.rand(40, generator=gen) + 0.5
y, q, s = rms_norm_quantize_rows(x, w, 1e-6, "int8")
n = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)).half()
print("promoted_dtype", float(y.dtype != torch.float32))
print("promoted_err", float((y - w * n.float()).abs().max()))
# broadcasting SwiGLU inputs are the plain op's (the kernel takes equal shapes only)
from torch import nn
from faircalib.kernels.fused_quant import QuantizingSwiGLU
from faircalib.kernels.shared_activations import share_activations

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.act = QuantizingSwiGLU()

    def forward(self, g, u):
        return self.act(g, u)

block = Block()
share_activations([block])
g, u = torch.randn(3, 8, 16, generator=gen), torch.randn(16, generator=gen)
with torch.no_grad():
    y = block(g, u)
print("broadcast_err", float((y - torch.nn.functional.silu(g) * u).abs().max()))
"""


@pytest.fixture(scope="module")
def kernel_results() -> dict[str, float]:
    return named_floats(run_interpreted(KERNELS))


def test_fused_kernels_compute_the_op_and_exactly_quantize_rows_of_their_output(kernel_results):
    assert len(kernel_results) == 2 * 2 * 2 * 2 * 5 + 4
    for name, value in kernel_results.items():
        if name in ("promoted_err", "broadcast_err"):
            assert value <= 1e-6, (name, value)  # float32 outputs: the op's own rounding
        elif name.startswith(("norm_err_", "swiglu_err_")):
            # y rounded once to its dtype (fp16: 2^-11 relative; SwiGLU rounds silu and the
            # product); float32 leaves the summation order's few ulps
            limit = 1e-6 if "float32" in name else (2.5e-3 if "swiglu" in name else 1e-3)
            assert value <= limit, (name, value)
        else:
            assert value == 0.0, name  # bits, dtypes, shapes: exact


LOADED = r"""
import sys, tempfile, torch
from pathlib import Path
sys.path.insert(0, "tests")
from faircalib import hub
from faircalib.calib.activations import ActCalibConfig, quantize_activations
from faircalib.calib.fakequant_io import packed_act_config, save_quantized
from faircalib.config import CalibConfig
from faircalib.formats.packed import load_packed_model
from faircalib.kernels import fused_quant, triton_w8a8
from llama_like_ckpt import write_family

tmp = Path(tempfile.mkdtemp())
model = hub.load(write_family(tmp / "src", "llada"))
gen = torch.Generator().manual_seed(2)
tokens = torch.randint(0, 256, (4, 32), generator=gen)
config = packed_act_config(ActCalibConfig("w8a8fp8", "rtn"))
report = quantize_activations(model, tokens, config, CalibConfig(n_samples=4, seq_len=32, seed=0))
save_quantized(model, report, tmp / "p", None, fmt="packed")
x_t = torch.randint(0, 256, (2, 24), generator=gen)
x_t[torch.rand(x_t.shape, generator=gen) < 0.5] = model.mask_id
t = torch.full((2,), 0.5)
fused = load_packed_model(tmp / "p", dtype=torch.float16, backend="fp8_w8a8")
swap = fused_quant.fuse_activation_quantization
fused_quant.fuse_activation_quantization = lambda blocks: 0  # loaded as before the fusion
apart = load_packed_model(tmp / "p", dtype=torch.float16, backend="fp8_w8a8")
fused_quant.fuse_activation_quantization = swap
calls = {"rows": 0, "norm": 0, "swiglu": 0}
for name, key in (("quantize_rows", "rows"), ("rms_norm_quantize_rows", "norm"),
                  ("swiglu_quantize_rows", "swiglu")):
    def counted(*a, _f=getattr(triton_w8a8, name), _k=key):
        calls[_k] += 1
        return _f(*a)
    setattr(triton_w8a8, name, counted)
n = len(fused.blocks)
with torch.no_grad():
    want = apart.log_probs(x_t, t)
    print("apart_rows_per_block", calls["rows"] / n)
    for step in range(2):  # the first call learns the readers' kind, the second fuses
        calls.update(rows=0, norm=0, swiglu=0)
        got = fused.log_probs(x_t, t)
        for k, v in calls.items():
            print(f"call{step}_{k}_per_block", v / n)
        finite = torch.isfinite(want)
        print(f"call{step}_same_inf", float(not torch.equal(finite, torch.isfinite(got))))
        print(f"call{step}_err", float((got[finite] - want[finite]).abs().max()))
calls.update(rows=0, norm=0, swiglu=0)
with torch.inference_mode():
    got = fused.log_probs(x_t, t)
print("inference_norm_per_block", calls["norm"] / n)
print("inference_rows_per_block", calls["rows"] / n)
print("inference_err", float((got[finite] - want[finite]).abs().max()))
"""


def test_a_loaded_fp8_llada_fuses_its_norms_and_swiglu_with_the_quantization():
    """A packed FP8 W8A8 LLaDA on the Triton row quantizers (interpreter): after one call that
    learns what its readers ask for, each block quantizes only the attention output on its own;
    the two RMSNorms and the SwiGLU hand their 8-bit rows over. The log-probabilities match a
    copy loaded without the fusion (fp16: y is the same op, its sum in another order)."""
    r = named_floats(run_interpreted(LOADED))
    assert r["apart_rows_per_block"] == 4  # attention input, attention output, MLP in, down in
    assert (r["call0_rows_per_block"], r["call0_norm_per_block"]) == (4, 0)
    assert r["call1_rows_per_block"] == 1
    assert (r["call1_norm_per_block"], r["call1_swiglu_per_block"]) == (2, 1)
    assert (r["inference_norm_per_block"], r["inference_rows_per_block"]) == (2, 1)
    for key in ("call0_err", "call1_err", "inference_err"):
        assert r[key] <= 2e-2, (key, r[key])
    assert r["call0_err"] == 0.0  # the learning call runs the ops as before
    assert r["call0_same_inf"] == r["call1_same_inf"] == 0.0


def test_the_swap_keeps_parameters_and_state_dict_keys(tmp_path):
    model = hub.load(write_family(tmp_path / "src", "dream"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert fuse_activation_quantization(model.blocks) == 3 * len(model.blocks)
    block = model.blocks[0]
    assert isinstance(block.input_layernorm, QuantizingRMSNorm)
    assert isinstance(block.mlp.act_fn, QuantizingSwiGLU)
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert fuse_activation_quantization(model.blocks) == 0  # nothing left to swap


def test_outside_the_kernels_reach_the_swapped_ops_compute_the_models_own():
    """On the CPU without Triton's interpreter (and outside a block's scope) the swapped
    modules run the model's computation itself: the same bits."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 32, generator=gen).bfloat16()
    weight = torch.nn.Parameter(torch.rand(32, generator=gen).bfloat16() + 0.5)
    assert torch.equal(QuantizingRMSNorm(weight, 1e-6)(x), rms_norm(x, weight, 1e-6))
    g, u = torch.randn(2, 5, 48, generator=gen), torch.randn(2, 5, 48, generator=gen)
    assert torch.equal(QuantizingSwiGLU()(g, u), swiglu(g, u))
    block = torch.nn.Sequential(QuantizingRMSNorm(weight, 1e-6))
    share_activations([block])
    assert torch.equal(block(x), rms_norm(x, weight, 1e-6))  # in a scope, but no Triton here


def test_sharing_without_fusion_leaves_the_ops_alone(tmp_path):
    model = hub.load(write_family(tmp_path / "src", "llada"))
    share_activations(model.blocks, fuse=False)
    kinds = {type(m).__name__ for m in model.blocks[0].modules()}
    assert "RMSNorm" in kinds and "SwiGLU" in kinds
    assert not kinds & {"QuantizingRMSNorm", "QuantizingSwiGLU"}


def test_families_without_fusable_ops_are_left_alone():
    model = MDLM(MDLMConfig(vocab_size=64, mask_id=1, seq_len=16, hidden_dim=32, n_heads=2))
    assert fuse_activation_quantization(model.blocks) == 0


def test_swiglu_kernel_refuses_gate_and_up_of_different_shapes():
    from faircalib.kernels.triton_w8a8 import swiglu_quantize_rows

    with pytest.raises(ValueError, match="differ"):
        swiglu_quantize_rows(torch.zeros(2, 8), torch.zeros(2, 4), "fp8")


def test_a_regex_target_that_also_matches_the_parameter_free_activation_still_loads(tmp_path):
    """Dream's `mlp.act_fn` is a module now: a checkpoint whose targets are regular
    expressions over names ("re:.*mlp\\..*", as llm-compressor recipes write them) matches it
    too. It has nothing to quantize, so the loader passes over it, as stock readers do."""
    import json

    from faircalib.calib.activations import ActCalibConfig, quantize_activations
    from faircalib.calib.fakequant_io import packed_act_config, save_quantized
    from faircalib.config import CalibConfig
    from faircalib.formats.packed import load_packed_model

    model = hub.load(write_family(tmp_path / "src", "dream"))
    tokens = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(2))
    config = packed_act_config(ActCalibConfig("w8a8", "rtn"))
    report = quantize_activations(model, tokens, config, CalibConfig(n_samples=4, seq_len=32))
    save_quantized(model, report, tmp_path / "p", None, fmt="packed")
    want = load_packed_model(tmp_path / "p")
    path = tmp_path / "p" / "config.json"
    cfg = json.loads(path.read_text())
    (group,) = cfg["quantization_config"]["config_groups"].values()
    x_t = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    t = torch.full((2,), 0.5)
    with torch.no_grad():
        expected = want.log_probs(x_t, t)
    # the last two also match containers (self_attn, mlp, the model itself) and the norms
    for targets in (
        ["re:.*self_attn\\..*", "re:.*mlp\\..*"],
        ["re:.*mlp.*", "re:.*attn.*"],
        ["re:.*"],
    ):
        group["targets"] = targets
        path.write_text(json.dumps(cfg))
        with torch.no_grad():
            assert torch.equal(load_packed_model(tmp_path / "p").log_probs(x_t, t), expected)
    group["targets"] = ["re:.*layernorm"]  # norms only: no Linear layer to apply the scheme to
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="match no Linear layer"):
        load_packed_model(tmp_path / "p")
