"""`faircalib quantize`: calibrate and quantize a dLLM, write a model directory.

Every run writes `recipe.json` beside its output: the flags that define the run (model, method
and its knobs, calibration data and masking, format), resolved. `faircalib quantize --config
recipe.json --out DIR` replays it (bit-identically on the CPU); flags given on that command
line override the recipe's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from faircalib.commands import argtypes, common

METHODS = ["rtn", "gptq", "awq", "smoothquant", "recon", "fair"]
# activation quantization (`--scheme`; faircalib.calib.activations.SCHEMES / METHODS, spelled
# out so building the parser imports no torch; tests/test_act_cli.py checks the two agree)
ACT_SCHEMES = ("w8a8", "w8a8fp8", "w4a8", "w4a8fp8", "w4a8fp8-e8m0", "w4a4")
ACT_METHODS = (
    "rtn",
    "gptq",
    "smoothquant",
    "quarot-rtn",
    "quarot",
    "flatquant",
    "flatquant-gptq",
    "fair",
    "fair-gptq",
)
ACT_SCHEME_HELP = {
    "w8a8": "INT8 per-channel weights, INT8 per-token activations",
    "w8a8fp8": "FP8 e4m3 per-channel weights, FP8 per-token activations",
    "w4a8": "INT4 g128 weights, INT8 per-token activations",
    "w4a8fp8": "INT4 g128 weights, FP8 per-token activations",
    "w4a8fp8-e8m0": "INT4 g128 weights with power-of-two scales, FP8 per-token activations "
    "(the grid of the fastest W4A8 GPU kernel)",
    "w4a4": "INT4 per-channel weights, INT4 per-token activations",
}
ACT_GPTQ = ("gptq", "quarot", "flatquant-gptq", "fair-gptq")
ACT_LEARNED = ("flatquant", "flatquant-gptq", "fair", "fair-gptq")
# with --scheme: knob -> the activation methods it applies to (() : none, refused)
ACT_KNOB_METHODS = {
    "damp": ACT_GPTQ,
    "no_act_order": ACT_GPTQ,
    "alpha": ("smoothquant",),
    "flat_steps": ACT_LEARNED,
    "flat_block_steps": ACT_LEARNED,
    "flat_shift": ACT_LEARNED,
    "clip_search": ("rtn", "gptq", "smoothquant", "quarot-rtn", "quarot"),
    **{
        k: ("fair", "fair-gptq")
        for k in (
            "fair_weighting",
            "fair_tokens",
            "fair_steps",
            "fair_prefix_len",
            "fair_noise",
            "fair_inputs",
            "fair_gamma",
            "fair_floor",
            "fair_max_weight",
        )
    },
    **{k: () for k in ("fair_base", "fair_preset", "recon_steps", "e2e_steps")},
}
# flags a scheme fixes or the activation path does not have: dest -> why
ACT_REFUSED = {
    "bits": "the scheme fixes the weight grid",
    "group_size": "the scheme fixes the weight grid",
    "symmetric": "the scheme fixes the weight grid",
    "offload": "activation calibration keeps the model on --device",
    "resume": "activation runs keep no progress files",
    "quantize_head": "the vocabulary layers are weight-only",
}
# recorded only with --scheme
ACT_RECIPE_FLAGS = ("scheme", "flat_steps", "flat_block_steps", "flat_shift", "clip_search")
# with --scheme, why --format packed has no form (checked in this order; none: packed - W8A8 as
# compressed-tensors int-quantized / float-quantized, W4A8 / W4AFP8 / W4A4 as pack-quantized
# weights with per-token input_activations, see faircalib.formats.packed)
ACT_PACKED_REFUSALS = (
    (
        lambda a: a.method == "smoothquant",
        "SmoothQuant's per-channel activation divisors have no compressed-tensors field that "
        "a stock reader applies",
    ),
    (
        lambda a: a.method in ("quarot-rtn", "quarot"),
        "QuaRot's online Hadamard rotations of the activations run in no stock reader",
    ),
    (
        lambda a: a.method in ACT_LEARNED,
        "the learned online transforms of the activations run in no stock reader",
    ),
    (
        lambda a: a.method not in ("rtn", "gptq"),
        "packed export takes --method rtn or gptq only",
    ),
    (
        lambda a: bool(a.clip_search),
        "a searched activation clip ratio has no compressed-tensors field (stock readers "
        "quantize each token to its full abs-max)",
    ),
)
# schemes with a packed form that --format auto still writes fake: why (written packed only when
# asked for, e.g. to reload 4-bit weights compactly with faircalib)
ACT_AUTO_FAKE = {
    "w4a4": "INT4 per-token activations run in no stock reader (vLLM refuses the group: its "
    "4-bit activations are FP4)",
}
RECIPE = "recipe.json"
RECIPE_VERSION = 1
# the flags that define what a run computes (not where it runs or writes)
RECIPE_FLAGS = (
    "method",
    "bits",
    "group_size",
    "symmetric",
    "calib",
    "calib_split",
    "text_field",
    "nsamples",
    "seq_len",
    "seed",
    "masking",
    "sampler_steps",
    "views",
    "include",
    "exclude",
    "format",
    "dtype",
    "calib_dtype",
    "max_device_gib",
    "damp",
    "no_act_order",
    "alpha",
    "fair_base",
    "fair_weighting",
    "fair_tokens",
    "fair_steps",
    "fair_prefix_len",
    "fair_noise",
    "fair_inputs",
    "fair_gamma",
    "fair_floor",
    "fair_max_weight",
    "fair_preset",
    "recon_steps",
    "e2e_steps",
    "quantize_head",
)
FAIR = ("fair", "recon")
# method knobs (flag dest -> the methods it applies to): any other method refuses it
KNOB_METHODS = {
    "damp": ("gptq", *FAIR),
    "no_act_order": ("gptq", *FAIR),
    "alpha": ("smoothquant",),
    **{
        k: FAIR
        for k in (
            "fair_base",
            "fair_weighting",
            "fair_tokens",
            "fair_steps",
            "fair_prefix_len",
            "fair_noise",
            "fair_inputs",
            "fair_gamma",
            "fair_floor",
            "fair_max_weight",
            "fair_preset",
            "recon_steps",
            "e2e_steps",
        )
    },
}
DTYPES = ("auto", "float32", "bfloat16", "float16")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="quantize a dLLM (RTN, GPTQ, AWQ, SmoothQuant, FAIR-Calib)",
        description="Calibrate and quantize a dLLM; writes a model directory that eval, "
        "generate and bench accept, with quantization.json (what ran) and recipe.json (how "
        "to run it again: quantize --config DIR/recipe.json --out NEW).",
    )
    p.add_argument(
        "model",
        nargs="?",
        help=f"{common.MODEL_HELP} (required unless --config names it)",
    )
    p.add_argument(
        "--config",
        metavar="RECIPE",
        help="recipe.json of an earlier run (written beside every output, or its directory) or "
        "a shipped scheme (gptq-w4g128, rtn-w4g128, awq-w4g128, smoothquant-w8a8, fair-w4g128, "
        "...): run it; MODEL and flags given here override the recipe's",
    )
    p.add_argument(
        "--method",
        choices=list(dict.fromkeys(METHODS + list(ACT_METHODS))),
        help="required unless --config or --scheme gives it; recon: FAIR-Calib's optimiser with "
        "every token weight 1 (attribution baseline); quarot-rtn, quarot, flatquant and "
        "flatquant-gptq need --scheme",
    )
    p.add_argument(
        "--scheme",
        choices=ACT_SCHEMES,
        help="quantize activations too (docs/activation-quant.md): "
        + "; ".join(f"{k}: {v}" for k, v in ACT_SCHEME_HELP.items())
        + ". Methods: rtn (default), gptq, smoothquant, quarot-rtn (Hadamard, RTN weights), "
        "quarot (Hadamard, GPTQ weights), flatquant (learned transform), flatquant-gptq, fair "
        "(flatquant on FAIR-Calib's weighted rows), fair-gptq (fair, GPTQ weights). w8a8 / "
        "w8a8fp8 with rtn or gptq are written packed (W8A8 compressed-tensors, symmetric "
        "weights), the rest fake. Default: weight-only",
    )
    p.add_argument(
        "--bits", type=int, help="weight bits (default: the method's: 4; smoothquant: 8, W8A8)"
    )
    p.add_argument(
        "--group-size",
        type=int,
        help="32, 64, 128 or -1 per-channel (default: the method's: 128; smoothquant: -1)",
    )
    p.add_argument("--symmetric", action="store_true", help="symmetric weight grid (no zero)")
    common.add_calib(p)
    common.add_text_field(p)
    common.add_nsamples(p)
    common.add_seq_len(p)
    p.add_argument(
        "--seed", type=argtypes.seed, default=0, help="calibration draw and masking seed"
    )
    p.add_argument(
        "--masking",
        default="uniform",
        choices=["uniform", "sampler", "none"],
        help="mask calibration inputs as the dLLM sees them: 'uniform' t over [0.05, 1], "
        "'sampler' t on a sampler's step grid k/steps, 'none' clean text",
    )
    p.add_argument(
        "--sampler-steps",
        type=int,
        default=64,
        help="--masking sampler: the step count whose grid k/steps (k = 1..steps) t is taken "
        "from; not generate's --steps (sampling) or --fair-steps (frontier tracking)",
    )
    p.add_argument(
        "--views",
        type=int,
        default=1,
        help="masked views per calibration text (noise levels)",
    )
    p.add_argument(
        "--include",
        action="append",
        metavar="GLOB",
        help="quantize only block linears whose full name (blocks.0.attn_qkv) matches; "
        "repeatable (default: every block linear; embeddings and the output layer stay float)",
    )
    p.add_argument(
        "--exclude",
        action="append",
        metavar="GLOB",
        help="leave block linears whose full name matches in float; repeatable",
    )
    p.add_argument(
        "--quantize-head",
        choices=["int8", "int4"],
        help="also quantize the vocabulary layers (input embedding, output projection; RTN, "
        "weight-only): int8 per token row or int4 in groups of 128 along the hidden dim "
        "(default: off, they stay float). See docs/models.md for which readers load them",
    )
    common.add_device(p)
    p.add_argument(
        "--offload",
        action="store_true",
        help="large models: load on the CPU and keep only the stem/head and one block on --device "
        "(FAIR-Calib's frontier tracking runs the model whole there if it fits --max-device-gib, "
        "else block by block)",
    )
    p.add_argument(
        "--format",
        default="auto",
        choices=["auto", "packed", "fake"],
        help="packed: compressed-tensors INT2-8 (vLLM, transformers; with --scheme and rtn or "
        "gptq: W8A8 INT8 / FP8, W4A8, W4AFP8, W4A4); fake: dequantized weights in a float "
        "directory (every float tool reads it); auto: packed where the method has a packed "
        "form, fake for awq, smoothquant and fair --fair-base awq, for --scheme with another "
        "method, and for --scheme w4a4 (no stock reader runs INT4 activations)",
    )
    p.add_argument(
        "--dtype",
        default="auto",
        choices=DTYPES,
        help="--format fake: weight dtype; auto: the source model's (no larger than the "
        "source); float32 keeps the dequantized weights exact",
    )
    p.add_argument(
        "--calib-dtype",
        default="float32",
        choices=DTYPES,
        help="dtype the model is loaded and calibrated in; auto: the source's. bfloat16 halves "
        "host memory for large models (an 8B model: 16 GB instead of 32)",
    )
    p.add_argument(
        "--max-device-gib",
        type=float,
        help="cap on FAIR-Calib's whole-model forwards (frontier tracking, instability scoring) "
        "on --device: batches shrink and the model streams block by block if it must "
        "(default: the device's memory)",
    )
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run from its last finished block (progress is kept in "
        "OUT.partial while a run is under way; the inputs must be the same)",
    )
    common.add_json(p)
    g = p.add_argument_group("method knobs (default: the method's own)")
    g.add_argument("--damp", type=float, help="GPTQ / FAIR(gptq) Hessian damping (0.01)")
    g.add_argument("--no-act-order", action="store_true", help="GPTQ: natural column order")
    g.add_argument("--alpha", type=float, help="SmoothQuant migration strength (0.5)")
    g.add_argument(
        "--fair-base", choices=["gptq", "awq", "rtn"], help="FAIR-Calib base method (gptq)"
    )
    g.add_argument(
        "--fair-weighting",
        choices=["instability", "margin", "prior", "uniform"],
        help="FAIR-Calib token weights (instability)",
    )
    g.add_argument("--fair-tokens", choices=["frontier", "all"], help="positions scored (frontier)")
    g.add_argument(
        "--fair-steps",
        type=int,
        help="sampler steps of FAIR-Calib's frontier tracking (16); not --sampler-steps "
        "(calibration masking) or generate's --steps",
    )
    g.add_argument("--fair-prefix-len", type=int, help="prompt tokens kept for frontier tracking")
    g.add_argument("--fair-noise", choices=["rtn", "random"], help="instability noise model")
    g.add_argument("--fair-inputs", choices=["mixed", "states"], help="calibration sequences")
    g.add_argument("--fair-gamma", type=float, help="exponent on normalised instability")
    g.add_argument("--fair-floor", type=float, help="row weight of non-frontier tokens")
    g.add_argument("--fair-max-weight", type=float, help="cap on a frontier row's extra weight")
    g.add_argument(
        "--fair-preset",
        choices=["full", "fast"],
        help="FAIR-Calib: full (weighted GPTQ + block reconstruction + end-to-end scales, the "
        "default) or fast (weighted GPTQ only)",
    )
    g.add_argument(
        "--recon-steps",
        type=argtypes.non_negative_int,
        help="fair/recon: optimiser steps per block (200)",
    )
    g.add_argument(
        "--e2e-steps",
        type=argtypes.non_negative_int,
        help="fair/recon: end-to-end scale steps (600; 0: off)",
    )
    g.add_argument(
        "--flat-steps",
        type=int,
        help="--scheme with flatquant, flatquant-gptq, fair: learned-transform optimiser steps "
        "per linear (200)",
    )
    g.add_argument(
        "--flat-block-steps",
        type=int,
        help="--scheme with flatquant, flatquant-gptq, fair: steps of the block-wise stage that "
        "tunes each block's transforms jointly on the block output error (default 0: "
        "per-layer only)",
    )
    g.add_argument(
        "--flat-shift",
        choices=["none", "mean", "learned"],
        help="--scheme with flatquant, flatquant-gptq, fair, fair-gptq: subtract a channel shift "
        "from each linear's input before quantizing it and add its exact share back as a bias "
        "(mean: the row-weighted mean of the calibration inputs; learned: that mean, then "
        "trained with the transform; default mean)",
    )
    g.add_argument(
        "--clip-search",
        action="store_true",
        help="--scheme with rtn, gptq, smoothquant, quarot-rtn, quarot: search each layer's "
        "activation clip ratio on calibration rows (flatquant learns its own)",
    )
    p.set_defaults(
        func=run,
        option_dests={o: a.dest for a in p._actions for o in a.option_strings},
        # a recipe's values pass the same choices and types as typed flags (`apply_recipe`)
        option_checks={a.dest: a for a in p._actions if a.option_strings},
    )


# --- configs from flags ------------------------------------------------------------------------
def check_knobs(args: argparse.Namespace) -> None:
    """Refuse a knob the chosen method does not have (it used to be ignored silently)."""
    if args.method not in METHODS:
        raise _config_error(
            f"--method {args.method} quantizes activations: it needs --scheme (one of "
            f"{', '.join(ACT_SCHEMES)})"
        )
    for dest in ("flat_steps", "flat_block_steps", "flat_shift", "clip_search"):
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            raise _config_error(
                f"--{dest.replace('_', '-')} applies to activation quantization only; add "
                "--scheme or leave it out"
            )
    for dest, methods in KNOB_METHODS.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False and args.method not in methods:
            flag = "--" + dest.replace("_", "-")
            raise _config_error(
                f"{flag} does not apply to --method {args.method} (a knob of "
                f"{', '.join(methods)}); leave it out"
            )


def method_config(args: argparse.Namespace, fmt: str | None = None):
    """The method config the flags describe; the method's own defaults where a flag is absent
    (SmoothQuant: W8A8 per-channel unless --bits / --group-size say otherwise)."""
    from faircalib.calib import METHOD_CONFIGS

    fmt = fmt or getattr(args, "format", "fake")
    kwargs: dict[str, Any] = {"symmetric": args.symmetric}
    if args.bits is not None:
        kwargs["bits"] = args.bits
    if args.group_size is not None:
        kwargs["group_size"] = args.group_size
    knobs = {"damp": args.damp, "alpha": args.alpha}
    if fmt == "packed":  # codes chosen for the bf16 scales the checkpoint stores
        knobs["scale_dtype"] = "bfloat16"  # kept only once the config has this field
    if args.method in ("gptq", *FAIR) and args.no_act_order:
        knobs["act_order"] = False
    if args.method in FAIR:
        from faircalib.config import ReconConfig

        stage2 = {"steps": args.recon_steps, "e2e_steps": args.e2e_steps}
        knobs["recon"] = ReconConfig(**{k: v for k, v in stage2.items() if v is not None})
        knobs["preset"] = args.fair_preset
        knobs.update(
            base=args.fair_base,
            weighting=args.fair_weighting,
            tokens=args.fair_tokens,
            steps=args.fair_steps,
            prefix_len=args.fair_prefix_len,
            noise=args.fair_noise,
            inputs=args.fair_inputs,
            gamma=args.fair_gamma,
            floor=args.fair_floor,
            max_weight=args.fair_max_weight,
            n_prompts=args.nsamples,
        )
    cls = METHOD_CONFIGS[args.method]
    fields = cls.__dataclass_fields__
    kwargs.update({k: v for k, v in knobs.items() if v is not None and k in fields})
    return cls(**kwargs)


def packable(config) -> bool:
    """Whether the packed format can hold the results of `config` (not AWQ / SmoothQuant,
    whose per-input-channel scales no packed reader applies)."""
    from faircalib.formats.packed import SMOOTHING_METHODS

    methods = (getattr(config, "method", "rtn"), getattr(config, "base", None))
    return not any(m in SMOOTHING_METHODS for m in methods)


def resolve_format(args: argparse.Namespace):
    """(method config, format): --format auto becomes packed wherever the method has a
    packed form; an explicit --format packed for a method without one is refused now."""
    config = method_config(args, "fake")
    fmt = args.format
    if fmt == "auto":
        fmt = "packed" if packable(config) else "fake"
    if fmt == "packed":
        from faircalib.formats.packed import check_packable_method

        check_packable_method(config)  # refuse AWQ / SmoothQuant now, not after calibrating
        config = method_config(args, "packed")
    return config, fmt


def _input_paths(args: argparse.Namespace) -> list[Path]:
    """The local files a run reads (the model, the calibration text, a recipe): --out must not
    be, or hold, any of them (check_output_dir)."""
    names = (getattr(args, key, None) for key in ("model", "calib", "config"))
    return [Path(str(name)) for name in names if name]


def calib_source(args: argparse.Namespace):
    """The calibration text; records the split actually used in `args.calib_split`."""
    from faircalib.data.sources import DEFAULT_CALIB_SPLIT, load_source

    split = args.calib_split or DEFAULT_CALIB_SPLIT.get(args.calib)
    source = load_source(args.calib, split, args.text_field)
    args.calib_split = source.split
    from faircalib.eval.protocols import DEFAULT_SPLITS

    if source.split is not None and source.split in {
        splits.get(args.calib) for splits in DEFAULT_SPLITS.values()
    }:
        warn(
            f"calibrating on {args.calib}/{source.split}, a split faircalib evaluates on: "
            "perplexities there will flatter the quantized model"
        )
    expected = getattr(args, "recipe_calib_sha256", None)
    if expected is not None and expected != source.sha256:
        warn(
            f"the calibration data {args.calib} differs from the recipe's (sha256 "
            f"{expected[:12]}... then, {source.sha256[:12]}... now): this run will not replay it"
        )
    return source


def calib_config(args: argparse.Namespace):
    from faircalib.config import CalibConfig

    return CalibConfig(
        source=args.calib,
        split=args.calib_split,
        n_samples=args.nsamples,
        seq_len=args.seq_len,
        seed=args.seed,
        masking=args.masking,
        sampler_steps=args.sampler_steps,
        views=args.views,
        device=args.device,
        offload=args.offload,
        max_device_gib=args.max_device_gib,
        include=args.include,
        exclude=args.exclude,
        quantize_head=getattr(args, "quantize_head", None),
    )


def _config_error(message: str):
    from faircalib.errors import ConfigError

    return ConfigError(message)


# --- recipes -----------------------------------------------------------------------------------
def explicit_dests(args: argparse.Namespace) -> set[str]:
    """The flags the user typed (argparse's prefixes included), so a recipe fills the rest."""
    dests = getattr(args, "option_dests", {})
    typed = set()
    for token in getattr(args, "argv", []) or []:
        if not token.startswith("--"):
            continue
        key = token.split("=", 1)[0]
        hits = [key] if key in dests else [o for o in dests if o.startswith(key)]
        if len(hits) == 1:
            typed.add(dests[hits[0]])
    if getattr(args, "model", None) is not None:
        typed.add("model")
    return typed


def shipped_recipes() -> dict[str, Path]:
    """The standard schemes as recipes (`--config gptq-w4g128`): name -> file."""
    from faircalib.hub import ASSETS

    return {p.stem: p for p in sorted((ASSETS / "recipes").glob("*.json"))}


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A recipe.json (or the directory holding one, or a shipped scheme's name), checked."""
    from faircalib.errors import CheckpointError
    from faircalib.models.base import read_json

    shipped = shipped_recipes()
    if str(path) in shipped and not Path(path).exists():
        path = shipped[str(path)]
    path = Path(path)
    if path.is_dir():
        path = path / RECIPE
    if not path.is_file():
        raise _config_error(
            f"recipe {path} does not exist; pass a recipe.json, its directory or a shipped "
            f"scheme ({', '.join(shipped)})"
        )
    try:
        recipe = read_json(path)
    except CheckpointError as exc:  # its remedy speaks of checkpoints; a recipe is the user's
        reason = str(exc).split(";")[0]
        raise _config_error(f"{path} is not a readable recipe ({reason})") from exc
    if not isinstance(recipe, dict) or not isinstance(recipe.get("args"), dict):
        raise _config_error(f"{path} is not a faircalib recipe (no 'args' object)")
    version = recipe.get("faircalib_recipe", RECIPE_VERSION)
    if version != RECIPE_VERSION:
        raise _config_error(
            f"{path} is a recipe of version {version!r}; this faircalib reads version "
            f"{RECIPE_VERSION}"
        )
    known = RECIPE_FLAGS + ACT_RECIPE_FLAGS
    unknown = sorted(set(recipe["args"]) - set(known))
    if unknown:
        raise _config_error(f"{path}: unknown recipe fields {unknown}; known: {known}")
    return recipe


def check_replay_threads(args: argparse.Namespace) -> None:
    """A CPU replay is bit-identical only with the recipe's thread count: float sums split
    over threads round differently (GPTQ's Hessians, matmuls). Say so when they differ."""
    import torch

    recorded = getattr(args, "recipe_cpu_threads", None)
    device = str(getattr(args, "device", "auto"))
    on_cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    if on_cpu and isinstance(recorded, int) and recorded != torch.get_num_threads():
        warn(
            f"the recipe ran with {recorded} CPU thread(s), this run has "
            f"{torch.get_num_threads()}: the result can differ in the last bits; set "
            f"OMP_NUM_THREADS={recorded} for a bit-identical replay"
        )


def apply_recipe(args: argparse.Namespace, recipe: dict[str, Any]) -> None:
    """Fill every flag the user did not type from the recipe (and MODEL, if it names one)."""
    typed = explicit_dests(args)
    if "model" not in typed and recipe.get("model") is not None:
        args.model = str(recipe["model"])
    if "calib" not in typed and "calib_split" not in typed:  # the recipe's own text, or not?
        args.recipe_calib_sha256 = recipe.get("calib_sha256")
    args.recipe_cpu_threads = recipe.get("cpu_threads")
    checks = getattr(args, "option_checks", {})
    for dest, value in recipe["args"].items():
        # null keeps the flag's default (what a recipe writes for a flag that was not set)
        if dest not in typed and value is not None:
            if dest in checks:
                value = check_recipe_value(checks[dest], value)
            setattr(args, dest, value)
    # a learned-transform recipe from before --flat-shift ran unshifted: replay it so (the
    # default is now mean)
    old_learned = recipe["args"].get("scheme") is not None and "flat_shift" not in recipe["args"]
    if old_learned and args.method in ACT_LEARNED and "flat_shift" not in typed:
        args.flat_shift = "none"


def _check_recipe_json_type(action: argparse.Action, flag: str, value: Any) -> None:
    """The JSON type a flag's value must have: true/false for a switch, a list of strings
    for a repeatable flag, a string for a free-text one (typed flags convert below)."""
    if action.nargs == 0:  # store_true / store_false
        wanted, ok = "true or false", isinstance(value, bool)
    elif isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        wanted = "a list of strings"
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    elif action.type is None and action.choices is None:
        wanted, ok = "a string", isinstance(value, str)
    else:
        return
    if not ok:
        raise _config_error(
            f"recipe field {action.dest} = {value!r} must be {wanted} ({flag}); fix the recipe"
        )


def check_recipe_value(action: argparse.Action, value: Any) -> Any:
    """Refuse a recipe value its flag would refuse if typed (a number its type rejects, a
    choice it lacks): one line naming the field, instead of a misleading error later. Returns
    the value, a string converted as its flag's would be ("4" for --bits is 4)."""
    flag = action.option_strings[0] if action.option_strings else action.dest
    _check_recipe_json_type(action, flag, value)
    typed = action.type is not None and not isinstance(value, bool)
    if typed and isinstance(value, (str, int, float)):
        try:
            converted = action.type(str(value))
        except (ValueError, TypeError, argparse.ArgumentTypeError) as exc:
            raise _config_error(
                f"recipe field {action.dest} = {value!r} is not a valid {flag} ({exc})"
            ) from exc
        value = converted if isinstance(value, str) else value
    if action.choices is not None and value not in action.choices:
        raise _config_error(
            f"recipe field {action.dest} = {value!r} is not a valid {flag}; choose from "
            f"{', '.join(map(str, action.choices))}"
        )
    return value


def replayable(value: str | None, names: tuple[str, ...] = ()) -> str | None:
    """A model or data argument as a recipe keeps it: a local path made absolute (a replay
    from another directory must find the same file); shipped names and hub ids as given."""
    if value is None or str(value) in names:
        return value
    path = Path(str(value)).expanduser()
    return str(path.absolute()) if path.exists() else value


def _replayable_flags(flags: dict[str, Any]) -> dict[str, Any]:
    from faircalib.data.corpora import CORPORA

    if flags.get("calib") is not None:
        flags["calib"] = replayable(flags["calib"], tuple(CORPORA))
    return flags


def _replayable_model(model: str) -> str:
    from faircalib.hub import SHIPPED_GAUSSIAN_MODELS, SHIPPED_MODELS

    return replayable(str(model), tuple(SHIPPED_MODELS + SHIPPED_GAUSSIAN_MODELS))


def make_recipe(args: argparse.Namespace, config, calib, fmt: str, dtype: str) -> dict[str, Any]:
    """What replays this run: the resolved flags, plus the configs they built (for reading)."""
    import faircalib

    flags = {dest: getattr(args, dest, None) for dest in RECIPE_FLAGS}
    flags.update(
        bits=config.bits,
        group_size=-1 if config.group_size is None else config.group_size,
        calib_split=calib.split,
        seq_len=calib.seq_len,
        format=fmt,
        dtype=dtype,
    )
    return {
        "faircalib_recipe": RECIPE_VERSION,
        "faircalib_version": faircalib.__version__,
        "model": _replayable_model(args.model),
        "args": _replayable_flags(flags),
        "method": config.to_dict(),
        "calib": {k: v for k, v in calib.to_dict().items() if k not in ("device", "offload")},
        "replay": "faircalib quantize --config recipe.json --out DIR",
    }


# --- checks before any work --------------------------------------------------------------------
def warn(message: str) -> None:
    print(f"faircalib quantize: warning: {message}", file=sys.stderr)


def check_source(source: Path, model_arg: str) -> dict | None:
    """Refuse a packed directory (its layers hold codes, not weights, and quantizing codes
    again is meaningless); warn on a fake-quant one. Returns the source's quantization record."""
    from faircalib import hub
    from faircalib.models.base import read_json

    if hub.is_packed(source):
        raise _config_error(
            f"{model_arg} is already quantized (a packed compressed-tensors directory); "
            "quantize its float source model instead"
        )
    record_path = source / "quantization.json"
    if not record_path.is_file():
        return None
    record = read_json(record_path)
    method = record.get("method", {}) if isinstance(record.get("method"), dict) else {}
    transformed = _online_transform_layers(source, record)
    if transformed:
        raise _config_error(
            f"{model_arg} quantizes activations behind online input transforms (SmoothQuant "
            f"divisors, Hadamard rotations or learned maps; {len(transformed)} layer(s), e.g. "
            f"{transformed[0]}) that quantizing again would drop, breaking the model; quantize "
            f"its float source ({record.get('source_model', 'unknown')}) instead"
        )
    warn(
        f"{model_arg} is already fake-quantized ({method.get('method', '?')} W"
        f"{method.get('bits', '?')}); quantizing it again compounds the errors - quantize its "
        f"float source ({record.get('source_model', 'unknown')}) instead"
    )
    return record


# ActQuantLinear state tensors (calib.fakequant_io) of a map applied to the input at run time
ONLINE_TRANSFORM_TENSORS = frozenset(
    ("smooth", "rotation_signs", "transform_p1", "transform_p2", "transform_smooth")
)


def _online_transform_layers(source: Path, record: dict) -> list[str]:
    """Layers of a fake-quant directory whose inputs pass an online map before their weight
    (`activation_quant` layers holding one; act_quant.json: SmoothQuant W8A8's input scales).
    The quantizers read a layer's weight alone, so quantizing such a directory again would
    silently drop the map."""
    act = record.get("activation_quant")
    layers = act.get("layers", {}) if isinstance(act, dict) else {}
    names = [
        name
        for name, layer in (layers.items() if isinstance(layers, dict) else ())
        if isinstance(layer, dict) and ONLINE_TRANSFORM_TENSORS & set(layer.get("tensors", ()))
    ]
    if (source / "act_quant.json").is_file():
        from faircalib.models.base import read_json

        legacy = read_json(source / "act_quant.json").get("layers", {})
        names += list(legacy) if isinstance(legacy, dict) else []
    return names


def weight_bytes(directory: Path) -> int:
    """Bytes of a model directory's safetensors files (weights as stored on disk)."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


# --- the run -----------------------------------------------------------------------------------
def run(args: argparse.Namespace) -> int:
    from faircalib import distributed, hub

    start = time.time()
    if args.config:
        apply_recipe(args, read_recipe(args.config))
    if args.model is None:
        raise _config_error("MODEL is required (or --config RECIPE, which names it)")
    if getattr(args, "scheme", None) is not None:
        return run_act(args, start)
    if args.method is None:
        raise _config_error(f"--method is required: one of {', '.join(METHODS)}")
    hub.check_device(args.device)  # --device gpu / cuda without CUDA: one line, first
    check_knobs(args)
    config, fmt = resolve_format(args)  # refuses bad bits / group sizes first
    # torchrun: progress files hold one process's block-input cache, and each rank holds a
    # share of it (faircalib.distributed): resumable runs are single-process for now
    if distributed.active() and args.resume:
        raise _config_error("--resume is not supported under torchrun; resume in one process")
    from faircalib.calib.progress import PartialRun, partial_dir
    from faircalib.models.io import check_output_dir

    out = Path(args.out)
    # an unwritable --out fails now, not after hours; --overwrite never deletes an input
    check_output_dir(out, args.overwrite, inputs=_input_paths(args))
    calib_data = calib_source(args)  # the user's text is checked before any model loads
    check_replay_threads(args)
    calib = calib_config(args)  # and bad calibration flags, before anything is loaded
    PartialRun.check(partial_dir(out), resume=args.resume, overwrite=args.overwrite)
    source = hub.resolve(args.model)
    check_source(source, str(args.model))
    _dtype_name(args, source)  # an unreadable torch_dtype is refused now, not after calibration
    check_packed_dtype(args, fmt, source)
    result = quantize_model_from_args(args, config, calib, calib_data, source, fmt)
    if distributed.is_main():  # torchrun: every rank holds the same model; rank 0 writes it
        tick = time.time()
        save(result, out, args.overwrite)
        result.timings["save_s"] = time.time() - tick
    if result.partial is not None:
        result.partial.remove()  # the output is complete: its progress is no longer needed
    result.timings["command_s"] = time.time() - start
    summary = summarize(result, out)
    if args.json:
        print(json.dumps(summary))
    else:
        for row in result.report["layers"]:
            print(
                f"{row['layer']:<22} rel. output error {row['rel_error']:.2e} "
                f"(RTN {row['rtn_rel_error']:.2e})"
            )
        print(summary_text(summary))
    return 0


class Result:
    """A finished calibration: the quantized model and everything the outputs record."""

    def __init__(self, **kwargs: Any) -> None:
        self.__dict__.update(kwargs)


def quantize_model_from_args(
    args: argparse.Namespace, config, calib, calib_data, source: Path, fmt: str, model=None
) -> Result:
    """Load (unless `model`, already loaded from `source`, is given), calibrate and quantize:
    the part between the checks and the writing."""
    import dataclasses

    import torch

    from faircalib import distributed, hub
    from faircalib.calib import quantize
    from faircalib.calib.engine import check_head, check_layers, quant_results
    from faircalib.calib.progress import PartialRun, fingerprint, partial_dir
    from faircalib.calib.select import restrict, selected_layers
    from faircalib.data import calibration_batch
    from faircalib.models.base import seq_len_warning

    tick = time.time()
    if model is None:
        dtype = hub.resolve_dtype(args.model, args.calib_dtype)
        model = hub.load(args.model, device="cpu" if args.offload else args.device, dtype=dtype)
    warning = seq_len_warning(model, args.seq_len, args.model, "calibrating on them may hurt")
    if warning:
        warn(warning)
    chosen, skipped = selected_layers(model, calib.include, calib.exclude)
    tokenizer = hub.load_tokenizer(args.model)
    seq_len = args.seq_len or model.seq_len
    tokens = calibration_batch(tokenizer, calib_data, None, args.nsamples, seq_len, args.seed)
    calib = dataclasses.replace(calib, seq_len=seq_len)
    with restrict(model, calib.include, calib.exclude):
        check_layers(model, config)
        if calib.quantize_head is not None:  # before the progress directory exists
            check_head(model, calib.quantize_head)
        partial = None
        if not distributed.active() and getattr(args, "out", None) is not None:
            fp = fingerprint(model, config.to_dict(), calib.to_dict(), tokens)
            partial = PartialRun.open(
                partial_dir(Path(args.out)), fp, resume=args.resume, overwrite=args.overwrite
            )
        resumed_from = partial.finished if partial is not None else 0
        load_s = time.time() - tick
        progress = not getattr(args, "json", True)
        try:
            report = quantize(model, config, tokens, calib, progress=progress, partial=partial)
        except KeyboardInterrupt as exc:  # SIGINT: say what survives (a SIGKILL keeps it too)
            if partial is None:
                raise
            raise KeyboardInterrupt(
                f"{partial.finished} block(s) finished; progress kept in {partial.directory}: "
                "rerun the same command with --resume to continue"
            ) from exc
        except Exception:
            # a failure before anything worth keeping (out of memory at the first block, a
            # bad knob): no progress directory to block the corrected command
            if partial is not None and partial.finished == 0 and not partial.state.get("inputs"):
                partial.remove()
            raise
    report = report.to_dict()
    timings = {"load_s": load_s, **report["timings"]}
    infos = {name: r.info for name, r in quant_results(model).items() if r.info}
    from faircalib.provenance import run_record

    recipe = make_recipe(args, config, calib, fmt, _dtype_name(args, source))
    recipe["calib_sha256"] = calib_data.sha256  # a replay warns if the text changed since
    recipe["cpu_threads"] = torch.get_num_threads()  # ... or, on the CPU, its thread count
    record = {
        "source_model": str(args.model),
        **run_record(argv=["faircalib", *getattr(args, "argv", sys.argv[1:])], device=args.device),
        "calib_data": calib_data.record(),
        "resumed_from_block": resumed_from if args.resume else None,
        "selection": {"quantized": len(chosen), "left_float": skipped},
        "layer_info": infos,
    }
    return Result(
        model=model,
        tokenizer=tokenizer,
        report=report,
        config=config,
        calib=calib,
        calib_data=calib_data,
        source=source,
        format=fmt,
        recipe=recipe,
        record=record,
        infos=infos,
        chosen=chosen,
        skipped=skipped,
        partial=partial,
        timings=timings,
        source_bytes=weight_bytes(source),
        out=None,
    )


def _dtype_name(args: argparse.Namespace, source: Path) -> str:
    from faircalib import hub

    if args.dtype != "auto":
        return args.dtype
    return str(hub.source_dtype(source)).removeprefix("torch.")


def check_packed_dtype(args: argparse.Namespace, fmt: str, source: Path) -> None:
    """A packed checkpoint stores its unquantized tensors (embeddings, norms, output layer) in
    bfloat16, whatever --dtype says (a fake-quant setting): say so rather than ignore it."""
    if fmt != "packed":
        return
    if args.dtype not in ("auto", "bfloat16"):
        warn(
            f"--dtype {args.dtype} sets --format fake's weights; a packed checkpoint stores its "
            "unquantized tensors (embeddings, norms, output layer) in bfloat16"
        )
    elif args.dtype == "auto" and _dtype_name(args, source) == "float16":
        warn(
            "the source is float16; the packed checkpoint stores its unquantized tensors "
            "(embeddings, norms, output layer) in bfloat16 (--format fake --dtype float16 keeps "
            "float16)"
        )


def save(result: Result, out: Path, overwrite: bool = False, dtype: str | None = None) -> Path:
    """Write the quantized model, quantization.json and recipe.json to `out`."""
    import torch

    from faircalib import hub
    from faircalib.calib.fakequant_io import save_quantized

    dtype = dtype or result.recipe["args"]["dtype"]
    if result.format == "packed":
        dtype = "bfloat16"  # what a packed checkpoint stores (check_packed_dtype said so)
    result.recipe["args"]["dtype"] = dtype
    upstream, missing = hub.upstream_files(result.source)
    if missing:
        warn(
            f"the source's config.json auto_map names {', '.join(missing)}, which it does not "
            f"hold (faircalib never downloads checkpoint code): copy them into {out} to load it "
            "with transformers' trust_remote_code"
        )
    tokenizer: Path | str | None = None
    if (result.source / "tokenizer.json").is_file():
        tokenizer = result.source / "tokenizer.json"
    elif hub.is_mdlm_hf(result.source) or hub.has_slow_tokenizer(result.source):
        # mdlm-owt ships none, Dream only a slow one: write the one it loads with
        tokenizer = hub.load_tokenizer(result.source).to_str()
    save_quantized(
        result.model,
        result.report,
        Path(out),
        tokenizer,
        overwrite,
        fmt=result.format,
        record={**result.record, "dtype": dtype},
        dtype=getattr(torch, dtype),
        extra_files={**upstream, RECIPE: result.recipe},
    )
    result.out = Path(out)
    return Path(out)


# --- the closing summary -----------------------------------------------------------------------
def diagnostics(result: Result) -> dict[str, Any]:
    """Per-method numbers worth a line: GPTQ's loss and the damping it actually used, AWQ's and
    SmoothQuant's chosen scales, FAIR-Calib's weight statistics and stage-2 gains."""
    out: dict[str, Any] = {}
    infos = list(result.infos.values())
    keys = sorted({k for info in infos for k in info})
    for key in keys:
        values = [info[key] for info in infos if key in info]
        out[key] = {"mean": sum(values) / len(values), "max": max(values), "min": min(values)}
    config = result.config
    damp = getattr(config, "damp", None)
    if damp is not None and "damp" in out:
        raised = {name: info["damp"] for name, info in result.infos.items() if info["damp"] > damp}
        out["damp_configured"] = damp
        out["damp_raised"] = raised
    fair = result.report.get("calib", {}).get("fair")
    if fair:
        out["fair"] = fair
    recon = [r for r in result.report.get("recon", []) if isinstance(r, dict)]
    if recon:
        out["recon_blocks"] = len([r for r in recon if r.get("block") != "e2e"])
    return out


def _summary_core(result: Result, out: Path, **extra: Any) -> dict[str, Any]:
    """The fields every closing summary has (`extra` goes after `method`), its error stats
    without the RTN comparison, and the recipe / next-command lines."""
    layers = result.report["layers"]
    rel = [r["rel_error"] for r in layers]
    worst = max(layers, key=lambda r: r["rel_error"]) if layers else None
    out_bytes = weight_bytes(out) if Path(out).is_dir() else None
    return {
        "out": str(out),
        "method": result.report["method"],
        **extra,
        "calib_data": result.calib_data.record(),
        "format": result.format,
        "timings": result.timings,
        "layers": layers,
        "quantized_layers": len(layers),
        "float_layers": result.skipped,
        "bytes": {
            "source": result.source_bytes,
            "output": out_bytes,
            "ratio": out_bytes / result.source_bytes if out_bytes and result.source_bytes else None,
        },
        "error": {
            "mean": sum(rel) / len(rel) if rel else None,
            "worst": worst["rel_error"] if worst else None,
            "worst_layer": worst["layer"] if worst else None,
        },
    }


def _closing(out: Path) -> dict[str, str]:
    return {"recipe": str(Path(out) / RECIPE), "next": f"faircalib eval {out} --data wikitext2"}


def summarize(result: Result, out: Path) -> dict[str, Any]:
    """The fields of the closing summary (the --json object: the old keys plus these)."""
    summary = _summary_core(result, out)
    rel = [r["rel_error"] for r in summary["layers"]]
    rtn = [r["rtn_rel_error"] for r in summary["layers"]]
    summary["error"]["rtn_mean"] = sum(rtn) / len(rtn) if rtn else None
    summary["error"]["vs_rtn"] = (sum(rel) / sum(rtn)) if rtn and sum(rtn) > 0 else None
    return {**summary, "diagnostics": diagnostics(result), **_closing(out), **head_summary(result)}


# what stock readers do with quantized vocabulary layers (measured: docs/models.md)
HEAD_READERS = (
    "readers: faircalib loads both; transformers' default compressed-tensors path loads a "
    "quantized output Linear but not a quantized embedding (AttributeError), vLLM neither "
    "(its vocab layers take no compressed-tensors scheme) - see docs/models.md"
)


def head_summary(result: Result) -> dict[str, Any]:
    """--quantize-head: its rows and, for packed output, which readers can take them (absent
    when the flag is off, so the summary is as before)."""
    rows = result.report.get("head")
    if not rows:
        return {}
    out: dict[str, Any] = {"head": rows}
    if result.format == "packed":
        out["head_readers"] = HEAD_READERS
    return out


def _mb(n: int | None) -> str:
    return "?" if n is None else f"{n / 2**20:.1f} MiB"


def _calib_line(s: dict[str, Any]) -> list[str]:
    """The calibration text a summary names: where it came from, its documents and sha256."""
    c = s.get("calib_data")
    if not c:
        return []
    split = f" ({c['split']})" if c.get("split") else ""
    return [
        f"  calibration data: {c['data']}{split}, {c['documents']:,} documents, "
        f"sha256 {c['sha256'][:12]}"
    ]


def summary_text(s: dict[str, Any]) -> str:
    m = s["method"]
    group = "per-channel" if m.get("group_size") is None else f"g{m['group_size']}"
    lines = [
        f"quantized {s['quantized_layers']} layers with {m['method']} W{m['bits']} {group}"
        + (f" ({len(s['float_layers'])} left in float)" if s["float_layers"] else "")
    ]
    lines += _calib_line(s)
    e = s["error"]
    if e["mean"] is not None:
        # RTN's own run has no comparison to make with itself
        vs_rtn = (
            ""
            if m["method"] == "rtn" or e.get("vs_rtn") is None
            else f"; RTN mean {e['rtn_mean']:.2e} ({e['vs_rtn']:.2f}x of RTN)"
        )
        lines.append(
            f"  output error: mean {e['mean']:.2e}, worst {e['worst']:.2e} ({e['worst_layer']})"
            + vs_rtn
        )
    d = s["diagnostics"]
    if "gptq_loss" in d:
        line = f"  gptq: loss mean {d['gptq_loss']['mean']:.3g}, damping {d['damp_configured']}"
        raised = d.get("damp_raised", {})
        if raised:
            line += (
                f" raised on {len(raised)} layer(s) (up to {max(raised.values()):.3g}: too few "
                "calibration rows for the width; use more --nsamples)"
            )
        lines.append(line)
    if "alpha" in d and m["method"] in ("awq", "fair"):
        lines.append(
            f"  awq: scale exponent alpha mean {d['alpha']['mean']:.2f} "
            f"(range {d['alpha']['min']:.2f}-{d['alpha']['max']:.2f})"
            + (f", clipping kept {d['clip_kept']['mean']:.2f}" if "clip_kept" in d else "")
        )
    if "scale_max" in d:
        lines.append(
            f"  smoothquant: alpha {d['alpha']['mean']:.2f}, smoothing scales "
            f"{d['scale_min']['min']:.3g}-{d['scale_max']['max']:.3g}, activation outliers "
            f"{d['act_outlier_before']['mean']:.1f}x -> {d['act_outlier_after']['mean']:.1f}x"
        )
    if "fair" in d:
        f = d["fair"]
        lines.append(
            f"  fair: {f.get('frontier_tokens', 0)} frontier tokens, max weight "
            f"{f.get('max_weight_used', 0):.2f}, {100 * f.get('weight_share_on_frontier', 0):.0f}% "
            "of the weight on the frontier"
        )
    for row in s.get("head", []):
        group = "per-row" if row["group_size"] is None else f"g{row['group_size']}"
        lines.append(
            f"  head: {row['layer']} ({row['role']}, {row['shape'][0]}x{row['shape'][1]}) "
            f"INT{row['bits']} {group} {row.get('method', 'rtn').upper()}, "
            f"weight error {row['weight_rel_error']:.2e}"
        )
    if "head_readers" in s:
        lines.append(f"  head {s['head_readers']}")
    b = s["bytes"]
    ratio = f" ({b['ratio']:.2f}x)" if b["ratio"] else ""
    lines.append(f"  size: {_mb(b['source'])} -> {_mb(b['output'])}{ratio}, {s['format']}")
    t = s["timings"]
    stages = [k for k in t if k.endswith("_s") and k not in ("total_s", "wall_s", "command_s")]
    lines.append(
        "  time: "
        + ", ".join(f"{k.removesuffix('_s')} {t[k]:.1f}s" for k in stages)
        + f"; total {t.get('command_s', t.get('wall_s', 0)):.1f}s"
    )
    lines.append(f"wrote {s['out']} (recipe: {s['recipe']})")
    lines.append(f"next: {s['next']}")
    return "\n".join(lines)


# --- activation quantization (--scheme) --------------------------------------------------------
def check_act_args(args: argparse.Namespace) -> None:
    """With --scheme: refuse, in one line each, what the activation path does not take."""
    if args.method is None:
        args.method = "rtn"
    if args.method not in ACT_METHODS:
        raise _config_error(
            f"--method {args.method} has no activation-quantization form; with --scheme use one "
            f"of {', '.join(ACT_METHODS)}"
        )
    for dest, why in ACT_REFUSED.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False:
            flag = "--" + dest.replace("_", "-")
            raise _config_error(f"{flag} does not apply with --scheme ({why}); leave it out")
    act_format(args)  # an impossible --format packed is refused here, before any work
    for dest, methods in ACT_KNOB_METHODS.items():
        value = getattr(args, dest, None)
        if value is not None and value is not False and args.method not in methods:
            flag = "--" + dest.replace("_", "-")
            where = f"a knob of {', '.join(methods)}" if methods else "weight-only FAIR-Calib"
            raise _config_error(
                f"{flag} does not apply to --scheme {args.scheme} --method {args.method} "
                f"({where}); leave it out"
            )


def act_format(args: argparse.Namespace) -> str:
    """fake or packed for --scheme: auto is packed where the scheme and method have a packed
    form that a stock reader runs (`ACT_AUTO_FAKE`), fake otherwise; --format packed without
    a packed form is refused with the reason."""
    why = next((reason for applies, reason in ACT_PACKED_REFUSALS if applies(args)), None)
    if args.format == "packed" and why is not None:
        raise _config_error(
            f"--format packed cannot store --scheme {args.scheme} --method {args.method}: {why}; "
            "use --format fake (or auto)"
        )
    if args.format == "auto":
        return "fake" if why or args.scheme in ACT_AUTO_FAKE else "packed"
    return args.format


def act_config(args: argparse.Namespace):
    """The ActCalibConfig the flags describe (refuses bad values: ConfigError)."""
    from faircalib.calib.activations import ActCalibConfig
    from faircalib.config import check_damp
    from faircalib.quant.flatquant import FlatQuantConfig

    if args.damp is not None:
        check_damp(args.damp)
    flat = FlatQuantConfig(
        **({} if args.flat_steps is None else {"steps": args.flat_steps}),
        **({} if getattr(args, "flat_shift", None) is None else {"shift": args.flat_shift}),
    )
    block_steps = getattr(args, "flat_block_steps", None)
    return ActCalibConfig(
        **({} if block_steps is None else {"block_steps": block_steps}),
        scheme=args.scheme,
        method=args.method,
        clip_search=bool(args.clip_search),
        smooth_alpha=0.5 if args.alpha is None else args.alpha,
        flat=flat,
        seed=args.seed,
        device=args.device,
        damp=args.damp,
        act_order=not args.no_act_order,
    )


def fair_rows_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """FairCalibConfig fields from the --fair-* flags (None: the default)."""
    return {
        "weighting": args.fair_weighting,
        "tokens": args.fair_tokens,
        "steps": args.fair_steps,
        "prefix_len": args.fair_prefix_len,
        "noise": args.fair_noise,
        "inputs": args.fair_inputs,
        "gamma": args.fair_gamma,
        "floor": args.fair_floor,
        "max_weight": args.fair_max_weight,
    }


def run_act(args: argparse.Namespace, start: float) -> int:
    """`quantize --scheme`: the checks, calibration, fake-quant directory and summary."""
    from faircalib import distributed, hub
    from faircalib.calib.activations import fair_rows_config
    from faircalib.models.io import check_output_dir

    hub.check_device(args.device)
    check_act_args(args)
    if distributed.active():
        raise _config_error("--scheme runs in one process; run it without torchrun")
    cfg = act_config(args)
    fmt = act_format(args)
    if fmt == "packed":  # INT weight scales chosen in the bf16 the checkpoint stores
        from faircalib.calib.fakequant_io import packed_act_config

        cfg = packed_act_config(cfg)
    fair = fair_rows_config(cfg, args.nsamples, **fair_rows_knobs(args))
    out = Path(args.out)
    check_output_dir(out, args.overwrite, inputs=_input_paths(args))
    calib_data = calib_source(args)
    check_replay_threads(args)
    calib = calib_config(args)
    source = hub.resolve(args.model)
    check_source(source, str(args.model))
    _dtype_name(args, source)
    check_packed_dtype(args, fmt, source)
    result = quantize_act_from_args(args, cfg, fair, calib, calib_data, source, fmt)
    tick = time.time()
    save(result, out, args.overwrite)
    result.timings["save_s"] = time.time() - tick
    result.timings["command_s"] = time.time() - start
    summary = act_summarize(result, out)
    if args.json:
        print(json.dumps(summary))
    else:
        for row in result.report["layers"]:
            print(f"{row['layer']:<22} rel. output error {row['rel_error']:.2e}")
        print(act_summary_text(summary))
    return 0


def quantize_act_from_args(
    args: argparse.Namespace, cfg, fair, calib, calib_data, source: Path, fmt: str = "fake"
) -> Result:
    """Load, calibrate and quantize weights and activations (the --scheme counterpart of
    `quantize_model_from_args`)."""
    import dataclasses

    import torch

    from faircalib import hub
    from faircalib.calib.activations import quantize_activations
    from faircalib.calib.select import restrict, selected_layers
    from faircalib.data import calibration_batch
    from faircalib.models.base import seq_len_warning
    from faircalib.provenance import run_record

    tick = time.time()
    dtype = hub.resolve_dtype(args.model, args.calib_dtype)
    model = hub.load(args.model, device=args.device, dtype=dtype)
    warning = seq_len_warning(model, args.seq_len, args.model, "calibrating on them may hurt")
    if warning:
        warn(warning)
    chosen, skipped = selected_layers(model, calib.include, calib.exclude)
    tokenizer = hub.load_tokenizer(args.model)
    seq_len = args.seq_len or model.seq_len
    tokens = calibration_batch(tokenizer, calib_data, None, args.nsamples, seq_len, args.seed)
    calib = dataclasses.replace(calib, seq_len=seq_len)
    load_s = time.time() - tick
    with restrict(model, calib.include, calib.exclude):
        report = quantize_activations(
            model, tokens, cfg, calib, fair, progress=not getattr(args, "json", True)
        )
    timings = {"load_s": load_s, **report["timings"]}
    recipe = make_act_recipe(args, cfg, fair, calib, _dtype_name(args, source), fmt)
    recipe["calib_sha256"] = calib_data.sha256  # a replay warns if the text changed since
    recipe["cpu_threads"] = torch.get_num_threads()  # ... or, on the CPU, its thread count
    record = {
        "source_model": str(args.model),
        **run_record(argv=["faircalib", *getattr(args, "argv", sys.argv[1:])], device=args.device),
        "calib_data": calib_data.record(),
        "selection": {"quantized": len(chosen), "left_float": skipped},
    }
    return Result(
        model=model,
        tokenizer=tokenizer,
        report=report,
        config=cfg,
        calib=calib,
        calib_data=calib_data,
        source=source,
        format=fmt,
        recipe=recipe,
        record=record,
        infos={},
        chosen=chosen,
        skipped=skipped,
        partial=None,
        timings=timings,
        source_bytes=weight_bytes(source),
        out=None,
    )


def make_act_recipe(
    args: argparse.Namespace, cfg, fair, calib, dtype: str, fmt: str = "fake"
) -> dict[str, Any]:
    """`make_recipe` for --scheme: the scheme fixes bits and group size; `fmt` as resolved
    (packed also rounds INT weight scales to bf16: the method records weight_scale_dtype)."""
    import faircalib

    flags = {dest: getattr(args, dest, None) for dest in RECIPE_FLAGS + ACT_RECIPE_FLAGS}
    flags.update(calib_split=calib.split, seq_len=calib.seq_len, format=fmt, dtype=dtype)
    method = cfg.to_dict()
    if cfg.method in ("fair", "fair-gptq"):
        method["fair_rows"] = fair.to_dict()
    return {
        "faircalib_recipe": RECIPE_VERSION,
        "faircalib_version": faircalib.__version__,
        "model": _replayable_model(args.model),
        "args": _replayable_flags(flags),
        "method": {k: v for k, v in method.items() if k != "device"},
        "calib": {k: v for k, v in calib.to_dict().items() if k not in ("device", "offload")},
        "replay": "faircalib quantize --config recipe.json --out DIR",
    }


def act_summarize(result: Result, out: Path) -> dict[str, Any]:
    """The closing summary of a --scheme run (the --json object)."""
    summary = _summary_core(result, out, scheme=result.report["method"]["scheme"])
    clips = [r["act_clip"] for r in summary["layers"]]
    summary["act_clip"] = {"mean": sum(clips) / len(clips), "min": min(clips)} if clips else None
    summary["fair"] = result.report.get("fair") or None
    return {**summary, **_closing(out)}


ACT_FORMAT_NOTES = {
    "fake": "fake (float weights; the activation-quantized layers' exact state in "
    "act_linears.safetensors)",
    "w8a8": "packed (compressed-tensors int-quantized: symmetric INT8 weights, bf16 "
    "per-channel scales; activations quantized per token at run time)",
    "w8a8fp8": "packed (compressed-tensors float-quantized: FP8 e4m3 weights, float32 "
    "per-channel scales; activations quantized per token at run time)",
    "w4a8": "packed (compressed-tensors pack-quantized: symmetric INT4 g128 weights, bf16 "
    "scales; INT8 activations quantized per token at run time, preset W4A8)",
    "w4a8fp8": "packed (compressed-tensors pack-quantized: symmetric INT4 g128 weights, bf16 "
    "scales; FP8 activations quantized per token at run time, preset W4AFP8)",
    "w4a8fp8-e8m0": "packed (compressed-tensors pack-quantized: symmetric INT4 g128 weights, "
    "power-of-two scales stored as bf16; FP8 activations quantized per token at run time, "
    "preset W4AFP8)",
    "w4a4": "packed (compressed-tensors pack-quantized: INT4 per-channel weights, bf16 scales; "
    "INT4 activations quantized per token at run time; no stock reader runs it)",
}


def _act_format_note(s: dict[str, Any]) -> str:
    return ACT_FORMAT_NOTES["fake" if s["format"] == "fake" else s["scheme"]]


def act_summary_text(s: dict[str, Any]) -> str:
    m = s["method"]
    lines = [
        f"quantized {s['quantized_layers']} layers with {m['method']} {s['scheme'].upper()} "
        f"({ACT_SCHEME_HELP[s['scheme']]})"
        + (f" ({len(s['float_layers'])} left in float)" if s["float_layers"] else "")
    ]
    lines += _calib_line(s)
    e = s["error"]
    if e["mean"] is not None:
        lines.append(
            f"  output error (weights and activations quantized): mean {e['mean']:.2e}, worst "
            f"{e['worst']:.2e} ({e['worst_layer']})"
        )
    if s["act_clip"]:
        lines.append(
            f"  activation clip ratio: mean {s['act_clip']['mean']:.2f}, min "
            f"{s['act_clip']['min']:.2f}"
        )
    shift = (m.get("flat") or {}).get("shift")
    if m["method"] in ACT_LEARNED and shift:
        lines.append(f"  input shift: {shift} (--flat-shift; its share is added back exactly)")
    if s["fair"]:
        f = s["fair"]
        lines.append(
            f"  fair: {f.get('frontier_tokens', 0)} frontier tokens, max weight "
            f"{f.get('max_weight_used', 0):.2f}, {100 * f.get('weight_share_on_frontier', 0):.0f}% "
            "of the weight on the frontier"
        )
    b = s["bytes"]
    ratio = f" ({b['ratio']:.2f}x)" if b["ratio"] else ""
    lines.append(f"  size: {_mb(b['source'])} -> {_mb(b['output'])}{ratio}, {_act_format_note(s)}")
    t = s["timings"]
    stages = [k for k in t if k.endswith("_s") and k not in ("total_s", "wall_s", "command_s")]
    lines.append(
        "  time: "
        + ", ".join(f"{k.removesuffix('_s')} {t[k]:.1f}s" for k in stages)
        + f"; total {t.get('command_s', t.get('wall_s', 0)):.1f}s"
    )
    lines.append(f"wrote {s['out']} (recipe: {s['recipe']})")
    lines.append(f"next: {s['next']}")
    return "\n".join(lines)
