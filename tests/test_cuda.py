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


def _refuse_fake_quantization(monkeypatch) -> None:
    """Make QuantLinear's activation fake quantization fail: an FP8-activation backend must
    quantize x itself, once."""

    def refuse(self, x):
        raise AssertionError("x fake-quantized before an FP8-activation backend")

    monkeypatch.setattr(QuantLinear, "quantize_input", refuse)


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
@pytest.mark.parametrize("group_size", [128, None])
def test_w4_planes_integer_path_matches_the_reference_in_bf16(group_size):
    """The bf16 "planes" loop with groups spanning K tiles (exact integer weights, scaled
    after the dots), over even and uneven splits of K (1, 3, 4 and 8 of 10 tiles): every fixed
    config against the float64 product."""
    pytest.importorskip("triton")
    from faircalib.kernels.triton_w4 import w4_matmul

    gen = torch.Generator(device="cuda").manual_seed(7)
    w = torch.randn(320, 1280, generator=gen, device="cuda") / 32  # 10 K tiles, ragged N
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=group_size, symmetric=False))
    codes = quantize(w, qp)
    layer = QuantLinear.from_codes(codes, qp, backend="triton_w4")
    ref_w = dequantize(codes, qp).double()
    for m in (1, 32, 64):
        x = torch.randn(m, 1280, generator=gen, device="cuda").bfloat16()
        layer(x)  # builds the tile layout
        prepared = layer._prepared[("triton_w4", x.device, x.dtype)]
        ref = x.double() @ ref_w.T
        for bm, bn, split in ((16, 64, 1), (32, 128, 3), (64, 128, 4), (32, 64, 8)):
            meta = {"BLOCK_M": bm, "BLOCK_N": bn, "UNPACK": "planes", "SPLIT_K": split}
            y = w4_matmul(x, *prepared, interpreted_meta=meta)
            assert rel_err(y, ref) <= 5e-3, (m, meta)
            # serial split-K: the same bits every call, and the counters left at zero
            assert torch.equal(w4_matmul(x, *prepared, interpreted_meta=meta), y), (m, meta)
            assert int(prepared[3].abs().sum()) == 0, (m, meta)


@needs_cuda
@pytest.mark.parametrize("m", [1, 32, 64])
def test_w4_split_k_gemm_replays_in_a_graph_and_leaves_its_counters_at_zero(m):
    """The autotuned fused GEMM (split K reduced by the last program to arrive) captured in a
    CUDA graph and replayed on new inputs, three times: against the float64 product each
    time; a replay is one kernel writing bf16 (no zero-fill, no cast pass)."""
    pytest.importorskip("triton")
    gen = torch.Generator(device="cuda").manual_seed(m)
    w = torch.randn(4100, 2048, generator=gen, device="cuda") / 32  # ragged N
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=False))
    codes = quantize(w, qp)
    layer = QuantLinear.from_codes(codes, qp, backend="triton_w4")
    ref_w = dequantize(codes, qp).double()
    x = torch.randn(m, 2048, generator=gen, device="cuda").bfloat16()
    layer(x)  # autotunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = layer(x)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=gen, device="cuda"))
        graph.replay()
        assert y.dtype == torch.bfloat16 and rel_err(y, x.double() @ ref_w.T) <= 5e-3
    torch.cuda.synchronize()
    counters = layer._prepared[("triton_w4", x.device, x.dtype)][3]
    assert int(counters.abs().sum()) == 0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        layer(x)
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    assert kernels == ["_w4_matmul_kernel"], kernels


@needs_cuda
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_triton_gemv_on_cuda_matches_the_reference_and_replays_in_a_graph(m, group_size):
    """The GEMV's split-K reduction on real hardware (last program to arrive sums the partials,
    then resets its counter): right, bit-identical call to call, and under CUDA graph replay."""
    pytest.importorskip("triton")
    gen = torch.Generator(device="cuda").manual_seed(m)
    w = torch.randn(4096, 1024, generator=gen, device="cuda") / 32
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=group_size, symmetric=False))
    codes = quantize(w, qp)
    layer = QuantLinear.from_codes(codes, qp, backend="triton_gemv")
    x = torch.randn(m, 1024, generator=gen, device="cuda").bfloat16()
    y = layer(x)
    ref = x.double() @ dequantize(codes, qp).double().T
    assert rel_err(y, ref) <= 1e-2 and layer.last_backend == "triton_gemv"
    assert all(torch.equal(layer(x), y) for _ in range(5))  # counters reset, fixed order
    from faircalib.models.cuda_graph import capture

    static_x = x.clone()
    graph, out = capture(lambda: layer(static_x))
    static_x.copy_(x * 2)
    graph.replay()
    assert torch.equal(out, layer(x * 2))


def _int8_layer(out_features: int, in_features: int, seed: int) -> tuple:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=gen, device="cuda") / 32
    qp = compute_qparams(w, QuantConfig(bits=8, group_size=None, symmetric=True))
    codes = quantize(w, qp)
    bias = torch.randn(out_features, generator=gen, device="cuda") / 8
    layer = QuantLinear.from_codes(codes, qp, bias=bias, backend="int8_w8a8", act_bits=8)
    return layer, dequantize(codes, qp).double(), bias.double(), gen


@needs_cuda
@pytest.mark.parametrize("m", [1, 16, 300, 1024])
def test_int8_w8a8_small_m_on_gemlite_matches_the_reference_on_the_same_weight(m):
    """Below M = 1024 int8_w8a8 runs gemlite's INT8 layer (where the package is installed):
    same result as the float64 matmul of int8-rounded activations and weights, gemlite's
    layer is a view of the cached int8 weight (no second copy), and CUDA graphs replay it."""
    pytest.importorskip("gemlite")
    from faircalib.kernels.backends import int8_w8a8_gemm, quantize_rows_int8

    layer, w_hat, bias, gen = _int8_layer(1536, 1024, m)
    x = torch.randn(m, 1024, generator=gen, device="cuda").bfloat16()
    y = layer(x)
    q, s = quantize_rows_int8(x)
    ref = (q.double() * s.double()) @ w_hat.T + bias
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) <= 1e-2
    kernel = int8_w8a8_gemm(m, 1024, 1536, x)
    assert kernel == ("gemlite" if m < 1024 else "triton")
    prepared = next(v for k, v in layer._prepared.items() if k[0] == "int8_w8a8")
    cache = prepared[2]
    if kernel == "gemlite":
        assert cache[torch.bfloat16].W_q.data_ptr() == prepared[0].data_ptr()
    from faircalib.models.cuda_graph import capture

    static_x = x.clone()
    graph, out = capture(lambda: layer(static_x))
    static_x.copy_(x * 2)
    graph.replay()
    torch.testing.assert_close(out, layer(x * 2), rtol=0, atol=0)


