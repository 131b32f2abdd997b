"""LLaDA and Dream: tiny random checkpoints written in the published layouts, loaded through
`faircalib.hub.load`, checked against transformers' LLaMA / Qwen2 run without a causal mask."""

import json
import sys
from fnmatch import fnmatch
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from faircalib import hub
from faircalib.cli import main
from faircalib.errors import CheckpointError
from faircalib.models import Dream, LLaDA, save_model
from llama_like_ckpt import (
    MASK_ID,
    SEQ,
    dream_config,
    dream_tensors,
    llada_config,
    llada_tensors,
    write_checkpoint,
    write_family,
)

TOL = 1e-4  # max |log-prob difference| at masked positions, float32 on both sides


# --- independent references: transformers' own LLaMA and Qwen2 ------------------------------
def llada_reference(config: dict, tensors: dict) -> LlamaForCausalLM:
    """LLaDA's block is LLaMA's with its own names: ff_proj is gate_proj (SiLU-gated), up_proj
    is up_proj, the block's ff_out is down_proj, the model-level ff_out is lm_head."""
    ref_config = LlamaConfig(
        vocab_size=config["embedding_size"],
        hidden_size=config["d_model"],
        intermediate_size=config["mlp_hidden_size"],
        num_hidden_layers=config["n_layers"],
        num_attention_heads=config["n_heads"],
        num_key_value_heads=config["n_kv_heads"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
        max_position_embeddings=config["max_sequence_length"],
        tie_word_embeddings=config["weight_tying"],
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    block = {
        "attn_norm": "input_layernorm",
        "q_proj": "self_attn.q_proj",
        "k_proj": "self_attn.k_proj",
        "v_proj": "self_attn.v_proj",
        "attn_out": "self_attn.o_proj",
        "ff_norm": "post_attention_layernorm",
        "ff_proj": "mlp.gate_proj",
        "up_proj": "mlp.up_proj",
        "ff_out": "mlp.down_proj",
    }
    state = {}
    for name, value in tensors.items():
        rest = name.removeprefix("model.transformer.")
        if rest.startswith("blocks."):
            _, i, module, leaf = rest.split(".")
            state[f"model.layers.{i}.{block[module]}.{leaf}"] = value
        else:
            top = {"wte": "model.embed_tokens", "ln_f": "model.norm", "ff_out": "lm_head"}
            module, leaf = rest.split(".")
            state[f"{top[module]}.{leaf}"] = value
    return _loaded(LlamaForCausalLM(ref_config), state, config["weight_tying"])


def dream_reference(config: dict, tensors: dict) -> Qwen2ForCausalLM:
    """Dream's tensor names are Qwen2ForCausalLM's, so they load as they are."""
    ref_config = Qwen2Config(
        vocab_size=config["vocab_size"],
        hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"],
        num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config["num_key_value_heads"],
        rms_norm_eps=config["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": config["rope_theta"]},
        max_position_embeddings=config["max_position_embeddings"],
        tie_word_embeddings=config["tie_word_embeddings"],
        hidden_act="silu",
    )
    return _loaded(Qwen2ForCausalLM(ref_config), tensors, config["tie_word_embeddings"])


def _loaded(model: torch.nn.Module, state: dict, tied: bool) -> torch.nn.Module:
    model.config._attn_implementation = "eager"  # attention exactly as the explicit mask says
    missing, unexpected = model.load_state_dict(
        {k: v.float() for k, v in state.items()}, strict=False
    )
    assert not unexpected and missing == (["lm_head.weight"] if tied else [])
    if tied:
        model.tie_weights()
    return model.float().eval()


@torch.no_grad()
def reference_logits(ref: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x [B, L] -> logits [B, L, V] with full attention: an all-zero additive 4-D mask."""
    b, seq = x.shape
    full = torch.zeros(b, 1, seq, seq)
    return ref(input_ids=x, attention_mask=full).logits.float()


def reference_log_probs(logits: torch.Tensor, shift: bool) -> torch.Tensor:
    """log p over real tokens: the mask token gets no mass (SUBS at masked positions)."""
    if shift:  # Dream: position i's prediction is position i - 1's output
        logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
    logits = logits.clone()
    logits[..., MASK_ID] = float("-inf")
    return logits.log_softmax(-1)


def max_diff(ours: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest difference of finite log-probs; both must put -inf (only) on the same entries."""
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))
    finite = torch.isfinite(ours)
    return float((ours[finite] - expected[finite]).abs().max())


FAMILIES = {
    "llada": (llada_config, llada_tensors, llada_reference, "weight_tying"),
    "dream": (dream_config, dream_tensors, dream_reference, "tie_word_embeddings"),
}


def masked_input(seed: int, batch: int = 2, seq: int = 24) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (batch, seq), generator=g)
    masked = torch.rand(batch, seq, generator=g) < 0.5
    masked[:, 0] = False  # Dream's position 0 has no predecessor: a committed token, as upstream
    return torch.where(masked, torch.full_like(x, MASK_ID), x)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("family", ["llada", "dream"])
