"""Activation quantization of a DiffusionLM: the join of `quant.activations`, `quant.rotation`
and `quant.flatquant` with the models.

Everything here works on any family through `model.quantizable_linears(block)`: each declared
linear is replaced by an `ActQuantLinear`, which runs its input through an optional online
transform (SmoothQuant division, randomized Hadamard rotation, learned FlatQuant transform),
fake-quantizes it (INT per-token / static per-tensor, FP8 e4m3 per-token) and multiplies by a
fake-quantized weight kept in the transformed basis. Rotations run *online* in front of every
linear, except where a family declares its residual stream (LLaDA, Dream): QuaRot methods rotate
that stream offline first (`calib/residual_rotation.py`) and its readers run no online rotation
(docs/activation-quant.md says which family folds what). Extra block stacks (PLANNER's latent
prior) are walked first, with the same per-block code, their layers named `<stack>.<i>.<name>`.

Three entry points:

* `quantize_activations_model`: calibrate block by block (as the weight-only engine does, later
  blocks see the quantized earlier blocks, activation quantization included) and replace the
  linears; methods rtn, gptq, smoothquant, quarot, flatquant, fair, fair-gptq. The learned-transform
  methods then tune each block's transforms jointly on its (row-weighted) output error
  (`tune_block_transforms`, FlatQuant's block-wise objective).
* `activation_outlier_stats`: per-layer input statistics of the float model on masked dLLM
  inputs over the whole t range, split into mask-token rows and clean rows.
* `a4_ablation`: which layers' inputs carry the W4A4 damage (A4 on one layer at a time, and
  on all layers but one), measured as the KL to the float model at masked positions.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from faircalib.calib.engine import stack_layer_config
from faircalib.calib.inputs import masked_inputs
from faircalib.calib.recon import SequenceRows, split_rows
from faircalib.calib.residual_rotation import fold_residual_rotation, reads_rotated_stream
from faircalib.config import CalibConfig, FairCalibConfig, GPTQConfig, QuantConfig, RTNConfig
from faircalib.errors import ConfigError, DataError
from faircalib.models.base import BlockContext, BlockStack, DiffusionLM
from faircalib.quant import quantize_linear
from faircalib.quant.activations import (
    ActQuantConfig,
    fake_quantize_activations,
    quantize_fp8_rows,
    quantize_int_per_token,
    search_clip_ratio,
    static_scale,
)
from faircalib.quant.flatquant import (
    FlatQuantConfig,
    FlatQuantResult,
    LearnedTransform,
    TrainableTransformLinear,
    learn_transform,
)
from faircalib.quant.recon import weighted_sq_sums
from faircalib.quant.rotation import Rotation, fold_input_rotation, random_hadamard, rotate
from faircalib.quant.smoothquant import smoothing_scales
from faircalib.quant.stats import LayerInputs, LayerInputsAccumulator


@dataclass(frozen=True)
class ActScheme:
    """Weights (bits, group size, int or fp8) and activations of a WxAy scheme."""

    w_bits: int | None  # None: float weights (activation-only ablations)
    w_group: int | None
    w_fmt: str  # "int" or "fp8" (fp8: e4m3, one scale per output channel)
    act: ActQuantConfig
    w_symmetric: bool = False  # INT weights without zero points
    w_scale_dtype: str | None = None  # "e8m0": power-of-two weight scales

    def weight_config(self, base: str) -> QuantConfig:
        cls = GPTQConfig if base == "gptq" else RTNConfig
        return cls(
            bits=self.w_bits or 8,
            group_size=self.w_group,
            symmetric=self.w_symmetric,
            scale_dtype=self.w_scale_dtype,
        )


SCHEMES: dict[str, ActScheme] = {
    # symmetric per-channel INT8 weights, as SmoothQuant, QDLM and the INT8 W8A8 kernels of
    # vLLM and this toolkit take them: the packed export writes the very same model
    "w8a8": ActScheme(8, None, "int", ActQuantConfig("int", 8), w_symmetric=True),
    "w8a8fp8": ActScheme(8, None, "fp8", ActQuantConfig("fp8")),
    # symmetric INT4 g128 weights, as compressed-tensors' W4A8 / W4AFP8 presets and vLLM's
    # W4A8 kernels take them (no zero points): the packed export writes the very same model
    "w4a8": ActScheme(4, 128, "int", ActQuantConfig("int", 8), w_symmetric=True),
    "w4a8fp8": ActScheme(4, 128, "int", ActQuantConfig("fp8"), w_symmetric=True),
    # the same with power-of-two group scales: the grid the lookup-table W4A8 kernel computes
    # exactly (kernels/cutlass_w4a8_lut.py: each group's levels are e4m3 numbers), so the K
    # loop is a plain FP8 GEMM; the packed export is w4a8fp8's (the scales are exact in bf16)
    "w4a8fp8-e8m0": ActScheme(
        4, 128, "int", ActQuantConfig("fp8"), w_symmetric=True, w_scale_dtype="e8m0"
    ),
    "w4a4": ActScheme(4, None, "int", ActQuantConfig("int", 4)),
    "w16a4": ActScheme(None, None, "int", ActQuantConfig("int", 4)),  # A4 alone
}

# method -> (weight quantizer, input transform); "fair" = flatquant with FAIR-Calib row weights
METHODS: dict[str, tuple[str, str | None]] = {
    "rtn": ("rtn", None),
    "gptq": ("gptq", None),
    "smoothquant": ("rtn", "smooth"),
    "quarot-rtn": ("rtn", "hadamard"),
    "quarot": ("gptq", "hadamard"),  # QuaRot: Hadamard rotations, GPTQ weights, RTN activations
    "flatquant": ("rtn", "learned"),
    "flatquant-gptq": ("gptq", "learned"),
    "fair": ("rtn", "learned"),
    # fair's transform, then GPTQ on W~ with the FAIR-weighted Hessian T^T H_w T (QuaRot /
    # FlatQuant-GPTQ's recipe on FAIR-Calib's rows): GPTQ absorbs the INT4 per-channel rounding
    # error that RTN leaves (see docs/activation-quant.md for the measured gap)
    "fair-gptq": ("gptq", "learned"),
}
# the methods that calibrate on FAIR-Calib's rows and weights (`calib.fair_inputs`)
FAIR_METHODS = ("fair", "fair-gptq")
BLOCK_STEPS = 0  # block_steps' default: off (CPU numbers in docs/activation-quant.md)


@dataclass
class ActCalibConfig:
    """One activation-quantization run: scheme, method and the calibration knobs."""

    scheme: str = "w4a4"
    method: str = "rtn"
    clip_search: bool = False  # search each layer's activation clip ratio on calibration rows
    smooth_alpha: float = 0.5
    flat: FlatQuantConfig = field(default_factory=FlatQuantConfig)
    max_rows: int = 4096  # input rows sampled per layer (searches, learned transforms)
    batch: int = 16  # sequences per forward
    seed: int = 0
    device: str = "cpu"
    # GPTQ weights (gptq, quarot, flatquant-gptq): None / True keep GPTQConfig's defaults
    damp: float | None = None
    act_order: bool = True
    # block-wise stage of the learned-transform methods (flatquant, flatquant-gptq, fair): all
    # transforms and clips of a block tuned jointly on the row-weighted block output error,
    # started from the per-layer result; 0 steps: per-layer only
    block_steps: int = BLOCK_STEPS
    block_lr: float = 5e-3  # Adam, on P1, P2 and log s (linear decay to 0)
    block_lr_clip: float = 5e-3  # Adam, on the clip ratios
    block_batch: int = 4  # sequences per step
    block_holdout: float = 0.125  # share of calibration texts that pick the best step
    block_eval_every: int = 25
    block_target: str = "float_stream"  # or "quant_input" (recon's two targets)
    # INT weight scales rounded to this dtype before the codes are chosen (packed export sets
    # the checkpoint's bfloat16, so the stored scales reproduce the evaluated weights exactly)
    weight_scale_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise ConfigError(f"unknown scheme {self.scheme!r}; choose one of {sorted(SCHEMES)}")
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose one of {sorted(METHODS)}")
        if self.block_steps < 0 or self.block_batch < 1 or self.block_eval_every < 1:
            raise ConfigError("block_steps >= 0, block_batch >= 1 and block_eval_every >= 1")
        if min(self.block_lr, self.block_lr_clip) < 0 or not 0 < self.block_holdout < 1:
            raise ConfigError("block learning rates must be >= 0 and block_holdout in (0, 1)")
        if self.block_target not in ("float_stream", "quant_input"):
            raise ConfigError(
                f"unknown block_target {self.block_target!r}; use float_stream or quant_input"
            )
        if self.weight_scale_dtype not in (None, "bfloat16", "float16"):
            raise ConfigError(
                f"weight_scale_dtype must be None, 'bfloat16' or 'float16', got "
                f"{self.weight_scale_dtype!r}"
            )

    @property
    def block_wise(self) -> bool:
        """Whether the block-wise stage runs (a learned-transform method and steps > 0)."""
        return self.block_steps > 0 and METHODS[self.method][1] == "learned"

    def to_dict(self) -> dict:
        return asdict(self)

    def weight_overrides(self, base: str) -> dict:
        """Weight-quantizer knobs that differ from the defaults (empty: the defaults): the
        scale dtype, and GPTQ's damping and act_order."""
        # a scheme's own scale type stays: its powers of two are exact in the checkpoint's bf16
        # (the packed export's `weight_scale_dtype`); the writer refuses any it cannot store
        keep = self.weight_scale_dtype is None or SCHEMES[self.scheme].w_scale_dtype is not None
        out: dict = {} if keep else {"scale_dtype": self.weight_scale_dtype}
        if base != "gptq":
            return out
        if self.damp is not None:
            out["damp"] = self.damp
        if not self.act_order:
            out["act_order"] = False
        return out