@needs_cuda
def test_int8_w8a8_keeps_the_triton_gemm_where_gemlite_cannot_take_the_shape():
    from faircalib.kernels.backends import int8_w8a8_gemm, quantize_rows_int8

    layer, w_hat, bias, gen = _int8_layer(320, 1024, 0)  # 320 is not a multiple of 128
    x = torch.randn(8, 1024, generator=gen, device="cuda").bfloat16()
    assert int8_w8a8_gemm(8, 1024, 320, x) == "triton"
    q, s = quantize_rows_int8(x)
    ref = (q.double() * s.double()) @ w_hat.T + bias
    assert rel_err(layer(x), ref) <= 1e-2


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


@needs_cuda
@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_cuda_graph_cached_generation_equals_eager_cached(cache):
    """Real CUDA graphs for the block-cache steps: the refresh graph writes the K/V the window
    graphs read; tokens equal the eager cached run's, on replay too."""
    from dataclasses import replace

    torch.manual_seed(0)
    cfg = MDLMConfig(vocab_size=300, mask_id=1, seq_len=64, hidden_dim=128, n_heads=4, n_blocks=2)
    model = MDLM(cfg).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    prompts = torch.randint(2, 300, (3, 8))
    sampler = SamplerConfig(sampler="low_confidence", steps=16, gen_length=32, block_length=8)
    sampler = replace(sampler, cache=cache)
    eager = generate(model, prompts, sampler, seed=7, trace=False).tokens
    graphed_model = CUDAGraphDenoiser(model)
    graphed = generate(graphed_model, prompts, sampler, seed=7, trace=False).tokens
    again = generate(graphed_model, prompts, sampler, seed=7, trace=False).tokens
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)
    assert graphed_model.graphs == 1 + 4  # the refresh, one window per block


def _calibrate_on_cuda(model, budget_gib, recon):
    """quantize_model on the GPU (offloaded blocks) with the cache plan's own choice under
    `budget_gib` (None: the GPU's free memory); returns (quantized copy, report)."""
    import copy

    from faircalib.calib.engine import quantize_model
    from faircalib.config import CalibConfig, GPTQConfig

    gen = torch.Generator().manual_seed(3)
    x_t = torch.randint(2, model.vocab_size, (20, 32), generator=gen)
    t, weights = torch.rand(20, generator=gen), torch.rand(20, 32, generator=gen)
    calib = CalibConfig(device="cuda", offload=True, max_device_gib=budget_gib)
    q = copy.deepcopy(model)
    report = quantize_model(
        q, GPTQConfig(group_size=32), x_t, t, weights, calib_cfg=calib, recon=recon,
        text_ids=torch.arange(20) // 2, progress=False,
    )  # fmt: skip
    return q, report


def _same_codes(a, b) -> bool:
    from faircalib.calib.engine import quant_results

    ra, rb = quant_results(a), quant_results(b)
    return ra.keys() == rb.keys() and all(
        torch.equal(ra[k].codes, rb[k].codes)
        and torch.equal(ra[k].qparams.scale, rb[k].qparams.scale)
        and torch.equal(ra[k].weight, rb[k].weight)
        for k in ra
    )


@needs_cuda
@pytest.mark.parametrize("bf16", [False, True])
def test_calibration_cache_on_the_gpu_or_pinned_host_gives_the_same_codes(tmp_path, bf16):
    """Issue 13: the cache plan puts a tiny model's caches on the GPU when they fit (no budget:
    the free memory), in pinned host memory under a 1 GiB budget (the 2 GiB margin alone
    exceeds it); both runs give the same codes, scales and weights, with and without block
    reconstruction."""
    from faircalib import hub
    from faircalib.config import ReconConfig

    if bf16:
        from llama_like_ckpt import write_family  # a bf16 family: LLaDA's layout, tiny

        model = hub.load(write_family(tmp_path / "llada", "llada"), dtype=torch.bfloat16)
    else:
        model = hub.load("mdlm-tiny")
    for recon in (None, ReconConfig(steps=8, batch=3, eval_every=4)):
        device_q, device_report = _calibrate_on_cuda(model, None, recon)
        host_q, host_report = _calibrate_on_cuda(model, 1.0, recon)
        on_device, on_host = device_report.calib["cache"], host_report.calib["cache"]
        assert on_device["placement"] == "device" and not on_device["forced"]
        assert on_host["placement"] == "host" and on_host["pinned"] and not on_host["forced"]
        if recon is not None:  # the backward pass may use non-deterministic kernels
            again_q, _ = _calibrate_on_cuda(model, None, recon)
            if not _same_codes(device_q, again_q):
                pytest.skip("block reconstruction is not deterministic on this GPU")
        assert _same_codes(device_q, host_q)
        assert device_report.recon == host_report.recon  # the same validation curves
        assert next(device_q.parameters()).device.type == "cpu"  # offload: the model ends there


# --- GPTQ's fused column sweep and tensor-core Gram matrices (quant/gptq*.py, quant/stats.py)
def _gptq_layer(n_in: int, seed: int):
    from faircalib.quant.stats import LayerInputs

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n_in, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) / 16)
    x[:, 3] *= 10.0
    x[:, 11] = 0.0
    return LayerInputs.from_rows(x.cuda()), g


@needs_cuda
@pytest.mark.parametrize(
    "group_size,act_order,symmetric", [(32, False, False), (128, True, False), (None, True, True)]
)
def test_gptq_fused_sweep_gives_the_torch_loops_codes_on_cuda(group_size, act_order, symmetric):
    """Same float32 operations in the same order, IEEE division, no FMA contraction: the
    kernel's codes and dequantized weights equal the torch loop's on the GPU."""
    from faircalib.config import GPTQConfig
    from faircalib.quant.gptq import quantize_gptq, triton_sweep_available

    inputs, g = _gptq_layer(512, seed=group_size or 1)
    w = (torch.randn(300, 512, generator=g) * 0.05).cuda()
    cfg = GPTQConfig(
        bits=4, group_size=group_size, act_order=act_order, symmetric=symmetric,
        scale_dtype="bfloat16",
    )  # fmt: skip
    assert triton_sweep_available(w.device, cfg.block_size)
    fused = quantize_gptq(w, inputs, cfg, sweep="auto")
    ref = quantize_gptq(w, inputs, cfg, sweep="torch")
    assert torch.equal(fused.codes, ref.codes)
    assert torch.equal(fused.weight, ref.weight)


