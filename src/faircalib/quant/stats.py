"""Statistics of one linear layer's inputs, gathered in a stream of calibration batches.

Every input row x_r (one token's activation) carries a weight w_r >= 0; FAIR-Calib uses the
weights to emphasise tokens that matter at inference, plain methods use w_r = 1. All methods
see the rows only through `LayerInputs`:

* the row-weighted second moment H = sum_r w_r x_r x_r^T / sum_r w_r (GPTQ's Hessian, up to
  GPTQ's constant factor 2, which cancels: damping is relative to mean(diag H));
* a uniform random sample of rows with their weights, for searches that need real rows
  (AWQ scales and clipping, per-layer error logs);
* per-channel abs-max (unweighted: SmoothQuant must cover every value it will see) and
  row-weighted abs-mean (AWQ's channel salience);
* the row-weighted mean m = sum_r w_r x_r / sum_r w_r (with H, the second moment of shifted
  rows x - z follows exactly: H - m z^T - z m^T + z z^T).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from faircalib.errors import CheckpointError, DataError
from faircalib.quant.primitives import quantize_activations_per_token


@dataclass
class LayerInputs:
    """Statistics of one linear layer's input rows x, weighted per row by w_r >= 0."""

    hessian: torch.Tensor  # [in, in] float32: sum_r w_r x_r x_r^T / sum_r w_r
    sample: torch.Tensor  # [n, in] float32: uniform random subset of rows with w_r > 0
    sample_weights: torch.Tensor  # [n] float32, the sampled rows' weights scaled to mean 1
    act_absmax: torch.Tensor  # [in]: max_r |x_r| over all rows (unweighted)
    act_absmean: torch.Tensor  # [in]: sum_r w_r |x_r| / sum_r w_r
    n_rows: int
    mean: torch.Tensor | None = None  # [in]: sum_r w_r x_r / sum_r w_r (None: not gathered)

    @property
    def in_features(self) -> int:
        return self.hessian.shape[0]

    def to(self, device: torch.device | str) -> LayerInputs:
        return LayerInputs(
            self.hessian.to(device),
            self.sample.to(device),
            self.sample_weights.to(device),
            self.act_absmax.to(device),
            self.act_absmean.to(device),
            self.n_rows,
            None if self.mean is None else self.mean.to(device),
        )

    @classmethod
    def from_rows(
        cls,
        x: torch.Tensor,
        row_weights: torch.Tensor | None = None,
        max_sample_rows: int = 4096,
        seed: int = 0,
    ) -> LayerInputs:
        """All statistics from rows held in memory at once ([..., in])."""
        acc = LayerInputsAccumulator(x.shape[-1], max_sample_rows, seed, x.device)
        acc.add(x, row_weights)
        return acc.finish()


