"""The flag vocabulary every command shares: one name, one meaning, one help text.

A model is always the positional MODEL; `--data/--split` is text to evaluate, `--calib/
--calib-split` text to calibrate on, `--text-field` the field either is read from, `--nsamples`
calibration sequences, `--mc-samples` Monte Carlo draws of the likelihood bound, `--limit` the
first N evaluation sequences. Old spellings stay accepted as hidden aliases (`hidden_alias`) for
one release. This module imports argparse only: `faircalib --help` must not load torch.
"""

from __future__ import annotations

import argparse

from faircalib.commands.argtypes import positive_int

MODEL_HELP = "shipped name (mdlm-tiny, mdlm-small), model directory or Hugging Face id owner/name"
DATA_HELP = (
    "evaluation text: shipped corpus (wikitext2, c4; see `faircalib data`), a .txt / "
    ".jsonl[.gz] / .parquet file, a `datasets` save_to_disk directory or a hub dataset id "
    "owner/name"
)
CALIB_HELP = (
    "calibration text: shipped corpus (c4, wikitext2), a .txt / .jsonl[.gz] / .parquet file, a "
    "`datasets` save_to_disk directory or a hub dataset id owner/name"
)
CALIB_SPLIT_HELP = "split of --calib (default: train for a shipped corpus; a dataset's split)"
TEXT_FIELD_HELP = "field holding the text in JSON Lines / Parquet / `datasets` input"
NSAMPLES_HELP = (
    "calibration sequences (--seq-len token windows of --calib); not --mc-samples, the Monte "
    "Carlo draws of the likelihood bound"
)
MC_SAMPLES_HELP = (
    "Monte Carlo (t, mask) draws per sequence of the likelihood bound; not --nsamples "
    "(calibration sequences)"
)
LIMIT_HELP = "evaluate only the first N evaluation sequences (default: all)"
SEQ_LEN_HELP = "tokens per sequence (default: the model's training length)"
DEVICE_HELP = "cpu, cuda or cuda:N"
JSON_HELP = "print exactly one JSON object on stdout"
# faircalib.frontier.samplers.SAMPLERS, spelled out so building the parser imports no torch
# (tests/test_cli_vocabulary.py checks the two agree)
SAMPLER_NAMES = (
    "low_confidence",
    "random",
    "ancestral",
    "maskgit_plus",
    "topk_margin",
    "entropy",
)


class HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default, unless the default is None / False (nothing
    to show) or the help already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == "":
            return text
        if "default" in text:
            return text
        if not action.option_strings and action.nargs not in ("?", "*"):
            return text
        shown = ",".join(map(str, default)) if isinstance(default, list | tuple) else default
        return f"{text} (default: {str(shown).replace('%', '%%')})"


def hidden_alias(p: argparse.ArgumentParser, *flags: str, dest: str, **kwargs) -> None:
    """An old spelling of `dest`'s flag: accepted, absent from --help."""
    p.add_argument(*flags, dest=dest, help=argparse.SUPPRESS, default=argparse.SUPPRESS, **kwargs)


def add_model(p: argparse.ArgumentParser, *, default: str | None = None) -> None:
    """The positional MODEL (optional only where `default` is given)."""
    if default is None:
        p.add_argument("model", help=MODEL_HELP)
        return
    # SUPPRESS: an absent positional must not overwrite a hidden `--model` alias; the default
    # is filled in after parsing (`fill_defaults`)
    p.add_argument(
        "model", nargs="?", default=argparse.SUPPRESS, help=f"{MODEL_HELP} (default: {default})"
    )
    p.set_defaults(fill_defaults={"model": default})


def fill_defaults(args: argparse.Namespace) -> argparse.Namespace:
    """Set the defaults `add_model` left out (see there) on a parsed namespace."""
    for name, value in getattr(args, "fill_defaults", {}).items():
        if not hasattr(args, name):
            setattr(args, name, value)
    return args


def add_data(p: argparse.ArgumentParser, *, default: str = "wikitext2", split_help: str) -> None:
    p.add_argument("--data", default=default, help=DATA_HELP)
    p.add_argument("--split", help=split_help)


def add_calib(p: argparse.ArgumentParser, *, default: str = "c4") -> None:
    p.add_argument("--calib", default=default, help=CALIB_HELP)
    p.add_argument("--calib-split", help=CALIB_SPLIT_HELP)


def add_text_field(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text-field", default="text", help=TEXT_FIELD_HELP)


def add_nsamples(p: argparse.ArgumentParser, *, default: int = 128) -> None:
    # plain int: CalibConfig refuses < 1 with its own line (tested wording)
    p.add_argument("--nsamples", type=int, default=default, help=NSAMPLES_HELP)


def add_mc_samples(p: argparse.ArgumentParser, *, default: int = 1) -> None:
    p.add_argument("--mc-samples", type=positive_int, default=default, help=MC_SAMPLES_HELP)


def add_limit(p: argparse.ArgumentParser) -> None:
    p.add_argument("--limit", type=positive_int, help=LIMIT_HELP)


def add_seq_len(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, help=SEQ_LEN_HELP)


def add_device(p: argparse.ArgumentParser, *, default: str | None = "cpu") -> None:
    p.add_argument("--device", default=default, help=DEVICE_HELP)


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help=JSON_HELP)
