"""Stage 2 of FAIR-Calib: block-wise reconstruction and the optional end-to-end scale stage.

This is where `faircalib.quant.recon` (learnable quantizers, the optimisation loop) meets the
model: a block's FakeQuantLinear layers are swapped for LearnableQuantLinear ones, the block
runs on calibration rows, and the row-weighted error of its output against the float target
drives the quantization parameters; then the layers are frozen back into FakeQuantLinear.

Rows are whole calibration sequences (attention mixes tokens, so a block needs whole
sequences); a seeded `holdout` share of them never trains and picks the best step.

Under torchrun both stages are data parallel (faircalib.distributed): the held-out split is
drawn over all rows, each rank trains on its own rows (a minibatch of `batch` rows per rank per
step), the loss is normalised by the weight of every rank's minibatch and the gradients are
summed (quant.recon.optimise), and the held-out loss is summed over ranks; in one process this
is exactly the single-process optimisation.
"""

from __future__ import annotations

import torch
from torch import nn

from faircalib import distributed
from faircalib.config import ReconConfig
from faircalib.models.base import BlockContext, DiffusionLM
from faircalib.quant.recon import (
    LearnableQuantLinear,
    OptimSettings,
    optimise,
    weighted_mse,
    weighted_sq_sums,
)

RANK_SEED = 1_000_003  # rank r draws its minibatches from seed + r * RANK_SEED (rank 0: seed)


class SequenceRows:
    """Calibration sequences kept as the engine's list of [batch, L, D] tensors (on the device,
    or on the host: `streaming.plan_cache`); gathers arbitrary sequences (and their block
    context rows) without concatenating the cache. `ids`: the global calibration row of each
    local row (under torchrun a rank holds a share)."""

    def __init__(
        self,
        chunks: list[torch.Tensor],
        contexts: list[BlockContext],
        ids: list[int] | None = None,
    ) -> None:
        self.chunks, self.contexts = chunks, contexts
        self.where = [(c, r) for c, chunk in enumerate(chunks) for r in range(len(chunk))]
        self.ids = list(range(len(self.where))) if ids is None else list(ids)

    def local(self, rows: list[int]) -> list[int]:
        """Local positions of those global `rows` this object holds, in the given order."""
        position = {g: i for i, g in enumerate(self.ids)}
        return [position[g] for g in rows if g in position]

    def __len__(self) -> int:
        return len(self.where)

    def gather(self, idx: list[int], device: torch.device) -> torch.Tensor:
        """[B, L, D] the sequences `idx` on `device`: stacked there when the chunks live there;
        host chunks are stacked into pinned memory and copied without blocking (CUDA)."""
        rows = [self.chunks[c][r] for c, r in (self.where[i] for i in idx)]
        if rows[0].device.type == "cpu" and device.type == "cuda":
            staged = torch.empty((len(rows), *rows[0].shape), dtype=rows[0].dtype, pin_memory=True)
            return torch.stack(rows, out=staged).to(device, non_blocking=True)
        return torch.stack(rows).to(device)

    def context(self, idx: list[int], device: torch.device) -> BlockContext:
        parts = [self.contexts[c].select(slice(r, r + 1)) for c, r in (self.where[i] for i in idx)]
        merged = {}
        for key, value in parts[0].tensors.items():
            if key.startswith("batch_"):
                value = torch.cat([p.tensors[key] for p in parts])
            merged[key] = value.to(device)
        return BlockContext(merged)


def split_rows(
    n: int, holdout: float, seed: int, text_ids: torch.Tensor | None = None
) -> tuple[list[int], list[int]]:
    """Seeded split of n rows into (train, held-out) by calibration text: every view of a text
    lands on the same side, so the held-out loss measures texts the optimiser never saw. At
    least one text on each side when there are two or more."""
    texts = torch.arange(n) if text_ids is None else text_ids
    unique = torch.unique(texts)
    perm = unique[torch.randperm(len(unique), generator=torch.Generator().manual_seed(seed))]
    n_val = min(max(1, round(len(unique) * holdout)), len(unique) - 1) if len(unique) >= 2 else 0
    held = torch.isin(texts, perm[:n_val])
    train, val = (~held).nonzero().flatten().tolist(), held.nonzero().flatten().tolist()
    return train, (val or train)


