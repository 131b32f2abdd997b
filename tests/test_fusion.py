"""faircalib.fusion and the LLaMA-style block's fused elementwise chains.

CPU: when fusion is on or off (it never is on the CPU, nor where a gradient is needed), and the
chains themselves against independent formulas (torch's own rms_norm, rotary written out pair
by pair). GPU (skipped in CI, recorded on the device): the compiled chains and a whole LLaDA
block against the eager ones, and a CUDA graph of the fused block.
"""

import pytest
import torch
import torch.nn.functional as F

from faircalib import fusion
from faircalib.models.base import BlockContext
from faircalib.models.llada import LLaDA
from faircalib.models.llama_like import (
    LlamaLikeBlock,
    LlamaSpec,
    rms_norm,
    rotary_qk,
    rotary_tables,
    swiglu,
)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _double(x: torch.Tensor) -> torch.Tensor:
    return 2 * x


def test_fused_is_eager_on_the_cpu_inside_eager_and_where_gradients_flow(monkeypatch):
    monkeypatch.delenv("FAIRCALIB_NO_COMPILE", raising=False)
    assert fusion.fused(_double, "cpu") is _double
    # a CUDA lookup builds the compiled wrapper (nothing runs yet) - except inside eager()
    assert fusion.fused(_double, "cuda") is not _double
    with fusion.eager():
        assert fusion.fused(_double, "cuda") is _double
    assert fusion.fused(_double, "cuda") is not _double  # the context restores it
    w = torch.ones(3, requires_grad=True)
    assert fusion.fused_for_inference(_double, torch.ones(3), w) is _double  # cpu anyway
    x_meta = torch.empty(3, device="meta")  # device type "meta": never compiled
    assert fusion.fused_for_inference(_double, x_meta) is _double


def test_fused_for_inference_skips_compilation_when_a_gradient_is_needed(monkeypatch):
    """Pretend every device is CUDA: with grad enabled and a tensor requiring it, the eager
    function comes back; under no_grad the compiled wrapper does."""
    seen = []
    monkeypatch.setattr(fusion, "fused", lambda fn, device_type: seen.append(device_type) or "c")
    w = torch.ones(3, requires_grad=True)
    assert fusion.fused_for_inference(_double, torch.ones(3), w) is _double
    with torch.no_grad():
        assert fusion.fused_for_inference(_double, torch.ones(3), w) == "c"
    assert fusion.fused_for_inference(_double, torch.ones(3)) == "c"  # nothing needs a grad
    assert seen == ["cpu", "cpu"]


def test_no_compile_flag_and_a_failed_compile_give_eager_results(monkeypatch):
    """FAIRCALIB_NO_COMPILE=1 returns the eager function; a compiler that raises (stood in for
    on the CPU) gives the eager result with one warning, and eager for good after it."""
    monkeypatch.setattr(fusion, "_compiled", {})
    monkeypatch.setattr(fusion, "_compile_failed", set())
    monkeypatch.setenv("FAIRCALIB_NO_COMPILE", "1")
    assert fusion.fused(_double, "cuda") is _double
    monkeypatch.delenv("FAIRCALIB_NO_COMPILE")

    def broken_compile(fn, dynamic=None):
        def run(*args):
            raise RuntimeError("inductor failed")

        return run

    monkeypatch.setattr(fusion.torch, "compile", broken_compile)
    x = torch.arange(4.0)
    with pytest.warns(UserWarning, match="torch.compile of _double failed"):
        assert torch.equal(fusion.fused(_double, "cuda")(x), torch.tensor([0.0, 2, 4, 6]))
    assert fusion.fused(_double, "cuda") is _double


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_torch(dtype: torch.dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(4, 7, 64, generator=gen) * 3).to(dtype)
    w = torch.randn(64, generator=gen).to(dtype)
    ref = w * F.rms_norm(x.float(), (64,), eps=1e-5).to(dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-5), ref, rtol=0, atol=0)


