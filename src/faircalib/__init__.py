"""FAIR-Calib: frontier-aware, instability-weighted quantization for diffusion LMs.

`faircalib.load`, `faircalib.quantize`, `faircalib.save` and `faircalib.evaluate` are the
one-call Python API (`faircalib.api`); they are imported on first use, so `import faircalib`
(and the command line's `--help`) stays free of torch.
"""

__version__ = "0.1.0"

_API = ("load", "quantize", "save", "evaluate", "Quantized")


def __getattr__(name: str):
    if name in _API or name == "api":
        import importlib

        api = importlib.import_module("faircalib.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'faircalib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API, "api"])