class ActQuantLinear(nn.Module):
    """x -> [x / smooth] -> [x Q] -> [learned transform] -> Q_a(.) -> x @ weight.T + bias
    [+ offset].

    `weight` [out, in] is the (fake-quantized) weight in the transformed basis, so with every
    quantizer off the module computes the original linear exactly (up to float rounding).
    `offset` [out]: z W^T of a learned transform that shifts its input by z (kept apart from
    the layer's own bias, which a layer may not have)."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        act: ActQuantConfig | None,
        *,
        smooth: torch.Tensor | None = None,
        rotation: Rotation | None = None,
        transform: LearnedTransform | None = None,
        act_scale: torch.Tensor | None = None,
        offset: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("smooth", smooth)
        self.register_buffer("act_scale", act_scale)
        self.register_buffer("offset", None if offset is None else offset.detach().clone())
        self.rotation, self.transform, self.act = rotation, transform, act

    def _apply(self, fn, recurse=True):
        # the rotation's signs and the transform's matrices are not buffers: follow the weight
        super()._apply(fn, recurse)
        device = self.weight.device
        if self.rotation is not None:
            self.rotation = self.rotation.to(device)
        if self.transform is not None:
            self.transform = self.transform.to(device)
        return self

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The online part before quantization: x [..., in] -> transformed x [..., in]."""
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        if self.rotation is not None:
            x = rotate(x, self.rotation)
        if self.transform is not None:
            x = self.transform.apply(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fake_quantize_activations(self.transform_input(x), self.act, self.act_scale)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(x, self.weight.to(x.dtype), bias)
        return y if self.offset is None else y + self.offset.to(y.dtype)


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, module)


def rotate_model(model: DiffusionLM, seed: int = 0, *, fold_residual: bool = True) -> DiffusionLM:
    """Float Hadamard rotation of every quantizable linear's input, folded into its weight
    (W Q) and applied online (x Q): the model's outputs are unchanged up to float rounding.
    A family that declares a residual layout (LLaDA, Dream) first gets the residual stream
    rotated offline (`fold_residual_rotation`, `fold_residual`): the linears reading the stream
    then take their input already rotated and run no online rotation; the others keep theirs."""
    if fold_residual:
        fold_residual_rotation(model, seed)
    # extra stacks (PLANNER's prior) too; the main stack keeps its seeds (i counts per stack)
    stacks = [*(stack.blocks for stack in model.extra_block_stacks()), model.blocks]
    for i, block in (pair for blocks in stacks for pair in enumerate(blocks)):
        for j, (name, lin) in enumerate(model.quantizable_linears(block)):
            if reads_rotated_stream(lin):  # weight already folded with the stream's Q
                _set_submodule(block, name, ActQuantLinear(lin.weight.detach(), lin.bias, None))
                continue
            rot = random_hadamard(lin.in_features, seed=seed + 1000 * i + j)
            w = fold_input_rotation(lin.weight.detach(), rot.to(lin.weight.device))
            _set_submodule(block, name, ActQuantLinear(w, lin.bias, None, rotation=rot))
    return model


