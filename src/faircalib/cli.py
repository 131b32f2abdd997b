"""`faircalib` command line. Each sub-command lives in `faircalib.commands.<name>` and
exposes `register(subparsers)`; this file only assembles them and turns errors into messages."""

from __future__ import annotations

import argparse
import importlib
import sys

from faircalib import __version__
from faircalib.errors import FairCalibError

COMMANDS = ["data", "train", "eval", "generate", "quantize", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="faircalib",
        description="Quantize diffusion language models to INT4/INT8 with frontier-aware calibration.",
    )
    parser.add_argument("--version", action="version", version=f"faircalib {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"faircalib.commands.{name}")
        except ModuleNotFoundError as exc:  # a command not built yet is simply not exposed
            if exc.name == f"faircalib.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FairCalibError as exc:
        print(f"faircalib {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