@needs_cuda
@pytest.mark.parametrize("group_size,act_order", [(128, False), (None, True)])
def test_gptq_fused_sweep_at_its_widest_tile_on_cuda(group_size, act_order):
    """256-column lazy blocks (the widest the kernel takes: 8 rows a program), a ragged last
    block (1300 = 5 x 256 + 20) and a row count no tile divides, compiled on the GPU."""
    from faircalib.config import GPTQConfig
    from faircalib.quant.gptq import quantize_gptq, triton_sweep_available

    n_in = 1280 if group_size else 1300  # dynamic groups must divide the width
    inputs, g = _gptq_layer(n_in, seed=9)
    w = (torch.randn(1001, n_in, generator=g) * 0.05).cuda()
    cfg = GPTQConfig(bits=4, group_size=group_size, act_order=act_order, block_size=256)
    assert triton_sweep_available(w.device, cfg.block_size)
    fused = quantize_gptq(w, inputs, cfg, sweep="auto")
    ref = quantize_gptq(w, inputs, cfg, sweep="torch")
    assert torch.equal(fused.codes, ref.codes)
    assert torch.equal(fused.weight, ref.weight)


@needs_cuda
def test_stacked_gptq_equals_separate_calls_on_cuda():
    from faircalib.config import GPTQConfig
    from faircalib.quant.gptq import quantize_gptq, quantize_gptq_many

    inputs, g = _gptq_layer(384, seed=5)
    weights = [(torch.randn(n, 384, generator=g) * 0.05).cuda() for n in (256, 64, 200)]
    cfg = GPTQConfig(bits=4, group_size=128, act_order=True)
    for w, res in zip(weights, quantize_gptq_many(weights, inputs, cfg), strict=True):
        assert torch.equal(res.codes, quantize_gptq(w, inputs, cfg).codes)


@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weighted", [False, True])
def test_gram_on_tensor_cores_is_float32_accurate(dtype, weighted):
    """16-bit rows take the bf16/fp16 GEMM (weighted bf16 rows: w * x split exactly into three
    bf16 pieces). Against a float64 Hessian the CPU float32 result is float32-accurate (~1e-7);
    the tensor cores' float32 accumulation is not IEEE round-to-nearest (H200, 2026-11-29:
    0.7-1.4e-5 relative), still ten times below what one bf16 rounding of w * x costs on these
    rows (1.4e-4, CPU-computed), so the bound tells the exact split from a rounded one."""
    from faircalib.quant.stats import LayerInputs

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(8192, 256, generator=g) * torch.logspace(-2, 1, 256)).to(dtype)
    row_w = torch.rand(8192, generator=g) * 3 if weighted else None
    w64 = torch.ones(8192, dtype=torch.float64) if row_w is None else row_w.double()
    x64 = x.double()
    ref = x64.T @ (w64[:, None] * x64) / w64.sum()
    gpu = LayerInputs.from_rows(x.cuda(), None if row_w is None else row_w.cuda()).hessian
    cpu = LayerInputs.from_rows(x, row_w).hessian
    assert rel_err(cpu, ref) < 2e-6
    assert rel_err(gpu.cpu(), ref) < 3e-5