@dataclass
class RowBatch:
    """One batch of a layer's input rows, summarised: what `LayerInputsAccumulator.fold` adds."""

    n_rows: int
    absmax: torch.Tensor  # [in] float32: max_r |x_r|
    weight_sum: float  # sum_r w_r, in float64
    abs_sum: torch.Tensor  # [in] float32: sum_r w_r |x_r|
    gram: torch.Tensor  # [in, in] float32: sum_r w_r x_r x_r^T
    rows: torch.Tensor  # [n_rows, in] float32, the rows themselves (for the sample)
    weights: torch.Tensor  # [n_rows] float32
    row_sum: torch.Tensor | None = None  # [in] float32: sum_r w_r x_r

    def candidates(
        self, keys: torch.Tensor, limit: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, rows, weights) of the rows that may enter a bottom-`limit` sample: rows with
        w > 0 (zero-weight rows carry no loss, so they would waste sample slots) and, with a
        limit, only keys up to the batch's limit-th smallest - no other row can be among the
        `limit` smallest keys overall. Batch order is kept (ties at the cut stay in)."""
        keep = self.weights > 0
        keys, rows, weights = keys[keep], self.rows[keep], self.weights[keep]
        if limit is not None and keys.shape[0] > limit:
            cut = keys <= torch.kthvalue(keys.cpu(), limit).values.to(keys.device)
            keys, rows, weights = keys[cut], rows[cut], weights[cut]
        return keys, rows, weights


class LayerInputsAccumulator:
    """Streaming builder of `LayerInputs`; deterministic for a seed on any device.

    The Hessian is accumulated in float64 (each batch's Gram matrix is formed in float32,
    then added to a float64 sum) so thousands of batches do not lose small contributions.
    Sampling is bottom-k: every row with positive weight gets a uniform random key from a
    seeded CPU generator and the `max_sample_rows` smallest keys are kept, which is a uniform
    sample without replacement whatever the batch sizes.
    """

    def __init__(self, in_features: int, max_sample_rows: int, seed: int, device) -> None:
        if max_sample_rows < 1:
            raise DataError(f"max_sample_rows must be >= 1, got {max_sample_rows}")
        self.in_features = in_features
        self.max_sample_rows = max_sample_rows
        self.device = torch.device(device)
        self._gen = torch.Generator().manual_seed(seed)
        self._h = torch.zeros(in_features, in_features, dtype=torch.float64, device=self.device)
        self._abs_sum = torch.zeros(in_features, dtype=torch.float64, device=self.device)
        self._row_sum: torch.Tensor | None = torch.zeros_like(self._abs_sum)
        self._absmax = torch.zeros(in_features, dtype=torch.float32, device=self.device)
        self._weight_sum = 0.0
        self._n_rows = 0
        self._sample = torch.zeros(0, in_features, device=self.device)  # [k, in]
        self._sample_w = torch.zeros(0, device=self.device)  # [k]
        self._keys = torch.zeros(0, device=self.device)  # [k]

    def add(self, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> None:
        """x: [..., in] activations; row_weights: [...] (x's leading shape) or None for ones."""
        batch = self.summarise(x, row_weights)
        self.fold(batch, *batch.candidates(self.draw_keys(batch.n_rows)))

    # `add` in three steps, so data-parallel calibration (faircalib.calib.dataparallel) can
    # summarise a batch on one rank and fold it into every rank's accumulator in batch order:
    # folding the same summaries in the same order gives the same bits as one process.
    def summarise(self, x: torch.Tensor, row_weights: torch.Tensor | None = None) -> RowBatch:
        """One batch's sums (x: [..., in], row_weights: x's leading shape or None)."""
        if x.shape[-1] != self.in_features:
            raise DataError(f"expected rows of {self.in_features} features, got {tuple(x.shape)}")
        flat = x.detach().reshape(-1, self.in_features).to(self.device)  # [N, in], own dtype
        rows = flat.float()  # [N, in]
        w = self._row_weights(row_weights, x.shape[:-1], rows.shape[0])  # [N]
        if not torch.isfinite(rows).all():
            raise CheckpointError("layer inputs contain NaN or Inf: the float model is unstable")
        return RowBatch(
            n_rows=rows.shape[0],
            absmax=rows.abs().amax(dim=0),
            weight_sum=float(w.double().sum()),
            abs_sum=(w[:, None] * rows.abs()).sum(dim=0),
            gram=gram_matrix(flat, rows, w, unweighted=bool((w == 1).all())),
            rows=rows,
            weights=w,
            row_sum=(w[:, None] * rows).sum(dim=0),
        )

    def draw_keys(self, n_rows: int) -> torch.Tensor:
        """The next `n_rows` sampling keys of the seeded stream: [n_rows] on the device.
        Keys are drawn for every row (not only w > 0) so the random stream, and hence the
        sample, does not depend on which rows happen to have zero weight."""
        return torch.rand(n_rows, generator=self._gen).to(self.device)

    def fold(
        self, batch: RowBatch, keys: torch.Tensor, rows: torch.Tensor, weights: torch.Tensor
    ) -> None:
        """Add a batch's sums, then offer its sample candidates (keys [c], rows [c, in],
        weights [c]: rows with w > 0, possibly only those that can still enter the sample)."""
        self._n_rows += batch.n_rows
        self._absmax = torch.maximum(self._absmax, batch.absmax)
        self._weight_sum += batch.weight_sum
        self._abs_sum += batch.abs_sum.double()
        if batch.row_sum is None or self._row_sum is None:  # a summary without it: no mean
            self._row_sum = None
        else:
            self._row_sum += batch.row_sum.double()
        self._h += batch.gram.double()  # [in, in]
        self._update_sample(keys, rows, weights)

    def _row_weights(self, row_weights: torch.Tensor | None, lead_shape, n: int) -> torch.Tensor:
        if row_weights is None:
            return torch.ones(n, device=self.device)
        if tuple(row_weights.shape) != tuple(lead_shape):
            raise DataError(
                f"row weights of shape {tuple(row_weights.shape)} "
                f"do not match rows of shape {tuple(lead_shape)}"
            )
        w = row_weights.detach().reshape(-1).to(self.device, torch.float32)
        if not torch.isfinite(w).all() or (w < 0).any():
            raise DataError("row weights must be finite and >= 0")
        return w

    def _update_sample(self, keys: torch.Tensor, rows: torch.Tensor, w: torch.Tensor) -> None:
        keys_all = torch.cat([self._keys, keys])
        rows_all = torch.cat([self._sample, rows])
        w_all = torch.cat([self._sample_w, w])
        k = min(self.max_sample_rows, keys_all.shape[0])
        idx = torch.topk(keys_all, k, largest=False, sorted=True).indices
        self._keys, self._sample, self._sample_w = keys_all[idx], rows_all[idx], w_all[idx]

    def finish(self) -> LayerInputs:
        if self._weight_sum <= 0:
            raise DataError(f"no calibration rows with positive weight ({self._n_rows} rows seen)")
        sample_w = self._sample_w / self._sample_w.mean()
        return LayerInputs(
            hessian=(self._h / self._weight_sum).float(),
            sample=self._sample.clone(),
            sample_weights=sample_w,
            act_absmax=self._absmax.clone(),
            act_absmean=(self._abs_sum / self._weight_sum).float(),
            n_rows=self._n_rows,
            mean=None if self._row_sum is None else (self._row_sum / self._weight_sum).float(),
        )


def gram_matrix(
    x: torch.Tensor, rows: torch.Tensor, w: torch.Tensor, *, unweighted: bool
) -> torch.Tensor:
    """sum_r w_r x_r x_r^T [in, in] in float32. x: [N, in] rows in their own dtype, rows: the
    same rows in float32 (same device), w: [N] float32 weights (`unweighted`: all ones).

    The CPU computes rows.T @ (w * rows) in float32, as always. On CUDA, bf16/fp16 rows go to
    the tensor cores with the same result up to summation order. (Why: a LLaDA-8B block's four
    distinct Gram matrices at 128 x 2048 tokens are ~105 TFLOP, ~1.6 s at an H200's float32
    SIMT rate against ~0.1 s in bf16; an estimate, not a measurement.)
    * unweighted: x.T @ x with 16-bit inputs and float32 output and accumulation. A product
      of two bf16 (8-bit significands) or fp16 (11-bit) values is exact in float32; what
      differs from the float32 GEMM is the summation, which the tensor cores do in float32
      without IEEE round-to-nearest: 0.7-1.4e-5 relative error against float64 on an H200
      (tests/test_cuda.py), against ~1e-7 for the CPU's float32 GEMM - far below the GPTQ
      damping (1% of the mean diagonal) and below one bf16 rounding of the rows (1.4e-4).
    * weighted bf16 rows: v = w * x (float32, 24-bit significand) is split exactly into three
      bf16 pieces v1 + v2 + v3 (round to nearest leaves <= 16, then <= 8 significant bits)
      and x.T @ v = x.T @ v1 + x.T @ v2 + x.T @ v3, three bf16 GEMMs whose products are again
      exact, so the error is the tensor cores' summation again (bounded against float64 in
      tests/test_cuda.py). Weighted fp16 rows keep the float32 GEMM.
    """
    on_tensor_cores = rows.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
    if not on_tensor_cores or not (unweighted or x.dtype == torch.bfloat16):
        return rows.T @ (w[:, None] * rows)
    if unweighted:
        return torch.mm(x.T, x, out_dtype=torch.float32)
    gram = None
    for piece in split_bf16(w[:, None] * rows):  # one bf16 piece alive at a time
        part = torch.mm(x.T, piece, out_dtype=torch.float32)
        gram = part if gram is None else gram.add_(part)
    return gram


def split_bf16(v: torch.Tensor) -> Iterator[torch.Tensor]:
    """Float32 v as three bf16 tensors whose float32 sum is exactly v (for normal numbers up
    to bf16's largest, ~3.39e38: each rounding to nearest keeps 8 of the remaining significant
    bits, 24 = 8 + 8 + 8). Activations times row weights are far inside that range.

    Memory: the generator does not keep `v` (gram_matrix passes a temporary, freed after the
    first residual) and subtracts each bf16 piece without a float32 copy of it (bf16 -> float32
    is exact, so the bits are those of rest - piece.float()): two float32 [N, in] tensors less
    at the peak, 3.2 GB for an 8B model's 12288-wide batch of 16 x 2048 rows. The peak is then
    rows, rest and the next rest (float32) plus one bf16 piece: what
    `streaming.block_working_bytes` plans per batch (3 float32 + 4 activation-dtype copies)."""
    rest = v
    del v  # `rest` is then the only reference this frame holds
    for k in range(3):
        piece = rest.to(torch.bfloat16)
        yield piece
        if k < 2:
            rest = rest - piece  # promoted in the kernel: no float32 copy of the piece


def check_inputs(inputs: LayerInputs, in_features: int, device: torch.device) -> LayerInputs:
    """Shape check and move to the weight's device before a method reads the statistics."""
    if inputs.hessian.shape != (in_features, in_features):
        raise DataError(
            f"calibration statistics have {inputs.hessian.shape[-1]} input features, "
            f"the weight has {in_features}"
        )
    if not torch.isfinite(inputs.hessian).all():
        raise CheckpointError("layer input statistics contain NaN or Inf")
    return inputs.to(device)


def weighted_output_error(
    weight_q: torch.Tensor,
    weight: torch.Tensor,
    inputs: LayerInputs,
    input_scale: torch.Tensor | None = None,
    act_bits: int | None = None,
) -> float:
    """Relative row-weighted output error on the sample:

        sum_r w_r ||x_r W^T - q(x_r / s) Wq^T||^2 / sum_r w_r ||x_r W^T||^2

    where s = input_scale (ones if None) and q is per-token activation fake quantization
    when `act_bits` is set. 0 means exact; 1 means as large as the output itself.
    """
    x = inputs.sample.to(weight.device)  # [n, in]
    w = inputs.sample_weights.to(weight.device)  # [n]
    ref = x @ weight.float().T  # [n, out]
    x_q = x if input_scale is None else x / input_scale.to(weight.device)
    if act_bits is not None:
        x_q = quantize_activations_per_token(x_q, act_bits)
    err = ((ref - x_q @ weight_q.float().T) ** 2).sum(dim=1)  # [n]
    denom = float((w * (ref**2).sum(dim=1)).sum())
    return float((w * err).sum()) / max(denom, 1e-30)