# --- calibration ------------------------------------------------------------------------------


def _slices(n: int, batch: int) -> list[slice]:
    return [slice(i, min(i + batch, n)) for i in range(0, n, batch)]


def _collect_inputs(
    block: nn.Module,
    linears: list[tuple[str, nn.Module]],
    cache: list[torch.Tensor],
    contexts: list[BlockContext],
    weights: list[torch.Tensor],
    cfg: ActCalibConfig,
    seed: int,
) -> dict[str, LayerInputs]:
    """Statistics of every declared linear's (raw, untransformed) input over all batches."""
    device = torch.device(cfg.device)
    accs = {
        name: LayerInputsAccumulator(lin.in_features, cfg.max_rows, seed, device)
        for name, lin in linears
    }
    current: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module, args):
            accs[name].add(args[0], current["w"])

        return fn

    handles = [lin.register_forward_pre_hook(hook(name)) for name, lin in linears]
    try:
        for h, ctx, w in zip(cache, contexts, weights, strict=True):
            current["w"] = w.to(device)
            block(h.to(device), ctx)
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.finish() for name, acc in accs.items()}


def transform_inputs(
    inputs: LayerInputs, fn: Callable[[torch.Tensor], torch.Tensor], diagonal: torch.Tensor | None
) -> LayerInputs:
    """Statistics of the rows x T for a linear row map fn(x) = x T: H -> T^T H T (fn applied
    to both sides of the symmetric H), sample -> fn(sample). The per-channel abs-max and
    abs-mean are exact for a diagonal T (`diagonal` = its entries); otherwise they are read
    from the sample rows (a rotated channel's maximum is not a function of the old maxima)."""
    hessian = fn(fn(inputs.hessian).T)
    sample = fn(inputs.sample)
    if diagonal is not None:
        absmax, absmean = inputs.act_absmax * diagonal.abs(), inputs.act_absmean * diagonal.abs()
    else:
        absmax, absmean = sample.abs().amax(dim=0), sample.abs().mean(dim=0)
    mean = None if inputs.mean is None else fn(inputs.mean[None])[0]
    return LayerInputs(hessian, sample, inputs.sample_weights, absmax, absmean, inputs.n_rows, mean)


def quantize_layer(
    name: str, lin: nn.Module, inputs: LayerInputs, cfg: ActCalibConfig, seed: int
) -> tuple[ActQuantLinear, dict]:
    """One linear -> its ActQuantLinear and a row of the layer table."""
    module, row, _ = _quantize_layer(name, lin, inputs, cfg, seed)
    return module, row


def _learned_weight_config(scheme: ActScheme) -> QuantConfig:
    """The weight grid the learned transform trains against (INT8 when the weights stay float:
    learn_transform then only uses its clip, which `_quantize_weight` ignores)."""
    return scheme.weight_config("rtn") if scheme.w_bits else QuantConfig(bits=8, group_size=None)


def _quantize_layer(
    name: str,
    lin: nn.Module,
    inputs: LayerInputs,
    cfg: ActCalibConfig,
    seed: int,
    scheme: ActScheme | None = None,
) -> tuple[ActQuantLinear, dict, FlatQuantResult | None]:
    """`quantize_layer`, also returning the learned transform (learned methods; else None).
    scheme: this layer's grid when it is not `cfg.scheme`'s (`_stack_scheme`)."""
    scheme = scheme or SCHEMES[cfg.scheme]
    base, kind = METHODS[cfg.method]
    w = lin.weight.detach().float()
    if kind == "learned":
        wcfg = _learned_weight_config(scheme)
        learned = learn_transform(
            w, inputs.sample, wcfg, scheme.act, cfg.flat, inputs.sample_weights
        )
        module = learned_module(name, lin, inputs, learned, cfg, scheme)
        return module, _layer_row(name, module, w, inputs, cfg, learned.info), learned
    act, extra = scheme.act, {}
    if kind == "smooth":
        s = smoothing_scales(inputs.act_absmax, w, cfg.smooth_alpha)
        extra["smooth"] = s
        t_inputs, w_t = transform_inputs(inputs, lambda x: x / s, 1 / s), w * s
    elif kind == "hadamard" and reads_rotated_stream(lin):
        # its input is the residual stream, rotated offline (`fold_residual_rotation`): the
        # weight is already W Q and nothing runs online
        t_inputs, w_t = inputs, w
    elif kind == "hadamard":
        rot = random_hadamard(w.shape[1], seed=seed).to(w.device)
        extra["rotation"] = rot
        t_inputs, w_t = (
            transform_inputs(inputs, lambda x: rotate(x, rot), None),
            fold_input_rotation(w, rot),
        )
    else:
        t_inputs, w_t = inputs, w
    w_q = _quantize_weight(name, w_t, t_inputs, scheme, base, overrides=cfg.weight_overrides(base))
    if cfg.clip_search and act.fmt:
        ratio, _ = search_clip_ratio(
            t_inputs.sample, w_t, act, weight_q=w_q, row_weights=t_inputs.sample_weights
        )
        act = replace(act, clip_ratio=ratio)
    scale = None
    if act.fmt == "int" and act.granularity == "tensor":
        scale = static_scale(t_inputs.act_absmax, act.bits, act.clip_ratio)
    module = ActQuantLinear(w_q, lin.bias, act, act_scale=scale, **extra)
    return module, _layer_row(name, module, w, inputs, cfg, {}), None


