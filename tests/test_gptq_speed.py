"""The fast GPTQ paths against the reference column loop: the fused Triton sweep (run by
Triton's CPU interpreter) against the torch loop, and the row-stacked `quantize_gptq_many`
against separate `quantize_gptq` calls. Both must give the same codes, bit for bit: rows are
independent given the Hessian, and the kernel performs the torch loop's float32 operations in
the same order (IEEE division, no FMA contraction)."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from faircalib.config import GPTQConfig
from faircalib.errors import ConfigError
from faircalib.quant import LayerInputs, quantize_gptq
from faircalib.quant.gptq import (
    group_shared_hessians,
    quantize_gptq_many,
    triton_sweep_available,
)


def _inputs(n_in: int, seed: int, weighted: bool = False) -> LayerInputs:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2 * n_in, n_in, generator=g) @ (torch.randn(n_in, n_in, generator=g) / 8)
    x[:, 5] *= 8.0  # an outlier input that act_order moves to the front
    x[:, n_in // 3] = 0.0  # a dead input
    row_w = torch.rand(2 * n_in, generator=g) if weighted else None
    return LayerInputs.from_rows(x, row_w)


CONFIGS = [
    GPTQConfig(bits=4, group_size=32, act_order=False),  # dynamic groups inside a lazy block
    GPTQConfig(bits=4, group_size=64, act_order=True, scale_dtype="bfloat16"),  # static groups
    GPTQConfig(bits=3, group_size=None, act_order=True, symmetric=True),  # per-channel
    GPTQConfig(bits=8, group_size=None, act_order=False, block_size=96),  # ragged last block
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"w{c.bits}g{c.group_size}ao{c.act_order}")
def test_stacked_gptq_equals_separate_calls(cfg):
    """q/k/v-like weights of different heights sharing one input: one sweep, same results."""
    g = torch.Generator().manual_seed(1)
    n_in = 192
    inputs = _inputs(n_in, seed=2, weighted=True)
    weights = [torch.randn(rows, n_in, generator=g) * 0.05 for rows in (40, 24, 57)]
    stacked = quantize_gptq_many(weights, inputs, cfg, names=["q", "k", "v"], sweep="torch")
    for weight, res in zip(weights, stacked, strict=True):
        alone = quantize_gptq(weight, inputs, cfg, sweep="torch")
        assert torch.equal(res.codes, alone.codes)
        assert torch.equal(res.weight, alone.weight)
        assert torch.equal(res.qparams.scale, alone.qparams.scale)
        assert torch.equal(res.qparams.zero, alone.qparams.zero)
        assert res.info["damp"] == alone.info["damp"]
        assert res.info["gptq_loss"] == pytest.approx(alone.info["gptq_loss"], rel=1e-6)


def test_linears_reading_one_input_are_grouped():
    """Statistics of the same rows give bit-identical Hessians; other rows (or the same rows
    with other weights) do not, so they are never stacked."""
    same = _inputs(64, seed=6)
    names = {
        "q": same,
        "o": _inputs(64, seed=7),
        "k": _inputs(64, seed=6),
        "v": same,
        "down": _inputs(128, seed=6),
        "weighted": _inputs(64, seed=6, weighted=True),
    }
    assert group_shared_hessians(names) == [["q", "k", "v"], ["o"], ["down"], ["weighted"]]


def test_stacking_rejects_weights_of_other_widths():
    inputs = _inputs(64, seed=5)
    with pytest.raises(ConfigError, match="input width"):
        cfg = GPTQConfig(group_size=32)
        quantize_gptq_many([torch.zeros(4, 64), torch.zeros(4, 32)], inputs, cfg)
    with pytest.raises(ConfigError, match="sweep"):
        quantize_gptq(torch.zeros(4, 64), inputs, GPTQConfig(group_size=32), sweep="numba")


def test_auto_sweep_uses_the_kernel_only_on_cuda():
    assert not triton_sweep_available(torch.device("cpu"), 128)
    assert not triton_sweep_available(torch.device("cuda"), 512)  # tile too wide


# Run in a fresh interpreter: TRITON_INTERPRET must be set before triton decorates the kernel.
INTERPRETED_CHECK = textwrap.dedent(
    """
    import torch
    from faircalib.config import GPTQConfig
    from faircalib.quant import LayerInputs, quantize_gptq
    from faircalib.quant.gptq import quantize_gptq_many

    gen = torch.Generator().manual_seed(0)
    for n_out, n_in, cfg in (
        (37, 128, GPTQConfig(bits=4, group_size=32, act_order=False)),
        (37, 128, GPTQConfig(bits=4, group_size=64, act_order=True, scale_dtype="bfloat16")),
        (9, 160, GPTQConfig(bits=3, group_size=None, act_order=True, symmetric=True)),
        (20, 192, GPTQConfig(bits=8, group_size=None, act_order=False, block_size=96)),
        # the widest tile the kernel takes (256 columns, 8 rows a program), ragged last block
        (19, 300, GPTQConfig(bits=4, group_size=None, act_order=True, block_size=256)),
        # dynamic groups of 128 inside 256-wide lazy blocks
        (19, 256, GPTQConfig(bits=4, group_size=128, act_order=False, block_size=256)),
    ):
        x = torch.randn(2 * n_in, n_in, generator=gen) @ torch.randn(n_in, n_in, generator=gen)
        x[:, 3] *= 10.0
        x[:, 7] = 0.0
        inputs = LayerInputs.from_rows(x)
        w = torch.randn(n_out, n_in, generator=gen) * 0.05
        ref = quantize_gptq(w, inputs, cfg, sweep="torch")
        fused = quantize_gptq(w, inputs, cfg, sweep="triton")
        assert torch.equal(fused.codes, ref.codes), cfg
        assert torch.equal(fused.weight, ref.weight), cfg
        assert torch.equal(fused.qparams.scale, ref.qparams.scale), cfg
        assert fused.info["gptq_loss"] == ref.info["gptq_loss"], cfg
    # stacked through the kernel: programs own row slices, so stacking changes nothing
    parts = [w[:11], w[11:]]
    for res, part in zip(quantize_gptq_many(parts, inputs, cfg, sweep="triton"), parts):
        assert torch.equal(res.codes, quantize_gptq(part, inputs, cfg, sweep="torch").codes)
    print("ok")
    """
)


def test_fused_sweep_matches_the_torch_loop_under_the_interpreter():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-c", INTERPRETED_CHECK], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().endswith("ok")
