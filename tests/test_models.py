"""MDLM invariants, checkpoint round trips and refusals, and a tiny training run."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from faircalib import hub
from faircalib.errors import CheckpointError
from faircalib.models import MDLM, MDLMConfig, load_model, save_model
from faircalib.models.io import INDEX


def tiny(seed: int = 0) -> MDLM:
    torch.manual_seed(seed)
    model = MDLM(
        MDLMConfig(
            vocab_size=50, mask_id=49, seq_len=16, hidden_dim=32, n_heads=4, n_blocks=2, cond_dim=8
        )
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def test_subs_invariants():
    model = tiny()
    x = torch.randint(0, 49, (3, 16))
    x[:, ::2] = 49
    lp = model.log_probs(x)
    probs = lp.exp()
    assert torch.allclose(probs.sum(-1), torch.ones(3, 16), atol=1e-5)
    assert (probs[..., 49] == 0).all()  # never predicts [MASK]
    committed = x != 49
    assert (lp[committed].argmax(-1) == x[committed]).all()  # carry-over
    assert torch.allclose(probs[committed].max(-1).values, torch.ones(int(committed.sum())))


def test_save_load_round_trip_is_bit_exact(tmp_path: Path):
    model = tiny()
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    for (k, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    with pytest.raises(CheckpointError, match="already exists"):
        save_model(model, tmp_path / "m")


def _shard(directory: Path) -> Path:
    return directory / next(
        iter(set(json.loads((directory / INDEX).read_text())["weight_map"].values()))
    )


def test_corrupt_or_mismatched_checkpoints_are_refused(tmp_path: Path):
    model = tiny()
    save_model(model, tmp_path / "m")
    shard = _shard(tmp_path / "m")
    tensors = load_file(shard)

    name = "blocks.0.attn_qkv.weight"
    bad = dict(tensors)
    bad[name] = torch.full_like(bad[name], float("nan"))
    save_file(bad, str(shard))
    with pytest.raises(CheckpointError, match="NaN"):
        load_model(tmp_path / "m")

    bad = dict(tensors)
    bad[name] = bad[name][:-1]
    save_file(bad, str(shard))
    with pytest.raises(CheckpointError, match="shape"):
        load_model(tmp_path / "m")

    bad = {k: v for k, v in tensors.items() if k != name}
    save_file(bad, str(shard))
    with pytest.raises(CheckpointError, match="absent|missing"):
        load_model(tmp_path / "m")

    shard.write_bytes(shard.read_bytes()[:100])  # truncated file
    with pytest.raises(CheckpointError, match="safetensors"):
        load_model(tmp_path / "m")

    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="JSON"):
        load_model(tmp_path / "m")


def test_unknown_model_names_are_refused():
    with pytest.raises(CheckpointError, match="neither a shipped model"):
        hub.resolve("mdlm-huge")


@torch.no_grad()
def test_shipped_models_load_and_predict_better_than_uniform():
    for name in hub.SHIPPED_MODELS:
        model = hub.load(name)
        tok = hub.load_tokenizer(name)
        ids = tok.encode(
            "The history of the city begins in the early nineteenth century, when "
            "settlers arrived from the east and built the first church."
        ).ids
        x0 = torch.tensor(ids)[None]
        x_t = x0.clone()
        x_t[:, 1::3] = model.mask_id
        lp = model.log_probs(x_t)
        masked = x_t == model.mask_id
        nll = -lp.gather(-1, x0[..., None])[..., 0][masked].mean().item()
        assert nll < 0.7 * torch.log(torch.tensor(float(model.vocab_size))).item()


def test_tiny_training_run_lowers_the_loss(tmp_path: Path):
    from faircalib.training import TrainConfig, train

    corpus = tmp_path / "c.jsonl"
    sentences = [f"the {w} sat on the mat and the {w} was happy." for w in ("cat", "dog", "bird")]
    corpus.write_text("\n".join(json.dumps({"text": s * 4}) for s in sentences * 20))
    from faircalib.data.tokenizers import train_bpe

    tok = train_bpe(sentences * 10, vocab_size=300, min_frequency=1)
    tok_path = tmp_path / "tokenizer.json"
    tok.save(str(tok_path))
    cfg = TrainConfig(
        corpus=[str(corpus)],
        tokenizer=str(tok_path),
        out=str(tmp_path / "out"),
        model_overrides={"hidden_dim": 32, "n_heads": 2, "n_blocks": 1, "seq_len": 32},
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        max_steps=40,
        eval_every=20,
        eval_batches=2,
        device="cpu",
        val_fraction=0.2,
    )
    train(cfg)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())
    uniform = math.log(tok.get_vocab_size())  # nats/token of a model that learned nothing
    assert log["log"][-1]["val_nelbo"] < 0.6 * uniform
    assert load_model(tmp_path / "out").seq_len == 32