def learned_module(
    name: str,
    lin: nn.Module,
    inputs: LayerInputs,
    learned: FlatQuantResult,
    cfg: ActCalibConfig,
    scheme: ActScheme | None = None,
) -> ActQuantLinear:
    """The ActQuantLinear of a learned transform: W~ folded offline and quantized (RTN with the
    learned clipping, or GPTQ on the transformed Hessian), x~ and Q_a online (scheme: as in
    `_quantize_layer`)."""
    scheme = scheme or SCHEMES[cfg.scheme]
    base, _ = METHODS[cfg.method]
    tf = learned.transform
    weight = lin.weight.detach().float()
    w_t = tf.fold(weight)
    t_inputs = transform_inputs(shifted_inputs(inputs, tf.shift), tf.linear, None)
    w_q = _quantize_weight(
        name, w_t, t_inputs, scheme, base, learned, overrides=cfg.weight_overrides(base)
    )
    offset = tf.output_offset(weight)
    return ActQuantLinear(w_q, lin.bias, learned.act, transform=tf, offset=offset)


def shifted_inputs(inputs: LayerInputs, shift: torch.Tensor | None) -> LayerInputs:
    """Statistics of the rows x - z: the Hessian sum_r w_r (x_r - z)(x_r - z)^T / sum_r w_r =
    H - m z^T - z m^T + z z^T from the gathered weighted mean m (exact: m and H come from the
    same rows; a mean estimated on the sample would not match H, and with the large channels
    every [MASK] row shares, H - m m^T lost positive definiteness on mdlm-small); sample,
    abs-max and abs-mean from the shifted sample."""
    if shift is None:
        return inputs
    if inputs.mean is None:
        raise DataError("a shifted input needs the rows' weighted mean; gather it (LayerInputs)")
    z = shift.detach().double().to(inputs.sample.device)
    m = inputs.mean.double().to(z.device)
    h = inputs.hessian.double()
    hessian = h - torch.outer(m, z) - torch.outer(z, m) + torch.outer(z, z)
    # H was stored in float32: its rounding (<= 2^-24 |H_ij| an entry, at most 2^-24 ||H||_F in
    # the 2-norm) survives the cancellation, so that much goes on the diagonal - a margin, not a
    # bound (each batch's float32 Gram sum rounds too); negligible unless the shared channels
    # dwarf the rest by ~10^3, as LLaDA's massive activations do
    hessian += torch.eye(len(z), dtype=h.dtype, device=h.device) * 2.0**-24 * h.norm()
    sample = inputs.sample - z.float()
    absmax, absmean = sample.abs().amax(dim=0), sample.abs().mean(dim=0)
    mean = (m - z).float()
    return LayerInputs(
        hessian.float(), sample, inputs.sample_weights, absmax, absmean, inputs.n_rows, mean
    )


def _layer_row(
    name: str, module: ActQuantLinear, w: torch.Tensor, inputs: LayerInputs, cfg, info: dict
) -> dict:
    return {
        "layer": name,
        "scheme": cfg.scheme,
        "method": cfg.method,
        "act_clip": module.act.clip_ratio,
        "rel_error": layer_error(module, w, inputs),
        **{k: v for k, v in info.items() if isinstance(v, float)},
    }


def _quantize_weight(
    name, w_t, t_inputs, scheme: ActScheme, base: str, learned=None, *, overrides=None
) -> torch.Tensor:
    """The fake-quantized transformed weight [out, in] (`overrides`: GPTQ knobs)."""
    if scheme.w_bits is None:
        return w_t
    if scheme.w_fmt == "fp8":
        return quantize_fp8_rows(w_t)
    if learned is not None and base == "rtn":  # RTN with the learned clipping (FlatQuant)
        return learned.result.weight
    wcfg = scheme.weight_config(base)
    if overrides:
        wcfg = replace(wcfg, **overrides)
    return quantize_linear(w_t, t_inputs, wcfg, name=name).weight


@torch.no_grad()
def layer_error(module: ActQuantLinear, weight: torch.Tensor, inputs: LayerInputs) -> float:
    """Relative row-weighted output error of the quantized module on the raw sample rows (a
    shifted input's offset z W^T is part of the module's output, its own bias is not)."""
    x = inputs.sample.to(weight.device)
    rw = inputs.sample_weights.to(weight.device)
    ref = x @ weight.float().T  # [n, out]
    bias = 0 if module.bias is None else module.bias.float()
    got = module(x).float() - bias
    return float(
        (rw * ((ref - got) ** 2).sum(1)).sum() / (rw * (ref**2).sum(1)).sum().clamp(min=1e-30)
    )


@torch.no_grad()
def quantize_activations_model(
    model: DiffusionLM,
    x_t: torch.Tensor,
    t: torch.Tensor,
    cfg: ActCalibConfig,
    row_weights: torch.Tensor | None = None,
    text_ids: torch.Tensor | None = None,
    block_log: list[dict] | None = None,
) -> list[dict]:
    """Replace every declared linear of `model` by its ActQuantLinear, block by block, on
    calibration inputs x_t [N, L] at levels t [N] (row_weights [N, L]: FAIR-Calib's; None:
    ones; text_ids [N]: the text of each row, so the block-wise stage holds out whole texts;
    None: every row its own text). Returns the per-layer table; the block-wise stage's logs
    are appended to `block_log`.

    Extra block stacks (`model.extra_block_stacks()`, PLANNER's latent prior) go first, with
    the same per-block code, as the weight-only engine walks them: a stack's first block reads
    `stack.inputs` on the calibration rows (not the main stack's stream), its rows weigh
    `stack.row_weights`, its layers are named `<stack>.<i>.<name>`. The main stack's inputs then
    come from the stem running the quantized stacks."""
    model.to(torch.device(cfg.device)).eval()
    weights = torch.ones(x_t.shape) if row_weights is None else row_weights.float()
    main = BlockStack("blocks", model.blocks, model.stem, lambda w: w)
    rows = []
    for stack in [*model.extra_block_stacks(), main]:
        extra = stack is not main
        rows += _quantize_act_stack(model, stack, extra, x_t, t, weights, cfg, text_ids, block_log)
    return rows


