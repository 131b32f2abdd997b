"""The sequential layer-wise engine: the one place where models meet quantization algorithms.

As in GPTQ, calibration runs block by block. The stem's outputs for every calibration sequence
are cached; each block in turn moves to the calibration device, runs on its float
inputs while hooks collect (row-weighted) statistics of each quantizable linear's input, has its
linears quantized, and then runs again - now quantized - to produce the next block's inputs, so
later blocks calibrate against the errors of earlier ones.

Offloading (`CalibConfig.offload`, `--offload`) is for models larger than the device: the blocks
live on the CPU, only the non-block modules (stem and head) and the one block being calibrated
are on the device, each block goes back to the CPU (with its codes) once quantized, and at the
end the stem and head follow, so the quantized model ends on the CPU. Without offloading every
module moves to the device and stays there.

The caches (block inputs, and with reconstruction its targets and the float stream) live on the
calibration device when they fit its budget next to the parameters and a block's working memory
(`streaming.plan_cache`), else in pinned host memory, copied to the device batch by batch. The
placement changes where tensors are, never the arithmetic: the results are the same bits.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from faircalib.calib.dataparallel import collect_stats, local_batches, map_linears, row_ids
from faircalib.calib.recon import SequenceRows, reconstruct_block
from faircalib.calib.streaming import (
    GIB,
    CachePlan,
    block_working_bytes,
    cache_budget,
    cache_copies,
    plan_cache,
    resident_bytes,
)
from faircalib.config import CalibConfig, GPTQConfig, QuantConfig, ReconConfig
from faircalib.models.base import BlockContext, BlockStack, DiffusionLM
from faircalib.quant import (
    LayerInputs,
    LayerInputsAccumulator,
    QuantResult,
    quantize_gptq,
    quantize_linear,
    quantize_rtn,
)
from faircalib.quant.primitives import config_scale_dtype, quantize_activations_per_token
from faircalib.quant.stats import weighted_output_error

if TYPE_CHECKING:  # progress.py builds on this module
    from faircalib.calib.progress import PartialRun

BATCH = 16  # sequences per forward during calibration
OFFLOAD_DEVICE = "cpu"  # where blocks wait with CalibConfig.offload
# tests: "device" or "host" overrides the cache placement plan (`streaming.plan_cache`)
_FORCED_CACHE_PLACEMENT: str | None = None


def stage_clock(device: torch.device) -> float:
    """Wall time after the device's queued work: a stage's time includes the kernels it launched
    (without the synchronisation they would be billed to whichever later stage waits first -
    a block's move back to the host, say). A few synchronisations per block, against stages of
    seconds; the host cannot queue the next stage meanwhile (not measured separately)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.time()


class FakeQuantLinear(nn.Module):
    """A linear layer running its quantized weights in float: (x / input_scale) -> optional
    per-token activation quantization -> x @ dequantized_weight.T + bias. Keeps the codes and
    qparams so the packed writer can store them."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        input_scale: torch.Tensor | None = None,
        act_bits: int | None = None,
        result: QuantResult | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().clone())  # [out, in] dequantized
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        scale = None if input_scale is None else input_scale.detach().clone()  # [in]
        self.register_buffer("input_scale", scale)
        self.act_bits = act_bits
        self.result = result  # None when loaded from a fake-quant directory (no codes kept)

    @classmethod
    def from_result(
        cls, result: QuantResult, bias: torch.Tensor | None, dtype: torch.dtype | None = None
    ) -> FakeQuantLinear:
        """dtype: the layer's weight dtype (the model's, e.g. bf16; None: the result's). The
        weight is stored once, shared with `result` (an 8B model cannot hold two copies)."""
        dtype = dtype or result.weight.dtype
        weight = result.weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        layer = cls(weight, bias, result.input_scale, result.act_bits)
        layer.result = dataclasses.replace(result, weight=layer.weight)
        return layer

    def _apply(self, fn, recurse=True):
        # `result` is not a module: without this, .to("cpu") would leave the codes, qparams and
        # the result's weight on the device. They follow the weight's device, keeping dtypes;
        # a weight shared with the result (`from_result`) stays shared, not copied.
        shared = self.result is not None and self.result.weight is self.weight
        super()._apply(fn, recurse)
        if shared:
            self.result = dataclasses.replace(self.result, weight=self.weight)
        if self.result is not None and self.result.codes.device != self.weight.device:
            self.result = self.result.to(self.weight.device)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x / self.input_scale.to(x.dtype)
        if self.act_bits is not None:
            x = quantize_activations_per_token(x, self.act_bits)
        weight = self.weight.to(x.dtype)
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


@dataclass
class QuantReport:
    method: dict
    calib: dict
    layers: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    recon: list[dict] = field(default_factory=list)  # one optimisation log per block (stage 2)
    resources: dict[str, int] = field(default_factory=dict)  # peak device / host bytes
    head: list[dict] = field(default_factory=list)  # --quantize-head: one row per vocab layer
    # --quantize-head with a GPTQ-based block method: the output layer's input statistics over
    # the calibration rows (`quantize_model(head_inputs=True)`); never serialised
    head_inputs: LayerInputs | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict:
        out = {
            "method": self.method,
            "calib": self.calib,
            "layers": self.layers,
            "timings": self.timings,
            "recon": self.recon,
            "resources": self.resources,
        }
        if self.head:  # only with --quantize-head: the record is unchanged without it
            out["head"] = self.head
        return out


def check_layers(model: DiffusionLM, cfg: QuantConfig) -> None:
    """Refuse before any work if a group size does not divide some layer (in an extra block
    stack: some layer at least as wide as the group, see `stack_layer_config`)."""
    for i, block in enumerate(model.blocks):
        for name, linear in model.quantizable_linears(block):
            cfg.check_layer(f"blocks.{i}.{name}", linear.in_features)
    for stack in model.extra_block_stacks():
        for i, block in enumerate(stack.blocks):
            for name, linear in model.quantizable_linears(block):
                layer_cfg = stack_layer_config(cfg, linear.in_features)
                layer_cfg.check_layer(f"{stack.name}.{i}.{name}", linear.in_features)


def stack_layer_config(cfg: QuantConfig, in_features: int) -> QuantConfig:
    """The quantizer of one layer of an extra block stack: `cfg`, except that a layer narrower
    than its group is quantized per row (one group spanning the row, which is what such a group
    would be). Extra stacks are a family's auxiliary networks (PLANNER's prior is 64 wide in
    planner-tiny), so the decoder's default group of 128 must not refuse the whole model; the
    main stack keeps refusing, as it always did."""
    if cfg.group_size is not None and in_features < cfg.group_size:
        return dataclasses.replace(cfg, group_size=None)
    return cfg


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def _param_bytes(module: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def _batches(n: int) -> list[slice]:
    return [slice(i, min(i + BATCH, n)) for i in range(0, n, BATCH)]


@torch.no_grad()
def quantize_model(
    model: DiffusionLM,
    method_cfg: QuantConfig,
    x_t: torch.Tensor,
    t: torch.Tensor,
    row_weights: torch.Tensor | None = None,
    *,
    calib_cfg: CalibConfig,
    recon: ReconConfig | None = None,
    text_ids: torch.Tensor | None = None,
    progress: bool = True,
    partial: PartialRun | None = None,
    head_inputs: bool = False,
) -> QuantReport:
    """Quantize every linear of `model.quantizable_linears` in place.

    x_t: [N, L] calibration inputs (partly masked), t: [N], row_weights: [N, L] (None = ones).
    recon: after each block's linears are quantized, learn their quantization parameters
    against the block's float output (FAIR-Calib stage 2; `calib.recon`); text_ids [N]: which
    calibration text each row is a view of, so reconstruction holds out whole texts.
    With `calib_cfg.offload` at most one block is on `calib_cfg.device` at any time and the
    whole model is on the CPU on return; the quantized weights are the same as without it.
    partial: progress kept on disk (`faircalib.calib.progress`): blocks it holds are restored
    instead of calibrated, and every finished block is saved to it.
    head_inputs: after the last block, run the head on the final cache (batch by batch) and keep
    the output layer's input statistics in `report.head_inputs`, for a GPTQ `quantize_head`.
    """
    check_layers(model, method_cfg)
    device = torch.device(calib_cfg.device)
    report = QuantReport(method=method_cfg.to_dict(), calib=calib_cfg.to_dict())
    n, seq_len = x_t.shape
    model.eval()
    outside_blocks = model.outside_blocks()
    if progress:
        stem_head = sum(_param_bytes(m) for m in outside_blocks) / 2**30
        if calib_cfg.offload:
            block = max(_param_bytes(b) for b in model.blocks) / 2**30
            where = f"stem/head {stem_head:.2f} GiB + one block {block:.2f} GiB (offload)"
        else:
            where = f"the whole model, {_param_bytes(model) / 2**30:.2f} GiB"
        print(f"[calib] parameters on {device}: {where}", file=sys.stderr)

    start = stage_clock(device)
    if calib_cfg.offload:  # a model that arrives on the device keeps only its stem/head there
        model.blocks.to(OFFLOAD_DEVICE)
    for module in outside_blocks:
        module.to(device)
    # under torchrun each rank keeps and runs only its share of the batches (calib.dataparallel)
    batches = local_batches(_batches(n))
    # [N, L] on the device: every statistics batch and reconstruction step slices it there
    weights = (torch.ones(n, seq_len) if row_weights is None else row_weights.float()).to(device)
    # stem_s first, as before (set below); the extra stacks add to stats/quantize/recon
    report.timings.update(stem_s=0.0, stats_s=0.0, quantize_s=0.0, propagate_s=0.0)
    if calib_cfg.offload:  # the blocks' moves to the device and back
        report.timings["offload_s"] = 0.0
    if recon:
        report.timings["recon_s"] = 0.0
    # stacks the stem runs (PLANNER's prior) first: the main stack's inputs then come from the
    # quantized stem, as each block calibrates on its quantized predecessors' outputs
    stacks_s = 0.0
    for stack in model.extra_block_stacks():
        tick = stage_clock(device)
        report.layers += _quantize_stack(
            model, stack, x_t, t, weights, method_cfg, calib_cfg, recon, text_ids, batches, report
        )
        report.timings[f"{stack.name}_s"] = stage_clock(device) - tick
        stacks_s += report.timings[f"{stack.name}_s"]
    plan, cache, contexts = _stem_cache(model, x_t, t, batches, calib_cfg, recon)
    report.calib["cache"] = plan.to_dict()
    if progress:
        _print_cache(plan, n, seq_len, cache)
    # The float model's own block outputs: reconstruction targets that keep later blocks
    # pulling towards the float model rather than towards the float block on drifted inputs.
    float_cache = (
        [plan.copy(h) for h in cache] if recon and recon.target == "float_stream" else None
    )
    report.timings["stem_s"] = stage_clock(device) - start - stacks_s

    first = 0
    if partial is not None:  # finished blocks of an interrupted run, and what follows them
        home = OFFLOAD_DEVICE if calib_cfg.offload else device
        first = partial.restore(model, cache, float_cache, report, home)
        for kept in (cache, float_cache or []):  # a restored cache is read from disk
            kept[:] = [plan.adopt(h) for h in kept]
        plan.settle()
    blocks = tqdm(
        list(enumerate(model.blocks))[first:],
        desc=f"{'weighted ' * (row_weights is not None)}{method_cfg.to_dict()['method']}{' + recon' * bool(recon)}",
        disable=not progress,
        file=sys.stderr,
    )
    for i, block in blocks:
        tick = stage_clock(device)
        block.to(device)
        if calib_cfg.offload:
            report.timings["offload_s"] += stage_clock(device) - tick
        rows, float_cache = _calibrate_block(
            i, block, model.quantizable_linears(block), cache, float_cache, contexts, weights,
            plan, batches, text_ids, report, method_cfg, calib_cfg, recon,
        )  # fmt: skip
        report.layers += rows
        tick = stage_clock(device)
        for j in range(len(cache)):  # outputs of the quantized block feed the next
            cache[j] = plan.keep(block(plan.load(cache[j]), contexts[j]))
        plan.settle()
        report.timings["propagate_s"] += stage_clock(device) - tick
        if calib_cfg.offload:
            tick = stage_clock(device)
            block.to(OFFLOAD_DEVICE)
            report.timings["offload_s"] += stage_clock(device) - tick
        if partial is not None:
            tick = time.time()
            partial.save_block(i, model, cache, float_cache, report)
            report.timings["progress_s"] = (
                report.timings.get("progress_s", 0.0) + time.time() - tick
            )
    if head_inputs:  # the final cache holds the head's hidden states: stem and head on `device`
        tick = stage_clock(device)
        x_batches = [x_t[sl] for sl in batches]
        contexts_x = [(ctx, x) for ctx, x in zip(contexts, x_batches, strict=True)]
        report.head_inputs = collect_head_inputs(
            model,
            _Loaded(cache, plan),
            contexts_x,
            weights,
            batches,
            device,
            calib_cfg,
            _HeadOnly(model),
        )
        report.timings["head_stats_s"] = stage_clock(device) - tick
    if calib_cfg.offload:  # once per run: the stem and head back to the host (`home_s`)
        tick = stage_clock(device)
        contexts.clear()  # device tensors from the stem
        for module in outside_blocks:
            module.to(OFFLOAD_DEVICE)
        report.timings["home_s"] = stage_clock(device) - tick
    report.timings["total_s"] = stage_clock(device) - start
    return report


def _quantize_stack(
    model: DiffusionLM,
    stack: BlockStack,
    x_t: torch.Tensor,
    t: torch.Tensor,
    token_weights: torch.Tensor,
    method_cfg: QuantConfig,
    calib_cfg: CalibConfig,
    recon: ReconConfig | None,
    text_ids: torch.Tensor | None,
    batches: list[slice],
    report: QuantReport,
) -> list[dict]:
    """One extra block stack, walked as the main stack is: each block collects its linears'
    row-weighted inputs, is quantized (and reconstructed with `recon`), then runs quantized to
    feed the next. Its inputs come from `stack.inputs` on the calibration rows; its cache (R
    rows per sequence) stays on the calibration device. Returns the stack's layer rows."""
    device = torch.device(calib_cfg.device)
    plan = CachePlan(True, device, 0, 0, 0, 0, None)  # on the device: keep/load are identity
    cache, contexts = [], []
    for sl in batches:
        h, ctx = stack.inputs(x_t[sl].to(device), t[sl].to(device))
        cache.append(h)
        contexts.append(ctx)
    weights = stack.row_weights(token_weights).to(device)  # [N, R]
    float_cache = list(cache) if recon and recon.target == "float_stream" else None
    rows: list[dict] = []
    for i, block in enumerate(stack.blocks):
        block.to(device)
        block_rows, float_cache = _calibrate_block(
            i, block, model.quantizable_linears(block), cache, float_cache, contexts, weights,
            plan, batches, text_ids, report, method_cfg, calib_cfg, recon, stack=stack.name,
        )  # fmt: skip
        rows += block_rows
        cache = _run_block(block, cache, contexts, plan)  # the quantized block feeds the next
    return rows


