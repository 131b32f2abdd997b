"""The public MDLM Hugging Face layout (kuleshov-group/mdlm-owt), on random tensors written in
exactly that layout and checked against an independent forward pass written from upstream's DiT."""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel

from faircalib.errors import CheckpointError
from faircalib.models import MDLM, MDLMConfig, save_model
from faircalib.models.loaders import (
    convert_mdlm_hf,
    detect_format,
    lightning_to_hf_tensors,
    load_checkpoint,
    load_mdlm_hf,
)

D, H, COND, BLOCKS, V, L = 32, 4, 16, 2, 60, 24
HD = D // H
MASK = V - 1


def hf_tensors(seed: int) -> dict[str, torch.Tensor]:
    """Upstream names and shapes, in upstream state_dict order (DIT modules, then buffers)."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.3

    t = {
        "backbone.vocab_embed.embedding": r(V, D),
        "backbone.sigma_map.mlp.0.weight": r(COND, 256),  # 256 sinusoidal features of sigma
        "backbone.sigma_map.mlp.0.bias": r(COND),
        "backbone.sigma_map.mlp.2.weight": r(COND, COND),
        "backbone.sigma_map.mlp.2.bias": r(COND),
        "backbone.rotary_emb.inv_freq": 1.0 / 10000 ** (torch.arange(0, HD, 2).float() / HD),
    }
    for i in range(BLOCKS):
        p = f"backbone.blocks.{i}."
        t[p + "norm1.weight"] = 1 + r(D)
        t[p + "attn_qkv.weight"] = r(3 * D, D)  # no bias upstream
        t[p + "attn_out.weight"] = r(D, D)
        t[p + "norm2.weight"] = 1 + r(D)
        t[p + "mlp.0.weight"] = r(4 * D, D)
        t[p + "mlp.0.bias"] = r(4 * D)
        t[p + "mlp.2.weight"] = r(D, 4 * D)
        t[p + "mlp.2.bias"] = r(D)
        t[p + "adaLN_modulation.weight"] = r(6 * D, COND)
        t[p + "adaLN_modulation.bias"] = r(6 * D)
    t["backbone.output_layer.norm_final.weight"] = 1 + r(D)
    t["backbone.output_layer.linear.weight"] = r(V, D)
    t["backbone.output_layer.linear.bias"] = r(V)
    t["backbone.output_layer.adaLN_modulation.weight"] = r(2 * D, COND)
    t["backbone.output_layer.adaLN_modulation.bias"] = r(2 * D)
    return t


def hf_config(**overrides) -> dict:
    config = {
        "architectures": ["MDLM"],
        "auto_map": {
            "AutoConfig": "configuration_mdlm.MDLMConfig",
            "AutoModelForMaskedLM": "modeling_mdlm.MDLM",
        },
        "model_type": "mdlm",
        "vocab_size": V,
        "model_length": L,
        "hidden_dim": D,
        "cond_dim": COND,
        "n_blocks": BLOCKS,
        "n_heads": H,
        "dropout": 0.1,
        "time_conditioning": False,
        "return_dict": False,
        "torch_dtype": "float32",
        "transformers_version": "4.38.2",
    }
    return {**config, **overrides}


def write_hf(directory: Path, tensors: dict, config: dict | None = None, shards: int = 1) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config or hf_config()))
    if shards == 1:
        save_file(tensors, str(directory / "model.safetensors"), metadata={"format": "pt"})
        return directory
    names = list(tensors)
    weight_map = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in names[i::shards]}
        save_file(part, str(directory / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def reference_logits(t: dict, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Upstream DIT.forward, written from its definition: x [B, L], sigma [B] -> [B, L, V]."""

    def w(name: str) -> torch.Tensor:
        return t["backbone." + name]

    def lin(h: torch.Tensor, name: str, bias: bool = True) -> torch.Tensor:
        return h @ w(name + ".weight").T + (w(name + ".bias") if bias else 0)

    def norm(h: torch.Tensor, name: str) -> torch.Tensor:
        return F.layer_norm(h, (D,), eps=1e-5) * w(name + ".weight")

    def rope(z: torch.Tensor) -> torch.Tensor:  # [B, L, H, hd]; pairs (i, i + hd/2), as flash-attn
        a, b = z[..., : HD // 2], z[..., HD // 2 :]
        return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)

    b, seq = x.shape
    freqs = torch.exp(-math.log(10000) * torch.arange(128) / 128)
    args = sigma[:, None] * freqs  # [B, 128]
    feats = torch.cat([args.cos(), args.sin()], dim=-1)  # [B, 256]
    c = F.silu(lin(F.silu(lin(feats, "sigma_map.mlp.0")), "sigma_map.mlp.2"))  # [B, COND]
    angles = torch.arange(seq).float()[:, None] * w("rotary_emb.inv_freq")  # [L, hd/2]
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # [L, 1, hd/2]
    h = w("vocab_embed.embedding")[x]  # [B, L, D]
    for i in range(BLOCKS):
        p = f"blocks.{i}."
        sh1, sc1, g1, sh2, sc2, g2 = lin(c, p + "adaLN_modulation")[:, None].chunk(6, dim=-1)
        a = norm(h, p + "norm1") * (1 + sc1) + sh1
        q, k, v = lin(a, p + "attn_qkv", bias=False).view(b, seq, 3, H, HD).unbind(2)
        q, k = rope(q), rope(k)
        att = (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(HD)).softmax(-1)
        o = torch.einsum("bhqk,bkhd->bqhd", att, v).reshape(b, seq, D)
        h = h + g1 * lin(o, p + "attn_out", bias=False)
        m = norm(h, p + "norm2") * (1 + sc2) + sh2
        h = h + g2 * lin(F.gelu(lin(m, p + "mlp.0"), approximate="tanh"), p + "mlp.2")
    shift, scale = lin(c, "output_layer.adaLN_modulation")[:, None].chunk(2, dim=-1)
    return lin(norm(h, "output_layer.norm_final") * (1 + scale) + shift, "output_layer.linear")


