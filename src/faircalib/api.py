"""The one-call Python API: `load`, `quantize`, `save`, `evaluate` (also `faircalib.quantize`
etc.). It runs exactly what `faircalib quantize` / `faircalib eval` run - the same defaults,
checks, records and recipe - so a script and a command line give the same model.

    import faircalib

    q = faircalib.quantize("mdlm-tiny", method="gptq", bits=4, group_size=64, nsamples=8,
                           seq_len=64, exclude=["blocks.0.*"])
    out = faircalib.save(q, "mdlm-tiny-w4g64")          # + quantization.json, recipe.json
    print(faircalib.evaluate(out, data="wikitext2", limit=8)["ppl"])

Method knobs use the command line's names without dashes (`damp`, `alpha`, `fair_steps`,
`recon_steps`, ...), plus `act_order=False` for `--no-act-order`.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from faircalib.commands import quantize as qcmd
from faircalib.errors import ConfigError

__all__ = ["Quantized", "evaluate", "load", "quantize", "save"]

Quantized = qcmd.Result  # .model, .tokenizer, .report, .recipe, .format, .out after save


def load(model: str | Path, *, device: str = "cpu", stack: bool = False):
    """A shipped name (mdlm-tiny, mdlm-small), a model directory (float, fake-quant, packed,
    kuleshov-group's MDLM layout) or a Hugging Face id -> an eval-mode DiffusionLM. The model
    remembers where it came from, so `quantize` and `evaluate` accept it. `stack`: q, k, v (and
    gate, up) run as one stacked layer each where their quantization matches (inference:
    `kernels.stacked_linears`)."""
    from faircalib import hub

    loaded = hub.load(model, device=device, stack=stack)
    loaded.faircalib_source = str(model)
    return loaded


def _quantize_defaults() -> argparse.Namespace:
    """`faircalib quantize`'s defaults, from its own parser (one source of truth)."""
    parser = argparse.ArgumentParser()
    qcmd.register(parser.add_subparsers())
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices["quantize"]
    return argparse.Namespace(
        **{a.dest: a.default for a in p._actions if a.dest not in ("help", "config")},
        argv=[],
        option_dests={},
    )


def quantize(
    model: Any,
    method: str = "gptq",
    *,
    bits: int | None = None,
    group_size: int | None = None,
    symmetric: bool = False,
    calib: str = "c4",
    calib_split: str | None = None,
    text_field: str = "text",
    nsamples: int = 128,
    seq_len: int | None = None,
    seed: int = 0,
    masking: str = "uniform",
    sampler_steps: int = 64,
    views: int = 1,
    include: list[str] | str | None = None,
    exclude: list[str] | str | None = None,
    format: str = "auto",
    dtype: str = "auto",
    device: str = "cpu",
    offload: bool = False,
    progress: bool = False,
    **knobs: Any,
) -> Quantized:
    """Calibrate and quantize `model` (a name / directory / hub id, or a model from `load`,
    which is quantized in place) with `method` on `nsamples` sequences of `calib`.

    bits / group_size: None = the method's own (4 / 128; SmoothQuant W8A8 per-channel).
    include / exclude: glob patterns on full layer names (`blocks.*.mlp.*`) choosing which
    block linears are quantized; embeddings and the output layer always stay float.
    format: "auto" (packed where the method has a packed form), "packed" or "fake" - decided
    here because packed checkpoints need codes chosen for bf16 scales. Returns a `Quantized`
    (`.model`, `.report`, `.recipe`, `.tokenizer`); `save` writes it."""
    from faircalib import hub

    args = _quantize_defaults()
    if isinstance(model, str | Path):
        args.model, loaded = str(model), None
    elif hasattr(model, "faircalib_source"):
        args.model, loaded = model.faircalib_source, model
        from faircalib.kernels.stacked_linears import StackedMember

        if any(isinstance(m, StackedMember) for m in model.modules()):
            raise ConfigError(
                "this model was loaded with stack=True, which is for inference; load it "
                "without stack to quantize it"
            )
    else:
        raise ConfigError(
            "quantize takes a model name, a directory, a hub id or a model from faircalib.load"
        )
    args.__dict__.update(
        method=method,
        bits=bits,
        group_size=group_size,
        symmetric=symmetric,
        calib=calib,
        calib_split=calib_split,
        text_field=text_field,
        nsamples=nsamples,
        seq_len=seq_len,
        seed=seed,
        masking=masking,
        sampler_steps=sampler_steps,
        views=views,
        include=[include] if isinstance(include, str) else include,
        exclude=[exclude] if isinstance(exclude, str) else exclude,
        format=format,
        dtype=dtype,
        device=device,
        offload=offload,
        json=not progress,
        out=None,
    )
    if "act_order" in knobs:
        args.no_act_order = not knobs.pop("act_order")
    unknown = sorted(set(knobs) - set(qcmd.KNOB_METHODS))
    if unknown:
        raise ConfigError(
            f"unknown quantize option(s) {unknown}; method knobs: "
            f"{sorted([*qcmd.KNOB_METHODS, 'act_order'])}"
        )
    args.__dict__.update(knobs)
    if method not in qcmd.METHODS:
        raise ConfigError(f"unknown method {method!r}; use one of {', '.join(qcmd.METHODS)}")
    if format not in ("auto", "packed", "fake") or dtype not in qcmd.DTYPES:
        raise ConfigError(f"format must be auto, packed or fake and dtype one of {qcmd.DTYPES}")
    hub.check_device(device)
    qcmd.check_knobs(args)
    config, fmt = qcmd.resolve_format(args)
    calib_data = qcmd.calib_source(args)
    calib_cfg = qcmd.calib_config(args)
    source = hub.resolve(args.model)
    qcmd.check_source(source, args.model)
    return qcmd.quantize_model_from_args(args, config, calib_cfg, calib_data, source, fmt, loaded)


def save(quantized: Quantized, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write a `quantize` result: the model directory (its format chosen in `quantize`), its
    quantization.json and recipe.json (replay: `faircalib quantize --config OUT/recipe.json
    --out NEW`). Files are readable by others (0644 / 0755 under umask 022)."""
    from faircalib.models.io import check_output_dir

    if not isinstance(quantized, qcmd.Result):
        raise ConfigError("save takes what faircalib.quantize returned")
    check_output_dir(Path(out), overwrite)
    return qcmd.save(quantized, Path(out), overwrite)


def evaluate(
    model: Any,
    data: str = "wikitext2",
    *,
    split: str | None = None,
    limit: int | None = None,
    mc_samples: int = 1,
    seq_len: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    protocol: str = "faircalib",
    text_field: str = "text",
    device: str = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """`faircalib eval`'s result (ppl bound, bits per byte, 95% interval, data record) for a
    name / directory / hub id, a model from `load`, or a `quantize` result in memory."""
    from faircalib import hub
    from faircalib.commands.eval import evaluate as run_eval

    kwargs: dict[str, Any] = {
        "seq_len": seq_len,
        "mc_samples": mc_samples,
        "seed": seed,
        "batch_size": batch_size,
        "limit": limit,
        "device": device,
        "progress": progress,
        "protocol": protocol,
        "text_field": text_field,
    }
    if isinstance(model, str | Path):
        return run_eval(str(model), data, split, **kwargs)
    if isinstance(model, qcmd.Result):
        name = str(model.out) if model.out is not None else f"{model.recipe['model']} (quantized)"
        return run_eval(
            name, data, split, model_obj=model.model, tokenizer=model.tokenizer, **kwargs
        )
    if hasattr(model, "faircalib_source"):
        tokenizer = hub.load_tokenizer(model.faircalib_source)
        return run_eval(
            model.faircalib_source, data, split, model_obj=model, tokenizer=tokenizer, **kwargs
        )
    raise ConfigError(
        "evaluate takes a model name, a directory, a hub id, a model from faircalib.load or "
        "a faircalib.quantize result"
    )
