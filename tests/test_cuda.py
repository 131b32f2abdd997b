"""GPU-only checks: the Triton kernels in bf16, fp8 with fast accumulation, CUDA-graph sampling.

CI has no GPU, so these skip there; they run on the device machine with
`python -m pytest -q tests/test_cuda.py` (results in benchmarks/results/cuda-tests.txt).
"""

import pytest
import torch

from faircalib.config import QuantConfig
from faircalib.errors import ConfigError
from faircalib.frontier.samplers import SamplerConfig, generate
from faircalib.kernels import QuantLinear
from faircalib.models import MDLM, MDLMConfig
from faircalib.models.cuda_graph import CUDAGraphDenoiser
from faircalib.quant.primitives import compute_qparams, dequantize, quantize

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_cuda_graph_denoiser_refuses_a_model_off_the_gpu():
    model = MDLM(MDLMConfig(vocab_size=64, mask_id=1, seq_len=16, hidden_dim=32, n_heads=2))
    with pytest.raises(ConfigError, match="CUDA device"):
        CUDAGraphDenoiser(model)


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return float((y.double() - ref).norm() / ref.norm())


@needs_cuda
@pytest.mark.parametrize("backend", ["triton_w4", "triton_dq", "int4_cuda", "dequant"])
@pytest.mark.parametrize("m", [1, 16, 300, 2048])
def test_w4_backends_match_the_float_reference_in_bf16(backend: str, m: int):
    pytest.importorskip("triton")
    gen = torch.Generator(device="cuda").manual_seed(m)
    w = torch.randn(384, 1024, generator=gen, device="cuda") / 32
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=False))
    codes = quantize(w, qp)
    layer = QuantLinear.from_codes(codes, qp, backend=backend)
    x = torch.randn(m, 1024, generator=gen, device="cuda").bfloat16()
    y = layer(x)
    ref = x.double() @ dequantize(codes, qp).double().T
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
    assert rel_err(y, ref) <= 1e-2
    assert layer.last_backend == backend


@needs_cuda
def test_fp8_w8a8_with_fast_accumulation_stays_within_e4m3_rounding():
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(512, 2048, generator=gen, device="cuda") / 45
    qp = compute_qparams(w, QuantConfig(bits=8, group_size=None, symmetric=True))
    layer = QuantLinear.from_codes(quantize(w, qp), qp, backend="fp8")
    x = torch.randn(1024, 2048, generator=gen, device="cuda").bfloat16()
    ref = x.double() @ dequantize(quantize(w, qp), qp).double().T
    assert rel_err(layer(x), ref) <= 5e-2  # two e4m3 roundings (~2-4%), fast accumulation


@needs_cuda
def test_cuda_graph_generation_equals_eager_generation():
    torch.manual_seed(0)
    cfg = MDLMConfig(vocab_size=300, mask_id=1, seq_len=64, hidden_dim=128, n_heads=4, n_blocks=2)
    model = MDLM(cfg).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():  # a random model with non-trivial (non-zero) outputs
            p.add_(torch.randn_like(p) * 0.05)
    prompts = torch.randint(2, 300, (3, 8))
    sampler = SamplerConfig(sampler="low_confidence", steps=16, gen_length=32)
    eager = generate(model, prompts, sampler, seed=7, trace=False).tokens
    graphed_model = CUDAGraphDenoiser(model)
    graphed = generate(graphed_model, prompts, sampler, seed=7, trace=False).tokens
    again = generate(graphed_model, prompts, sampler, seed=7, trace=False).tokens
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)
    assert graphed_model.graphs == 1  # every step has the same shape: one capture, replayed