def _calibrate_block(
    i: int,
    block: nn.Module,
    linears: list[tuple[str, nn.Linear]],
    cache: list[torch.Tensor],
    float_cache: list[torch.Tensor] | None,
    contexts: list[BlockContext],
    weights: torch.Tensor,
    plan: CachePlan,
    batches: list[slice],
    text_ids: torch.Tensor | None,
    report: QuantReport,
    method_cfg: QuantConfig,
    calib_cfg: CalibConfig,
    recon: ReconConfig | None,
    stack: str | None = None,
) -> tuple[list[dict], list[torch.Tensor] | None]:
    """Quantize block `i` of the main stack (`stack` None) or of an extra stack on its cached
    inputs, then with `recon` reconstruct it against the float block's outputs (its log and
    time go to `report`). Returns the block's layer rows and the float-stream cache for the
    next block."""
    device = torch.device(calib_cfg.device)
    targets = _run_block(block, float_cache or cache, contexts, plan) if recon else None
    rows = _quantize_block(
        i,
        block,
        linears,
        _Loaded(cache, plan),
        contexts,
        weights,
        method_cfg,
        calib_cfg,
        device,
        report.timings,
        batches,
        prefix=stack,
    )
    if recon:
        tick = stage_clock(device)
        ids = row_ids(batches)  # global calibration rows of this rank's cache
        log = reconstruct_block(
            block,
            SequenceRows(cache, contexts, ids),
            SequenceRows(targets, contexts, ids),
            weights,
            recon,
            device,
            calib_cfg.seed + i,
            text_ids,
            config_scale_dtype(method_cfg),
        )
        report.recon.append({"block": i if stack is None else f"{stack}.{i}", **log})
        report.timings["recon_s"] += stage_clock(device) - tick
        if float_cache is not None:
            float_cache = targets  # the float block's outputs feed the next block's targets
    return rows, float_cache


