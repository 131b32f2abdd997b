"""`QuantLinear`: an `nn.Linear` replacement that keeps a quantized weight as integer codes.

It computes, for x [..., in]:

    x_s = x / input_scale                      (AWQ / SmoothQuant smoothing; skipped if None)
    x_q = per-token fake-quant(x_s, act_bits)  (W8A8 / W4A8 / W4A4; skipped if None)
    y   = x_q @ W_hat.T + bias,   W_hat = scale * (code - zero)

which is exactly what the fake-quantized float model computes, so a packed checkpoint and the
fake-quant evaluation agree (bit-for-bit on the fp32 `dequant` backend). `act_format` says which
per-token grid x_q lies on: "int" (symmetric INT, +-(2^(act_bits-1) - 1), the default) or "fp8"
(e4m3, abs-max / 448, act_bits 8: W4AFP8); an "fp8" layer never runs the INT8-activation
kernels (`int8`, `int8_w8a8`, `w4a8`: refused by name, skipped by `auto`) and runs `w4a8_fp8`
without quantizing x twice (the kernel quantizes onto the same e4m3 grid itself).

Storage: `qweight` holds the plain codes, two per byte for bits <= 4 (`backends.pack_codes`);
`scale` is float32 and `zero` uint8, both [out, n_groups]. Each backend repacks the codes into
its kernel's layout on first use and caches the result per (backend, device, dtype) next to
the codes (so int4_cuda, int4_cpu, int8 and fp8 hold a second copy); the Triton layout holds
the codes losslessly, so it replaces the plain copy instead (`codes()` and `state_dict()` read
it back). Moving or loading the module restores the plain codes and clears the cache; a
dtype cast (`model.to(torch.bfloat16)`) casts the bias but keeps `scale` and `input_scale` in
float32 and `zero` in uint8, so the cast model computes the same W_hat.
`backend="auto"` picks per call from the device, the dtype (autocast's, if on) and M, the
number of token rows (`backends.auto_backend`); `last_backend` records the choice.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from faircalib.errors import ConfigError
from faircalib.kernels.backends import (
    BACKENDS,
    W4_AUTO,
    W4A8_AUTO_MIN_M,
    auto_backend,
    check_backend_name,
    dequantize_packed,
    pack_codes,
    packed_width,
    supports,
    unpack_codes,
    w4afp8_auto_backend,
)
from faircalib.quant.activations import quantize_fp8_rows
from faircalib.quant.primitives import QParams, quantize_activations_per_token

SUPPORTED_BITS = range(2, 9)
ACT_FORMATS = ("int", "fp8")
# backends that quantize an "fp8" layer's activations onto its own e4m3 grid themselves
FP8_ACT_BACKENDS = ("w4a8_fp8", "w4a8_fp8_dq", "cutlass_w4a8", "cutlass_w4a8_lut")
# float buffers that keep float32 whatever dtype the model is cast to (see `_apply`)
FLOAT32_BUFFERS = ("scale", "input_scale")


class QuantLinear(nn.Module):
    """A linear layer with integer weight codes (see the module docstring for the math)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        bias: bool = False,
        input_scale: bool = False,
        act_bits: int | None = None,
        act_format: str = "int",
        backend: str = "auto",
        cache_dequant: bool = False,
    ) -> None:
        super().__init__()
        _check_layout(in_features, out_features, bits, group_size, act_bits)
        _check_act_format(act_format, act_bits)
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.act_bits, self.act_format = act_bits, act_format
        self.backend = check_backend_name(backend)
        # dequant backend: keep the dequantized weight (bf16-GEMM speed for bf16 memory)
        self.cache_dequant = cache_dequant
        n_groups = 1 if group_size is None else in_features // group_size
        width = packed_width(in_features, bits)
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, n_groups))
        # zero points are small integers: uint8 keeps them exact through model.to(dtype)
        zero = torch.full((out_features, n_groups), 2 ** (bits - 1), dtype=torch.uint8)
        self.register_buffer("zero", zero)
        self.register_buffer("input_scale", torch.ones(in_features) if input_scale else None)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.last_backend: str | None = None
        self._prepared: dict[tuple[str, torch.device, torch.dtype], tuple] = {}
        self._plans: dict[tuple[torch.device, torch.dtype, int], tuple] = {}
        # facts about the weight that backends derive once (e.g. which grid it is on); cleared
        # with the plans, when the layer moves or loads new weights
        self._derived: dict[str, object] = {}
        # (backend, prepared key) whose layout holds the codes after the plain copy was freed
        self._codes_layout: tuple[str, tuple] | None = None

    # --- construction ---------------------------------------------------------------------
    @classmethod
    def from_codes(
        cls,
        codes: torch.Tensor,
        qparams: QParams,
        *,
        bias: torch.Tensor | None = None,
        input_scale: torch.Tensor | None = None,
        act_bits: int | None = None,
        act_format: str = "int",
        backend: str = "auto",
        cache_dequant: bool = False,
    ) -> QuantLinear:
        """Build from [out, in] integer codes and their QParams (the quantizers' output)."""
        out_features, in_features = codes.shape
        layer = cls(
            in_features,
            out_features,
            bits=qparams.bits,
            group_size=qparams.group_size,
            symmetric=qparams.symmetric,
            bias=bias is not None,
            input_scale=input_scale is not None,
            act_bits=act_bits,
            act_format=act_format,
            backend=backend,
            cache_dequant=cache_dequant,
        ).to(codes.device)
        check_codes(codes, qparams)
        with torch.no_grad():
            layer.qweight.copy_(pack_codes(codes, qparams.bits))
            layer.scale.copy_(qparams.scale.float())
            layer.zero.copy_(qparams.zero.round().to(torch.uint8))
            if input_scale is not None:
                _check_input_scale(input_scale, in_features)
                layer.input_scale.copy_(input_scale.float())
            if bias is not None:
                layer.bias = nn.Parameter(bias.detach().clone().reshape(out_features))
        return layer

    @classmethod
    def from_result(
        cls, result: object, bias: torch.Tensor | None = None, **kwargs: object
    ) -> QuantLinear:
        """From a QuantResult-like object with .codes, .qparams, .input_scale, .act_bits."""
        return cls.from_codes(
            result.codes,  # type: ignore[attr-defined]
            result.qparams,  # type: ignore[attr-defined]
            bias=bias,
            input_scale=getattr(result, "input_scale", None),
            act_bits=getattr(result, "act_bits", None),
            **kwargs,  # type: ignore[arg-type]
        )

    # state that belongs to the input, not to an output row: shared when layers are stacked
    PER_INPUT_STATE = ("input_scale",)
    # what layers must agree on to be stacked into one (`stacked`)
    _STACK_SAME = (
        "in_features",
        "bits",
        "group_size",
        "symmetric",
        "act_bits",
        "act_format",
        "backend",
        "cache_dequant",
    )

    @classmethod
    def stacked(cls, layers: list[QuantLinear]) -> QuantLinear:
        """One QuantLinear whose output rows are the layers' in order (`kernels.stacked_linears`):
        the same quantization, their codes, scales, zero points and biases concatenated, the
        input scale they share. ValueError naming what differs."""
        first = layers[0]
        for layer in layers[1:]:
            differ = [a for a in cls._STACK_SAME if getattr(layer, a) != getattr(first, a)]
            if differ:
                raise ValueError(f"their {', '.join(differ)} differ")
            if (layer.bias is None) != (first.bias is None):
                raise ValueError("some have a bias and some do not")
            if layer.scale.device != first.scale.device:
                raise ValueError("they lie on different devices")
            same_input = (layer.input_scale is None and first.input_scale is None) or (
                layer.input_scale is not None
                and first.input_scale is not None
                and torch.equal(layer.input_scale, first.input_scale)
            )
            if not same_input:
                raise ValueError("their input scales differ")
        states = [layer.state_dict() for layer in layers]
        state = {
            key: value if key in cls.PER_INPUT_STATE else torch.cat([s[key] for s in states])
            for key, value in states[0].items()
        }
        with torch.device("meta"):
            fused = cls(
                first.in_features,
                sum(layer.out_features for layer in layers),
                **{a: getattr(first, a) for a in cls._STACK_SAME[1:]},
                bias=first.bias is not None,
                input_scale=first.input_scale is not None,
            )
        fused.load_state_dict(state, assign=True)
        return fused

    # --- views of the weight ----------------------------------------------------------------
    @property
    def qparams(self) -> QParams:
        return QParams(self.scale, self.zero.float(), self.bits, self.group_size, self.symmetric)

    def codes(self) -> torch.Tensor:
        """[out, in] uint8 codes in [0, 2^bits)."""
        if self._codes_layout is not None:  # the plain copy was freed: read the kernel layout
            name, key = self._codes_layout
            return BACKENDS[name].codes_from_layout(self._prepared[key])[:, : self.in_features]
        return unpack_codes(self.qweight, self.bits, self.in_features)

    def stored_qweight(self) -> torch.Tensor:
        """`qweight` as stored ([out, packed_width] uint8), rebuilt if a kernel layout holds it."""
        if self._codes_layout is not None:
            return pack_codes(self.codes(), self.bits)
        return self.qweight

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[out, in] W_hat = scale * (code - zero)."""
        return dequantize_packed(
            self.stored_qweight(), self.scale, self.zero, self.bits, self.in_features, dtype
        )

    # --- forward ------------------------------------------------------------------------------
    def choose_backend(self, device_type: str, dtype: torch.dtype, m: int) -> str:
        """The backend a call with M token rows of `dtype` runs: `self.backend` (checked), or
        the `auto` rule."""
        if self.act_format == "fp8":
            return self._fp8_act_backend(device_type, dtype, m)
        if self.backend == "auto":
            return auto_backend(self, device_type, dtype, m)
        reason = BACKENDS[self.backend].supports(self, device_type, dtype, m)
        if reason is not None:
            raise ConfigError(
                f"QuantLinear backend {self.backend!r} cannot run this layer: {reason}"
            )
        return self.backend

    def _fp8_act_backend(self, device_type: str, dtype: torch.dtype, m: int) -> str:
        """`choose_backend` for e4m3 activations: the INT8-activation kernels would compute
        another grid, so they are refused by name; `auto` takes `w4a8_fp8` where `w4a8` would
        be taken for an INT8 layer (`W4A8_AUTO_MIN_M`), then `backends.w4afp8_auto_backend`
        (`cutlass_w4a8_lut` for power-of-two-scale layers, `cutlass_w4a8` from
        `W4AFP8_AUTO_MIN_M`), else the weight-only rule on the activations this layer
        fake-quantizes first (`W4_AUTO`, as `auto_backend` ends)."""
        if self.backend == "auto":
            min_m = W4A8_AUTO_MIN_M.get(device_type, math.inf)
            if m >= min_m and supports(self, "w4a8_fp8", device_type, dtype, m) is None:
                return "w4a8_fp8"
            cutlass = w4afp8_auto_backend(self, device_type, dtype, m)
            if cutlass is not None:
                return cutlass
            rows = W4_AUTO.get(device_type, [])
            names = next((n for bound, n in rows if m < bound), ())
            return next(
                (n for n in names if supports(self, n, device_type, dtype, m) is None), "dequant"
            )
        if BACKENDS[self.backend].quantizes_activations:
            raise ConfigError(
                f"QuantLinear backend {self.backend!r} quantizes activations to INT8; this layer's "
                "are FP8 e4m3 (act_format='fp8'): use auto, dequant or one of "
                + ", ".join(FP8_ACT_BACKENDS)
            )
        reason = supports(self, self.backend, device_type, dtype, m)
        if reason is not None:
            raise ConfigError(
                f"QuantLinear backend {self.backend!r} cannot run this layer: {reason}"
            )
        return self.backend

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """The per-token activation fake quantization this layer applies (act_bits set)."""
        if self.act_format == "fp8":
            return quantize_fp8_rows(x)
        return quantize_activations_per_token(x, self.act_bits)

    def _quantizes_itself(self, name: str) -> bool:
        """Whether backend `name` puts x on this layer's activation grid itself."""
        if self.act_format == "fp8":
            return name in FP8_ACT_BACKENDS
        return BACKENDS[name].quantizes_activations

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)  # [M, in], M = x.numel() // in_features
        if self.input_scale is not None:
            x2d = x2d / self.input_scale.to(x2d.dtype)
        dtype = compute_dtype(x2d)
        name, backend, prepared = self._plan(x2d.device, dtype, x2d.shape[0])
        if self.act_bits is not None and not self._quantizes_itself(name):
            x2d = self.quantize_input(x2d)
        y = backend.run(self, prepared, x2d.to(dtype))  # [M, out]
        if self.bias is not None and not backend.adds_bias:
            y = y + self.bias.to(y.dtype)
        self.last_backend = name
        return y.reshape(*lead, self.out_features)

    def _plan(self, device: torch.device, dtype: torch.dtype, m: int) -> tuple:
        """(name, backend, prepared tensors) for calls of M rows: chosen and repacked once per
        (device, dtype, M), so a steady-state call costs one dict lookup in Python - at small M
        the backend checks cost more than the kernel itself."""
        key = (device, dtype, m)
        plan = self._plans.get(key)
        if plan is None:
            name = self.choose_backend(device.type, dtype, m)
            if (name, device, dtype) not in self._prepared:
                with torch.no_grad():
                    self._prepared[(name, device, dtype)] = BACKENDS[name].prepare(
                        self, device, dtype
                    )
                self._maybe_free_plain_codes(name, device, dtype)
            plan = self._plans[key] = (name, BACKENDS[name], self._prepared[(name, device, dtype)])
        return plan

    def _maybe_free_plain_codes(self, name: str, device: torch.device, dtype: torch.dtype) -> None:
        """A layout that holds the codes losslessly, on qweight's own device, replaces the plain
        copy there: resident INT4 memory stays one copy of the codes, not two. `codes()`,
        `stored_qweight()` and `state_dict()` read the layout; moving or loading restores it."""
        if (
            BACKENDS[name].codes_from_layout is not None
            and self._codes_layout is None
            and device == self.qweight.device
        ):
            self._codes_layout = (name, (name, device, dtype))
            self.qweight = torch.empty(0, dtype=torch.uint8, device=device)

    def _apply(self, fn, recurse: bool = True):  # noqa: ANN001 - torch's signature
        self._forget_plans()  # kernel layouts belong to the old device/dtype
        # scales stay float32 through model.to(dtype) / .half(), as zero stays uint8: rounding
        # them to bf16 would change W_hat, and a model cast to its compute dtype must not
        kept = {n: self._buffers[n] for n in FLOAT32_BUFFERS if self._buffers[n] is not None}
        for name in kept:
            self._buffers[name] = None  # hidden from torch's cast; moved below
        try:
            out = super()._apply(fn, recurse)
        except BaseException:
            self._buffers.update(kept)  # a failed move leaves the layer as it was
            raise
        for name, t in kept.items():
            self._buffers[name] = _moved_keeping_dtype(fn, t)
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        self._forget_plans()
        super()._load_from_state_dict(*args, **kwargs)

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:  # noqa: ANN001
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "qweight"] = self.stored_qweight()

    def _forget_plans(self) -> None:
        """Drop kernel layouts and per-M plans, first restoring the plain codes if a layout
        held them."""
        if self._codes_layout is not None:
            self.qweight = self.stored_qweight()
            self._codes_layout = None
        self._prepared.clear()
        self._plans.clear()
        self._derived.clear()

    def extra_repr(self) -> str:
        group = "channel" if self.group_size is None else f"g{self.group_size}"
        extras = [
            f"in={self.in_features}",
            f"out={self.out_features}",
            f"w{self.bits}",
            group,
            "sym" if self.symmetric else "asym",
            f"backend={self.backend}",
        ]
        if self.act_bits is not None:
            extras.append(f"a{self.act_bits}" if self.act_format == "int" else "a-fp8")
        if self.input_scale is not None:
            extras.append("input_scale")
        return ", ".join(extras)


