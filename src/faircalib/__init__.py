"""FAIR-Calib: frontier-aware, instability-weighted quantization for diffusion LMs."""

__version__ = "0.1.0"
