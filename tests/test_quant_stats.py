"""Layer input statistics: weighted Hessian, sampling, determinism, output error helper."""

import pytest
import torch

from faircalib.errors import CheckpointError, DataError
from faircalib.quant.stats import (
    LayerInputs,
    LayerInputsAccumulator,
    split_bf16,
    weighted_output_error,
)


def _rows(seed: int = 0, n: int = 600, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ torch.randn(d, d, generator=g)  # correlated
    w = torch.rand(n, generator=g) * 3.0
    w[::7] = 0.0  # some rows carry no weight
    return x, w


def _stream(x, w, batch: int, max_rows: int = 100, seed: int = 0) -> LayerInputs:
    acc = LayerInputsAccumulator(x.shape[-1], max_rows, seed, "cpu")
    for i in range(0, x.shape[0], batch):
        acc.add(x[i : i + batch], None if w is None else w[i : i + batch])
    return acc.finish()


def test_weighted_hessian_and_means_match_explicit_formulas():
    x, w = _rows()
    st = _stream(x.reshape(10, 60, 32), w.reshape(10, 60), batch=3)  # [B, L, in] batches
    x64, w64 = x.double(), w.double()
    h = (x64.T * w64) @ x64 / w64.sum()
    assert torch.allclose(st.hessian.double(), h, rtol=1e-5, atol=1e-5 * float(h.abs().max()))
    absmean = (w64[:, None] * x64.abs()).sum(0) / w64.sum()
    assert torch.allclose(st.act_absmean.double(), absmean, rtol=1e-5)
    mean = (w64[:, None] * x64).sum(0) / w64.sum()
    assert torch.allclose(st.mean.double(), mean, rtol=1e-5, atol=1e-6)
    # abs-max is over ALL rows, zero-weight ones included.
    assert torch.equal(st.act_absmax, x.abs().amax(0))
    assert st.n_rows == 600


def test_unit_weights_equal_unweighted():
    x, _ = _rows(1)
    a = _stream(x, None, batch=128)
    b = _stream(x, torch.ones(600), batch=128)
    assert torch.equal(a.hessian, b.hessian)
    assert torch.equal(a.sample, b.sample)
    assert torch.allclose(a.hessian.double(), x.double().T @ x.double() / 600, rtol=1e-5, atol=1e-4)
    assert bool((a.sample_weights == 1.0).all())


def test_sample_is_deterministic_uniform_and_skips_zero_weight_rows():
    x, w = _rows(2)
    a = _stream(x, w, batch=50)
    b = _stream(x, w, batch=333)  # batch sizes do not change the sample
    c = _stream(x, w, batch=50, seed=1)
    assert torch.equal(a.sample, b.sample) and torch.equal(a.sample_weights, b.sample_weights)
    assert not torch.equal(a.sample, c.sample)
    assert a.sample.shape == (100, 32)
    assert abs(float(a.sample_weights.mean()) - 1.0) < 1e-5
    # Every sampled row is a real row with positive weight, and its weight travels with it.
    match = (a.sample[:, None, :] == x[None, :, :]).all(-1)  # [100, 600]
    idx = match.float().argmax(1)
    assert bool(match.any(1).all())
    assert bool((w[idx] > 0).all())
    ratio = a.sample_weights / w[idx]
    assert float(ratio.max() - ratio.min()) < 1e-5
    # Uniform: sampled rows are spread over the stream (not just its start or end).
    assert 150 < float(idx.float().mean()) < 450
    # Fewer rows than the budget: all positive-weight rows are kept.
    assert _stream(x, w, batch=50, max_rows=10_000).sample.shape[0] == int((w > 0).sum())


def test_bad_rows_raise():
    acc = LayerInputsAccumulator(8, 10, 0, "cpu")
    with pytest.raises(DataError, match="features"):
        acc.add(torch.randn(4, 9))
    with pytest.raises(DataError, match=">= 0"):
        acc.add(torch.randn(4, 8), torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(DataError, match="do not match"):
        acc.add(torch.randn(4, 8), torch.ones(5))
    bad = torch.randn(4, 8)
    bad[1, 2] = float("inf")
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        acc.add(bad)
    acc.add(torch.randn(4, 8), torch.zeros(4))
    with pytest.raises(DataError, match="positive weight"):
        acc.finish()


def test_weighted_output_error_matches_hand_computation():
    x, w = _rows(3)
    st = LayerInputs.from_rows(x, w, max_sample_rows=10_000)  # the sample is every weighted row
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=g)
    noisy = weight + 0.01 * torch.randn(16, 32, generator=g)
    keep = w > 0
    xs, ws = x[keep].double(), w[keep].double()
    num = (ws * ((xs @ (weight - noisy).double().T) ** 2).sum(1)).sum()
    den = (ws * ((xs @ weight.double().T) ** 2).sum(1)).sum()
    got = weighted_output_error(noisy, weight, st)
    assert abs(got - float(num / den)) < 1e-4 * float(num / den)
    assert weighted_output_error(weight, weight, st) == 0.0
    s = torch.rand(32, generator=g) + 0.5
    assert weighted_output_error(weight * s, weight, st, input_scale=s) < 1e-10


def test_split_bf16_is_exact():
    """Three bf16 pieces reproduce any normal float32 exactly (the weighted GPU Gram path)."""
    g = torch.Generator().manual_seed(0)
    v = torch.randn(50_000, generator=g) * torch.logspace(-30, 30, 50_000)
    v = torch.cat([v, torch.tensor([1.0 + 2**-23, -(2.0**-126), 1e38, 0.0])])
    pieces = list(split_bf16(v))
    assert len(pieces) == 3
    assert all(p.dtype == torch.bfloat16 for p in pieces)
    total = sum(p.double() for p in pieces)
    assert torch.equal(total, v.double())


def test_split_bf16_frees_its_input_after_the_first_residual():
    """The weighted GPU Gram passes w * rows as a temporary: the generator must not keep that
    float32 [N, in] tensor alive through the second residual (a copy more at the peak)."""
    import weakref

    v = torch.randn(1000, generator=torch.Generator().manual_seed(2))
    expected = v.clone()
    alive = weakref.ref(v)
    pieces = split_bf16(v)
    del v  # as gram_matrix's temporary: only the generator could still hold it
    first = next(pieces)
    second = next(pieces)  # the first residual exists: the input is no longer needed
    assert alive() is None
    total = first.double() + second.double() + next(pieces).double()
    assert torch.equal(total, expected.double())  # and the split is still exact


def test_cpu_gram_is_the_float32_product():
    """On the CPU the batch Gram matrix is rows^T (w * rows) in float32, bit for bit, for
    16-bit rows as for float32 ones (the tensor-core path is CUDA only)."""
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x = torch.randn(300, 24, generator=g).to(dtype)
        for row_w in (None, torch.rand(300, generator=g)):
            acc = LayerInputsAccumulator(24, 16, seed=0, device="cpu")
            batch = acc.summarise(x, row_w)
            rows = x.float()
            w = torch.ones(300) if row_w is None else row_w
            assert torch.equal(batch.gram, rows.T @ (w[:, None] * rows))
