"""LLaDA (Nie et al. 2025; `GSAI-ML/LLaDA-8B-Base`, `-Instruct`): a masked diffusion LM trained
from scratch on an OLMo-style LLaMA block without a causal mask.

Layout, from the checkpoint's `modeling_llada.py` (`LLaDAModelLM` -> `LLaDAModel` ->
`LLaDALlamaBlock`) and `configuration_llada.py` (OLMo's `ModelConfig` with its defaults):

    model.transformer.wte.weight                 [embedding_size, d_model]
    model.transformer.blocks.N.attn_norm.weight  RMSNorm
    model.transformer.blocks.N.{q,k,v}_proj      bias only with include_qkv_bias
    model.transformer.blocks.N.attn_out          attention output projection
    model.transformer.blocks.N.ff_norm.weight    RMSNorm
    model.transformer.blocks.N.ff_proj           silu(ff_proj(x)) * up_proj(x) ...
    model.transformer.blocks.N.up_proj
    model.transformer.blocks.N.ff_out            ... -> ff_out: the down projection
    model.transformer.ln_f.weight                final RMSNorm
    model.transformer.ff_out.weight              output layer; absent with weight_tying

Logits at a position predict the token at that position (no shift).
"""

from __future__ import annotations

from typing import Any

from faircalib.errors import CheckpointError
from faircalib.models.llama_like import (
    BlockNames,
    LlamaLikeLM,
    LlamaSpec,
    NameMap,
    integer,
    positive_float,
    positive_int,
    require_values,
    rope_theta,
)

MODEL_TYPE = "llada"
# key -> (upstream default when the key is absent, the values this adapter implements)
SUPPORTED = {
    "block_type": ("sequential", ("llama",)),
    "activation_type": ("swiglu", ("silu",)),  # silu on ff_proj, times up_proj
    "layer_norm_type": ("default", ("rms",)),
    "layer_norm_with_affine": (True, (True,)),
    "rope": (False, (True,)),
    "alibi": (False, (False,)),
    "attention_layer_norm": (False, (False,)),
    "input_emb_norm": (False, (False,)),
    "scale_logits": (False, (False,)),
    "include_bias": (False, (False,)),
    "bias_for_layer_norm": (None, (None, False)),  # None inherits include_bias (False)
    "block_group_size": (1, (1,)),  # grouping changes parameter names
}


def kv_heads(config: dict[str, Any], n_heads: int) -> int:
    """OLMo's effective_n_kv_heads: n_kv_heads, or 1 / n_heads from multi_query_attention."""
    n_kv, mqa = config.get("n_kv_heads"), config.get("multi_query_attention")
    implied = None if mqa is None else (1 if mqa else n_heads)
    if n_kv is None:
        return implied or n_heads
    if type(n_kv) is not int or n_kv <= 0 or (implied is not None and n_kv != implied):
        raise CheckpointError(
            f"LLaDA config.json: n_kv_heads={n_kv!r} is invalid "
            f"(multi_query_attention={mqa!r}, n_heads={n_heads})"
        )
    return n_kv


def llada_spec(config: dict[str, Any]) -> LlamaSpec:
    """Map LLaDA's config.json onto a LlamaSpec, refusing anything the block does not implement.
    Sizes and mask_token_id must be present (upstream's defaults there are GPT-2's)."""
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"model_type is {config.get('model_type')!r}, expected 'llada'")
    if config.get("num_experts") or "LLaDAMoEModelLM" in (config.get("architectures") or ()):
        # inclusionAI's LLaDA-MoE shares model_type "llada" but is a mixture of experts with
        # Qwen-style keys: refuse it by name, not by the dense keys it lacks
        raise CheckpointError(
            "this is LLaDA-MoE (a mixture-of-experts model: num_experts / LLaDAMoEModelLM), "
            "which faircalib does not support; dense LLaDA (LLaDA-8B, LLaDA-1.5) is supported"
        )
    require_values(config, SUPPORTED, "LLaDA")
    d, n_heads = positive_int(config, "d_model", "LLaDA"), positive_int(config, "n_heads", "LLaDA")
    if config.get("mlp_hidden_size") is None:
        intermediate = positive_int(config, "mlp_ratio", "LLaDA", default=4) * d
    else:
        intermediate = positive_int(config, "mlp_hidden_size", "LLaDA")
    rows_key = "embedding_size" if config.get("embedding_size") is not None else "vocab_size"
    return LlamaSpec(
        vocab_size=positive_int(config, rows_key, "LLaDA"),
        mask_id=integer(config, "mask_token_id", "LLaDA"),
        seq_len=positive_int(config, "max_sequence_length", "LLaDA"),  # the training length
        hidden=d,
        n_layers=positive_int(config, "n_layers", "LLaDA"),
        n_heads=n_heads,
        n_kv_heads=kv_heads(config, n_heads),
        intermediate=intermediate,
        rope_theta=rope_theta(config, 10000.0, "LLaDA"),
        rms_eps=positive_float(config, "rms_norm_eps", 1e-5, "LLaDA"),
        qkv_bias=bool(config.get("include_qkv_bias") or False),
        tie_embeddings=bool(config.get("weight_tying", True)),
        shift_logits=False,
    )


class LLaDA(LlamaLikeLM):
    family = MODEL_TYPE
    NAMES = NameMap(
        embed="model.transformer.wte",
        blocks="model.transformer.blocks",
        final_norm="model.transformer.ln_f",
        lm_head="model.transformer.ff_out",
        block=BlockNames(
            attn_norm="attn_norm",
            q="q_proj",
            k="k_proj",
            v="v_proj",
            o="attn_out",
            mlp_norm="ff_norm",
            gate="ff_proj",
            up="up_proj",
            down="ff_out",
            act="act",
        ),
    )
    TIE_KEY = "weight_tying"

    @classmethod
    def parse_config(cls, config: dict[str, Any]) -> LlamaSpec:
        return llada_spec(config)
