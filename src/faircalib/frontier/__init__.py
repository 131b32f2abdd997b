"""Write-frontier samplers, the frontier trace, flip / degeneration / mechanism metrics, and
FAIR-Calib's Stage-I position prior."""

from faircalib.frontier.metrics import (
    cache_flip_metrics,
    compare_generations,
    distinct_n,
    mechanism_metrics,
    repetition_rate,
)
from faircalib.frontier.prior import position_prior
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
    "cache_flip_metrics",
    "compare_generations",
    "distinct_n",
    "generate",
    "mechanism_metrics",
    "position_prior",
    "repetition_rate",
]