def _moved_keeping_dtype(fn, t: torch.Tensor) -> torch.Tensor:  # noqa: ANN001 - torch's fn
    """`fn(t)` (a module-wide move or cast) with t's own dtype kept: device moves apply,
    dtype casts do not."""
    moved = fn(t)
    return moved if moved.dtype == t.dtype else t.to(device=moved.device)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmul runs in: autocast's (as nn.Linear would) or the input's."""
    device_type = x.device.type
    if x.is_floating_point() and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# --- validation ---------------------------------------------------------------------------------
def _check_layout(
    in_features: int, out_features: int, bits: int, group_size: int | None, act_bits: int | None
) -> None:
    if bits not in SUPPORTED_BITS:
        raise ConfigError(f"QuantLinear supports 2..8-bit codes, got {bits}")
    if in_features <= 0 or out_features <= 0:
        raise ConfigError(
            f"QuantLinear needs positive sizes, got in={in_features}, out={out_features}"
        )
    if group_size is not None and (group_size <= 0 or in_features % group_size):
        raise ConfigError(f"group size {group_size} does not divide {in_features} input features")
    if act_bits is not None and not 2 <= act_bits <= 16:
        raise ConfigError(f"activation bit width must be in 2..16, got {act_bits}")


def _check_act_format(act_format: str, act_bits: int | None) -> None:
    if act_format not in ACT_FORMATS:
        raise ConfigError(f"act_format must be one of {ACT_FORMATS}, got {act_format!r}")
    if act_format == "fp8" and act_bits != 8:
        raise ConfigError(f"FP8 (e4m3) activations are 8-bit: act_bits must be 8, got {act_bits}")


def check_codes(codes: torch.Tensor, qp: QParams) -> None:
    """Refuse codes/qparams that do not describe a valid [out, in] quantized weight."""
    if codes.dim() != 2 or codes.is_floating_point() or codes.is_complex():
        raise ConfigError(
            f"codes must be a 2-D integer tensor, got {tuple(codes.shape)} {codes.dtype}"
        )
    out_features, in_features = codes.shape
    n_groups = 1 if qp.group_size is None else in_features // qp.group_size
    for name, t in (("scale", qp.scale), ("zero", qp.zero)):
        if tuple(t.shape) != (out_features, n_groups):
            raise ConfigError(
                f"{name} has shape {tuple(t.shape)}, expected {(out_features, n_groups)}"
            )
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > qp.maxq):
        raise ConfigError(f"codes outside [0, {qp.maxq}] for {qp.bits}-bit quantization")
    if not (torch.isfinite(qp.scale).all() and (qp.scale > 0).all()):
        raise ConfigError("scales must be finite and positive")
    zero = qp.zero.float()
    if not ((zero == zero.round()).all() and (zero >= 0).all() and (zero <= qp.maxq).all()):
        raise ConfigError(f"zero points must be integers in [0, {qp.maxq}]")
    if qp.symmetric and not (zero == 2 ** (qp.bits - 1)).all():
        raise ConfigError(f"symmetric quantization needs every zero point = {2 ** (qp.bits - 1)}")


def _check_input_scale(input_scale: torch.Tensor, in_features: int) -> None:
    if tuple(input_scale.shape) != (in_features,):
        raise ConfigError(
            f"input_scale has shape {tuple(input_scale.shape)}, expected ({in_features},)"
        )
    if not (torch.isfinite(input_scale).all() and (input_scale > 0).all()):
        raise ConfigError("input_scale must be finite and positive")