def _quantize_act_stack(
    model: DiffusionLM,
    stack: BlockStack,
    extra: bool,
    x_t: torch.Tensor,
    t: torch.Tensor,
    token_weights: torch.Tensor,
    cfg: ActCalibConfig,
    text_ids: torch.Tensor | None,
    block_log: list[dict] | None,
) -> list[dict]:
    """One stack of `quantize_activations_model`: its inputs cached from `stack.inputs`, then
    each block calibrated on the outputs of its quantized predecessors. extra: an extra stack
    (its narrow layers per row, `_stack_scheme`; its block logs named `<stack>.<i>`)."""
    device = torch.device(cfg.device)
    slices = _slices(len(x_t), cfg.batch)
    cache, contexts = [], []
    for sl in slices:
        h, ctx = stack.inputs(x_t[sl].to(device), t[sl].to(device))
        cache.append(h.cpu())
        contexts.append(ctx)
    weights = stack.row_weights(token_weights).float().cpu()  # [N, R]: the stack's rows
    wts = [weights[sl] for sl in slices]
    # recon's default target: the float model's own block outputs on float inputs, so each
    # block is pulled towards the float model's hidden state, not towards the float block on
    # already drifted inputs (later blocks also undo earlier blocks' errors)
    stream = cfg.block_wise and cfg.block_target == "float_stream"
    float_cache = [h.clone() for h in cache] if stream else None
    rows = []
    for i, block in enumerate(stack.blocks):
        linears = model.quantizable_linears(block)
        stats = _collect_inputs(block, linears, cache, contexts, wts, cfg, cfg.seed + i)
        # (a block whose linears are all excluded has nothing to tune)
        float_block = copy.deepcopy(block) if cfg.block_wise and linears else None
        layers = _quantize_block_layers(block, linears, stats, f"{stack.name}.{i}", i, extra, cfg)
        rows += [layer.row for layer in layers]
        if float_block is not None:
            targets = _run_block(float_block, float_cache or cache, contexts, device)
            log = tune_block_transforms(
                block, layers, cache, targets, contexts, weights, cfg, cfg.seed + i, text_ids
            )
            if block_log is not None:
                block_log.append({"block": f"{stack.name}.{i}" if extra else i, **log})
            float_cache = targets if stream else None
            del float_block
        elif float_cache is not None:  # nothing quantized here: the block is still float
            float_cache = _run_block(block, float_cache, contexts, device)
        cache = _run_block(block, cache, contexts, device)
    return rows


def _quantize_block_layers(
    block: nn.Module,
    linears: list[tuple[str, nn.Module]],
    stats: dict[str, LayerInputs],
    prefix: str,
    index: int,
    extra: bool,
    cfg: ActCalibConfig,
) -> list[LearnedLayer]:
    """Replace block `index`'s linears (layer names `<prefix>.<name>`) by their ActQuantLinear."""
    layers = []
    for j, (name, lin) in enumerate(linears):
        full = f"{prefix}.{name}"
        scheme = _stack_scheme(cfg, lin.in_features) if extra else None
        module, row, learned = _quantize_layer(
            full, lin, stats[name], cfg, cfg.seed + 1000 * index + j, scheme
        )
        if scheme is not None and scheme.w_group != SCHEMES[cfg.scheme].w_group:
            row["group_size"] = scheme.w_group  # the table says where the grid differs
        _set_submodule(block, name, module)
        layers.append(LearnedLayer(name, full, lin, stats[name], learned, module, row, scheme))
    return layers


def _stack_scheme(cfg: ActCalibConfig, in_features: int) -> ActScheme:
    """The grid of one layer of an extra block stack: `cfg.scheme`'s, except that a layer
    narrower than the weight group is quantized per row - the weight-only engine's rule
    (`engine.stack_layer_config`): PLANNER's prior is 64 wide in planner-tiny, and W4A8's
    group of 128 must not refuse the whole model."""
    scheme = SCHEMES[cfg.scheme]
    group = stack_layer_config(scheme.weight_config("rtn"), in_features).group_size
    return scheme if group == scheme.w_group else replace(scheme, w_group=group)


def _run_block(
    block: nn.Module, cache: list[torch.Tensor], contexts: list[BlockContext], device
) -> list[torch.Tensor]:
    return [block(h.to(device), ctx).cpu() for h, ctx in zip(cache, contexts, strict=True)]


# --- block-wise stage of the learned transforms -----------------------------------------------


@dataclass
class LearnedLayer:
    """One declared linear of a block during the block-wise stage."""

    name: str  # within the block
    full: str  # <stack>.i.name (blocks.i.name in the main stack)
    linear: nn.Module  # the float linear
    inputs: LayerInputs  # its input statistics (GPTQ's Hessian for flatquant-gptq)
    learned: FlatQuantResult  # the per-layer result
    module: ActQuantLinear  # the per-layer module
    row: dict  # its row of the layer table (updated if the block-wise stage improves it)
    scheme: ActScheme | None = None  # its grid when not the config's (`_stack_scheme`)