def masked_input(seed: int) -> torch.Tensor:
    x = torch.randint(0, MASK, (2, L), generator=torch.Generator().manual_seed(seed))
    x[:, ::3] = MASK
    x[1, 10:] = MASK
    return x


@pytest.mark.parametrize("time_conditioning", [False, True])
@torch.no_grad()
def test_loaded_model_matches_the_reference_forward(tmp_path: Path, time_conditioning: bool):
    tensors = hf_tensors(0)
    src = write_hf(tmp_path / "hf", tensors, hf_config(time_conditioning=time_conditioning))
    assert detect_format(src) == "mdlm-hf"
    model = load_mdlm_hf(src)
    assert not model.training
    assert (model.mask_id, model.vocab_size, model.seq_len) == (MASK, V, L)
    params = sum(v.numel() for k, v in tensors.items() if not k.endswith("inv_freq"))
    assert model.num_parameters() == params
    for name, value in model.state_dict().items():
        assert torch.equal(value, tensors["backbone." + name]), name

    x, t = masked_input(1), torch.tensor([0.3, 0.7])
    lp = model.log_probs(x, t)
    # The noise level fed to sigma_map: ours is -log(1 - t) (MDLM's schedule with eps = 0); with
    # time conditioning off upstream feeds zeros.
    sigma = -torch.log1p(-t) if time_conditioning else torch.zeros(2)
    ref = reference_logits(tensors, x, sigma)
    ref[..., MASK] = float("-inf")
    ref = ref.log_softmax(-1)  # [B, L, V]
    masked = x == MASK
    assert (lp[masked][:, :MASK] - ref[masked][:, :MASK]).abs().max() < 1e-4
    assert (lp[..., MASK] == float("-inf")).all()
    assert (lp[~masked].gather(-1, x[~masked][:, None]) == 0).all()


@torch.no_grad()
def test_embedding_rows_and_output_bias_reach_log_probs_directly(tmp_path: Path):
    tensors = hf_tensors(2)
    for name in tensors:  # zero adaLN: gates 0 make every block the identity, final shift/scale 0
        if "adaLN_modulation" in name:
            tensors[name] = torch.zeros_like(tensors[name])
    model = load_mdlm_hf(write_hf(tmp_path / "hf", tensors))
    x = masked_input(3)
    emb = tensors["backbone.vocab_embed.embedding"]
    g = tensors["backbone.output_layer.norm_final.weight"]
    weight = tensors["backbone.output_layer.linear.weight"]
    bias = tensors["backbone.output_layer.linear.bias"]
    logits = F.layer_norm(emb[x], (D,)) * g @ weight.T + bias  # [B, L, V]
    logits[..., MASK] = float("-inf")
    expected = logits.log_softmax(-1)
    masked = x == MASK
    diff = model.log_probs(x)[masked][:, :MASK] - expected[masked][:, :MASK]
    assert diff.abs().max() < 1e-5


@torch.no_grad()
def test_sharded_checkpoint_converts_bit_exactly(tmp_path: Path):
    src = write_hf(tmp_path / "hf", hf_tensors(4), shards=3)
    model = load_mdlm_hf(src)
    out = convert_mdlm_hf(src, tmp_path / "native")
    assert detect_format(out) == "faircalib"
    native = load_checkpoint(out)
    assert isinstance(native, MDLM) and native.cfg == model.cfg
    x = masked_input(5)
    assert torch.equal(native.log_probs(x), model.log_probs(x))
    assert torch.equal(load_checkpoint(src).log_probs(x), model.log_probs(x))
    with pytest.raises(CheckpointError, match="already exists"):
        convert_mdlm_hf(src, out)