def _run_block(
    block: nn.Module, cache: list[torch.Tensor], contexts: list[BlockContext], plan: CachePlan
) -> list[torch.Tensor]:
    """The block's outputs for every cached batch, kept where the plan keeps the cache."""
    out = [plan.keep(block(plan.load(h), ctx)) for h, ctx in zip(cache, contexts, strict=True)]
    plan.settle()
    return out


class _Loaded(Sequence):
    """A cache seen through `plan.load`: item j is batch j on the device (host batches copied
    with non_blocking=True), for code that indexes a cache and runs its batches there."""

    def __init__(self, cache: list[torch.Tensor], plan: CachePlan) -> None:
        self.cache, self.plan = cache, plan

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return _Loaded(self.cache[j], self.plan)
        return self.plan.load(self.cache[j])


def _stem_cache(
    model: DiffusionLM,
    x_t: torch.Tensor,
    t: torch.Tensor,
    batches: list[slice],
    calib_cfg: CalibConfig,
    recon: ReconConfig | None,
) -> tuple[CachePlan, list[torch.Tensor], list[BlockContext]]:
    """The stem's outputs for `batches`, kept where the cache plan (made from the first
    output's shape and dtype) puts them, and the block contexts (on the device)."""
    device = torch.device(calib_cfg.device)
    cache, contexts, plan = [], [], None
    for sl in batches:
        h, ctx = model.stem(x_t[sl].to(device), t[sl].to(device))
        if plan is None:
            rows = sum(s.stop - s.start for s in batches)
            plan = _plan_cache(model, h, rows, x_t.shape, calib_cfg, recon)
        cache.append(plan.keep(h))
        contexts.append(ctx)
    if plan is None:  # a rank without batches keeps nothing
        plan = CachePlan(False, device, 0, 0, 0, 0, None)
    plan.settle()
    return plan, cache, contexts