def block_loss(
    out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_r w_r ||out_r - target_r||^2, sum_r w_r) over token rows: out, target [B, L, D],
    weights [B, L]; the stage minimises their ratio (recon's weighted MSE)."""
    return weighted_sq_sums(out, target, weights)


def _trainable(layer: LearnedLayer, cfg: ActCalibConfig) -> TrainableTransformLinear:
    scheme = layer.scheme or SCHEMES[cfg.scheme]
    mode = "none" if scheme.w_bits is None else ("fp8" if scheme.w_fmt == "fp8" else "int")
    return TrainableTransformLinear(
        layer.linear.weight,
        layer.linear.bias,
        layer.learned,
        _learned_weight_config(scheme),
        cfg.flat.learn_clip,
        mode,
        cfg.flat.shift,
    )


def _install(block: nn.Module, layers: list[LearnedLayer], modules: list[nn.Module]) -> None:
    for layer, module in zip(layers, modules, strict=True):
        _set_submodule(block, layer.name, module)


def tune_block_transforms(
    block: nn.Module,
    layers: list[LearnedLayer],
    inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    contexts: list[BlockContext],
    weights: torch.Tensor,
    cfg: ActCalibConfig,
    seed: int,
    text_ids: torch.Tensor | None = None,
) -> dict:
    """Tune all learned transforms and clip ratios of `block` jointly (Adam, STE rounding) on
    the row-weighted MSE of its quantized output against `targets`, starting from the per-layer
    modules the block holds. inputs/targets: [batch, L, D] chunks per calibration batch,
    weights [N, L]. A seeded `cfg.block_holdout` of the texts never trains; the frozen modules
    with the lowest held-out loss (the per-layer ones included, at step 0) stay in the block,
    so the block is never worse than per-layer on the held-out rows. An evaluation that finds
    a NaN or inf parameter ends the training (`diverged_step` in the log). Returns the log."""
    device = torch.device(cfg.device)
    src, goal = SequenceRows(inputs, contexts), SequenceRows(targets, contexts)
    train, val = split_rows(len(src), cfg.block_holdout, seed, text_ids)

    def sums(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        out = block(src.gather(idx, device), src.context(idx, device))
        return block_loss(out, goal.gather(idx, device), weights[idx].to(device))

    def held_out(modules: list[nn.Module]) -> float:
        _install(block, layers, modules)
        with torch.no_grad():
            parts = [sums(b) for b in _chunks(val, cfg.batch)]
        return float(sum(n for n, _ in parts) / sum(d for _, d in parts).clamp(min=1e-12))

    best_modules = [layer.module for layer in layers]
    log = {"initial_val": held_out(best_modules), "best_step": 0, "steps": cfg.block_steps}
    log["best_val"] = log["initial_val"]
    trainables = [_trainable(layer, cfg) for layer in layers]
    opt = torch.optim.Adam(
        [g for tr in trainables for g in tr.param_groups(cfg.block_lr, cfg.block_lr_clip)]
    )
    decay = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0 - k / cfg.block_steps)
    gen = torch.Generator().manual_seed(seed)
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:  # only the transforms train; the block's own weights stay as they are
        p.requires_grad_(False)
    try:
        with torch.enable_grad():
            for step in range(1, cfg.block_steps + 1):
                _install(block, layers, trainables)
                pick = torch.randint(len(train), (min(cfg.block_batch, len(train)),), generator=gen)
                num, den = sums([train[k] for k in pick.tolist()])
                loss = num / den.clamp(min=1e-12)
                opt.zero_grad()
                loss.backward()
                opt.step()
                decay.step()
                log.setdefault("train_first", float(loss.detach()))
                log["train_last"] = float(loss.detach())
                if step % cfg.block_eval_every == 0 or step == cfg.block_steps:
                    if not _all_finite(trainables):
                        # a rate that wrecks the transforms: once a parameter is NaN or inf,
                        # Adam keeps it so and no later step recovers; freezing it would fail
                        # (a NaN clip ratio), and the best modules so far stay in the block
                        log["diverged_step"] = step
                        break
                    modules = [
                        _freeze_layer(lay, tr, cfg)
                        for lay, tr in zip(layers, trainables, strict=True)
                    ]
                    best_modules = _keep_best(log, step, held_out(modules), modules, best_modules)
    finally:
        _install(block, layers, best_modules)
        for p in frozen:
            p.requires_grad_(True)
    if log["best_step"]:
        _update_rows(layers, best_modules, log["best_step"])
    return log


def _all_finite(modules: list[nn.Module]) -> bool:
    return all(bool(torch.isfinite(p).all()) for m in modules for p in m.parameters())


def _keep_best(log: dict, step: int, val: float, modules: list, best: list) -> list:
    """The modules with the lowest held-out loss so far (NaN never wins; ties keep the older)."""
    if val == val and val < log["best_val"]:
        log.update(best_val=val, best_step=step)
        return modules
    return best


def _chunks(idx: list[int], size: int) -> list[list[int]]:
    return [idx[k : k + size] for k in range(0, len(idx), size)]


def _freeze_layer(
    layer: LearnedLayer, trainable: TrainableTransformLinear, cfg: ActCalibConfig
) -> ActQuantLinear:
    learned = trainable.freeze(layer.learned.info)
    return learned_module(layer.full, layer.linear, layer.inputs, learned, cfg, layer.scheme)


def _update_rows(layers: list[LearnedLayer], modules: list[ActQuantLinear], step: int) -> None:
    for layer, module in zip(layers, modules, strict=True):
        w = layer.linear.weight.detach().float()
        layer.row.update(
            act_clip=module.act.clip_ratio,
            rel_error=layer_error(module, w, layer.inputs),
            block_step=float(step),
        )


def fair_rows_config(cfg: ActCalibConfig, n_texts: int, **knobs) -> FairCalibConfig:
    """The FAIR-Calib config whose calibration rows (`calib.fair_inputs`) the `fair` method
    learns on: the scheme's weight grid for the instability noise (INT4 per-channel when the
    weights stay float), half of `n_texts` tracked, the rest masked. `knobs`: FairCalibConfig
    fields (weighting, steps, prefix_len, ...); None values keep the defaults."""
    scheme = SCHEMES[cfg.scheme]
    given = {k: v for k, v in knobs.items() if v is not None}
    return FairCalibConfig(
        bits=scheme.w_bits or 4,
        group_size=scheme.w_group if scheme.w_bits else None,
        n_prompts=max(n_texts // 2, 1),
        preset="fast",
        **given,
    )


def act_calibration_inputs(
    model: DiffusionLM,
    tokens: torch.Tensor,
    cfg: ActCalibConfig,
    calib: CalibConfig,
    fair: FairCalibConfig | None = None,
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, dict]:
    """Calibration rows for `cfg` from texts tokens [N, L]: (x_t, t, row weights or None,
    FAIR-Calib diagnostics). Every method but fair and fair-gptq takes the texts masked as
    `calib` says (`masked_inputs`); those two take FAIR-Calib's rows (`calib.fair_inputs`, config `fair` or
    `fair_rows_config`'s default)."""
    rows = act_calibration_rows(model, tokens, cfg, calib, fair, progress)
    return rows["x_t"], rows["t"], rows["weights"], rows["extra"]


def act_calibration_rows(
    model: DiffusionLM,
    tokens: torch.Tensor,
    cfg: ActCalibConfig,
    calib: CalibConfig,
    fair: FairCalibConfig | None = None,
    progress: bool = False,
) -> dict:
    """`act_calibration_inputs` as a dict, with text_ids [M] (the text of each row, for the
    block-wise stage's held-out split) added."""
    from faircalib.calib import fair_inputs  # the package imports this module's users only

    if cfg.method not in FAIR_METHODS:
        x_t, t = masked_inputs(model, tokens, calib)
        text_ids = torch.arange(len(tokens)).repeat(calib.views)  # row v * N + i: text i
        return {"x_t": x_t, "t": t, "weights": None, "text_ids": text_ids, "extra": {}}
    fair = fair or fair_rows_config(cfg, len(tokens))
    inputs, extra = fair_inputs(model, fair, tokens, calib, progress)
    keys = ("x_t", "t", "weights", "text_ids")
    return {**{k: inputs[k] for k in keys}, "extra": extra}


def quantize_activations(
    model: DiffusionLM,
    tokens: torch.Tensor,
    cfg: ActCalibConfig,
    calib: CalibConfig,
    fair: FairCalibConfig | None = None,
    progress: bool = False,
) -> dict:
    """Calibrate on texts tokens [N, L] and replace the declared linears (what `faircalib
    quantize --scheme` and `faircalib bench` run). Returns the report: method (scheme, method
    and knobs), calibration config, per-layer table, block-wise stage logs, FAIR-Calib
    diagnostics and timings. QuaRot methods first rotate the residual stream offline where the
    family declares its layout (`fold_residual_rotation`; the report's `residual_rotation`
    says what was folded)."""
    start = time.time()
    model.to(cfg.device)
    residual = None
    if METHODS[cfg.method][1] == "hadamard":
        residual = fold_residual_rotation(model, cfg.seed).to_dict()
    data = act_calibration_rows(model, tokens, cfg, calib, fair, progress)
    weights, extra = data["weights"], data["extra"]
    inputs_s = time.time() - start
    tick = time.time()
    blocks: list[dict] = []
    rows = quantize_activations_model(
        model, data["x_t"], data["t"], cfg, weights, data["text_ids"], blocks
    )
    scheme = SCHEMES[cfg.scheme]
    return {
        "method": {
            **cfg.to_dict(),
            "weights": {"bits": scheme.w_bits, "group_size": scheme.w_group, "fmt": scheme.w_fmt},
            "activations": scheme.act.to_dict(),
            **(
                {"fair_rows": fair_config_dict(fair, cfg, len(tokens))}
                if weights is not None
                else {}
            ),
        },
        "calib": calib.to_dict(),
        **({"residual_rotation": residual} if residual is not None else {}),
        "layers": rows,
        **({"blocks": blocks} if blocks else {}),
        "fair": {k: v for k, v in extra.items() if not k.endswith("_s")},
        "timings": {
            **{k: v for k, v in extra.items() if k.endswith("_s")},
            "inputs_s": inputs_s,
            "quantize_s": time.time() - tick,
            "wall_s": time.time() - start,
        },
    }


def fair_config_dict(fair: FairCalibConfig | None, cfg: ActCalibConfig, n_texts: int) -> dict:
    return (fair or fair_rows_config(cfg, n_texts)).to_dict()


# --- statistics -------------------------------------------------------------------------------


@dataclass
class _RowStats:
    """Running statistics of one layer's input rows of one kind (masked or clean)."""

    token_absmax: list[torch.Tensor] = field(default_factory=list)  # per-batch [rows]
    channel_absmax: torch.Tensor | None = None  # [in]
    sq: float = 0.0
    err8: float = 0.0
    err4: float = 0.0
    t_err4: dict[int, list[float]] = field(default_factory=dict)  # t bin -> [err, sq]

    def add(self, x: torch.Tensor, t_bin: torch.Tensor, n_bins: int) -> None:
        x = x.float()  # [rows, in]
        if len(x) == 0:
            return
        self.token_absmax.append(x.abs().amax(dim=1).cpu())
        cmax = x.abs().amax(dim=0)
        self.channel_absmax = (
            cmax if self.channel_absmax is None else torch.maximum(self.channel_absmax, cmax)
        )
        sq = (x**2).sum(dim=1)  # [rows]
        e8 = ((x - quantize_int_per_token(x, 8)) ** 2).sum(dim=1)
        e4 = ((x - quantize_int_per_token(x, 4)) ** 2).sum(dim=1)
        self.sq, self.err8, self.err4 = (
            self.sq + float(sq.sum()),
            self.err8 + float(e8.sum()),
            self.err4 + float(e4.sum()),
        )
        for b in range(n_bins):
            sel = t_bin == b
            if sel.any():
                acc = self.t_err4.setdefault(b, [0.0, 0.0])
                acc[0] += float(e4[sel].sum())
                acc[1] += float(sq[sel].sum())

    def summary(self, median_ref: float, outlier_factor: float, n_bins: int) -> dict:
        tok = torch.cat(self.token_absmax)
        cmax = self.channel_absmax
        top = torch.topk(cmax, min(3, len(cmax))).indices.tolist()
        return {
            "tokens": len(tok),
            "max_abs": float(tok.max()),
            "token_absmax_p50": float(tok.median()),
            "token_absmax_p99": float(torch.quantile(tok, 0.99)),
            "outlier_token_share": float((tok > outlier_factor * median_ref).float().mean()),
            "channel_ratio": float(cmax.max() / cmax.median().clamp(min=1e-12)),
            "top_channels": top,
            "int8_rel_err": self.err8 / max(self.sq, 1e-30),
            "int4_rel_err": self.err4 / max(self.sq, 1e-30),
            "int4_rel_err_by_t": [
                self.t_err4[b][0] / max(self.t_err4[b][1], 1e-30) if b in self.t_err4 else None
                for b in range(n_bins)
            ],
        }


def _declared_linears(model: DiffusionLM) -> list[tuple[str, nn.Module, bool]]:
    """(full name, linear, whether its input rows are token positions) of every declared
    linear, in the engine's walk order: extra stacks' layers (`<stack>.<i>.<name>`) first,
    then `blocks.<i>.<name>` (the main stack's rows are the tokens)."""
    main = {id(block) for block in model.blocks}
    return [
        (f"{prefix}.{name}", lin, id(block) in main)
        for prefix, block in model.named_calib_blocks()
        for name, lin in model.quantizable_linears(block)
    ]


@torch.no_grad()
def activation_outlier_stats(
    model: DiffusionLM,
    x_t: torch.Tensor,
    t: torch.Tensor,
    *,
    batch: int = 8,
    t_bins: int = 3,
    outlier_factor: float = 10.0,
) -> list[dict]:
    """Per declared linear: statistics of its float inputs on x_t [N, L] at t [N], split into
    rows at mask-token positions and clean rows. A row's abs-max is its largest |x_j|; an
    outlier token is a row whose abs-max exceeds `outlier_factor` times the median row abs-max
    of the layer (both kinds pooled, so the two shares are comparable); channel_ratio is the
    largest channel abs-max over the median channel abs-max; int{8,4}_rel_err is the per-token
    quantization error of the input itself, sum ||x - q(x)||^2 / sum ||x||^2, also per t bin
    (bin b holds t in [b / t_bins, (b + 1) / t_bins)). Extra block stacks' layers (PLANNER's
    prior: `<stack>.<i>.<name>`, first) are included; their rows are no token positions (the
    prior's are the K codes of each sequence), so none is a mask row: all count as clean, in
    their sequence's t bin."""
    model.eval()
    device = model.device
    names = _declared_linears(model)
    stats = {name: {"masked": _RowStats(), "clean": _RowStats()} for name, _, _ in names}
    current: dict[str, torch.Tensor] = {}

    def hook(name: str, token_rows: bool):
        def fn(_module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if token_rows:
                masked, bins = current["masked"], current["bins"]
            else:  # R rows per sequence, sequence-major
                seq_bins = current["seq_bins"]
                bins = seq_bins.repeat_interleave(len(x) // len(seq_bins))
                masked = torch.zeros(len(x), dtype=torch.bool, device=x.device)
            stats[name]["masked"].add(x[masked], bins[masked], t_bins)
            stats[name]["clean"].add(x[~masked], bins[~masked], t_bins)

        return fn

    handles = [lin.register_forward_pre_hook(hook(name, tok)) for name, lin, tok in names]
    try:
        for sl in _slices(len(x_t), batch):
            xb, tb = x_t[sl].to(device), t[sl].to(device)
            current["masked"] = (xb == model.mask_id).reshape(-1)
            row_bins = (tb * t_bins).long().clamp(0, t_bins - 1)  # [B]
            current["seq_bins"] = row_bins
            current["bins"] = row_bins[:, None].expand_as(xb).reshape(-1)
            model.log_probs(xb, tb)
    finally:
        for handle in handles:
            handle.remove()
    out = []
    for name, _, _ in names:
        pooled = torch.cat(stats[name]["masked"].token_absmax + stats[name]["clean"].token_absmax)
        ref = float(pooled.median())
        row = {"layer": name}
        for kind in ("masked", "clean"):
            if stats[name][kind].token_absmax:
                row[kind] = stats[name][kind].summary(ref, outlier_factor, t_bins)
        out.append(row)
    return out


# --- per-layer A4 ablation --------------------------------------------------------------------


def _masked_kl(ref: torch.Tensor, got: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Sum over masked positions of KL(p_ref || p_got); [MASK]'s -inf column contributes 0."""
    p = ref.exp()
    terms = torch.where(ref > float("-inf"), p * (ref - got.clamp(min=-1e4)), torch.zeros_like(p))
    return terms.sum(-1)[masked].sum()


@torch.no_grad()
def a4_ablation(
    model: DiffusionLM,
    x_t: torch.Tensor,
    t: torch.Tensor,
    act: ActQuantConfig | None = None,
    *,
    batch: int = 8,
    leave_one_out: bool = True,
) -> dict:
    """Weights stay float; activations of the declared linears are quantized with `act`
    (default per-token INT4). Mean KL(float || quantized) per masked position: with every
    layer quantized ("all"), with one layer alone ("only"), and with every layer but one
    ("all_but": how much of the damage that layer's input carries). The layers of extra
    block stacks (PLANNER's prior, `<stack>.<i>.<name>`) are among them, first."""
    act = act or ActQuantConfig("int", 4)
    model.eval()
    device = model.device
    names = [(name, lin) for name, lin, _ in _declared_linears(model)]
    slices = _slices(len(x_t), batch)
    refs = [model.log_probs(x_t[sl].to(device), t[sl].to(device)).cpu() for sl in slices]
    n_masked = int((x_t == model.mask_id).sum())

    def kl_with(quantized: set[str]) -> float:
        def pre(_module, args):
            return (fake_quantize_activations(args[0], act),)

        handles = [lin.register_forward_pre_hook(pre) for name, lin in names if name in quantized]
        try:
            total = 0.0
            for sl, ref in zip(slices, refs, strict=True):
                xb = x_t[sl].to(device)
                got = model.log_probs(xb, t[sl].to(device)).cpu()
                total += float(_masked_kl(ref, got, (xb == model.mask_id).cpu()))
        finally:
            for handle in handles:
                handle.remove()
        return total / max(n_masked, 1)

    every = {name for name, _ in names}
    layers = []
    for name, _ in names:
        row = {"layer": name, "only": kl_with({name})}
        if leave_one_out:
            row["all_but"] = kl_with(every - {name})
        layers.append(row)
    return {
        "act": act.to_dict(),
        "masked_positions": n_masked,
        "all": kl_with(every),
        "layers": layers,
    }


def summarize_stats(rows: list[dict]) -> dict:
    """Mean over layers of each linear kind (by name within the block) of the headline stats.
    An extra block stack's kinds stay apart (`prior_blocks.attn_qkv`): another network."""
    kinds: dict[str, list[dict]] = {}
    for r in rows:
        stack, _, name = r["layer"].split(".", 2)
        kinds.setdefault(name if stack == "blocks" else f"{stack}.{name}", []).append(r)
    out = {}
    for kind, group in kinds.items():
        out[kind] = {
            side: {
                key: statistics.mean(g[side][key] for g in group)
                for key in ("outlier_token_share", "channel_ratio", "int4_rel_err", "max_abs")
            }
            for side in ("masked", "clean")
            if all(side in g for g in group)
        }
    return out