def _swap_learnable(
    root: nn.Module, rounding: bool, scale_dtype: torch.dtype | None
) -> list[tuple[str, LearnableQuantLinear]]:
    from faircalib.calib.engine import FakeQuantLinear, _set_submodule  # engine imports us

    swapped = []
    for name, module in list(root.named_modules()):
        if isinstance(module, FakeQuantLinear) and module.result is not None:
            learnable = LearnableQuantLinear(
                module.result, module.bias, rounding=rounding, scale_dtype=scale_dtype
            )
            _set_submodule(root, name, learnable.to(module.weight.device))
            swapped.append((name, learnable))
    return swapped


def _freeze(root: nn.Module, swapped: list[tuple[str, LearnableQuantLinear]]) -> list[dict]:
    from faircalib.calib.engine import FakeQuantLinear, _set_submodule

    infos = []
    for name, learnable in swapped:
        result = learnable.to_result()
        fq = FakeQuantLinear.from_result(result, learnable.bias, learnable.store_dtype)
        _set_submodule(root, name, fq)
        infos.append({"layer": name, **{k: v for k, v in result.info.items() if "recon" in k}})
    return infos


def _zero_loss(layers: list[LearnableQuantLinear]) -> torch.Tensor:
    """0, as a loss connected to the parameters (backward gives zero gradients)."""
    return sum(layer.gain.sum() for layer in layers) * 0.0


def _batches(idx: list[int], size: int) -> list[list[int]]:
    return [idx[i : i + size] for i in range(0, len(idx), size)]


