"""argparse types that refuse impossible numbers at parse time, in argparse's one line."""

from __future__ import annotations

import argparse
import math


def _int_at_least(text: str, low: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1 (counts, lengths, batch sizes)."""
    return _int_at_least(text, 1)


def seed(text: str) -> int:
    """A random seed: an integer in [0, 2**63) (torch's generators take a signed 64-bit one)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed is an integer in [0, 2**63), got {value}")
    return value


def seed_list(text: str) -> list[int]:
    """A comma list of seeds (`seed` each), at least one."""
    parts = [part.strip() for part in text.split(",")]
    if not all(parts):
        raise argparse.ArgumentTypeError(f"a comma list of seeds, got {text!r}")
    return [seed(part) for part in parts]


def finite_float(text: str) -> float:
    """A finite float (temperatures, scales, probabilities: NaN and inf pass every range check)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0 (warm-up steps: none is allowed)."""
    return _int_at_least(text, 0)


def positive_float(text: str) -> float:
    """A finite float > 0 (learning rates, seconds, sizes)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
    return value