def _plan_cache(
    model: DiffusionLM,
    h: torch.Tensor,
    rows: int,
    shape: torch.Size,
    calib_cfg: CalibConfig,
    recon: ReconConfig | None,
) -> CachePlan:
    """`streaming.plan_cache` for this run: `rows` cached sequences like h[0] (a stem output)
    in every copy reconstruction keeps, plus the one batch a propagate step holds besides."""
    device = torch.device(calib_cfg.device)
    n, seq_len = shape
    row_bytes = h[0].numel() * h.element_size()
    copies = cache_copies(recon.target if recon else None)
    cache_bytes = (copies * rows + min(BATCH, rows)) * row_bytes
    act_bytes = h.element_size()
    working = max(
        (_block_working(model, b, act_bytes, n, seq_len, calib_cfg, recon) for b in model.blocks),
        default=0,
    )
    # what is already on the device (the stem/head) is counted in `resident`, not taken from
    # the free memory
    on_device = [t for t in [*model.parameters(), *model.buffers()] if t.device == h.device]
    held = sum(t.numel() * t.element_size() for t in on_device)
    budget = cache_budget(device, calib_cfg.max_device_gib, held)
    resident = resident_bytes(model, calib_cfg.offload)
    return plan_cache(device, cache_bytes, resident, working, budget, _FORCED_CACHE_PLACEMENT)


