"""Kernel checks under Triton's CPU interpreter. The interpreter must be switched on before
triton decorates the kernels, so each check runs in a fresh Python process."""

import os
import subprocess
import sys
from pathlib import Path


def run_interpreted(code: str, *, cwd: Path | None = None, timeout: float = 600) -> str:
    """Run `code` with TRITON_INTERPRET=1 in a new interpreter; its stdout (it must exit 0)."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "TRITON_INTERPRET": "1"},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def named_floats(stdout: str) -> dict[str, float]:
    """Lines "name value" -> {name: value} (how the checks report their errors)."""
    return {line.split()[0]: float(line.split()[1]) for line in stdout.strip().splitlines()}
