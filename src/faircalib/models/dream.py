"""Dream (Ye et al. 2025; `Dream-org/Dream-v0-Base-7B`, `-Instruct-7B`): a masked diffusion LM
initialised from Qwen2.5-7B, run with bidirectional attention.

Layout, from the checkpoint's `modeling_dream.py` / `configuration_dream.py` (Qwen2's, with
`is_causal = False`):

    model.embed_tokens.weight                             [vocab_size, hidden_size]
    model.layers.N.input_layernorm.weight                 RMSNorm
    model.layers.N.self_attn.{q,k,v}_proj.{weight,bias}   always biased (hard-coded upstream)
    model.layers.N.self_attn.o_proj.weight                no bias
    model.layers.N.post_attention_layernorm.weight        RMSNorm
    model.layers.N.mlp.{gate,up,down}_proj.weight         down(silu(gate(x)) * up(x))
    model.norm.weight                                     final RMSNorm
    lm_head.weight                                        absent with tie_word_embeddings

Dream keeps the next-token alignment of its AR initialisation: the output at position i - 1
predicts token i, so its sampler shifts logits one position right,
`cat([logits[:, :1], logits[:, :-1]], dim=1)`, and so does our head.
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

MODEL_TYPE = "Dream"
# Dream's config inherits Qwen2.5's 131,072 rotary positions; that is not a length the
# diffusion model was trained or evaluated at. Defaults (eval windows, calibration length,
# generation limit) use at most this many tokens; --seq-len overrides eval and calibration.
MAX_SEQ_LEN = 2048
SUPPORTED = {
    "hidden_act": ("silu", ("silu",)),
    "rope_scaling": (None, (None,)),
    "use_sliding_window": (False, (False,)),
}


def dream_spec(config: dict[str, Any]) -> LlamaSpec:
    """Map Dream's config.json (Qwen2 field names) onto a LlamaSpec."""
    if config.get("model_type") != MODEL_TYPE:
        raise CheckpointError(f"model_type is {config.get('model_type')!r}, expected 'Dream'")
    require_values(config, SUPPORTED, "Dream")
    hidden = positive_int(config, "hidden_size", "Dream")
    n_heads = positive_int(config, "num_attention_heads", "Dream")
    if config.get("head_dim") not in (None, hidden // n_heads):  # upstream derives it
        raise CheckpointError(f"Dream config.json: head_dim {config['head_dim']} != hidden/heads")
    n_kv = config.get("num_key_value_heads")
    positions = positive_int(config, "max_position_embeddings", "Dream", default=32768)
    return LlamaSpec(
        vocab_size=positive_int(config, "vocab_size", "Dream"),
        mask_id=integer(config, "mask_token_id", "Dream"),
        seq_len=min(positions, MAX_SEQ_LEN),
        hidden=hidden,
        n_layers=positive_int(config, "num_hidden_layers", "Dream"),
        n_heads=n_heads,
        n_kv_heads=n_heads
        if n_kv is None
        else positive_int(config, "num_key_value_heads", "Dream"),
        intermediate=positive_int(config, "intermediate_size", "Dream"),
        rope_theta=rope_theta(config, 10000.0, "Dream"),
        rms_eps=positive_float(config, "rms_norm_eps", 1e-6, "Dream"),
        qkv_bias=True,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        shift_logits=True,
    )


class Dream(LlamaLikeLM):
    family = "dream"
    NAMES = NameMap(
        embed="model.embed_tokens",
        blocks="model.layers",
        final_norm="model.norm",
        lm_head="lm_head",
        block=BlockNames(
            attn_norm="input_layernorm",
            q="self_attn.q_proj",
            k="self_attn.k_proj",
            v="self_attn.v_proj",
            o="self_attn.o_proj",
            mlp_norm="post_attention_layernorm",
            gate="mlp.gate_proj",
            up="mlp.up_proj",
            down="mlp.down_proj",
            act="mlp.act_fn",
        ),
    )
    TIE_KEY = "tie_word_embeddings"

    @classmethod
    def parse_config(cls, config: dict[str, Any]) -> LlamaSpec:
        return dream_spec(config)
