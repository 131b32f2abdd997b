"""dLLM adapters behind one interface (`DiffusionLM`), and their checkpoint I/O."""

from faircalib.models.base import BlockContext, DiffusionLM
from faircalib.models.diffusion_lm import DiffusionLMConfig, DiffusionLMModel
from faircalib.models.dream import Dream
from faircalib.models.io import build_model, load_model, register_family, save_model
from faircalib.models.llada import LLaDA
from faircalib.models.mdlm import MDLM, MDLMConfig
from faircalib.models.planner import Planner, PlannerConfig

register_family("mdlm", MDLM.from_config)
# Gaussian families (no mask token in their inputs): docs/models.md, "Families without [MASK]"
register_family("diffusion_lm", DiffusionLMModel.from_config)
register_family("planner", Planner.from_config)
# LLaDA and Dream directories are upstream's own layout: dispatched on config.json's model_type
register_family("llada", LLaDA.from_config, model_type="llada")
register_family("dream", Dream.from_config, model_type="Dream")

__all__ = [
    "MDLM",
    "BlockContext",
    "DiffusionLM",
    "DiffusionLMConfig",
    "DiffusionLMModel",
    "Dream",
    "LLaDA",
    "MDLMConfig",
    "Planner",
    "PlannerConfig",
    "build_model",
    "load_model",
    "register_family",
    "save_model",
]