@needs_cuda
@pytest.mark.parametrize("m", [1, 300])
def test_reloaded_fp8_layer_runs_the_fp8_gemm_within_bf16_rounding(m: int):
    """A reloaded FP8 W8A8 layer (`FP8ActLinear`, backend auto) runs the real FP8 GEMM
    (torch._scaled_mm, or our GEMM for narrow layers of few output tiles; per-token x
    per-channel scales) for bf16 input on CUDA. Its e4m3
    operands are the reference path's, so against the float64 product of those operands it
    differs by the bf16 rounding of output and bias add and by fast accumulation only (CPU, same
    data, no fast accumulation: 2.4e-3; benchmarks/kernels.py, H100, K = 4096: 2.1e-3 without
    bias). The reference path rounds x_q, the weight and its output to bf16 (2.7e-3, CPU);
    an unquantized x would be 2.4e-2 off, so the bounds see the quantizer."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    from faircalib.formats.packed import FP8ActLinear
    from faircalib.kernels.backends import fp8_w8a8_gemm

    gen = torch.Generator().manual_seed(m)
    w = torch.randn(512, 1024, generator=gen) / 32
    w_scale = w.abs().amax(dim=1, keepdim=True) / 448  # independent e4m3 grid: torch's cast
    values = (w / w_scale).to(torch.float8_e4m3fn)
    bias = torch.randn(512, generator=gen)
    layer = FP8ActLinear(values, w_scale, bias).cuda()
    x = (torch.randn(2, m, 1024, generator=gen) * torch.logspace(-1, 1, 1024)).bfloat16()
    with torch.no_grad():
        y = layer(x.cuda())
    # 512 outputs in 1-5 row blocks: a narrow layer of few tiles, on our GEMM (`fp8_w8a8_gemm`)
    assert layer.last_backend == "fp8_w8a8" and fp8_w8a8_gemm(2 * m, 512, 1024) == "triton"
    assert y.dtype == torch.bfloat16 and y.shape == (2, m, 512)
    xf = x.float().reshape(-1, 1024)
    x_scale = xf.abs().amax(dim=1, keepdim=True) / 448
    x8 = (xf / x_scale).to(torch.float8_e4m3fn)
    w64 = values.double() * w_scale.double()
    exact = (x8.double() * x_scale.double()) @ w64.T + bias.double()
    layer.backend = "reference"
    with torch.no_grad():
        ref = layer(x.cuda()).reshape(-1, 512).cpu()
    assert layer.last_backend == "reference"
    y = y.reshape(-1, 512).cpu()
    assert rel_err(y, exact) <= 5e-3
    assert rel_err(ref, exact) <= 5e-3
    assert rel_err(y, ref.double()) <= 8e-3
    assert rel_err(xf.double() @ w64.T + bias.double(), exact) > 1e-2


@needs_cuda
def test_shared_activation_quantization_replays_in_a_cuda_graph(tmp_path, monkeypatch):
    """A loaded INT8 W8A8 LLaDA on the GPU kernels: q, k, v (and gate, up) read one
    quantization of their input inside a captured graph; replays on new inputs match the same
    model run eagerly with every layer quantizing its own input."""
    pytest.importorskip("triton")
    from faircalib.formats.packed import load_packed_model
    from test_shared_activations import llada_w8a8

    directory, x_t, t = llada_w8a8(tmp_path)
    shared = load_packed_model(directory, "cuda", torch.bfloat16, backend="int8_w8a8")
    unshared = load_packed_model(directory, "cuda", torch.bfloat16, backend="int8_w8a8")
    for block in unshared.blocks:
        block._forward_pre_hooks.clear()
        block._forward_hooks.clear()
    x_t, t = x_t.cuda(), t.cuda()
    graphed = CUDAGraphDenoiser(shared)
    gen = torch.Generator(device="cuda").manual_seed(3)
    with torch.no_grad():
        for _ in range(3):  # the capture, then two replays on new inputs
            x_t = torch.randint(0, 256, x_t.shape, generator=gen, device="cuda")
            # (a stale quantization, from the capture's input, would be far off)
            torch.testing.assert_close(
                graphed.log_probs(x_t, t), unshared.log_probs(x_t, t), atol=2e-2, rtol=1e-2
            )
    assert graphed.graphs == 1
    # the fused path runs on the GPU: each block's two norms and SwiGLU write the 8-bit rows
    from faircalib.kernels import triton_w8a8

    calls = []
    for name in ("rms_norm_quantize_rows", "swiglu_quantize_rows"):
        fn = getattr(triton_w8a8, name)
        monkeypatch.setattr(
            triton_w8a8, name, lambda *a, _f=fn, _n=name: calls.append(_n) or _f(*a)
        )
    with torch.no_grad():
        shared.log_probs(x_t, t)
    assert len(calls) == 3 * len(shared.blocks)  # (added after this session's GPU run)


@needs_cuda
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_autotuned_tma_w8a8_gemm_matches_the_reference(kind):
    """The persistent TMA GEMM autotuned over all its configs against the float64 product of
    its operands; a ragged M and N. Which config won is printed for the record."""
    pytest.importorskip("triton")
    import triton

    from faircalib.kernels import triton_w8a8 as k
    from faircalib.kernels.backends import fp8_quantize

    if k.tma_supported(torch.device("cuda")):
        pytest.skip(k.tma_supported(torch.device("cuda")))
    gen = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(1100, 1024, generator=gen, device="cuda")
    w = torch.randn(1000, 1024, generator=gen, device="cuda")
    a8, a_s = k.quantize_rows(x, kind)
    if kind == "int8":
        w8 = torch.randint(-127, 128, w.shape, generator=gen, device="cuda", dtype=torch.int8)
        w_s = torch.rand(1000, generator=gen, device="cuda") + 0.01
    else:
        w8, w_s = fp8_quantize(w)
    ref = (a8.double() @ w8.double().T) * a_s.double() * w_s.double().reshape(1, -1)
    y = k.w8a8_matmul_tma(a8, a_s, w8, w_s, torch.bfloat16)
    assert rel_err(y, ref) <= 1e-2
    print(f"triton {triton.__version__}: {kind} best {k._autotuned_w8a8_tma.best_config}")


@needs_cuda
@pytest.mark.parametrize("kind", ["int8", "fp8"])
@pytest.mark.parametrize("m,k", [(1024, 4096), (37, 12288)])
def test_fused_norm_and_swiglu_quantization_in_bf16(kind, m, k):
    """The fused RMSNorm / SwiGLU kernels on the GPU: y within bf16 rounding of the float64
    op, and its 8-bit rows exactly `quantize_rows(y)` (the readers get the same bits)."""
    pytest.importorskip("triton")
    from faircalib.kernels.triton_w8a8 import (
        quantize_rows,
        rms_norm_quantize_rows,
        swiglu_quantize_rows,
    )

    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", generator=gen).mul(3).bfloat16()
    w = (torch.rand(k, device="cuda", generator=gen) + 0.5).bfloat16()
    gu = torch.randn(m, 2 * k, device="cuda", generator=gen).mul(4).bfloat16()
    gate, up = gu[:, :k], gu[:, k:]  # rows with a stride, as a fused gate/up output has
    x64 = x.double()
    norm_ref = w.double() * x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5)
    silu_ref = torch.nn.functional.silu(gate.double()) * up.double()
    for (y, q, s), ref in (
        (rms_norm_quantize_rows(x, w, 1e-5, kind), norm_ref),
        (swiglu_quantize_rows(gate, up, kind), silu_ref),
    ):
        assert y.dtype == torch.bfloat16
        # two bf16 roundings (the normalised value / silu, then the product): 2 * 2^-8
        torch.testing.assert_close(y.double(), ref, rtol=8e-3, atol=1e-6 * ref.abs().max().item())
        q2, s2 = quantize_rows(y, kind)
        assert torch.equal(s, s2)
        assert torch.equal(q.view(torch.uint8), q2.view(torch.uint8))


@needs_cuda
@pytest.mark.parametrize("k", [3584, 4096, 18944])  # whole rows in registers, and in passes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_row_quantizer_gives_the_torch_grids_bits_on_the_gpu(k, dtype):
    """`quantize_rows` on the GPU (one reciprocal a row and FMA corrections, not a division per
    element) against the grids of `backends.fp8_quantize` / `quantize_rows_int8` with every
    quotient correctly rounded (computed in float64, then rounded once to float32: exact for a
    float32 quotient), bit for bit: rows over 40 decades of magnitude, a zero row with signed
    zeros, a row under the abs-max floor, a row with an inf, and (float32 rows) values next to
    the grids' ties, x = (n + 1/2) * scale. (torch's own CUDA division by a scalar multiplies
    by its reciprocal: not the IEEE quotient the CPU reference and the kernels give.)"""
    pytest.importorskip("triton")
    from faircalib.kernels.triton_w8a8 import quantize_rows
    from faircalib.quant.primitives import ACT_ABSMAX_FLOOR

    def divide(a: torch.Tensor, b: torch.Tensor | float) -> torch.Tensor:
        b = b.double() if isinstance(b, torch.Tensor) else b
        return (a.double() / b).float()

    gen = torch.Generator(device="cuda").manual_seed(4)
    m = 1024
    mags = torch.logspace(-20, 20, m, device="cuda", dtype=torch.float64).float()
    x = (torch.randn(m, k, device="cuda", generator=gen) * mags[:, None]).to(dtype)
    x[7] = 0.0
    x[7, ::2] = -0.0
    x[9] = (x[9].float() * (3e-9 / x[9].float().abs().max())).to(dtype)
    x[11, 3] = float("inf")
    finite = x.isfinite()
    for kind, top in (("fp8", 448.0), ("int8", 127.0)):
        rows = x.clone()
        amax = rows.float().abs().amax(-1, keepdim=True)
        ties = torch.randint(-254, 255, (m, 64), device="cuda", generator=gen).float() / 2
        near = (ties * divide(amax, top)).to(dtype)  # under the abs-max: the scale holds
        rows[:, 16:80] = torch.where(amax.isinf(), rows[:, 16:80], near)
        scale = divide(rows.float().abs().amax(-1, keepdim=True).clamp(min=ACT_ABSMAX_FLOOR), top)
        v = divide(rows.float(), scale).clamp(-top, top)
        want = v.to(torch.float8_e4m3fn) if kind == "fp8" else torch.round(v).to(torch.int8)
        q, s = quantize_rows(rows, kind)
        assert torch.equal(s, scale), kind
        assert torch.equal(q.view(torch.uint8)[finite], want.view(torch.uint8)[finite]), kind


@needs_cuda
@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_split_k_w8a8_gemm_matches_the_reference_and_replays_in_a_graph(kind):
    """An 8B MLP down projection (14336 -> 4096) at M = 64 has 32 output tiles: K splits (4 ways
    on an H200) and the partials are reduced in the kernel. INT8 gives the unsplit GEMM's bits;
    both stay within bf16 rounding of the float64 product of the operands; a CUDA graph replays
    it with new inputs, and every call leaves the arrival counters at zero. FP8 at this shape
    runs it through `backends.fp8_rows_matmul` too (the rule's pick)."""
    pytest.importorskip("triton")
    from faircalib.kernels import backends
    from faircalib.kernels import triton_w8a8 as k

    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    m, n, depth = 64, 4096, 14336
    if k.split_k_for(m, n, depth, k._device_sms(torch.device("cuda"))) == 1:
        pytest.skip("this GPU has too few SMs for the split")
    gen = torch.Generator(device="cuda").manual_seed(9)
    x = torch.randn(m, depth, generator=gen, device="cuda", dtype=torch.bfloat16)
    a8, a_s = k.quantize_rows(x, kind)
    if kind == "int8":
        w8 = torch.randint(-127, 128, (n, depth), generator=gen, device="cuda", dtype=torch.int8)
        w_s = torch.rand(n, generator=gen, device="cuda") + 0.01
    else:
        w8, w_s = backends.fp8_quantize(torch.randn(n, depth, generator=gen, device="cuda"))
    ref = (a8.double() @ w8.double().T) * a_s.double() * w_s.double().reshape(1, -1)
    y = k.w8a8_matmul(a8, a_s, w8, w_s, torch.bfloat16)
    whole = k.w8a8_matmul(
        a8, a_s, w8, w_s, torch.bfloat16, meta={"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 128}
    )
    assert rel_err(y, ref) <= 4e-3 and rel_err(whole, ref) <= 4e-3
    if kind == "int8":
        assert torch.equal(y, whole)
    else:
        assert backends.fp8_w8a8_gemm(m, n, depth) == "triton"
        rows = backends.fp8_rows_matmul(a8, a_s, w8, w_s.reshape(1, -1), None, torch.bfloat16)
        assert torch.equal(rows, y)
    assert not any(c.any() for c in k._counters.values())

    static = a8.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        k.w8a8_matmul(static, a_s, w8, w_s, torch.bfloat16)  # warm-up off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = k.w8a8_matmul(static, a_s, w8, w_s, torch.bfloat16)
    for seed in (1, 2):
        x2 = torch.randn(m, depth, generator=gen.manual_seed(seed), device="cuda")
        static.copy_(k.quantize_rows(x2, kind)[0])
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, k.w8a8_matmul(static, a_s, w8, w_s, torch.bfloat16))
    assert not any(c.any() for c in k._counters.values())


@needs_cuda
@pytest.mark.parametrize("kind", ["fp8", "int8"])
def test_stacked_dream_attention_matches_its_members_and_replays_in_a_graph(kind):
    """Dream-7B's q, k, v (3584 -> 3584, 512, 512, with biases) as 8-bit layers, stacked into
    one 3584 x 4608 layer (`kernels.stacked_linears`): on the GPU kernels each member's output
    stays within bf16 rounding of the unstacked layer's (INT8: the same integer GEMM, so within
    the bf16 output rounding only), one stacked call serves the three, and `capture` replays
    it with new inputs."""
    from torch import nn

    from faircalib.formats.packed import FP8ActLinear
    from faircalib.kernels.backends import fp8_quantize
    from faircalib.kernels.stacked_linears import stack_linears
    from faircalib.models.cuda_graph import capture

    if kind == "fp8" and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("fp8 needs compute capability >= 8.9")
    gen = torch.Generator().manual_seed(11)
    root = nn.Module()
    for name, out in (("q", 3584), ("k", 512), ("v", 512)):
        w = torch.randn(out, 3584, generator=gen) / 60
        bias = torch.randn(out, generator=gen) / 10
        if kind == "fp8":
            values, scale = fp8_quantize(w)
            layer = FP8ActLinear(values, scale, bias)
        else:
            qp = compute_qparams(w, QuantConfig(bits=8, group_size=None, symmetric=True))
            layer = QuantLinear.from_codes(quantize(w, qp), qp, bias=bias, act_bits=8)
        setattr(root, name, layer)
    root = root.cuda().to(torch.bfloat16)
    x = torch.randn(1024, 3584, generator=gen).cuda().bfloat16()
    with torch.no_grad():
        want = [getattr(root, n)(x) for n in "qkv"]
        report = stack_linears(root, [("q", "k", "v")])
        assert report.stacked == [("q", "k", "v")]
        calls = []
        root.q.stacked.register_forward_hook(lambda *_: calls.append(1))
        got = [getattr(root, n)(x) for n in "qkv"]
        assert len(calls) == 1
        for g, w in zip(got, want, strict=True):
            assert rel_err(g, w.double()) <= (8e-3 if kind == "fp8" else 4e-3)
        static = x.clone()
        graph, outs = capture(lambda: [getattr(root, n)(static) for n in "qkv"])
        x2 = torch.randn(1024, 3584, generator=gen).cuda().bfloat16()
        static.copy_(x2)
        graph.replay()
        torch.cuda.synchronize()
        eager = [getattr(root, n)(x2) for n in "qkv"]
        for g, e in zip(outs, eager, strict=True):
            assert torch.equal(g, e)


@needs_cuda
def test_capture_finds_the_split_k_counters_its_warm_up_made(monkeypatch):
    """`models.cuda_graph.capture` captures on the stream it warmed up on, so a split-K GEMM
    in the graph uses the counters made (and zeroed) eagerly, none made inside the capture;
    the replay matches an eager call."""
    pytest.importorskip("triton")
    from faircalib.kernels import triton_w8a8 as k
    from faircalib.models.cuda_graph import capture

    m, n, depth = 64, 4096, 14336
    if k.split_k_for(m, n, depth, k._device_sms(torch.device("cuda"))) == 1:
        pytest.skip("this GPU has too few SMs for the split")
    gen = torch.Generator(device="cuda").manual_seed(12)
    a8 = torch.randint(-127, 128, (m, depth), generator=gen, device="cuda", dtype=torch.int8)
    w8 = torch.randint(-127, 128, (n, depth), generator=gen, device="cuda", dtype=torch.int8)
    a_s = torch.rand(m, generator=gen, device="cuda") + 0.01
    w_s = torch.rand(n, generator=gen, device="cuda") + 0.01
    found_in_capture = []
    original = k._split_counters

    def recorded(device: torch.device) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():
            key = (device.index or 0, torch.cuda.current_stream(device).cuda_stream)
            found_in_capture.append(key in k._counters)
        return original(device)

    monkeypatch.setattr(k, "_split_counters", recorded)
    graph, out = capture(lambda: k.w8a8_matmul(a8, a_s, w8, w_s, torch.bfloat16))
    assert found_in_capture == [True]  # the warm-up stream's set, made eagerly
    a8.copy_(torch.randint(-127, 128, (m, depth), generator=gen, device="cuda", dtype=torch.int8))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, k.w8a8_matmul(a8, a_s, w8, w_s, torch.bfloat16))
    assert not any(c.any() for c in k._counters.values())