def test_rotary_qk_rotates_each_pair_by_its_angle():
    """Rotate-half rotary: dims (i, i + hd/2) of position l turn by angle l * theta^(-2i/hd)."""
    b, h, seq, hd = 2, 3, 5, 8
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(b, h, seq, hd, generator=gen), torch.randn(b, h, seq, hd, generator=gen)
    cos, sin = rotary_tables(seq, hd, 10000.0, torch.device("cpu"))
    q2, k2 = rotary_qk(q, k, cos, sin)
    for x, y in ((q, q2), (k, k2)):
        for pos in range(seq):
            for i in range(hd // 2):
                angle = torch.tensor(pos * 10000.0 ** (-2 * i / hd), dtype=torch.float64)
                a, c = x[..., pos, i].double(), x[..., pos, i + hd // 2].double()
                want_a = a * angle.cos() - c * angle.sin()
                want_c = c * angle.cos() + a * angle.sin()
                torch.testing.assert_close(y[..., pos, i].double(), want_a, rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(
                    y[..., pos, i + hd // 2].double(), want_c, rtol=1e-5, atol=1e-6
                )


def test_swiglu_is_silu_gate_times_up():
    g, u = torch.tensor([-2.0, 0.0, 1.5]), torch.tensor([3.0, -1.0, 2.0])
    want = g / (1 + torch.exp(-g)) * u
    torch.testing.assert_close(swiglu(g, u), want)


def _llada_block(hidden: int, heads: int, mlp: int, device: str) -> LlamaLikeBlock:
    spec = LlamaSpec(
        vocab_size=100, mask_id=99, seq_len=64, hidden=hidden, n_layers=1, n_heads=heads,
        n_kv_heads=heads, intermediate=mlp, rope_theta=500000.0, rms_eps=1e-5, qkv_bias=False,
        tie_embeddings=False, shift_logits=False,
    )  # fmt: skip
    torch.manual_seed(0)
    block = LlamaLikeBlock(spec, LLaDA.NAMES.block)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 1 / p.shape[-1] ** 0.5) if p.dim() == 2 else p.uniform_(0.5, 1.5)
    return block.to(device, torch.bfloat16)


@needs_cuda
def test_fused_chains_match_eager_on_the_gpu():
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(3, 200, 512, generator=gen, device="cuda", dtype=torch.bfloat16) * 4
    w = torch.rand(512, generator=gen, device="cuda", dtype=torch.bfloat16) + 0.5
    with torch.no_grad():
        got = fusion.fused_for_inference(rms_norm, x, w)(x, w, 1e-5)
    ref = w.double() * F.rms_norm(x.double(), (512,), eps=1e-5)
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-2  # bf16 rounding only
    qkv = torch.randn(3, 200, 3, 8, 64, generator=gen, device="cuda", dtype=torch.bfloat16)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # strided views
    cos, sin = rotary_tables(200, 64, 500000.0, torch.device("cuda"))
    with torch.no_grad():
        fq, fk = fusion.fused_for_inference(rotary_qk, q, k)(q, k, cos, sin)
    eq, ek = rotary_qk(q, k, cos, sin)
    torch.testing.assert_close(fq, eq, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fk, ek, rtol=1e-2, atol=1e-2)
    g, u = x[..., :256], x[..., 256:]
    with torch.no_grad():
        torch.testing.assert_close(fusion.fused_for_inference(swiglu, g, u)(g, u), swiglu(g, u))


@needs_cuda
def test_fused_llada_block_matches_eager_and_replays_from_a_cuda_graph():
    from faircalib.models.cuda_graph import capture

    block = _llada_block(512, 8, 1024, "cuda")
    cos, sin = rotary_tables(128, 64, 500000.0, torch.device("cuda"))
    ctx = BlockContext({"rotary_cos": cos, "rotary_sin": sin})
    gen = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(2, 128, 512, generator=gen, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        with fusion.eager():
            ref = block(h, ctx).double()
        got = block(h, ctx)
        assert float((got.double() - ref).norm() / ref.norm()) < 1e-2
        graph, out = capture(lambda: block(h, ctx))
        h.copy_(torch.randn(2, 128, 512, generator=gen, device="cuda", dtype=torch.bfloat16))
        graph.replay()
        with fusion.eager():
            ref2 = block(h, ctx).double()
    assert float((out.double() - ref2).norm() / ref2.norm()) < 1e-2  # the graph read the new h
