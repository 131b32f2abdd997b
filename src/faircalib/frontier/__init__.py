"""Write-frontier samplers, the frontier trace, and flip / degeneration metrics."""

from faircalib.frontier.metrics import compare_generations, distinct_n, repetition_rate
from faircalib.frontier.samplers import (
    SAMPLERS,
    FrontierStep,
    FrontierTrace,
    GenerationResult,
    SamplerConfig,
    generate,
)

__all__ = [
    "SAMPLERS",
    "FrontierStep",
    "FrontierTrace",
    "GenerationResult",
    "SamplerConfig",
    "compare_generations",
    "distinct_n",
    "generate",
    "repetition_rate",
]