def test_log_probs_match_transformers_without_causal_mask(tmp_path: Path, family, tied):
    make_config, make_tensors, make_reference, tie_key = FAMILIES[family]
    config = make_config(**{tie_key: tied})
    tensors = make_tensors(config, seed=1)
    model = hub.load(write_checkpoint(tmp_path / family, config, tensors))
    ref = make_reference(config, tensors)
    shift = family == "dream"
    x = masked_input(2)
    masked = x == MASK_ID
    assert masked.sum() > 10
    with torch.no_grad():
        ours = model.log_probs(x)
        ref_logits = reference_logits(ref, x)
        assert max_diff(ours[masked], reference_log_probs(ref_logits, shift)[masked]) < TOL
        if shift:  # the shift matters: the unshifted reference is far off
            unshifted = reference_log_probs(ref_logits, shift=False)
            assert max_diff(ours[masked], unshifted[masked]) > 100 * TOL

        # the reference really attends both ways: a later token moves an earlier position
        x2 = x.clone()
        x2[:, -1] = (x[:, -1] + 1) % 256
        ref_logits2 = reference_logits(ref, x2)
        assert (ref_logits2[:, 1] - ref_logits[:, 1]).abs().max() > 1e-3
        expected2 = reference_log_probs(ref_logits2, shift)
        assert max_diff(model.log_probs(x2)[masked], expected2[masked]) < TOL


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_subs_invariants_and_ignored_time(tmp_path: Path, family):
    model = hub.load(write_family(tmp_path / family, family))
    x = masked_input(3)
    with torch.no_grad():
        lp = model.log_probs(x)
        assert torch.equal(lp, model.log_probs(x, torch.full((2,), 0.3)))  # no time conditioning
    assert torch.isinf(lp[..., MASK_ID]).all()  # [MASK] never predicted
    committed = x != MASK_ID
    assert torch.equal(lp[committed].argmax(-1), x[committed])
    assert (lp[committed].max(-1).values == 0).all()  # one-hot on the token already there
    probs = lp[~committed].exp().sum(-1)
    assert torch.allclose(probs, torch.ones_like(probs), atol=1e-5)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_quantizable_linears_are_named_as_upstream_in_execution_order(tmp_path: Path, family):
    model = hub.load(write_family(tmp_path / family, family))
    block = model.blocks[1]
    linears = model.quantizable_linears(block)
    expected = {
        "llada": ["q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj", "ff_out"],
        "dream": [
            *(f"self_attn.{p}_proj" for p in "qkvo"),
            *(f"mlp.{p}_proj" for p in ("gate", "up", "down")),
        ],
    }[family]
    assert [name for name, _ in linears] == expected
    calls = []
    hooks = [m.register_forward_hook(lambda *_, n=n: calls.append(n)) for n, m in linears]
    model.log_probs(masked_input(0))
    for h in hooks:
        h.remove()
    assert calls == expected  # the order the block actually runs them in
    prefix = {"llada": "model.transformer.blocks.1.", "dream": "model.layers.1."}[family]
    names = {n for n, _ in model.named_modules()}
    assert all(prefix + n in names for n in expected)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_saved_directory_keeps_upstream_names_and_config(tmp_path: Path, family):
    src = write_family(tmp_path / "src", family)
    model = hub.load(src)
    out = save_model(model, tmp_path / "out")
    config, source = (json.loads((d / "config.json").read_text()) for d in (out, src))
    assert {k: v for k, v in config.items() if k != "torch_dtype"} == {
        k: v for k, v in source.items() if k != "torch_dtype"
    }
    index = json.loads((out / "model.safetensors.index.json").read_text())
    upstream = json.loads((src / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(upstream["weight_map"])
    again = hub.load(out)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    rebuilt = type(model).from_config(model.config_dict())
    assert rebuilt.config_dict() == model.config_dict()


@pytest.mark.parametrize("family", ["llada", "dream", "mdlm"])
def test_outside_blocks_hold_exactly_the_stem_and_head(tmp_path: Path, family):
    """What offloaded calibration may keep on the device: every parameter not in a block."""
    model = hub.load("mdlm-tiny" if family == "mdlm" else write_family(tmp_path / family, family))
    outside = model.outside_blocks()
    in_blocks = {id(p) for p in model.blocks.parameters()}
    expected = sorted(id(p) for p in model.parameters() if id(p) not in in_blocks)
    assert sorted(id(p) for m in outside for p in m.parameters()) == expected
    block_ids = {id(m) for m in model.blocks.modules()}
    assert not any(id(sub) in block_ids for m in outside for sub in m.modules())


def test_generation_stops_at_the_tokenizers_end_tokens():
    from faircalib.commands.generate import _until_stop, stop_ids
    from llama_like_ckpt import LLADA_MASK, byte_tokenizer

    tok = byte_tokenizer(LLADA_MASK)
    assert stop_ids(tok) == {256}
    assert _until_stop([5, 7, 256, 9], stop_ids(tok)) == [5, 7]
    assert _until_stop([5, 7], stop_ids(tok)) == [5, 7]


def test_seq_len_is_the_training_length_or_a_cap(tmp_path: Path):
    llada = hub.load(write_family(tmp_path / "l", "llada"))
    dream = hub.load(write_family(tmp_path / "d", "dream"))
    assert (llada.seq_len, dream.seq_len) == (SEQ, 2048)  # Dream's config says 131072
    assert isinstance(llada, LLaDA) and isinstance(dream, Dream)
    assert llada.vocab_size == dream.vocab_size == 264 and llada.mask_id == MASK_ID


# --- loading from a hub id, remote code ----------------------------------------------------
def test_hub_id_offline_fails_with_one_clear_line(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert main(["eval", "faircalib-test/no-such-model", "--limit", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "faircalib-test/no-such-model" in err and "Hugging Face Hub" in err
    with pytest.raises(CheckpointError, match="neither a shipped model"):
        hub.resolve("not/a/hub/id")


REMOTE_CODE = """
import pathlib
pathlib.Path({sentinel!r}).write_text("remote code ran")
raise RuntimeError("remote code must never be imported")
"""


def add_remote_code(directory: Path, sentinel: Path) -> None:
    for name in ("modeling_llada.py", "configuration_llada.py", "modeling_dream.py"):
        (directory / name).write_text(REMOTE_CODE.format(sentinel=str(sentinel)))


def test_remote_code_is_never_imported_or_downloaded(tmp_path: Path, monkeypatch):
    import huggingface_hub

    sentinel = tmp_path / "ran"
    src = write_family(tmp_path / "repo", "llada")
    add_remote_code(src, sentinel)
    local = hub.load(src)  # a local directory with remote code beside the weights
    fetched: list[str] = []

    def fake_snapshot_download(repo_id: str, allow_patterns: list[str]) -> str:
        """What the hub would give: the repository's files matching allow_patterns."""
        dest = tmp_path / "cache" / repo_id.replace("/", "--")
        dest.mkdir(parents=True)
        for f in src.iterdir():
            if any(fnmatch(f.name, p) for p in allow_patterns):
                (dest / f.name).write_bytes(f.read_bytes())
                fetched.append(f.name)
        return str(dest)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    remote = hub.load("GSAI-ML/LLaDA-8B-Base")
    assert not sentinel.exists()
    assert not any(m.startswith(("modeling_", "configuration_")) for m in sys.modules)
    assert "config.json" in fetched and "tokenizer.json" in fetched
    assert not any(name.endswith(".py") for name in fetched)
    x = masked_input(4)
    assert torch.equal(local.log_probs(x), remote.log_probs(x))


# --- bad layouts ----------------------------------------------------------------------------
def _edit_config(d: Path, **changes) -> None:
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    for key in [k for k, v in changes.items() if v is _DROP]:
        del config[key]
    (d / "config.json").write_text(json.dumps(config))


_DROP = "__drop__"


def _edit_tensors(d: Path, edit) -> None:
    for shard in sorted(d.glob("model-*.safetensors")):
        tensors = load_file(str(shard))
        edit(tensors)
        save_file(tensors, str(shard), metadata={"format": "pt"})


def _drop_tensor(d: Path) -> None:
    _edit_tensors(d, lambda t: t.pop("model.transformer.blocks.1.up_proj.weight", None))
    index = json.loads((d / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.transformer.blocks.1.up_proj.weight"]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))


def _nan(t: dict) -> None:
    key = "model.transformer.blocks.0.ff_norm.weight"
    if key in t:
        t[key][3] = float("nan")


def _wrong_shape(t: dict) -> None:
    key = "model.transformer.blocks.0.k_proj.weight"
    if key in t:
        t[key] = t[key][:-8]


def _extra(t: dict) -> None:
    if "model.transformer.ln_f.weight" in t:
        t["model.transformer.blocks.0.rotary.inv_freq"] = torch.ones(8)


def _missing_shard(d: Path) -> None:
    next(d.glob("model-00002-*.safetensors")).unlink()


def _only_pickle(d: Path) -> None:
    for f in d.glob("model*"):
        f.unlink()
    (d / "pytorch_model.bin").write_bytes(b"not read")


DAMAGE = {
    "missing tensor": (_drop_tensor, "missing"),
    "unexpected tensor": (lambda d: _edit_tensors(d, _extra), "unexpected"),
    "wrong shape": (lambda d: _edit_tensors(d, _wrong_shape), "shape"),
    "nan": (lambda d: _edit_tensors(d, _nan), "NaN"),
    "missing shard": (_missing_shard, "missing"),
    "pickle only": (_only_pickle, "only pickled weights"),
    "sequential block": (lambda d: _edit_config(d, block_type="sequential"), "block_type"),
    "default block_type": (lambda d: _edit_config(d, block_type=_DROP), "block_type"),
    "alibi": (lambda d: _edit_config(d, alibi=True), "alibi"),
    "no d_model": (lambda d: _edit_config(d, d_model=_DROP), "d_model"),
    "mask outside": (lambda d: _edit_config(d, mask_token_id=264), "mask_token_id"),
    "bad kv heads": (lambda d: _edit_config(d, n_kv_heads=3), "heads"),
    "unknown type": (lambda d: _edit_config(d, model_type="llama"), "unknown model family"),
    # Python's json writes and reads NaN / Infinity literals
    "nan rope_theta": (lambda d: _edit_config(d, rope_theta=float("nan")), "positive finite"),
    "inf rms eps": (lambda d: _edit_config(d, rms_norm_eps=float("inf")), "positive finite"),
    "lowercase model_type": (
        lambda d: _edit_config(d, model_type="LLaDA"),
        "did you mean model_type 'llada'",
    ),
    # inclusionAI/LLaDA-MoE-7B-A1B: model_type "llada", Qwen-style MoE keys, no d_model
    "llada moe": (
        lambda d: _edit_config(d, architectures=["LLaDAMoEModelLM"], num_experts=64),
        "LLaDA-MoE",
    ),
}


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_bad_llada_layouts_are_refused_with_the_reason(tmp_path: Path, kind):
    d = write_family(tmp_path / "m", "llada")
    damage, reason = DAMAGE[kind]
    damage(d)
    with pytest.raises(CheckpointError, match=reason):
        hub.load(d)


@pytest.mark.parametrize(
    "change,reason",
    [
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling"),
        ({"use_sliding_window": True}, "use_sliding_window"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"num_key_value_heads": 3}, "heads"),
        ({"hidden_size": 48}, "shape"),  # the tensors are 64 wide
    ],
)
def test_bad_dream_configs_are_refused(tmp_path: Path, change, reason):
    d = write_family(tmp_path / "m", "dream")
    _edit_config(d, **change)
    with pytest.raises(CheckpointError, match=reason):
        hub.load(d)


@pytest.mark.parametrize("family", ["llada", "dream"])
def test_a_rotary_base_saved_in_rope_parameters_is_read(tmp_path: Path, family):
    """transformers 5 saves the rotary base as rope_parameters {"rope_theta", "rope_type"}
    and no rope_theta key: read there, the logits match transformers' with that base (a
    silent default base of 10000 gave other logits); scaled rotary types are refused."""
    make_config, make_tensors, make_reference, _ = FAMILIES[family]
    config = make_config()
    tensors = make_tensors(config, seed=1)
    ref = make_reference(config, tensors)  # built with config's rope_theta
    theta = config.pop("rope_theta")
    assert theta != 10000.0
    config["rope_parameters"] = {"rope_theta": theta, "rope_type": "default"}
    directory = write_checkpoint(tmp_path / family, config, tensors)
    model = hub.load(directory)
    x = masked_input(2)
    masked = x == MASK_ID
    with torch.no_grad():
        want = reference_log_probs(reference_logits(ref, x), family == "dream")
        assert max_diff(model.log_probs(x)[masked], want[masked]) < TOL
    for change, words in (
        ({"rope_parameters": {"rope_theta": theta, "rope_type": "yarn"}}, "yarn"),
        ({"rope_theta": theta / 2}, "disagree"),
    ):
        (directory / "config.json").write_text(json.dumps({**config, **change}))
        with pytest.raises(CheckpointError, match=words):
            hub.load(directory)


def test_older_dream_exports_load_their_weights_and_refuse_contradictions(tmp_path: Path):
    """Older transformers exports of Qwen2-style models store each layer's rotary `inv_freq`
    buffer and, with tied embeddings, a copy of the embedding as lm_head.weight. Both load as
    the clean checkpoint does (the same log-probs); a head copy that differs from the
    embedding, or frequencies of another rope_theta, are refused in one line."""
    config = dream_config(tie_word_embeddings=True)
    tensors = dream_tensors(config)
    hd = config["hidden_size"] // config["num_attention_heads"]
    inv_freq = 1.0 / config["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd)
    older = dict(tensors)
    older["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    for i in range(config["num_hidden_layers"]):
        older[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = inv_freq
    clean = hub.load(write_checkpoint(tmp_path / "clean", config, tensors))
    loaded = hub.load(write_checkpoint(tmp_path / "older", config, older))
    x_t = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    x_t[:, ::3] = MASK_ID
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x_t), clean.log_probs(x_t))
    other_head = {**older, "lm_head.weight": older["lm_head.weight"] * 2}
    with pytest.raises(CheckpointError, match="tie_word_embeddings"):
        hub.load(write_checkpoint(tmp_path / "head", config, other_head))
    stale = {**older, "model.layers.0.self_attn.rotary_emb.inv_freq": inv_freq * 3}
    with pytest.raises(CheckpointError, match="rope_theta"):
        hub.load(write_checkpoint(tmp_path / "rope", config, stale))


def test_a_bom_in_config_json_is_read_and_an_index_without_weight_map_is_named(tmp_path: Path):
    """Windows editors save config.json with a byte-order mark: it loads. An index file
    without its weight_map says so, instead of listing every tensor as missing."""
    directory = write_family(tmp_path / "m", "dream")
    config = directory / "config.json"
    config.write_bytes(b"\xef\xbb\xbf" + config.read_bytes())
    assert hub.load(directory).family == "dream"
    index = directory / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}}))
    with pytest.raises(CheckpointError, match="has no weight_map"):
        hub.load(directory)