def _block_working(
    model: DiffusionLM,
    block: nn.Module,
    act_bytes: int,
    n: int,
    seq_len: int,
    calib_cfg: CalibConfig,
    recon: ReconConfig | None,
) -> int:
    """`streaming.block_working_bytes` of one block of this run (0 without quantizable linears)."""
    shapes = [(lin.in_features, lin.out_features) for _, lin in model.quantizable_linears(block)]
    if not shapes:
        return 0
    return block_working_bytes(
        shapes,
        batch_rows=min(BATCH, n) * seq_len,
        act_bytes=act_bytes,
        sample_rows=min(calib_cfg.max_rows_per_layer, n * seq_len),
        recon_rows=recon.batch * seq_len if recon else 0,
    )


def _print_cache(plan: CachePlan, n: int, seq_len: int, cache: list[torch.Tensor]) -> None:
    """The `[calib] ... block-input cache` line: its real size and dtype, and where it lives."""
    one = sum(h.numel() * h.element_size() for h in cache) / GIB
    dtype = str(cache[0].dtype).removeprefix("torch.") if cache else "-"
    where = f"on {plan.device}" if plan.on_device else "on the host" + " (pinned)" * plan.pinned
    need = plan.cache_bytes + plan.resident_bytes + plan.working_bytes + plan.margin_bytes
    budget = "no budget" if plan.budget_bytes is None else f"{plan.budget_bytes / GIB:.2f} GiB"
    print(
        f"[calib] {n} sequences x {seq_len} tokens; block-input cache {one:.2f} GiB {dtype} "
        f"{where} (all copies {plan.cache_bytes / GIB:.2f} GiB; with parameters, working "
        f"memory and margin {need / GIB:.2f} GiB of {budget}"
        f"{', forced' * plan.forced})",
        file=sys.stderr,
    )


