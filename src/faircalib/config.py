"""Configuration dataclasses: one name per concept from the CLI flag to the primitive.

`--bits` -> `QuantConfig.bits` -> the quantizer's level count -> the packer.
"""

from __future__ import annotations

import math
import numbers
import typing
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Literal

from faircalib.errors import ConfigError

SUPPORTED_BITS = (2, 3, 4, 5, 6, 7, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, None)  # None: one scale per output channel
# "e8m0": powers of two (OCP MX's shared-exponent type), the grid the lookup-table W4A8 kernel
# computes exactly (kernels/cutlass_w4a8_lut.py)
SCALE_DTYPES = (None, "bfloat16", "float16", "float32", "e8m0")
# AWQ's clipping search leaves query/key rows alone (as llm-awq does): layer-name pattern ->
# (parts, of), the leading parts/of of the layer's output rows being query/key rows
AWQ_NO_CLIP_ROWS: dict[str, tuple[int, int]] = {
    "*attn_qkv": (2, 3),  # MDLM's fused projection: rows [q; k; v], each d wide
    "*q_proj": (1, 1),
    "*k_proj": (1, 1),
}


def check_fields(obj: Any) -> None:
    """Refuse, in one line, a dataclass field whose value has the wrong type or is not one of
    its Literal's names (`FairCalibConfig(base="nope")`, `bits=4.5`, `damp=float("nan")`).
    Fields of other types (nested configs, dicts) are left to their own checks."""
    hints = typing.get_type_hints(type(obj))
    cls = type(obj).__name__
    for f in fields(obj):
        value, hint = getattr(obj, f.name), hints.get(f.name)
        options = typing.get_args(hint)
        if typing.get_origin(hint) is Literal:
            if value not in options:
                names = ", ".join(repr(o) for o in options)
                raise ConfigError(f"{cls}: unknown {f.name} {value!r}; use one of {names}")
            continue
        optional = type(None) in options
        if optional and value is None:
            continue
        base = next((o for o in options if o is not type(None)), hint) if optional else hint
        if base is bool and not isinstance(value, bool):
            raise ConfigError(f"{cls}: {f.name} must be true or false, got {value!r}")
        if base is int and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ConfigError(f"{cls}: {f.name} must be an integer, got {value!r}")
        if base is float and (
            isinstance(value, bool)
            or not isinstance(value, numbers.Real)
            or not math.isfinite(value)
        ):
            raise ConfigError(
                f"{cls}: {f.name} must be a finite number, got {value!r}; pass a finite value"
            )
        if base is str and not isinstance(value, str):
            raise ConfigError(f"{cls}: {f.name} must be a string, got {value!r}")