@needs_cuda
@pytest.mark.parametrize("config", range(11))
def test_cutlass_w4a16_matches_the_reference_of_its_operands_and_replays_in_a_graph(config):
    """Every configuration of the CUTLASS library (built, or from $FAIRCALIB_CUTLASS_DIR)
    against the float64 product with the weight its operands stand for, at M on both sides of
    its token tiles; then a graph replay on new activations equals an eager call."""
    from faircalib.kernels import cutlass_w4
    from faircalib.kernels.backends import pack_codes
    from faircalib.models.cuda_graph import capture

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    gen = torch.Generator(device="cuda").manual_seed(config)
    w = torch.randn(512, 1024, generator=gen, device="cuda") / 32
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=False))
    codes = quantize(w, qp)
    weight = cutlass_w4.CutlassW4Weight.prepare(
        pack_codes(codes, 4), qp.scale, qp.zero, 128, keep_plain=True
    )
    plain = cutlass_w4.signed_int4(pack_codes(codes, 4))
    w_ref = cutlass_w4.reference_weight(plain, weight.scale, weight.zero, 128)
    lib = cutlass_w4.load_library()
    if config == 0:  # the shuffle (torch) against the kernel's own layout, 2,400 points
        points = torch.Generator().manual_seed(0)
        for n, k in ((16, 64), (128, 256), (512, 1024), (3584, 512), (1024, 4096), (4096, 4096)):
            offsets = cutlass_w4.shuffle_offsets(n, k)
            rows = torch.randint(0, n, (400,), generator=points).tolist()
            cols = torch.randint(0, k, (400,), generator=points).tolist()
            for i, j in zip(rows, cols, strict=True):
                want = lib.fc_w4a16_sm90_shuffled_offset(n, k, i, j)
                assert int(offsets[i, j]) == want, (n, k, i, j)
    assert rel_err(w_ref, dequantize(codes, qp).double()) < 5e-3  # the operands are the weight
    for m in (1, 16, 33, 100, 256, 1000):
        x = torch.randn(m, 1024, generator=gen, device="cuda").to(torch.bfloat16)
        y = cutlass_w4.w4a16_gemm(x, weight, config)
        assert rel_err(y, x.double() @ w_ref.T) < 1e-2, (config, m)
    x = torch.randn(64, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    graph, out = capture(lambda: cutlass_w4.w4a16_gemm(x, weight, config))
    x.copy_(torch.randn(64, 1024, generator=gen, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cutlass_w4.w4a16_gemm(x, weight, config))


@needs_cuda
@pytest.mark.parametrize("config", range(7))
def test_cutlass_int8_gemm_matches_the_exact_integer_product_and_replays_in_a_graph(config):
    """Every tile configuration of the CUTLASS INT8 library against the exact integer product scaled
    in float64 (the kernel's only rounding is the bf16 output), ragged M included."""
    from faircalib.kernels import cutlass_w8a8
    from faircalib.models.cuda_graph import capture

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    gen = torch.Generator(device="cuda").manual_seed(100 + config)
    n, k = 512, 1024
    w8 = torch.randint(-127, 128, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    w_s = torch.rand(n, generator=gen, device="cuda") / 100 + 1e-4
    for m in (1, 7, 100, 256, 1000):
        a8 = torch.randint(-127, 128, (m, k), generator=gen, device="cuda", dtype=torch.int8)
        a_s = torch.rand(m, generator=gen, device="cuda") / 100 + 1e-4
        # float64 holds every integer dot product here exactly (|.| <= 127^2 * 1024 < 2^53);
        # CUDA has no int64 matmul
        exact = (a8.double() @ w8.double().T) * a_s.double()[:, None] * w_s.double()
        y = cutlass_w8a8.int8_scaled_mm(a8, a_s, w8, w_s, config)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-6).all(), (config, m)
    a8 = torch.randint(-127, 128, (64, k), generator=gen, device="cuda", dtype=torch.int8)
    a_s = torch.rand(64, generator=gen, device="cuda") + 0.01
    graph, out = capture(lambda: cutlass_w8a8.int8_scaled_mm(a8, a_s, w8, w_s, config))
    a8.copy_(torch.randint(-127, 128, (64, k), generator=gen, device="cuda", dtype=torch.int8))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cutlass_w8a8.int8_scaled_mm(a8, a_s, w8, w_s, config))


@needs_cuda
@pytest.mark.parametrize("config", range(4))
def test_cutlass_w4a8_gemm_matches_the_float64_group_sums_and_replays_in_a_graph(config):
    """Every tile configuration of the block-scaled FP8 library against float64 sums of the
    e4m3 products, each 128-k group times its own weight scale and the row's activation
    scale. Scales drawn over three decades per row and per (output, group), so a scale read
    from the wrong row, output or group is far outside the tolerance; ragged M included."""
    from faircalib.kernels import cutlass_w4a8
    from faircalib.models.cuda_graph import capture

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    gen = torch.Generator(device="cuda").manual_seed(200 + config)
    n, k, e4m3 = 512, 1024, torch.float8_e4m3fn
    groups = k // cutlass_w4a8.GROUP
    w8 = torch.randint(-15, 16, (n, k), generator=gen, device="cuda").to(e4m3)  # codes - zero
    w_s = 10 ** (3 * torch.rand(n, groups, generator=gen, device="cuda") - 5)

    def want(a8: torch.Tensor, a_s: torch.Tensor) -> torch.Tensor:
        parts = torch.einsum(
            "mgk,ngk->mng", a8.double().view(-1, groups, 128), w8.double().view(n, groups, 128)
        )
        return (parts * w_s.double()).sum(-1) * a_s.double()[:, None]

    def rows(m: int) -> torch.Tensor:  # e4m3 has no infinity: out of range would be NaN
        return (torch.randn(m, k, generator=gen, device="cuda") * 100).clamp(-448, 448).to(e4m3)

    for m in (1, 7, 100, 256, 1000):
        a8 = rows(m)
        a_s = 10 ** (3 * torch.rand(m, generator=gen, device="cuda") - 3)
        y = cutlass_w4a8.fp8_group_scaled_mm(a8, a_s, w8, w_s, config)
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        ref = want(a8, a_s)
        scale = ref.abs().amax(1, keepdim=True)  # per row: the rows' scales span 3 decades
        assert ref.isfinite().all() and ((y.double() - ref).abs() <= 1e-2 * scale).all(), (
            config,
            m,
        )
    a8, a_s = rows(64), torch.rand(64, generator=gen, device="cuda") + 0.01
    graph, out = capture(lambda: cutlass_w4a8.fp8_group_scaled_mm(a8, a_s, w8, w_s, config))
    a8.copy_(rows(64))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cutlass_w4a8.fp8_group_scaled_mm(a8, a_s, w8, w_s, config))