def _quantize_block(
    index,
    block,
    linears,
    cache,
    contexts,
    weights,
    method_cfg,
    calib_cfg,
    device,
    timings,
    batches,
    prefix: str | None = None,
) -> list[dict]:
    """Collect the block's input statistics over `batches` (this rank's share of the cached
    calibration batches) and replace each quantizable linear by its quantized version.
    prefix: None for the main stack (`blocks`), else the extra stack's name (its layers'
    quantizer: `stack_layer_config`)."""
    tick = stage_clock(device)
    accs = {
        name: LayerInputsAccumulator(
            lin.in_features, calib_cfg.max_rows_per_layer, calib_cfg.seed + index, device
        )
        for name, lin in linears
    }
    n_batches = len(_batches(len(weights)))
    collect_stats(block, linears, accs, cache, contexts, weights, batches, device, n_batches)
    timings["stats_s"] += stage_clock(device) - tick

    def work(name: str, lin: nn.Linear) -> tuple[QuantResult, dict]:
        if prefix is None:
            return _quantize_linear(index, name, lin, accs[name], method_cfg)
        layer_cfg = stack_layer_config(method_cfg, lin.in_features)
        return _quantize_linear(index, name, lin, accs[name], layer_cfg, prefix)

    tick = stage_clock(device)  # wall time: under torchrun the linears run on several ranks at once
    outputs = map_linears(linears, work, device)
    timings["quantize_s"] += stage_clock(device) - tick
    for (name, lin), (result, _) in zip(linears, outputs, strict=True):
        fq = FakeQuantLinear.from_result(result, lin.bias, lin.weight.dtype)
        _set_submodule(block, name, fq)
    return [row for _, row in outputs]


def _quantize_linear(
    index: int,
    name: str,
    lin: nn.Linear,
    acc: LayerInputsAccumulator,
    method_cfg: QuantConfig,
    prefix: str = "blocks",
) -> tuple[QuantResult, dict]:
    """One linear's QuantResult and its row of the layer table."""
    tick = time.time()
    inputs = acc.finish()
    full = f"{prefix}.{index}.{name}"
    w = lin.weight.detach().float()
    result = quantize_linear(w, inputs, method_cfg, name=full)
    seconds = time.time() - tick
    rtn = quantize_rtn(w, QuantConfig(method_cfg.bits, method_cfg.group_size, method_cfg.symmetric))
    return result, (
        {
            "layer": full,
            "method": method_cfg.to_dict()["method"],
            "bits": method_cfg.bits,
            "group_size": method_cfg.group_size,
            "seconds": seconds,
            "rel_error": weighted_output_error(
                result.weight,
                w,
                inputs,
                input_scale=result.input_scale,
                act_bits=result.act_bits,
            ),
            "rtn_rel_error": weighted_output_error(rtn.weight, w, inputs),
        }
    )


def quant_results(model: DiffusionLM) -> dict[str, QuantResult]:
    """Full module name -> QuantResult of every quantized linear, and of every embedding that
    `quantize_head` quantized (its weight: the embedding parameter as it is now), for the
    packed writer."""
    out = {
        name: m.result
        for name, m in model.named_modules()
        if isinstance(m, FakeQuantLinear) and m.result is not None
    }
    for name, m in model.named_modules():
        held = getattr(m, VOCAB_RESULT, None)
        if held is not None:
            param, result = held
            out[name] = dataclasses.replace(result, weight=getattr(m, param).detach())
    return out


# --- --quantize-head: the vocabulary layers (embedding, output projection) ------------------------
# mode -> (bits, group size along the hidden dim); symmetric, so zero points are implicit and
# stock readers' default compressed path can load them (it cannot load packed asymmetric zero
# points with compressed-tensors 0.20.1, see tests/test_formats_interop.py)
HEAD_SCHEMES = {"int8": (8, None), "int4": (4, 128)}
# attribute of an embedding module quantized by `quantize_head`: (parameter name, QuantResult
# with codes and qparams on the CPU); the parameter itself holds the dequantized weight
VOCAB_RESULT = "vocab_quant_result"


def head_config(mode: str, scale_dtype: str | None = None) -> QuantConfig:
    """The weight quantizer of `--quantize-head MODE` (RTN, symmetric)."""
    if mode not in HEAD_SCHEMES:
        from faircalib.errors import ConfigError

        raise ConfigError(f"unknown --quantize-head {mode!r}; use int8 or int4")
    bits, group = HEAD_SCHEMES[mode]
    return QuantConfig(bits, group, symmetric=True, scale_dtype=scale_dtype)