def reconstruct_block(
    block: nn.Module,
    inputs: SequenceRows,
    targets: SequenceRows,
    weights: torch.Tensor,
    cfg: ReconConfig,
    device: torch.device,
    seed: int,
    text_ids: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
) -> dict:
    """Learn the quantization parameters of `block`'s quantized linears in place.

    inputs/targets: the block's inputs and float targets per calibration sequence (this rank's
    rows); weights: [N, L] per-token loss weights and text_ids: [N] text of each row, both over
    all N rows. Returns the optimisation log."""
    train, val = split_rows(len(weights), cfg.holdout, seed, text_ids)
    train, val = inputs.local(train), inputs.local(val)  # positions in this rank's rows
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    swapped = _swap_learnable(block, cfg.rounding and cfg.lr_round > 0, scale_dtype)
    layers = [layer for _, layer in swapped]
    # minibatch indices come from a CPU generator and index Python lists, never a device
    # tensor: no step waits for the device
    gen = torch.Generator().manual_seed(seed + RANK_SEED * distributed.rank())
    # each row's [L] weights, as views of one device copy: a step stacks its rows on the device
    # (a CPU index into a device tensor would be a blocking copy per step)
    weight_rows = weights.to(device).unbind(0)

    def block_out(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        row_w = torch.stack([weight_rows[inputs.ids[i]] for i in idx])  # global rows
        out = block(inputs.gather(idx, device), inputs.context(idx, device))
        return out, targets.gather(idx, device), row_w

    def train_loss(_step: int) -> torch.Tensor:
        # sum_r w_r err_r over this rank's minibatch / sum_r w_r over every rank's: the summed
        # gradients are those of the weighted mean over all ranks' rows
        if train:
            pick = torch.randint(len(train), (min(cfg.batch, len(train)),), generator=gen)
            num, den = weighted_sq_sums(*block_out([train[i] for i in pick.tolist()]))
        else:  # a rank without training rows still takes part in the sums
            num, den = _zero_loss(layers), torch.zeros((), device=device)
        return num / distributed.all_reduce_sum(den).clamp(min=1e-12)

    val_batches = _batches(val, 8)
    # the held-out batches' weight sums never change: summed once, on the CPU as always
    host_weights = weights.cpu()
    val_w = [float(host_weights[[inputs.ids[i] for i in b]].sum()) for b in val_batches]

    def val_loss() -> float:
        with torch.no_grad():
            mses = [weighted_mse(*block_out(b)) for b in val_batches]
        # one wait for the device per evaluation, not one per batch (same float64 sums)
        values = torch.stack(mses).tolist() if mses else []
        num = distributed.sum_float(sum(v * w for v, w in zip(values, val_w, strict=True)))
        return num / max(distributed.sum_float(sum(val_w)), 1e-12)

    settings = OptimSettings(cfg.steps, cfg.lr_scale, cfg.lr_round, cfg.eval_every)
    try:
        with torch.enable_grad():
            log = optimise(layers, train_loss, val_loss, settings)
    finally:
        layer_infos = _freeze(block, swapped)
        for p in frozen:
            p.requires_grad_(True)
    return {**log.to_dict(), "layers": layer_infos}


def masked_kl(teacher_lp: torch.Tensor, student_lp: torch.Tensor, x_t: torch.Tensor, mask_id: int):
    """[B, L] KL(p_teacher || p_student) at masked positions (0 at committed ones, where SUBS
    makes both one-hot); the -inf log-probabilities of impossible tokens contribute 0."""
    p = teacher_lp.exp()
    terms = torch.where(p > 0, p * (teacher_lp - student_lp), torch.zeros_like(p))
    return terms.sum(-1) * (x_t == mask_id)


def finetune_scales_e2e(
    model: DiffusionLM,
    teacher: DiffusionLM,
    x_t: torch.Tensor,
    t: torch.Tensor,
    weights: torch.Tensor,
    cfg: ReconConfig,
    device: torch.device,
    seed: int,
    text_ids: torch.Tensor | None = None,
    clean: torch.Tensor | None = None,
    scale_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> dict:
    """Tune the scales (and with `cfg.e2e_rounding` the rounding offsets) of every quantized
    linear of `model` (on `device`) to minimise the row-weighted KL(p_teacher || p_model) at
    masked positions of the calibration inputs.

    clean: [N, L] the clean text of rows that are masked views of calibration text (-1 for
    rows that are not, e.g. recorded sampler states). With `cfg.e2e_fresh_masks`, such training
    rows get a fresh noise level and mask at every step: the stage then sees every text at many
    noise levels instead of one, which keeps a whole-model objective from fitting one draw of
    masks. Held-out rows keep their recorded masks, so the stopping criterion is fixed.
    Under torchrun every rank holds the whole model and trains on its share of the rows."""
    train, val = split_rows(len(x_t), cfg.holdout, seed, text_ids)
    train, val = distributed.shard(train), distributed.shard(val)
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    swapped = _swap_learnable(model, cfg.e2e_rounding and cfg.lr_round > 0, scale_dtype)
    teacher.to(device).eval()
    gen = torch.Generator().manual_seed(seed + RANK_SEED * distributed.rank())
    layers = [layer for _, layer in swapped]
    refresh = clean is not None and cfg.e2e_fresh_masks

    def remask(idx: list[int], x: torch.Tensor, tt: torch.Tensor):
        rows = torch.tensor(idx)
        fresh = clean[rows][:, 0] >= 0  # [B] rows that are views of clean text
        t_new = 0.05 + 0.95 * torch.rand(len(idx), generator=gen)
        u = torch.rand(x.shape, generator=gen)
        masked = u < model.schedule.mask_prob(t_new)[:, None]
        x_new = torch.where(masked, torch.full_like(x, model.mask_id), clean[rows])
        return torch.where(fresh[:, None], x_new, x), torch.where(fresh, t_new, tt)

    def kl_sums(idx: list[int], train_step: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        x, tt = x_t[idx], t[idx]
        if train_step and refresh:
            x, tt = remask(idx, x, tt)
        x, tt = x.to(device), tt.to(device)
        with torch.no_grad():
            ref = teacher.log_probs(x, tt)
        kl = masked_kl(ref, model.log_probs(x, tt), x, model.mask_id)  # [B, L]
        w = weights[idx].to(device) * (x == model.mask_id)
        return (kl * w).sum(), w.sum()

    def train_loss(_step: int) -> torch.Tensor:
        if train:
            pick = torch.randint(len(train), (min(cfg.e2e_batch, len(train)),), generator=gen)
            num, den = kl_sums([train[i] for i in pick.tolist()], train_step=True)
        else:  # a rank without training rows still takes part in the sums
            num, den = _zero_loss(layers), torch.zeros((), device=device)
        return num / distributed.all_reduce_sum(den).clamp(min=1e-12)

    def val_loss() -> float:
        with torch.no_grad():
            sums = [kl_sums(b) for b in _batches(val, 8)]
        zero = torch.zeros((), device=device)
        num = distributed.all_reduce_sum(sum((n for n, _ in sums), zero))
        den = distributed.all_reduce_sum(sum((d for _, d in sums), zero))
        return float(num / max(float(den), 1e-12))

    lr_round = cfg.lr_round if cfg.e2e_rounding else 0.0
    name = "FAIR-Calib end-to-end scales" if progress else None
    settings = OptimSettings(cfg.e2e_steps, cfg.e2e_lr, lr_round, cfg.eval_every, name)
    try:
        with torch.enable_grad():
            log = optimise(layers, train_loss, val_loss, settings)
    finally:
        _freeze(model, swapped)
        for p in frozen:
            p.requires_grad_(True)
    return log.to_dict()
