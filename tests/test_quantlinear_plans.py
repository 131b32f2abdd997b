"""QuantLinear's per-layer plans and kernel layouts in a whole packed model (issues 13, 16).

A packed LLaDA-layout model must prepare each layer's kernel layout once, not per denoising
step; a cast of the model to its compute dtype must not round the scales; and a packed model
loaded in bf16 must run its linears in bf16 like the bf16 model does (else `auto` on CUDA falls
back from triton_dq to the fp32 `dequant` reference: the 10x slower LLaDA-8B step).
"""

from __future__ import annotations

import collections
import dataclasses
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from faircalib import hub
from faircalib.cli import main
from faircalib.config import QuantConfig
from faircalib.formats.packed import load_packed_model
from faircalib.kernels import QuantLinear
from faircalib.kernels import backends as B
from faircalib.quant.primitives import compute_qparams, dequantize, quantize
from llama_like_ckpt import MASK_ID, write_family

SIZES = {"d_model": 128, "mlp_hidden_size": 256}  # K % 128 == 0: the Triton backends run too


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("plans")
    src = write_family(root / "bf16", "llada", **SIZES)
    out = root / "w4"
    args = ["quantize", str(src), "--method", "rtn", "--nsamples", "2", "--seq-len", "32"]
    assert main([*args, "--group-size", "32", "--format", "packed", "--out", str(out)]) == 0
    return {"bf16": src, "packed": out}


@pytest.fixture
def counts(monkeypatch) -> collections.Counter:
    """Counts every backend's `prepare` and every QuantLinear `_forget_plans`."""
    seen: collections.Counter = collections.Counter()
    for name, backend in list(B.BACKENDS.items()):

        def prepare(layer, device, dtype, _inner=backend.prepare, _name=name):  # noqa: ANN001
            seen[f"prepare:{_name}"] += 1
            return _inner(layer, device, dtype)

        monkeypatch.setitem(B.BACKENDS, name, dataclasses.replace(backend, prepare=prepare))
    forget = QuantLinear._forget_plans

    def counted_forget(self) -> None:  # noqa: ANN001
        seen["forget"] += 1
        forget(self)

    monkeypatch.setattr(QuantLinear, "_forget_plans", counted_forget)
    return seen


def canvas() -> torch.Tensor:
    x = torch.randint(0, 256, (1, 48), generator=torch.Generator().manual_seed(0))
    x[:, 24:] = MASK_ID
    return x


def quant_layers(model: torch.nn.Module) -> list[QuantLinear]:
    return [m for m in model.modules() if isinstance(m, QuantLinear)]


@pytest.mark.parametrize(
    ("backend", "dtype", "expect"),
    [
        ("dequant", torch.float32, "dequant"),
        ("int4_cpu", torch.bfloat16, "int4_cpu"),
        ("auto", torch.bfloat16, "int4_cpu"),  # W4_AUTO's CPU row
    ],
)
@torch.no_grad()
def test_each_layer_is_prepared_once_across_steps(checkpoints, counts, backend, dtype, expect):
    model = load_packed_model(checkpoints["packed"], dtype=dtype, backend=backend).to(dtype)
    layers = quant_layers(model)
    assert len(layers) == 2 * 7  # 2 blocks x (q, k, v, o, gate, up, down)
    counts.clear()
    first = model.log_probs(canvas())
    for _ in range(3):
        again = model.log_probs(canvas())
    assert counts == {f"prepare:{expect}": len(layers)}  # once per layer, never forgotten
    assert all(q.last_backend == expect and len(q._plans) == 1 for q in layers)
    assert torch.equal(first, again)  # the cached layouts compute what the first step did


def test_triton_layouts_survive_steps_under_the_interpreter(checkpoints):
    """triton_dq and triton_w4 free the plain codes into their layout on first use; later steps
    must reuse that layout (run in a fresh interpreter: TRITON_INTERPRET=1 before import)."""
    pytest.importorskip("triton")
    check = textwrap.dedent(
        f"""
        import torch
        from faircalib.formats.packed import load_packed_model
        from faircalib.kernels import QuantLinear
        from faircalib.kernels import backends as B
        calls = []
        for name in ("triton_dq", "triton_w4"):
            inner = B.BACKENDS[name].prepare
            def prepare(layer, device, dtype, _inner=inner):
                calls.append(id(layer))
                return _inner(layer, device, dtype)
            B.BACKENDS[name] = B.Backend(**{{**B.BACKENDS[name].__dict__, "prepare": prepare}})
        x = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        x[:, 8:] = {MASK_ID}
        for name in ("triton_dq", "triton_w4"):
            calls.clear()
            model = load_packed_model({str(checkpoints["packed"])!r}, backend=name).half()
            layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
            with torch.no_grad():
                outs = [model.log_probs(x) for _ in range(2)]
            assert sorted(calls) == sorted(id(q) for q in layers), (name, len(calls))
            assert all(q.qweight.numel() == 0 and q.last_backend == name for q in layers)
            assert torch.equal(outs[0], outs[1])
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run(
        [sys.executable, "-c", check], env=env, capture_output=True, text=True, timeout=600
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip().endswith("ok")


def small_layer(bias: bool) -> tuple[QuantLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(32, 128, generator=gen)
    qp = compute_qparams(w, QuantConfig(bits=4, group_size=64, symmetric=False))
    b = torch.randn(32, generator=gen) if bias else None
    layer = QuantLinear.from_codes(quantize(w, qp), qp, bias=b, backend="dequant")
    return layer, dequantize(quantize(w, qp), qp)  # the fake-quant weight, float32


def test_model_cast_keeps_the_scales_float32():
    """model.to(bf16) casts the bias (as nn.Linear's) but must not round W_hat's scales."""
    layer, w_hat = small_layer(bias=True)
    layer.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float32 and layer.zero.dtype == torch.uint8
    assert layer.bias.dtype == torch.bfloat16
    assert torch.equal(layer.dequantized_weight(), w_hat)
    layer.half().float()  # every cast round trip keeps it
    assert torch.equal(layer.dequantized_weight(), w_hat)


def test_model_cast_still_moves_the_scales():
    layer, _ = small_layer(bias=False)
    layer.to("meta", torch.bfloat16)
    assert layer.scale.device.type == "meta" and layer.scale.dtype == torch.float32
    assert layer.qweight.device.type == "meta"


def float_dtypes_outside_quant_linears(model: torch.nn.Module) -> dict[str, torch.dtype]:
    quant = {name for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    return {
        name: t.dtype
        for name, t in [*model.named_parameters(), *model.named_buffers()]
        if t.is_floating_point() and name.rpartition(".")[0] not in quant
    }


@torch.no_grad()
def test_packed_model_loaded_in_bf16_computes_in_bf16(checkpoints):
    dense = hub.load(checkpoints["bf16"], dtype=torch.bfloat16)
    packed = hub.load(checkpoints["packed"], dtype=torch.bfloat16)
    dense_dtypes = float_dtypes_outside_quant_linears(dense)
    packed_dtypes = float_dtypes_outside_quant_linears(packed)
    shared = dense_dtypes.keys() & packed_dtypes.keys()
    assert shared and {packed_dtypes[k] for k in shared} == {dense_dtypes[k] for k in shared}
    seen: set[torch.dtype] = set()
    for layer in quant_layers(packed):
        layer.register_forward_hook(lambda m, inp, out: seen.add(inp[0].dtype))
    packed.log_probs(canvas())
    assert seen == {torch.bfloat16}