def check_head(model: DiffusionLM, mode: str) -> None:
    """Refuse, before any calibration and in one line, a head the family will not have
    quantized, or whose hidden dim a 128-group does not divide."""
    from faircalib.errors import ConfigError

    declared = model.vocab_layers()
    if declared.refusal:
        raise ConfigError(declared.refusal)
    cfg = head_config(mode)
    for layer in declared.layers:
        d = model.get_submodule(layer.module).get_parameter(layer.param).shape[1]
        if cfg.group_size is not None and d % cfg.group_size:
            raise ConfigError(
                f"--quantize-head {mode}: its group size {cfg.group_size} does not divide "
                f"{layer.key}'s hidden dim {d}; use --quantize-head int8 (per token row)"
            )


def head_gptq_config(mode: str, base: GPTQConfig, scale_dtype: str | None = None) -> GPTQConfig:
    """The output layer's GPTQ quantizer under `--quantize-head MODE` when the blocks ran GPTQ
    `base`: the head scheme's grid (bits, group, symmetric) with the blocks' GPTQ knobs."""
    grid = head_config(mode, scale_dtype)
    return GPTQConfig(
        bits=grid.bits,
        group_size=grid.group_size,
        symmetric=grid.symmetric,
        scale_dtype=grid.scale_dtype,
        damp=base.damp,
        act_order=base.act_order,
        block_size=base.block_size,
    )


def gptq_head_layer(model: DiffusionLM) -> tuple[str, nn.Linear] | None:
    """(module path, Linear) of the declared output layer a GPTQ head step quantizes with its
    inputs; None when there is none (a tied matrix is also the embedding: RTN)."""
    for layer in model.vocab_layers().layers:
        module = model.get_submodule(layer.module)
        if layer.role == "output" and isinstance(module, nn.Linear) and layer.param == "weight":
            return layer.module, module
    return None


class _HeadReached(Exception):
    """Raised by the pre-hook that ends a head run once the output layer's input is seen."""


def _stop_at_output(model: DiffusionLM, run) -> None:
    """run() with a forward pre-hook on the output layer that stops it right there: its inputs
    reach the statistics hooks registered before (`collect_stats`), the [B, L, V] logits are
    never formed."""

    def stop(_m, _args):
        raise _HeadReached

    _, out = gptq_head_layer(model)
    handle = out.register_forward_pre_hook(stop)
    try:
        run()
    except _HeadReached:
        pass
    finally:
        handle.remove()


class _HeadOnly:
    """collect_stats' "block" for the engine's final cache: hidden [B, L, D] and (context, x_t
    batch) -> the model's head, stopped at the output layer."""

    def __init__(self, model: DiffusionLM) -> None:
        self.model = model

    def __call__(self, h: torch.Tensor, pair) -> None:
        ctx, x = pair
        _stop_at_output(self.model, lambda: self.model.head(h, ctx, x.to(h.device)))


class _WholeModel:
    """collect_stats' "block" from token ids: x_t batch and t batch -> stem, every block, head
    (stopped at the output layer)."""

    def __init__(self, model: DiffusionLM) -> None:
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> None:
        def run():
            h, ctx = self.model.stem(x, t.to(x.device))
            for block in self.model.blocks:
                h = block(h, ctx)
            self.model.head(h, ctx, x)

        _stop_at_output(self.model, run)


def collect_head_inputs(
    model: DiffusionLM, cache, contexts, weights, batches, device, calib_cfg: CalibConfig, runner
) -> LayerInputs:
    """The output layer's row-weighted input statistics over this rank's `batches` (all ranks'
    under torchrun, as for a block's linears): runner(cache[j], contexts[j]) runs the head on
    one batch at a time, a pre-hook feeds a LayerInputsAccumulator (Hessian [D, D] on `device`).
    """
    name, out = gptq_head_layer(model)
    acc = LayerInputsAccumulator(
        out.in_features, calib_cfg.max_rows_per_layer, calib_cfg.seed + len(model.blocks), device
    )
    n_batches = len(_batches(len(weights)))
    linears = [(name, out)]
    collect_stats(
        runner, linears, {name: acc}, cache, contexts, weights, batches, device, n_batches
    )
    return acc.finish()


