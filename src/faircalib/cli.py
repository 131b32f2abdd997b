"""`faircalib` command line. Each sub-command lives in `faircalib.commands.<name>` and
exposes `register(subparsers)`; this file only assembles them and turns errors into messages.

Building the parser imports argparse and the command modules' flag definitions only: torch and
everything that needs it are imported inside each command's `run`, on dispatch, so `faircalib
--help` and every `--help` answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from typing import NoReturn

from faircalib import __version__
from faircalib.commands.common import HelpFormatter, fill_defaults
from faircalib.errors import FairCalibError

COMMANDS = ["data", "train", "eval", "generate", "quantize", "bench", "build_kernels"]


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: the problem, then where the usage is (the default
    prints the whole usage block first, which buries the problem for long commands)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)  # sub-commands too: defaults shown
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
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
    # Under torchrun (`torchrun --nproc-per-node N -m faircalib.cli ...`) ranks > 0 print
    # nothing and the command runs inside the process group; error lines go through
    # distributed.print_error, which prints only the first failing rank's. Without WORLD_SIZE
    # all of this is a no-op (and torch is not imported before a command runs).
    quiet: contextlib.AbstractContextManager = contextlib.nullcontext()
    if "WORLD_SIZE" in os.environ:
        from faircalib import distributed

        quiet = distributed.quiet_other_ranks()
    with quiet:
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = fill_defaults(build_parser().parse_args(argv))
    args.argv = argv  # what the user typed: `quantize --config` lets explicit flags win
    from faircalib import distributed  # torch: only once a command runs

    try:
        with distributed.launched(getattr(args, "device", None) or "cpu"):
            return int(args.func(args) or 0)
    except FairCalibError as exc:
        distributed.print_error(f"faircalib {args.command}: error: {exc}")
        return 2
    except KeyboardInterrupt as exc:  # a command may say what survives (`quantize`: progress)
        detail = f": {exc}" if str(exc) else ""
        distributed.print_error(f"faircalib {args.command}: interrupted{detail}")
        return 130
    except OSError as exc:  # the environment, not a bug: one line, as for bad input
        distributed.print_error(
            f"faircalib {args.command}: error: {exc}; check the path, its permissions and the "
            "free disk space"
        )
        return 1
    except MemoryError:
        distributed.print_error(out_of_memory(args.command))
        return 1
    except RuntimeError as exc:
        # torch's allocators raise RuntimeError subclasses (torch.OutOfMemoryError on CUDA,
        # "DefaultCPUAllocator: can't allocate memory" on the CPU)
        if "out of memory" not in str(exc).lower() and "can't allocate" not in str(exc):
            if distributed.peer_failed():
                return 1
            raise
        distributed.print_error(out_of_memory(args.command))
        return 1
    except Exception:
        if distributed.peer_failed():  # torchrun: a collective broke because another rank
            return 1  # failed first and printed why; this rank's traceback would bury that
        raise


def out_of_memory(command: str) -> str:
    return (
        f"faircalib {command}: error: out of memory; use fewer or shorter sequences, smaller "
        "counts (--nsamples, --views, --sampler-steps), --offload, or a larger machine"
    )


if __name__ == "__main__":
    sys.exit(main())