@needs_cuda
@pytest.mark.parametrize(("group", "act_format"), [(128, "fp8"), (None, "fp8"), (128, "int")])
def test_cutlass_w4a8_backend_computes_the_numbers_of_the_triton_w4a8_fp8(
    group, act_format, monkeypatch
):
    """A W4AFP8 layer (act_format "fp8") on `cutlass_w4a8` against the same layer on
    `w4a8_fp8_dq` (the same operands, float32 sums in another order) and against float64 on
    the dequantized weight with the e4m3 activations both quantize to, bias included; the
    layer does not fake-quantize x first (the backend quantizes it once). An INT8-activation
    layer on either backend is fake-quantized to its int8 grid first, then re-rounded to e4m3:
    the two still agree."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    from faircalib.kernels.backends import fp8_quantize

    gen = torch.Generator(device="cuda").manual_seed(7)
    w = torch.randn(768, 1024, generator=gen, device="cuda") / 32
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=group, symmetric=False))
    codes, bias = quantize(w, qp), torch.randn(768, generator=gen, device="cuda")
    layers = {
        name: QuantLinear.from_codes(
            codes, qp, bias=bias, act_bits=8, act_format=act_format, backend=name
        )
        for name in ("cutlass_w4a8", "w4a8_fp8_dq")
    }
    if act_format == "fp8":  # the backends quantize x themselves, once
        _refuse_fake_quantization(monkeypatch)
    x = torch.randn(3, 300, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        y, y_triton = (layers[name](x) for name in ("cutlass_w4a8", "w4a8_fp8_dq"))
    assert y.shape == (3, 300, 768) and y.dtype == torch.bfloat16
    assert rel_err(y, y_triton.double()) < 5e-3
    if act_format == "fp8":
        x8, xs = fp8_quantize(x.reshape(-1, 1024))
        ref = (x8.double() * xs.double()) @ dequantize(codes, qp).double().T + bias.double()
        assert rel_err(y.reshape(-1, 768), ref) < 1e-2


@needs_cuda
def test_cutlass_w4a8_lut_shuffle_formula_is_the_librarys_layout():
    """cutlass_w4a8_lut.shuffle_offsets (the atom tiled in torch) against the library's own
    layout evaluated on the host, at every element of a 64 x 256 weight."""
    from faircalib.kernels import cutlass_w4a8_lut

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    lib = cutlass_w4a8_lut.load_library()
    n, k = 64, 256
    mine = cutlass_w4a8_lut.shuffle_offsets(n, k)
    theirs = torch.tensor(
        [[lib.fc_w4a8_lut_sm90_shuffled_offset(n, k, i, j) for j in range(k)] for i in range(n)]
    )
    assert torch.equal(mine, theirs)


@needs_cuda
@pytest.mark.parametrize("config", range(9))
def test_cutlass_w4a8_lut_gemm_matches_float64_and_replays_in_a_graph(config):
    """Every tile of the lookup-table W4A8 library against the float64 product of the e4m3
    rows and the weight values * output scale * group scale (every value in [-8, 7], group
    scales over seven octaves, output and row scales over three decades, so a table or scale
    read for the wrong group, output or row fails); ragged M."""
    from faircalib.kernels import cutlass_w4a8_lut
    from faircalib.models.cuda_graph import capture

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    gen = torch.Generator(device="cuda").manual_seed(300 + config)
    n, k, group, e4m3 = 512, 1024, 256, torch.float8_e4m3fn
    codes = torch.randint(-8, 8, (n, k), generator=gen, device="cuda", dtype=torch.int8)
    rel = torch.exp2(-torch.randint(0, 7, (n, k // group), generator=gen, device="cuda").float())
    out_scale = 10 ** (3 * torch.rand(n, generator=gen, device="cuda") - 4)
    weight = cutlass_w4a8_lut.LutWeight.prepare(codes, out_scale, rel)
    w = cutlass_w4a8_lut.dequantize_values(codes, out_scale, rel).double()

    def rows(m: int) -> torch.Tensor:
        return (torch.randn(m, k, generator=gen, device="cuda") * 50).clamp(-448, 448).to(e4m3)

    for m in (1, 7, 100, 256, 1000):
        x8 = rows(m)
        x_s = 10 ** (3 * torch.rand(m, generator=gen, device="cuda") - 3)
        y = cutlass_w4a8_lut.gemm(x8, x_s, weight, config)
        ref = (x8.double() * x_s.double()[:, None]) @ w.T
        assert y.dtype == torch.bfloat16 and y.shape == (m, n)
        scale = ref.abs().amax(1, keepdim=True)
        assert ((y.double() - ref).abs() <= 1e-2 * scale).all(), (config, m)
    x8, x_s = rows(64), torch.rand(64, generator=gen, device="cuda") + 0.01
    graph, out = capture(lambda: cutlass_w4a8_lut.gemm(x8, x_s, weight, config))
    x8.copy_(rows(64))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cutlass_w4a8_lut.gemm(x8, x_s, weight, config))


@needs_cuda
def test_cutlass_w4a8_lut_backend_computes_the_numbers_of_the_triton_w4a8_fp8(monkeypatch):
    """A w4a8fp8-e8m0 layer (symmetric, power-of-two scales, bias) on `cutlass_w4a8_lut`
    against the same layer on `w4a8_fp8_dq` and against float64 on the dequantized weight
    with the e4m3 rows both quantize to; x is quantized once (fake quantization refused);
    `auto` takes the backend at every M; the plain codes are freed and read back from the
    kernel's layout unchanged."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    from faircalib.kernels.backends import fp8_quantize

    gen = torch.Generator(device="cuda").manual_seed(8)
    w = torch.randn(768, 1024, generator=gen, device="cuda") / 32
    cfg = QuantConfig(bits=4, group_size=128, symmetric=True, scale_dtype="e8m0")
    qp = compute_qparams(w, cfg)
    codes, bias = quantize(w, qp), torch.randn(768, generator=gen, device="cuda")
    layers = {
        name: QuantLinear.from_codes(
            codes, qp, bias=bias, act_bits=8, act_format="fp8", backend=name
        )
        for name in ("cutlass_w4a8_lut", "w4a8_fp8_dq", "auto")
    }
    _refuse_fake_quantization(monkeypatch)
    x = torch.randn(3, 300, 1024, generator=gen, device="cuda").to(torch.bfloat16)
    with torch.no_grad():
        y, y_triton = (layers[name](x) for name in ("cutlass_w4a8_lut", "w4a8_fp8_dq"))
    assert y.shape == (3, 300, 768) and y.dtype == torch.bfloat16
    assert rel_err(y, y_triton.double()) < 5e-3
    x8, xs = fp8_quantize(x.reshape(-1, 1024))
    ref = (x8.double() * xs.double()) @ dequantize(codes, qp).double().T + bias.double()
    assert rel_err(y.reshape(-1, 768), ref) < 1e-2
    assert torch.equal(layers["cutlass_w4a8_lut"].codes(), codes)  # read from the layout
    auto = layers["auto"]
    for m in (1, 255, 256):
        assert auto.choose_backend("cuda", torch.bfloat16, m) == "cutlass_w4a8_lut"
    asym = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=False))
    other = QuantLinear.from_codes(quantize(w, asym), asym, act_bits=8, act_format="fp8")
    assert other.choose_backend("cuda", torch.bfloat16, 256) == "cutlass_w4a8"


