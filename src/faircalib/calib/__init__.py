"""Calibration: joins models (faircalib.models) and algorithms (faircalib.quant).

model = faircalib.hub.load("mdlm-small")
report = quantize(model, GPTQConfig(bits=4, group_size=128), tokens, CalibConfig(device="cuda"))
"""

from __future__ import annotations

import copy
import sys
import time

import torch

from faircalib.calib.engine import (
    FakeQuantLinear,
    QuantReport,
    check_head,
    check_layers,
    gptq_head_layer,
    head_inputs_from_model,
    quantize_head,
    quantize_model,
)
from faircalib.calib.fair import fair_calibration_inputs
from faircalib.calib.fakequant_io import load_fake_quant, save_quantized
from faircalib.calib.inputs import calibration_inputs, masked_inputs, sampler_levels
from faircalib.calib.progress import PartialRun
from faircalib.calib.recon import finetune_scales_e2e
from faircalib.config import (
    AWQConfig,
    CalibConfig,
    FairCalibConfig,
    GPTQConfig,
    QuantConfig,
    ReconMethodConfig,
    RTNConfig,
    SmoothQuantConfig,
)
from faircalib.models.base import DiffusionLM
from faircalib.quant.primitives import config_scale_dtype

METHOD_CONFIGS: dict[str, type[QuantConfig]] = {
    "rtn": RTNConfig,
    "gptq": GPTQConfig,
    "awq": AWQConfig,
    "smoothquant": SmoothQuantConfig,
    "fair": FairCalibConfig,
    "recon": ReconMethodConfig,
}


def quantize(
    model: DiffusionLM,
    config: QuantConfig,
    tokens: torch.Tensor,
    calib: CalibConfig | None = None,
    *,
    progress: bool = True,
    partial: PartialRun | None = None,
) -> QuantReport:
    """Quantize `model` in place with `config` on calibration tokens [N, L].

    With `calib.offload` the engine keeps one block at a time on `calib.device` and returns the
    model on the CPU. FAIR-Calib's frontier tracking and instability scoring run the float model
    whole: on the device if it fits `calib.max_device_gib` (default: the device's memory), else
    one block at a time; the noisy model is the same model with noise applied block by block.
    `partial`: keep progress on disk and continue from it (`faircalib.calib.progress`).
    """
    calib = calib or CalibConfig()
    check_layers(model, config)
    if calib.quantize_head is not None:  # refused now, not after calibration
        check_head(model, calib.quantize_head)
    start = time.time()
    device = torch.device(calib.device)
    if device.type == "cuda":  # the peak this run needs, not what earlier work left behind
        torch.cuda.reset_peak_memory_stats(device)
    extra: dict = {}
    recon, teacher = None, None
    if isinstance(config, FairCalibConfig):
        saved = partial.load_inputs() if partial is not None else None
        if saved is None:
            inputs, extra = fair_inputs(model, config, tokens, calib, progress)
            if partial is not None:
                partial.save_inputs(inputs, extra)
        else:  # frontier tracking is the costly part: never redone on resume
            inputs, extra = saved
        x_t, t, weights = inputs["x_t"], inputs["t"], inputs["weights"]
        text_ids, clean = inputs["text_ids"], inputs["clean"]
        method_cfg = config.base_config()
        if config.optimised:
            recon = config.recon
            teacher = _e2e_teacher(model, config, calib)
    else:
        x_t, t = masked_inputs(model, tokens, calib)
        weights, method_cfg = None, config
        text_ids = torch.arange(len(tokens)).repeat(calib.views)
    # --quantize-head after GPTQ-based blocks: the output layer gets GPTQ on its real inputs
    # (the engine's final cache through the head); the embedding, and RTN/AWQ runs, keep RTN
    gptq_head = (
        calib.quantize_head is not None
        and isinstance(method_cfg, GPTQConfig)
        and gptq_head_layer(model) is not None
    )
    e2e = teacher is not None  # the end-to-end stage will change the blocks after the engine
    report = quantize_model(
        model,
        method_cfg,
        x_t,
        t,
        weights,
        calib_cfg=calib,
        recon=recon,
        text_ids=text_ids,
        progress=progress,
        partial=partial,
        head_inputs=gptq_head and not e2e,
    )
    if teacher is not None:
        tick = time.time()
        model.to(calib.device)
        e2e = finetune_scales_e2e(
            model,
            teacher,
            x_t,
            t,
            weights,
            recon,
            torch.device(calib.device),
            calib.seed,
            text_ids=text_ids,
            clean=clean,
            scale_dtype=config_scale_dtype(config),
            progress=progress,
        )
        report.recon.append({"block": "e2e", **e2e})
        report.timings["e2e_s"] = time.time() - tick
        del teacher
    elif recon is not None and recon.e2e_steps > 0:
        report.recon.append({"block": "e2e", "skipped": "offload"})
    if calib.quantize_head is not None:  # after every block step: the vocab layers
        tick = time.time()
        head_in = report.head_inputs
        if gptq_head and e2e:  # the e2e stage changed the blocks: rerun them for the head
            head_in = head_inputs_from_model(model, x_t, t, weights, calib)
        report.head = quantize_head(
            model,
            calib.quantize_head,
            getattr(config, "scale_dtype", None),
            inputs=head_in,
            gptq=method_cfg if gptq_head else None,
        )
        report.head_inputs = head_in = None  # statistics on the device: not kept
        report.timings["head_s"] = time.time() - tick
    report.method = config.to_dict()
    report.timings.update({k: v for k, v in extra.items() if k.endswith("_s")})
    report.timings["wall_s"] = time.time() - start
    report.calib["fair"] = {k: v for k, v in extra.items() if not k.endswith("_s")}
    report.resources = peak_memory(device)
    return report