@torch.no_grad()
def head_inputs_from_model(
    model: DiffusionLM,
    x_t: torch.Tensor,
    t: torch.Tensor,
    row_weights: torch.Tensor | None,
    calib_cfg: CalibConfig,
) -> LayerInputs:
    """The output layer's input statistics from a full forward of the (quantized) model on the
    calibration rows, batch by batch - for when the blocks changed after the engine's final
    cache was formed (FAIR-Calib's end-to-end stage, which runs with the model on the device)."""
    device = torch.device(calib_cfg.device)
    batches = local_batches(_batches(len(x_t)))
    weights = torch.ones(x_t.shape) if row_weights is None else row_weights.float()
    xs = [x_t[sl].to(device) for sl in batches]
    ts = [t[sl] for sl in batches]
    return collect_head_inputs(
        model, xs, ts, weights, batches, device, calib_cfg, _WholeModel(model)
    )


@torch.no_grad()
def quantize_head(
    model: DiffusionLM,
    mode: str,
    scale_dtype: str | None = None,
    inputs: LayerInputs | None = None,
    gptq: GPTQConfig | None = None,
) -> list[dict]:
    """Weight-only quantization of the family's declared vocabulary layers, in place: the output
    Linear becomes a FakeQuantLinear (packed as an ordinary target); an embedding keeps its
    parameter, now holding the dequantized weight, and its codes in `VOCAB_RESULT`. Each [V, D]
    matrix is quantized per token row, groups along D. RTN, except the output layer when
    `inputs` (its input statistics, `collect_head_inputs`) and `gptq` (the blocks' GPTQ config)
    are given: then GPTQ on those inputs, on their device (`head_gptq_config`). The embedding
    (and a tied matrix) has no inputs: always RTN. One row per layer for the report, naming the
    method."""
    check_head(model, mode)
    cfg = head_config(mode, scale_dtype)
    use_gptq = inputs is not None and gptq is not None
    target = gptq_head_layer(model) if use_gptq else None
    rows = []
    for layer in model.vocab_layers().layers:
        module = model.get_submodule(layer.module)
        param = module.get_parameter(layer.param)
        tick = time.time()
        extra: dict = {}
        if target is not None and module is target[1]:
            gcfg = head_gptq_config(mode, gptq, scale_dtype)
            result, extra = _gptq_head(param, inputs, gcfg, layer.key)
            method = "gptq"
        else:
            result = quantize_rtn(param.detach().float().cpu(), cfg, name=layer.key)
            method = "rtn"
        rel_error = result.info["weight_rel_error"]
        result = dataclasses.replace(result, info=None)  # reported in the head rows, not per layer
        if isinstance(module, nn.Linear):
            fq = FakeQuantLinear.from_result(result.to(param.device), module.bias, param.dtype)
            _set_submodule(model, layer.module, fq)
        else:  # an embedding (or the tied matrix): same parameter, dequantized values
            param.copy_(result.weight.to(param.dtype))
            kept = dataclasses.replace(result, weight=torch.empty(0))
            object.__setattr__(module, VOCAB_RESULT, (layer.param, kept))
        rows.append(
            {
                "layer": layer.key,
                "role": layer.role,
                "mode": mode,
                "method": method,
                "bits": cfg.bits,
                "group_size": cfg.group_size,
                "shape": list(param.shape),
                "weight_rel_error": rel_error,
                **extra,
                "seconds": time.time() - tick,
            }
        )
    return rows


def _gptq_head(
    param: torch.Tensor, inputs: LayerInputs, cfg: GPTQConfig, name: str
) -> tuple[QuantResult, dict]:
    """GPTQ of the output layer's [V, D] weight on the device of its statistics (a float32 copy
    of this one matrix there), its weight error in `info`, and the output errors of it and of
    RTN on the sampled input rows for the head row."""
    device = inputs.hessian.device
    w = param.detach().to(device).float()
    result = quantize_gptq(w, inputs, cfg, name=name)
    rel = float((result.weight - w).norm() / w.norm().clamp(min=1e-30))
    err = weighted_output_error(result.weight, w, inputs)
    rtn = quantize_rtn(w, QuantConfig(cfg.bits, cfg.group_size, cfg.symmetric, cfg.scale_dtype))
    extra = {
        "rel_error": err,
        "rtn_rel_error": weighted_output_error(rtn.weight, w, inputs),
        **{k: v for k, v in (result.info or {}).items() if k in ("gptq_loss", "damp")},
    }
    del rtn, w
    return dataclasses.replace(result, info={"weight_rel_error": rel}), extra