def check_at_least(obj: Any, minimum: float, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < minimum:
            raise ConfigError(f"{type(obj).__name__}: {name} must be >= {minimum}, got {value!r}")


def config_from_dict(data: dict[str, Any]) -> QuantConfig:
    """The method config a `to_dict()` (quantization.json, recipe.json) describes; unknown
    methods and field names are refused in one line rather than ignored."""
    from faircalib.calib import METHOD_CONFIGS

    if not isinstance(data, dict):
        raise ConfigError(f"a method config must be a JSON object, got {type(data).__name__}")
    method = data.get("method", "rtn")
    if method not in METHOD_CONFIGS:
        raise ConfigError(f"unknown method {method!r}; use one of {sorted(METHOD_CONFIGS)}")
    cls = METHOD_CONFIGS[method]
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{cls.__name__} has no field(s) {unknown}; known: {sorted(known)}")
    kwargs = dict(data)
    if "no_clip_rows" in kwargs and isinstance(kwargs["no_clip_rows"], dict):  # JSON lists
        kwargs["no_clip_rows"] = {k: tuple(v) for k, v in kwargs["no_clip_rows"].items()}
    return cls(**kwargs)


def check_damp(damp: float) -> None:
    """GPTQ's Hessian damping, a fraction of the mean diagonal: negative breaks the inverse."""
    if not 0 <= damp <= 1:
        raise ConfigError(f"--damp must be a fraction in [0, 1], got {damp}; use e.g. --damp 0.01")


@dataclass
class QuantConfig:
    """Weight quantizer shared by every method."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = False
    # round scales to this dtype before codes are chosen ("bfloat16" for packed checkpoints, so
    # fake-quant, packed and stock readers agree exactly); None keeps float32 scales
    scale_dtype: str | None = None

    def __post_init__(self) -> None:
        check_fields(self)
        if self.scale_dtype not in SCALE_DTYPES:
            raise ConfigError(
                f"unsupported scale dtype {self.scale_dtype!r}; choose one of {SCALE_DTYPES}"
            )
        if self.bits not in SUPPORTED_BITS:
            raise ConfigError(f"unsupported bit width {self.bits}; choose one of {SUPPORTED_BITS}")
        if self.group_size in (-1, 0):
            self.group_size = None  # -1 / 0 on the CLI mean per-channel (another negative: a typo)
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ConfigError(
                f"unsupported group size {self.group_size}; choose 32, 64, 128 or per-channel (-1)"
            )

    @property
    def levels(self) -> int:
        return 2**self.bits

    def check_layer(self, name: str, in_features: int) -> None:
        if self.group_size is not None and in_features % self.group_size:
            raise ConfigError(
                f"group size {self.group_size} does not divide {name}'s {in_features} input "
                "features; pass a --group-size that divides it (e.g. 32 or 64), or per-channel"
            )

    def to_dict(self) -> dict[str, Any]:
        return {"method": getattr(self, "method", "rtn"), **asdict(self)}


@dataclass
class RTNConfig(QuantConfig):
    """Round-to-nearest with min-max ranges: the 'standard PTQ' baseline."""

    method: Literal["rtn"] = "rtn"


@dataclass
class GPTQConfig(QuantConfig):
    """GPTQ (Frantar et al. 2023). `act_order` quantizes columns by decreasing Hessian diagonal;
    with groups it uses static groups (scales fixed before the reordering) so the codes stay
    in the plain contiguous-group layout that packed formats store."""

    method: Literal["gptq"] = "gptq"
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128

    def __post_init__(self) -> None:
        super().__post_init__()
        check_damp(self.damp)
        check_at_least(self, 1, "block_size")


@dataclass
class AWQConfig(QuantConfig):
    """AWQ (Lin et al. 2024): per-input-channel scales s = mean|x|^a, a searched on a grid,
    then a search over clipping ranges."""

    method: Literal["awq"] = "awq"
    n_grid: int = 20
    clip_search: bool = True
    max_shrink: float = 0.5
    n_clip_grid: int = 20
    no_clip_rows: dict[str, tuple[int, int]] = field(default_factory=lambda: dict(AWQ_NO_CLIP_ROWS))

    def __post_init__(self) -> None:
        super().__post_init__()
        check_at_least(self, 1, "n_grid", "n_clip_grid")
        if not 0 <= self.max_shrink < 1:
            raise ConfigError(f"AWQ max_shrink must be in [0, 1), got {self.max_shrink}")


@dataclass
class SmoothQuantConfig(QuantConfig):
    """SmoothQuant (Xiao et al. 2023): migrate activation outliers into the weights with
    strength `alpha`, then W8A8 with per-token dynamic activation quantization."""

    bits: int = 8  # the paper's setting: W8A8, per-channel weights
    group_size: int | None = None
    method: Literal["smoothquant"] = "smoothquant"
    alpha: float = 0.5
    act_bits: int = 8

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.act_bits <= 16:
            raise ConfigError(f"SmoothQuant act_bits must be in 2..16, got {self.act_bits}")
        if not 0 <= self.alpha <= 1:
            raise ConfigError(
                f"SmoothQuant alpha must be in [0, 1], got {self.alpha}; use e.g. --alpha 0.5"
            )


@dataclass
class ReconConfig:
    """Stage 2 of FAIR-Calib: learn each block's quantization parameters by gradient descent.

    Each quantized linear keeps its base method's integer grid (GPTQ's codes and zero points)
    and learns a per-group scale gain (Adam) and, with `rounding`, a rounding offset in
    [-0.5, 0.5] per weight (signed gradient, as AutoRound), so a code may move one step. The
    loss is the row-weighted squared error of the block's output against `target`:
    "float_stream" = the float model's own block outputs (the float model run on float inputs,
    so later blocks also correct the errors of earlier ones), "quant_input" = the float block
    on the quantized model's inputs. `holdout` of the calibration sequences never train and pick
    the best step (the initialisation included), so the result is never worse than the base
    method on held-out rows. `e2e_steps` > 0 then tunes only the scales of the whole model
    against KL(p_float || p_quant) at the masked positions (weighted like the rows).
    """

    steps: int = 200
    batch: int = 4  # sequences per step
    lr_scale: float = 2e-3  # Adam, on log scale gains
    lr_round: float = 5e-3  # signed gradient on rounding offsets; 0 = scales only
    rounding: bool = True
    target: Literal["float_stream", "quant_input"] = "float_stream"
    holdout: float = 0.125
    eval_every: int = 25
    e2e_steps: int = 600
    e2e_lr: float = 2e-3
    e2e_batch: int = 4
    e2e_fresh_masks: bool = True  # re-mask calibration texts at a new t every step
    e2e_rounding: bool = False  # also learn rounding offsets end to end (lr_round)

    def __post_init__(self) -> None:
        check_fields(self)
        if min(self.steps, self.e2e_steps) < 0 or self.batch < 1 or self.e2e_batch < 1:
            raise ConfigError(
                "reconstruction steps must be >= 0 and batches >= 1; use --recon-steps and "
                "--e2e-steps of 0 (off) or more"
            )
        if min(self.lr_scale, self.lr_round, self.e2e_lr) < 0:
            raise ConfigError("reconstruction learning rates must be >= 0")
        if not 0 < self.holdout < 1:
            raise ConfigError(f"holdout must be a fraction in (0, 1), got {self.holdout}")
        if self.target not in ("float_stream", "quant_input"):
            raise ConfigError(f"unknown target {self.target!r}; use float_stream or quant_input")
        if self.eval_every < 1:
            raise ConfigError("eval_every must be >= 1")


@dataclass
class FairCalibConfig(QuantConfig):
    """FAIR-Calib: frontier-aware, instability-weighted calibration around a base method.

    1. Frontier tracking: the float model's own sampler runs on `n_prompts` calibration prompts
       (a `prefix_len`-token C4 prefix, the rest masked) for `steps` steps; every visited state
       (x_t, t) and the positions committed at each step are recorded. This needs the whole
       float model on the calibration device once, offloading or not (with
       `CalibConfig.offload` it moves there for steps 1-2 and back to the CPU afterwards).
    2. Instability: at the recorded states, KL(p_float || p_noisy) per position, where p_noisy
       is the model with `noise` applied to every quantizable weight: "rtn" = the RTN error at the
       target bits/group size, "random" = Gaussian noise of the same per-layer norm; scaled by
       `noise_scale` (0 gives zero instability).
    3. Row weights: tokens on the frontier (committed within `window` steps of the state) get
       floor + min((KL / mean frontier KL) ** gamma, max_weight); all other rows get `floor`.
       `weighting` = "instability" (KL), "margin" (1 - top1/top2 margin), "prior" (the
       publication's Stage-I position prior - frontier hits x masked-stage unreliability per
       generated position, faircalib.frontier.prior - on every generated position of the
       state rows) or "uniform" (all 1);
       `tokens` = "frontier" or "all" (every masked position scored).
    4. The base method (`base`, GPTQ by default) calibrates with these weights in its Hessian and
       statistics, i.e. it minimises the weighted output error. `inputs` = "mixed" (default):
       half of the calibration sequences are masked at stratified t (weight 1 everywhere) and
       half are recorded sampler states with frontier weights; "states": all sequences are
       sampler states (the publication's description; worse at 3 bits in our ablation).
    """

    method: Literal["fair"] = "fair"
    preset: Literal["full", "fast"] = "full"
    inputs: Literal["mixed", "states"] = "mixed"
    base: Literal["gptq", "awq", "rtn"] = "gptq"
    n_prompts: int = 128
    prefix_len: int = 64
    steps: int = 16
    sampler: str = "low_confidence"
    noise: Literal["rtn", "random"] = "rtn"
    noise_scale: float = 1.0
    weighting: Literal["instability", "margin", "prior", "uniform"] = "instability"
    tokens: Literal["frontier", "all"] = "frontier"
    window: int = 1
    floor: float = 1.0
    gamma: float = 1.0
    max_weight: float = 20.0
    # knobs of the base method
    damp: float = 0.01
    act_order: bool = True
    block_size: int = 128
    # stage 2, block-wise reconstruction (preset "full"; "fast" stops after the weighted base)
    recon: ReconConfig = field(default_factory=lambda: ReconConfig())

    def __post_init__(self) -> None:
        super().__post_init__()
        check_damp(self.damp)
        if isinstance(self.recon, dict):  # from a recorded config / JSON
            self.recon = ReconConfig(**self.recon)
        if self.preset not in ("full", "fast"):
            raise ConfigError(f"unknown FAIR-Calib preset {self.preset!r}; use 'full' or 'fast'")
        if self.base not in ("gptq", "awq", "rtn"):
            raise ConfigError(f"unknown FAIR-Calib base {self.base!r}; use gptq, awq or rtn")
        if self.weighting not in ("instability", "margin", "prior", "uniform"):
            raise ConfigError(
                f"unknown weighting {self.weighting!r}; use instability, margin, prior or uniform"
            )
        if self.gamma < 0 or self.floor < 0 or self.max_weight < 0:
            raise ConfigError(
                "gamma, floor and max_weight must be >= 0; use non-negative --fair-gamma, "
                "--fair-floor and --fair-max-weight"
            )
        if not isinstance(self.recon, ReconConfig):
            raise ConfigError(f"recon must be a ReconConfig or a dict, got {self.recon!r}")
        check_at_least(self, 1, "n_prompts", "steps", "block_size")
        check_at_least(self, 0, "prefix_len", "window", "noise_scale")
        from faircalib.commands.common import SAMPLER_NAMES  # argparse only: no cycle

        if self.sampler not in SAMPLER_NAMES:
            raise ConfigError(
                f"unknown FAIR-Calib sampler {self.sampler!r}; use one of {SAMPLER_NAMES}"
            )

    @property
    def optimised(self) -> bool:
        """Whether stage 2 (block reconstruction and/or the end-to-end stage) runs."""
        return self.preset == "full" and (self.recon.steps > 0 or self.recon.e2e_steps > 0)

    def base_config(self) -> QuantConfig:
        common = {
            "bits": self.bits,
            "group_size": self.group_size,
            "symmetric": self.symmetric,
            "scale_dtype": self.scale_dtype,
        }
        if self.base == "gptq":
            return GPTQConfig(
                **common, damp=self.damp, act_order=self.act_order, block_size=self.block_size
            )
        if self.base == "awq":
            return AWQConfig(**common)
        return RTNConfig(**common)


@dataclass
class ReconMethodConfig(FairCalibConfig):
    """`recon`: FAIR-Calib's optimiser on FAIR-Calib's calibration inputs (masked sequences plus
    recorded sampler states) with every token weight 1 - the attribution baseline that says how
    much of FAIR-Calib's gain is the frontier weighting rather than the optimisation."""

    method: Literal["recon"] = "recon"
    weighting: Literal["instability", "margin", "prior", "uniform"] = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weighting != "uniform":
            raise ConfigError("recon weights every token 1; use --method fair for weighting")


@dataclass
class CalibConfig:
    """What the calibration set is and how the dLLM sees it."""

    source: str = "c4"
    split: str | None = "train"
    n_samples: int = 128
    seq_len: int | None = None  # None: the model's training length
    seed: int = 0
    # how calibration inputs are noised: 'uniform' t stratified over [t_min, 1]; 'sampler' t on
    # the grid k / sampler_steps (k = 1..sampler_steps) a sampler visits; 'none' (clean text)
    masking: Literal["uniform", "sampler", "none"] = "uniform"
    t_min: float = 0.05  # 'uniform' only
    sampler_steps: int = 64  # 'sampler' only
    # masked views per calibration text: each text enters calibration `views` times, masked at
    # `views` different noise levels (a dLLM sees every text at every t); 1 = one view
    views: int = 1
    max_rows_per_layer: int = 8192  # rows kept for searches (AWQ, clipping); Hessians use all
    device: str = "cpu"
    # large models: blocks live on the CPU, one at a time on `device`; the result ends on the CPU
    offload: bool = False
    # which block linears are quantized: glob patterns on full names (`blocks.*.mlp.*`);
    # None = every quantizable linear (faircalib.calib.select)
    include: list[str] | None = None
    exclude: list[str] | None = None
    # a cap on what FAIR-Calib's whole-model forwards (frontier tracking, instability scoring)
    # use on `device`: batches shrink, and the model streams block by block if it must; None:
    # the device's memory (results are then those of the default batches)
    max_device_gib: float | None = None
    # --quantize-head: weight-only RTN of the vocabulary layers the family declares
    # (`DiffusionLM.vocab_layers`): 'int8' per channel (per token row), 'int4' in groups of
    # 128 along the hidden dim; None (default) leaves them in float
    quantize_head: Literal[None, "int8", "int4"] = None

    def __post_init__(self) -> None:
        check_fields(self)
        from faircalib.calib.select import check_patterns

        self.include = check_patterns(self.include, "include")
        self.exclude = check_patterns(self.exclude, "exclude")
        if not 0 <= self.t_min < 1:
            raise ConfigError(f"t_min must be in [0, 1), got {self.t_min}")
        check_at_least(self, 1, "max_rows_per_layer")
        if self.n_samples < 1:
            raise ConfigError("calibration needs at least one sample; use --nsamples 1 or more")
        if self.max_device_gib is not None and not self.max_device_gib > 0:
            raise ConfigError(
                f"max_device_gib (--max-device-gib) must be > 0 GiB, got {self.max_device_gib}; "
                "pass the GPU memory calibration may use"
            )
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(
                f"--seq-len must be at least 1, got {self.seq_len}; use a positive length or "
                "leave it out (the model's own)"
            )
        if self.masking not in ("uniform", "sampler", "none"):
            raise ConfigError(
                f"unknown calibration masking {self.masking!r}; use 'uniform', 'sampler' or 'none'"
            )
        if self.sampler_steps < 1:
            raise ConfigError(
                f"sampler_steps must be >= 1, got {self.sampler_steps}; use --sampler-steps 1 or more"
            )
        if self.views < 1:
            raise ConfigError(
                f"views must be >= 1 (masked views per text), got {self.views}; use --views 1 or more"
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        if self.quantize_head is None:  # off: the record (and resume fingerprint) as before
            del out["quantize_head"]
        return out


@dataclass
class RunRecord:
    """What a results file records next to its numbers."""

    command: str = ""
    git_commit: str = ""
    device: str = ""
    date: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
