"""The `mdlm-base` preset (>= 100 M parameters) and the recorded weight fingerprint."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch

from faircalib import training
from faircalib.training import PRESETS, TrainConfig

TOKENIZER = Path(__file__).parents[1] / "src/faircalib/assets/tokenizers/wiki-bpe-8k.json"


def mdlm_parameter_count(vocab: int, d: int, cond: int, blocks: int, mlp_ratio: int = 4) -> int:
    """MDLM's parameters written out from its architecture (models/mdlm.py): untied embedding
    and output layer, bias-free attention, biased MLP and adaLN, weight-only LayerNorms."""
    embed = vocab * d
    sigma = 256 * cond + cond + cond * cond + cond
    block = d + 3 * d * d + d * d + d
    block += d * mlp_ratio * d + mlp_ratio * d + mlp_ratio * d * d + d
    block += cond * 6 * d + 6 * d
    final = d + d * vocab + vocab + cond * 2 * d + 2 * d
    return embed + sigma + blocks * block + final


def base_config(**overrides) -> TrainConfig:
    return TrainConfig(
        corpus=[], tokenizer=str(TOKENIZER), out="unused", preset="mdlm-base",
        model_overrides=overrides, device="cpu",
    )  # fmt: skip


def test_mdlm_base_builds_at_over_100m_parameters():
    tokenizer, _ = training.load_tokenizer(str(TOKENIZER))
    model = training.build_model(base_config(), tokenizer)
    p = PRESETS["mdlm-base"]
    expected = mdlm_parameter_count(
        tokenizer.get_vocab_size(), p["hidden_dim"], p["cond_dim"], p["n_blocks"]
    )
    assert sum(x.numel() for x in model.parameters()) == expected
    assert expected >= 100_000_000
    assert model.family == "mdlm" and model.seq_len == p["seq_len"]


def test_mdlm_base_takes_a_training_step_on_a_tiny_batch():
    """One AdamW step of the real loss (short windows: the width and depth are the preset's)."""
    torch.manual_seed(0)
    tokenizer, _ = training.load_tokenizer(str(TOKENIZER))
    cfg = base_config(seq_len=16)
    model = training.build_model(cfg, tokenizer)
    loss_fn = training.step_loss_fn(model, cfg, "cpu")
    x0 = torch.randint(0, tokenizer.get_vocab_size() - 2, (2, 16))
    t, u = torch.tensor([0.3, 0.7]), torch.rand(2, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = model.blocks[0].attn_qkv.weight.detach().clone()
    loss = loss_fn(x0, t, u)
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0].attn_qkv.weight)
    with torch.no_grad():  # the same batch and noise: the loss went down
        assert loss_fn(x0, t, u).item() < loss.item()


def reference_fingerprint(directory: Path) -> str:
    """The fingerprint recomputed from the raw safetensors files (header JSON + byte ranges),
    without torch: names sorted across shards, `name|DTYPE|shape` then the tensor's bytes."""
    entries = {}
    for path in sorted(directory.glob("*.safetensors")):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        for name, info in header.items():
            if name != "__metadata__":
                begin, end = info["data_offsets"]
                entries[name] = (info, raw[8 + n + begin : 8 + n + end])
    digest = hashlib.sha256()
    for name in sorted(entries):
        info, data = entries[name]
        shape = ",".join(str(d) for d in info["shape"])
        digest.update(f"{name}|{info['dtype']}|{shape}\n".encode() + data)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A few-step tiny training on synthetic token ids (seed 3)."""
    import numpy as np

    tmp = tmp_path_factory.mktemp("fp")
    cache = tmp / "tokens.npy"
    np.save(cache, np.random.default_rng(0).integers(0, 8000, 6000).astype(np.uint16))

    def run(out: str) -> Path:
        cfg = TrainConfig(
            corpus=[], tokenizer=str(TOKENIZER), out=str(tmp / out), token_cache=str(cache),
            preset="tiny", model_overrides={"seq_len": 32}, batch_size=2, max_steps=2,
            warmup_steps=1, eval_every=1000, eval_batches=1, seed=3, device="cpu",
        )  # fmt: skip
        return training.train(cfg)

    return run("a"), run("b")


def test_fingerprint_is_recorded_and_matches_the_saved_files(trained):
    first, _ = trained
    log = json.loads((first / "train_log.json").read_text())
    recorded = log["weight_fingerprint_sha256"]
    assert recorded == reference_fingerprint(first)
    assert recorded == training.directory_fingerprint(first)
    assert recorded in (first / "MODEL_CARD.md").read_text()


def test_the_record_carries_the_unigram_floor_of_its_validation_split(trained):
    import numpy as np

    first, _ = trained
    log = json.loads((first / "train_log.json").read_text())
    ids = np.load(Path(log["config"]["token_cache"])).astype(np.int64)
    mask_id = training.load_tokenizer(str(TOKENIZER))[0].token_to_id("<|mask|>")
    assert (ids == mask_id).any()  # the random cache holds some: training drops them
    ids = ids[ids != mask_id]
    n_val = training.validation_tokens(len(ids), training.TrainConfig(**log["config"]))
    vocab = json.loads((first / "config.json").read_text())["vocab_size"]
    counts = np.bincount(ids[:-n_val], minlength=vocab) + 1.0  # add-one, by hand
    expect = -np.log(counts[ids[-n_val:]] / counts.sum()).mean()
    assert log["val_unigram_nats_per_token"] == pytest.approx(expect, rel=1e-9)
    assert f"{expect:.4f}" in (first / "MODEL_CARD.md").read_text()


def test_same_seed_same_fingerprint(trained):
    first, second = trained
    assert training.directory_fingerprint(first) == training.directory_fingerprint(second)


def test_fingerprint_sees_every_bit_and_ignores_order():
    tensors = {"b": torch.arange(6.0).reshape(2, 3).bfloat16(), "a": torch.ones(4)}
    reordered = {"a": tensors["a"], "b": tensors["b"]}
    assert training.weight_fingerprint(tensors) == training.weight_fingerprint(reordered)
    nudged = dict(tensors, a=torch.tensor([1.0, 1.0, 1.0, 1.0000001]))
    assert training.weight_fingerprint(nudged) != training.weight_fingerprint(tensors)
    reshaped = dict(tensors, b=tensors["b"].reshape(3, 2))
    assert training.weight_fingerprint(reshaped) != training.weight_fingerprint(tensors)