@needs_cuda
def test_cutlass_w4a8_takes_empty_and_strided_inputs():
    """M = 0 returns an empty result without unpacking; a strided activation view gives what
    its contiguous copy gives."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    gen = torch.Generator(device="cuda").manual_seed(9)
    w = torch.randn(256, 512, generator=gen, device="cuda") / 32
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=128, symmetric=False))
    layer = QuantLinear.from_codes(
        quantize(w, qp), qp, act_bits=8, act_format="fp8", backend="cutlass_w4a8"
    )
    with torch.no_grad():
        assert layer(torch.zeros(0, 512, device="cuda", dtype=torch.bfloat16)).shape == (0, 256)
        wide = torch.randn(64, 1024, generator=gen, device="cuda").to(torch.bfloat16)
        strided = wide[:, ::2]  # [64, 512], row stride 1024, column stride 2
        assert torch.equal(layer(strided), layer(strided.contiguous()))


@needs_cuda
@pytest.mark.parametrize(
    ("n", "k", "group"),
    [(4096, 1024, 128), (512, 3584, 128), (1000, 256, None), (300, 1280, 256)],
)
def test_cuda_gemv_matches_the_float64_product_and_replays_in_a_graph(n, k, group):
    """The GEMV against the float64 product with the dequantized weight at every M it takes,
    on a layer that fills the GPU, one that splits K (Dream's K / V), one of ragged rows with
    a single group and one of groups of two steps, each through one and two row tiles a warp,
    K split and not, 4, 8 and 16 warps a block; then a graph replay on new activations equals
    an eager call."""
    from faircalib.kernels import cuda_gemv
    from faircalib.kernels.backends import pack_codes
    from faircalib.models.cuda_graph import capture

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the library is built for sm_90a")
    gen = torch.Generator(device="cuda").manual_seed(n)
    if group == 256:  # groups of two steps (QuantConfig has no g256): codes and grids drawn
        codes = torch.randint(0, 16, (n, k), generator=gen, device="cuda", dtype=torch.uint8)
        scale = torch.rand(n, k // group, generator=gen, device="cuda") / 64 + 1e-3
        zero = torch.randint(0, 16, (n, k // group), generator=gen, device="cuda").float()
        weight = cuda_gemv.GemvWeight.prepare(pack_codes(codes, 4), scale, zero, group)
        grid = lambda t: t.to(torch.bfloat16).double().repeat_interleave(group, 1)  # noqa: E731
        w_hat = (codes.double() - grid(zero)) * grid(scale)  # bf16 scales, as prepare keeps
    else:
        w = torch.randn(n, k, generator=gen, device="cuda") / 32
        qp = compute_qparams(w, QuantConfig(bits=4, group_size=group, symmetric=False))
        codes = quantize(w, qp)
        weight = cuda_gemv.GemvWeight.prepare(pack_codes(codes, 4), qp.scale, qp.zero, group or k)
        w_hat = dequantize(codes, qp).double()
    for m in (1, 2, 3, 5, 8):
        x = torch.randn(m, k, generator=gen, device="cuda").to(torch.bfloat16)
        want = x.double() @ w_hat.T
        # the rules' choice, then every tile count with and without a split of K
        paths = ((None, None, None), (1, 1, 8), (2, 1, 8), (1, 2, 8), (2, 2, 4), (2, 1, 16))
        for tiles, splits, warps in paths:
            y = cuda_gemv.w4a16_gemv(x, weight, tiles, splits, warps)
            assert y.dtype == torch.bfloat16 and y.shape == (m, n)
            assert rel_err(y, want) < 1e-2, (m, n, k, tiles, splits, warps)
    x = torch.randn(1, k, generator=gen, device="cuda").to(torch.bfloat16)
    graph, out = capture(lambda: cuda_gemv.w4a16_gemv(x, weight))
    x.copy_(torch.randn(1, k, generator=gen, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, cuda_gemv.w4a16_gemv(x, weight))
