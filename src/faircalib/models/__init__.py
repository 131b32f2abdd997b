"""dLLM adapters behind one interface (`DiffusionLM`), and their checkpoint I/O."""

from faircalib.models.base import BlockContext, DiffusionLM
from faircalib.models.io import build_model, load_model, register_family, save_model
from faircalib.models.mdlm import MDLM, MDLMConfig

register_family("mdlm", MDLM.from_config)

__all__ = [
    "MDLM",
    "BlockContext",
    "DiffusionLM",
    "MDLMConfig",
    "build_model",
    "load_model",
    "register_family",
    "save_model",
]