def test_conversion_copies_a_tokenizer_of_the_right_size(tmp_path: Path):
    src = write_hf(tmp_path / "hf", hf_tensors(10))
    for size, name in ((V, "ok.json"), (V - 1, "short.json")):
        Tokenizer(WordLevel({f"w{i}": i for i in range(size)}, unk_token="w0")).save(
            str(tmp_path / name)
        )
    out = convert_mdlm_hf(src, tmp_path / "native", tokenizer=tmp_path / "ok.json")
    assert Tokenizer.from_file(str(out / "tokenizer.json")).get_vocab_size() == V
    with pytest.raises(CheckpointError, match=f"has {V - 1} tokens"):
        convert_mdlm_hf(src, tmp_path / "n2", tokenizer=tmp_path / "short.json")
    with pytest.raises(CheckpointError, match="does not exist"):
        convert_mdlm_hf(src, tmp_path / "n3", tokenizer=tmp_path / "absent.json")
    assert not (tmp_path / "n2").exists() and not (tmp_path / "n3").exists()


def test_mask_id_comes_from_the_config_or_the_caller(tmp_path: Path):
    src = write_hf(tmp_path / "hf", hf_tensors(6), hf_config(mask_token_id=7))
    assert load_mdlm_hf(src).mask_id == 7
    assert load_mdlm_hf(src, mask_id=3).mask_id == 3
    with pytest.raises(CheckpointError, match="outside vocabulary"):
        load_mdlm_hf(src, mask_id=V)


def _damage(tensors: dict, config: dict, kind: str) -> str:
    """Break one thing; return a phrase the error message must contain."""
    name = "backbone.blocks.1.attn_qkv.weight"
    if kind == "missing":
        del tensors[name]
        return "missing"
    if kind == "shape":
        tensors[name] = tensors[name][:-1]
        return "has shape"
    if kind == "nan":
        tensors[name][0, 0] = float("nan")
        return "NaN"
    if kind == "int":
        tensors[name] = tensors[name].to(torch.int32)
        return "dtype"
    if kind == "foreign":
        tensors["lm_head.weight"] = torch.zeros(2)
        return "outside"
    if kind == "rotary":
        tensors["backbone.rotary_emb.inv_freq"] = 1.0 / 500000 ** (torch.arange(0, HD, 2) / HD)
        return "rotary"
    if kind == "config_field":
        del config["n_heads"]
        return "lacks"
    if kind == "config_type":
        config["hidden_dim"] = "32"
        return "positive integers"
    config["model_type"] = "bd3lm"
    return "matches no known layout"


@pytest.mark.parametrize(
    "kind",
    ["missing", "shape", "nan", "int", "foreign", "rotary", "config_field", "config_type", "type"],
)
def test_bad_checkpoints_are_refused_with_the_reason(tmp_path: Path, kind: str):
    tensors, config = hf_tensors(8), hf_config()
    phrase = _damage(tensors, config, kind)
    src = write_hf(tmp_path / "bad", tensors, config)
    with pytest.raises(CheckpointError, match=phrase):
        load_checkpoint(src)


def test_pickles_and_stray_paths_are_refused(tmp_path: Path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.ckpt").write_bytes(b"\x80\x04not loaded")
    with pytest.raises(CheckpointError, match="pickles"):
        detect_format(tmp_path / "run")
    with pytest.raises(CheckpointError, match="pickles"):
        load_checkpoint(tmp_path / "run" / "last.ckpt")
    with pytest.raises(CheckpointError, match="not a model directory"):
        load_mdlm_hf(tmp_path / "absent")
    save_model(
        MDLM(MDLMConfig(vocab_size=V, mask_id=MASK, hidden_dim=D, n_heads=H)), tmp_path / "n"
    )
    with pytest.raises(CheckpointError, match="model_type"):
        load_mdlm_hf(tmp_path / "n")


@torch.no_grad()
def test_lightning_state_with_ema_maps_onto_the_hf_layout(tmp_path: Path):
    raw = hf_tensors(9)
    state = {**raw, "noise.dummy_metric": 3}  # non-backbone entries are dropped
    params = [k for k in raw if not k.endswith("inv_freq")]
    shadow = [raw[k] + 1.0 for k in params]  # EMA weights differ from the live ones
    tensors = lightning_to_hf_tensors(state, shadow)
    assert set(tensors) == set(raw)
    model = load_mdlm_hf(write_hf(tmp_path / "hf", tensors))
    assert torch.equal(model.vocab_embed.embedding, raw["backbone.vocab_embed.embedding"] + 1)
    assert torch.equal(model.blocks[1].mlp[2].bias, raw["backbone.blocks.1.mlp.2.bias"] + 1)
    assert torch.equal(
        lightning_to_hf_tensors(state)["backbone.blocks.0.norm1.weight"],
        raw["backbone.blocks.0.norm1.weight"],
    )
    with pytest.raises(CheckpointError, match="EMA holds"):
        lightning_to_hf_tensors(state, shadow[:-1])
    # sigma_map.mlp.2's weight and bias swapped: shapes no longer line up
    swapped = shadow[:2] + [shadow[3], shadow[2]] + shadow[4:]
    with pytest.raises(CheckpointError, match="parameter order"):
        lightning_to_hf_tensors(state, swapped)
    with pytest.raises(CheckpointError, match="not an MDLM"):
        lightning_to_hf_tensors({"model.x": torch.zeros(1)})
