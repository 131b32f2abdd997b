"""One way for an optional fast path to fail: record why (once), warn, and let the caller use
its plain path from then on. Used where a kernel may not compile on another Triton version or
an optional package may not build (gemlite, the W4 "swap" configs, the INT8 TMA GEMM)."""

from __future__ import annotations

import warnings


def record_failure(
    failures: list[str], what: str, instead: str, exc: BaseException, stacklevel: int = 3
) -> None:
    """Append `exc` (one line, 300 characters at most) to `failures`, the caller's switch, and
    warn: "{what} failed (reason); using {instead} from now on"."""
    failures.append(f"{type(exc).__name__}: {exc}"[:300])
    warnings.warn(
        f"{what} failed ({failures[0]}); using {instead} from now on",
        RuntimeWarning,
        stacklevel=stacklevel,
    )