def peak_memory(device: torch.device) -> dict[str, int]:
    """Peak bytes of this process: tensors on a CUDA `device` (torch's allocator, since the
    run's start) and host resident memory (since the process started)."""
    out = {"peak_host_bytes": _peak_rss_bytes()}
    if device.type == "cuda":
        out["peak_device_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_device_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
    return out


def _peak_rss_bytes() -> int:
    try:
        import resource
    except ImportError:  # not on this platform (Windows)
        return 0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS: bytes; Linux: KiB


def fair_inputs(
    model: DiffusionLM,
    config: FairCalibConfig,
    tokens: torch.Tensor,
    calib: CalibConfig,
    progress: bool = False,
) -> tuple[dict[str, torch.Tensor], dict]:
    """FAIR-Calib's engine inputs - x_t [M, L], t [M], weights [M, L], text_ids [M], clean
    [M, L] - and the tracking diagnostics. With `config.inputs == "mixed"` the first half of
    `tokens` is tracked (recorded sampler states, frontier-instability weights) and the rest is
    masked at stratified t with weight 1; the masked rows come first. Shared by the weight-only
    engine and activation quantization (`calib.activations.act_calibration_inputs`)."""
    if not calib.offload:  # offloaded: tracking places the model itself (resident or streamed)
        model.to(calib.device)
    n_track = len(tokens) if config.inputs == "states" else len(tokens) // 2
    x_t, t, weights, extra = fair_calibration_inputs(
        model,
        tokens[:n_track],
        config,
        calib.seed,
        calib.device,
        calib.views,
        max_device_gib=calib.max_device_gib,
        progress=progress,
    )
    text_ids = torch.arange(n_track).repeat(calib.views)
    if n_track < len(tokens):  # the rest: masked at stratified t, as plain calibration does
        x_m, t_m = masked_inputs(model, tokens[n_track:], calib)
        x_t, t = torch.cat([x_m, x_t]), torch.cat([t_m, t])
        weights = torch.cat([torch.ones(x_m.shape), weights])
        rest = torch.arange(n_track, len(tokens)).repeat(calib.views)
        text_ids = torch.cat([rest, text_ids])
    # the clean text of masked views (-1: sampler states) for the end-to-end stage
    clean = torch.full(x_t.shape, -1, dtype=tokens.dtype)
    n_masked = len(x_t) - n_track * calib.views
    clean[:n_masked] = tokens[text_ids[:n_masked]]
    inputs = {"x_t": x_t, "t": t, "weights": weights, "text_ids": text_ids, "clean": clean}
    return inputs, extra


_fair_inputs = fair_inputs  # the old private name


def _e2e_teacher(model: DiffusionLM, config: FairCalibConfig, calib: CalibConfig):
    """A float copy of the model for the end-to-end stage, or None when that stage is off. The
    stage runs the teacher and the quantized model side by side, so it needs both on the
    device; with offloading (which exists because one model does not fit) it is skipped."""
    if config.recon.e2e_steps <= 0:
        return None
    if calib.offload:
        print(
            "[calib] --offload: skipping the end-to-end scale stage (it needs the float and the "
            "quantized model on the device together); block reconstruction still runs",
            file=sys.stderr,
        )
        return None
    return copy.deepcopy(model).eval()


def quantize_for_bench(
    model: DiffusionLM,
    tokenizer,
    *,
    method: str,
    bits: int,
    group_size: int | None,
    nsamples: int,
    seq_len: int | None,
    seed: int,
    device: str,
    offload: bool = False,
    progress: bool = True,
    source=None,
    quantize_head: str | None = None,
    **method_kwargs,
) -> tuple[DiffusionLM, dict]:
    """Calibrate on `source` (a faircalib.data.sources.TextSource; None: C4 train, the shared
    default) and quantize; returns the model and its report.

    offload: one block at a time on `device` during calibration; the model returns on the CPU.
    quantize_head: None, 'int8' or 'int4' (`CalibConfig.quantize_head`)."""
    from faircalib.data import calibration_batch

    config = METHOD_CONFIGS[method](bits=bits, group_size=group_size, **method_kwargs)
    seq_len = seq_len or model.seq_len
    tokens = calibration_batch(tokenizer, source or "c4", "train", nsamples, seq_len, seed)
    if isinstance(config, FairCalibConfig):
        config.n_prompts = nsamples
    where = {"source": source.name, "split": source.split} if source is not None else {}
    calib = CalibConfig(
        n_samples=nsamples,
        seq_len=seq_len,
        seed=seed,
        device=device,
        offload=offload,
        quantize_head=quantize_head,
        **where,
    )
    report = quantize(model, config, tokens, calib, progress=progress)
    return model, report.to_dict()


__all__ = [
    "FakeQuantLinear",
    "METHOD_CONFIGS",
    "calibration_inputs",
    "fair_inputs",
    "load_fake_quant",
    "save_quantized",
    "PartialRun",
    "QuantReport",
    "masked_inputs",
    "quantize",
    "quantize_for_bench",
    "quantize_model",
    "sampler_levels",
]
