"""The fused Triton dequant GEMM (optional dependency), run by Triton's CPU interpreter."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

# The interpreter must be switched on before triton decorates the kernel, so the check runs
# in a fresh interpreter. It has no bfloat16: fp16 and fp32 inputs stand in for it.
CHECK = textwrap.dedent(
    """
    import torch
    from faircalib.config import QuantConfig
    from faircalib.kernels import QuantLinear
    from faircalib.quant.primitives import compute_qparams, dequantize, quantize

    worst = 0.0
    cases = [(5, 64, 128, 32, False), (33, 96, 256, 128, True), (3, 64, 256, None, False),
             (17, 48, 192, 64, True)]
    for i, (m, n, k, group, sym) in enumerate(cases):
        gen = torch.Generator().manual_seed(i)
        w = torch.randn(n, k, generator=gen)
        qp = compute_qparams(w, QuantConfig(bits=4, group_size=group, symmetric=sym))
        codes = quantize(w, qp)
        layer = QuantLinear.from_codes(codes, qp, backend="triton_w4")
        for dtype in (torch.float16, torch.float32):
            x = torch.randn(m, k, generator=gen).to(dtype)
            y = layer(x)
            assert layer.last_backend == "triton_w4" and y.dtype == dtype
            ref = x.double() @ dequantize(codes, qp).double().T
            worst = max(worst, float((y.double() - ref).norm() / ref.norm()))
    print(worst)
    """
)


def test_fused_w4_kernel_matches_reference_under_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", CHECK],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    worst = float(done.stdout.strip().splitlines()[-1])
    assert worst <= 1e-3  # fp16 inputs and outputs, fp32 accumulation
