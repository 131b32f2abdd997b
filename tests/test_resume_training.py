"""`faircalib train` resumed from OUT.partial gives the weights of an uninterrupted run, bit for
bit (CPU, fp32), and refuses a resume whose settings or data differ."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from faircalib import training
from faircalib.errors import ConfigError
from faircalib.training import TrainConfig
from faircalib.training_state import state_dir

TOKENIZER = Path(__file__).parents[1] / "src/faircalib/assets/tokenizers/wiki-bpe-8k.json"


def config(tmp: Path, out: str, cache: Path, **kw) -> TrainConfig:
    settings = dict(
        corpus=[], tokenizer=str(TOKENIZER), out=str(tmp / out), token_cache=str(cache),
        preset="tiny", model_overrides={"seq_len": 32, "hidden_dim": 64, "n_blocks": 2},
        batch_size=2, max_steps=7, warmup_steps=2, eval_every=3, eval_batches=1, seed=5,
        device="cpu",
    )  # fmt: skip
    return TrainConfig(**{**settings, **kw})


@pytest.fixture(scope="module")
def tokens(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("tok") / "tokens.npy"
    np.save(cache, np.random.default_rng(0).integers(0, 8000, 6000).astype(np.uint16))
    return cache


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tokens) -> dict:
    tmp = tmp_path_factory.mktemp("runs")
    straight = training.train(config(tmp, "straight", tokens))
    # the same run in three invocations: 2 steps, 3 more, then the rest
    first = training.train(config(tmp, "pieces", tokens, stop_after_steps=2))
    second = training.train(config(tmp, "pieces", tokens, stop_after_steps=3, resume=True))
    after_second = json.loads((second / "state.json").read_text())
    last = training.train(config(tmp, "pieces", tokens, resume=True))
    return dict(straight=straight, first=first, second=second, last=last,
                after_second=after_second, tmp=tmp)  # fmt: skip


def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(runs):
    assert runs["first"] == runs["second"] == state_dir(runs["last"])
    assert runs["after_second"]["step"] == 5  # 2 + 3 steps, then stopped
    a, b = runs["straight"], runs["last"]
    assert training.directory_fingerprint(a) == training.directory_fingerprint(b)
    log_a = json.loads((a / "train_log.json").read_text())
    log_b = json.loads((b / "train_log.json").read_text())
    assert log_a["steps"] == log_b["steps"] == 7
    assert log_a["tokens_seen"] == log_b["tokens_seen"] == 7 * 2 * 32
    # the validations at steps 3 and 6 straddle both interruptions: same numbers
    assert [r["step"] for r in log_b["log"]] == [3, 6]
    assert [r["val_nelbo"] for r in log_a["log"]] == [r["val_nelbo"] for r in log_b["log"]]
    assert log_a["final_val_nelbo_per_token"] == log_b["final_val_nelbo_per_token"]


def test_the_state_is_gone_once_the_model_is_written(runs):
    assert not state_dir(runs["last"]).exists()
    assert (runs["last"] / "config.json").is_file()


def test_a_resume_with_other_settings_is_refused_naming_them(runs, tokens):
    tmp = runs["tmp"]
    training.train(config(tmp, "other", tokens, stop_after_steps=1))
    with pytest.raises(ConfigError, match=r"differs from the interrupted one in lr, seed;"):
        training.train(config(tmp, "other", tokens, resume=True, lr=2e-3, seed=6))
    other = tmp / "other-tokens.npy"
    np.save(other, np.random.default_rng(1).integers(0, 8000, 6000).astype(np.uint16))
    with pytest.raises(ConfigError, match=r"in stream_sha256(, stream_tokens)?;"):
        training.train(config(tmp, "other", other, resume=True))
    # where it runs and how long an invocation lasts may change
    done = training.train(config(tmp, "other", tokens, resume=True, checkpoint_every=100))
    assert (done / "config.json").is_file()


def test_nothing_to_resume_is_one_clear_error(tmp_path, tokens):
    with pytest.raises(ConfigError, match=r"nothing to resume: .*never\.partial holds no"):
        training.train(config(tmp_path, "never", tokens, resume=True))


def test_periodic_checkpoints_leave_a_state_a_killed_run_resumes_from(tmp_path, tokens):
    """checkpoint_every writes the state during a run that is not stopped; a copy taken then
    (what a killed run leaves) resumes to the uninterrupted weights."""
    import shutil

    cfg = config(tmp_path, "ck", tokens, checkpoint_every=4)
    copy = tmp_path / "kept.partial"
    original = training.save_state

    def save_and_copy(directory, *args, **kw):  # keep the step-4 state before it is discarded
        original(directory, *args, **kw)
        if not copy.exists():
            shutil.copytree(directory, copy)

    training.save_state = save_and_copy
    try:
        full = training.train(cfg)
    finally:
        training.save_state = original
    assert json.loads((copy / "state.json").read_text())["step"] == 4
    shutil.copytree(copy, state_dir(tmp_path / "ck2"))
    resumed = training.train(config(tmp_path, "ck2", tokens, resume=True))
    assert training.directory_fingerprint(full) == training.directory_fingerprint(resumed)


def test_the_cli_stops_and_resumes_and_refuses_bad_limits(tmp_path, tokens, capsys):
    from faircalib.cli import main

    out = tmp_path / "cli"
    common = ["train", "--tokenizer", str(TOKENIZER), "--token-cache", str(tokens), "--preset",
              "tiny", "--seq-len", "32", "--hidden-dim", "64", "--n-blocks", "2", "--batch-size",
              "2", "--max-steps", "3", "--warmup-steps", "1", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(common + ["--stop-after-steps", "2"]) == 0
    assert json.loads((state_dir(out) / "state.json").read_text())["step"] == 2
    assert not out.exists()
    assert main(common + ["--resume"]) == 0
    assert (out / "config.json").is_file() and not state_dir(out).exists()
    assert json.loads((out / "train_log.json").read_text())["steps"] == 3
    capsys.readouterr()
    for flags in (["--checkpoint-every", "-1"], ["--stop-after", "0"], ["--stop-after-steps", "0"]):
        with pytest.raises(SystemExit) as exc:  # refused by argparse, as argument errors
            main(common + flags)
        assert exc.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and flags[0] in err[0], err


def test_buffers_outside_the_state_dict_survive_a_resume(tmp_path, tokens):
    """A Diffusion-LM's time warp keeps its running curve and update count in non-persistent
    buffers (not weights, so never in a saved model): the training state must still carry them,
    in their own dtypes, or a resumed run would sample levels uniformly for 100 more steps."""
    import torch

    from faircalib.training_state import load_state, resume_key, save_state

    cfg = config(tmp_path, "warp", tokens, preset="diffusionlm-tiny",
                 model_overrides={"seq_len": 32, "time_warp_bins": 8})  # fmt: skip
    tokenizer, _ = training.load_tokenizer(cfg.tokenizer)
    stream = np.load(tokens).astype(np.int32)
    key = resume_key(cfg, stream)

    def fresh():
        torch.manual_seed(0)
        model = training.build_model(cfg, tokenizer)
        return model, torch.optim.AdamW(model.parameters()), torch.Generator().manual_seed(1)

    model, opt, gen = fresh()
    assert "warp_ce" not in model.state_dict()  # the case this test is about
    with torch.no_grad():
        model.warp_ce.copy_(torch.linspace(0.5, 4.0, 8))
        model.warp_updates.fill_(157)
    save_state(state_dir(tmp_path / "warp"), model, opt, gen, {"step": 3, "total_steps": 7,
               "tokens_seen": 1, "elapsed_s": 0.0, "log": []}, key)  # fmt: skip
    other, other_opt, other_gen = fresh()
    assert int(other.warp_updates) == 0
    load_state(state_dir(tmp_path / "warp"), other, other_opt, other_gen, key)
    assert torch.equal(other.warp_ce, torch.linspace(0.5, 4.0, 8))
    assert other.warp_updates.dtype == torch.long and int(other.warp_updates) == 157


def test_the_tokenizer_counts_by_content_not_path(tmp_path, tokens):
    import shutil

    from faircalib.training_state import resume_key

    stream = np.load(tokens).astype(np.int32)
    moved = tmp_path / "elsewhere.json"
    shutil.copy(TOKENIZER, moved)
    base = resume_key(config(tmp_path, "a", tokens), stream)
    assert resume_key(config(tmp_path, "a", tokens, tokenizer=str(moved)), stream) == base
    moved.write_text(moved.read_text().replace("<|mask|>", "<|MASK|>"))
    changed = resume_key(config(tmp_path, "a", tokens, tokenizer=str(moved)), stream)
    assert changed["tokenizer_sha256"] != base["tokenizer_sha256"]
    # batches drawn on the device tie the state to the device type
    drawn = resume_key(config(tmp_path, "a", tokens, device_draws=True), stream)
    assert drawn["draw_device_type"] == "cpu" and "draw_device_type" not in base


def test_literal_mask_tokens_in_the_text_are_dropped_and_counted(tmp_path, capsys):
    """Text that spells "<|mask|>" out tokenises to the mask id; a clean token must never be
    the mask (an MDLM could not tell it from a masked one, a Gaussian family gives it no mass):
    training drops those ids and says how many."""
    import lzma

    from tokenizers import Tokenizer

    shard = tmp_path / "docs.jsonl.xz"
    docs = [{"text": f"Document {i} has <|mask|> in it and plenty of other words. " * 20}
            for i in range(30)]  # fmt: skip
    shard.write_bytes(lzma.compress("\n".join(json.dumps(d) for d in docs).encode()))
    tok = Tokenizer.from_file(str(TOKENIZER))
    mask_id = tok.token_to_id("<|mask|>")
    stream = training.tokenize_stream(tok, training.read_documents([str(shard)]), 0)
    n_mask = int((stream == mask_id).sum())
    assert n_mask == 30 * 20  # the tokenizer does turn the literal text into the id
    kept = training.without_mask_tokens(stream, tok)
    assert len(kept) == len(stream) - n_mask and not (kept == mask_id).any()
    assert f"dropped {n_mask:,} <|mask|> tokens" in capsys.readouterr().out


def test_train_never_replaces_its_inputs_and_asks_before_replacing_a_directory(tmp_path, tokens):
    """An --out that holds the token cache (or the corpus, or the tokenizer) is refused even
    with overwrite, and nothing in it is touched; an existing --out needs overwrite; the model
    is readable by others (0755 / 0644 under umask 022), as quantize's output is."""
    import os
    import shutil
    import stat

    from faircalib.errors import CheckpointError, OutputError

    home = tmp_path / "home"
    home.mkdir()
    cache = home / "tokens.npy"
    shutil.copy(tokens, cache)
    (home / "NOTES.txt").write_text("mine")
    for out in (home, tmp_path):  # the input's directory, and a directory above it
        with pytest.raises(OutputError, match="would replace the input"):
            training.train(config(out.parent, out.name, cache, overwrite=True))
    assert sorted(p.name for p in home.iterdir()) == ["NOTES.txt", "tokens.npy"]
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="--overwrite"):
        training.train(config(tmp_path, "occupied", cache, max_steps=1))
    assert (occupied / "keep.txt").read_text() == "keep"
    old = os.umask(0o022)
    try:
        out = training.train(config(tmp_path, "occupied", cache, max_steps=1, overwrite=True))
    finally:
        os.umask(old)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o644 for p in out.iterdir())
