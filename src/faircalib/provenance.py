"""What every results file records next to its numbers: faircalib version, git commit (when
the code runs from a git checkout, or FAIRCALIB_GIT_COMMIT names it), torch version, device and
date, plus the command line."""

from __future__ import annotations

import sys


def run_record(argv: list[str] | None = None, device: str | None = None) -> dict:
    """`faircalib.bench.run_record` (command, faircalib_version, git_commit, device name, torch,
    date, deterministic) plus the device the command ran on (`run_device`: cpu, cuda:0, ...)."""
    from faircalib.bench import deterministic
    from faircalib.bench import run_record as base

    argv = argv if argv is not None else ["faircalib", *sys.argv[1:]]
    record = base(argv)
    if device is not None:
        record["run_device"] = str(device)
        record["deterministic"] = deterministic(device)
    return record
