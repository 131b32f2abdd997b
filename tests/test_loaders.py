"""The public MDLM Hugging Face layout, on a random model written in exactly that layout."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from faircalib.errors import CheckpointError
from faircalib.models import load_model
from faircalib.models.loaders import convert_mdlm_hf, detect_format, load_mdlm_hf

D, COND, BLOCKS, V, L = 32, 16, 2, 60, 24


def hf_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Tensors named as in kuleshov-group's HF MDLM (`backbone.` + DiT module paths)."""
    r = lambda *s: torch.randn(*s, generator=gen) * 0.1  # noqa: E731
    t = {
        "backbone.vocab_embed.embedding": r(V, D),
        "backbone.sigma_map.mlp.0.weight": r(COND, 256),
        "backbone.sigma_map.mlp.0.bias": r(COND),
        "backbone.sigma_map.mlp.2.weight": r(COND, COND),
        "backbone.sigma_map.mlp.2.bias": r(COND),
        "backbone.rotary_emb.inv_freq": 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8)),
        "backbone.output_layer.norm_final.weight": 1 + r(D),
        "backbone.output_layer.linear.weight": r(V, D),
        "backbone.output_layer.linear.bias": r(V),
        "backbone.output_layer.adaLN_modulation.weight": r(2 * D, COND),
        "backbone.output_layer.adaLN_modulation.bias": r(2 * D),
    }
    for i in range(BLOCKS):
        p = f"backbone.blocks.{i}."
        t.update(
            {
                p + "norm1.weight": 1 + r(D),
                p + "attn_qkv.weight": r(3 * D, D),
                p + "attn_out.weight": r(D, D),
                p + "norm2.weight": 1 + r(D),
                p + "mlp.0.weight": r(4 * D, D),
                p + "mlp.0.bias": r(4 * D),
                p + "mlp.2.weight": r(D, 4 * D),
                p + "mlp.2.bias": r(D),
                p + "adaLN_modulation.weight": r(6 * D, COND),
                p + "adaLN_modulation.bias": r(6 * D),
            }
        )
    return t


def write(directory: Path, tensors: dict) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mdlm",
                "architectures": ["MDLM"],
                "vocab_size": V,
                "model_length": L,
                "hidden_dim": D,
                "cond_dim": COND,
                "n_blocks": BLOCKS,
                "n_heads": 4,
                "dropout": 0.1,
                "time_conditioning": False,
            }
        )
    )
    save_file(tensors, str(directory / "model.safetensors"))
    return directory


def test_loads_the_hf_layout_and_converts(tmp_path: Path):
    tensors = hf_tensors(torch.Generator().manual_seed(0))
    src = write(tmp_path / "hf", tensors)
    assert detect_format(src) == "mdlm-hf"
    model = load_mdlm_hf(src)
    assert model.mask_id == V - 1 and model.seq_len == L
    assert torch.equal(model.vocab_embed.embedding, tensors["backbone.vocab_embed.embedding"])
    assert torch.equal(model.blocks[1].mlp[2].bias, tensors["backbone.blocks.1.mlp.2.bias"])
    x = torch.randint(0, V - 1, (2, L))
    x[:, ::3] = V - 1
    with torch.no_grad():
        lp = model.log_probs(x)
    assert (
        torch.isfinite(lp[x == V - 1][:, : V - 1]).all() and (lp[..., V - 1] == float("-inf")).all()
    )
    out = convert_mdlm_hf(src, tmp_path / "native")
    assert detect_format(out) == "faircalib"
    with torch.no_grad():
        assert torch.equal(load_model(out).log_probs(x), lp)


@pytest.mark.parametrize("damage", ["missing", "shape", "nan", "foreign"])
def test_bad_hf_checkpoints_are_refused(tmp_path: Path, damage: str):
    tensors = hf_tensors(torch.Generator().manual_seed(1))
    name = "backbone.blocks.0.attn_qkv.weight"
    if damage == "missing":
        del tensors[name]
    elif damage == "shape":
        tensors[name] = tensors[name][:-1]
    elif damage == "nan":
        tensors[name][0, 0] = float("nan")
    else:
        tensors["head.weight"] = torch.zeros(2)
    with pytest.raises(CheckpointError):
        load_mdlm_hf(write(tmp_path / "bad", tensors))
