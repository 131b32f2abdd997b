"""The Diffusion-LM pilot scripts (scripts/pilots/diffusionlm_{diagnose,readz}.py) on a tiny
synthetic token stream: they run end to end, `--max-steps` caps training, and the cond arm's
`--flag` marks clean positions in training only."""

import importlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

PILOTS = Path(__file__).resolve().parents[1] / "scripts" / "pilots"
TINY = ["--blocks", "1", "--hidden", "32", "--length", "16", "--batch", "4"]
DIAG = ["--bins", "1", "--t-per-bin", "1", "--windows", "2", "--targets", "2"]


@pytest.fixture
def readz(monkeypatch):
    monkeypatch.syspath_prepend(str(PILOTS))  # readz imports diffusionlm_diagnose by name
    return importlib.import_module("diffusionlm_readz")


@pytest.fixture
def tokens(tmp_path) -> Path:
    """210k ids over the scripts' 8192-token vocabulary (they hold out the last 200k), from a
    skewed distribution so the unigram prior is not flat; 0 and 1 ([MASK]) never occur."""
    rng = np.random.default_rng(0)
    ids = np.minimum(2 + rng.zipf(1.3, size=210_000), 8191).astype(np.uint16)
    path = tmp_path / "tokens.npy"
    np.save(path, ids)
    return path


def run(readz, capsys, argv: list[str]) -> list[dict]:
    readz.main(argv)
    return [json.loads(line) for line in capsys.readouterr().out.splitlines()]


def test_readz_cond_flag_runs_and_max_steps_caps(readz, tokens, capsys):
    argv = ["--arm", "cond", "--flag", "--tokens", str(tokens), "--wall", "20", "--every", "1"]
    rows = run(readz, capsys, argv + ["--max-steps", "3"] + TINY + DIAG)
    bounds = [r for r in rows if "bound" in r]
    # step 0, steps 1..3 (--every 1), then the final bound: the 20 s wall does not bind
    assert [r.get("step", r.get("steps")) for r in bounds] == [0, 1, 2, 3, 3]
    for r in bounds:
        assert math.isfinite(r["bound"]) and 0 <= r["diffusion"] <= r["bound"]
    assert all(r["arm"] == "cond flag" for r in rows)
    # the printed unigram level against numpy on the same file
    ids = np.load(tokens).astype(np.int64)
    counts = np.bincount(ids[:-200_000], minlength=8192) + 0.5
    total = 32 + 2  # bound and diagnosis windows share one spread over the held-out tail
    stride = (200_000 - 16) // total
    starts = [(j * total) // 32 * stride for j in range(32)]  # the bound's share of it
    held = np.concatenate([ids[-200_000:][k : k + 16] for k in starts])
    expect = -np.log(counts[held] / counts.sum()).mean()
    assert rows[0]["unigram_ce_heldout"] == pytest.approx(expect, abs=1e-3)
    summary = rows[-1]
    assert summary["summary"].startswith("diffusion term") and math.isfinite(summary["net"])


def test_readz_wall_stops_without_max_steps(readz, tokens, capsys):
    rows = run(
        readz, capsys, ["--arm", "plain", "--tokens", str(tokens), "--wall", "0"] + TINY + DIAG
    )
    assert [r["steps"] for r in rows if "steps" in r] == [0]


def test_flag_is_a_noop_at_init_and_clean_only_in_training(readz, tokens):
    """Zero-initialised, the flag leaves the cond arm's function unchanged; training's loss marks
    the clean positions (the flag's `clean` row gets gradient), the bound never does."""
    args = readz.parse(["--arm", "cond", "--flag", "--tokens", str(tokens)] + TINY)
    plain_args = readz.parse(["--arm", "cond", "--tokens", str(tokens)] + TINY)
    log_unigram = torch.zeros(8192)
    flagged, unflagged = readz.make(args, log_unigram), readz.make(plain_args, log_unigram)
    x0 = torch.randint(2, 8192, (4, 16), generator=torch.Generator().manual_seed(0))
    t, u = torch.full((4,), 0.5), torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        same = (
            flagged.bound_terms(x0, t, u)["diffusion"],
            unflagged.bound_terms(x0, t, u)["diffusion"],
        )
    torch.testing.assert_close(*same)

    flagged.bound_terms(x0, t, u)["diffusion"].sum().backward()
    grad = flagged.flag_embedding.weight.grad
    assert grad[0].abs().sum() > 0 and grad[1].abs().sum() == 0  # the bound: all noisy

    flagged.zero_grad()
    t = torch.linspace(0.1, 0.9, 16)  # 16 sequences: some conditioned (p = 1/2 each)
    x0 = torch.randint(2, 8192, (16, 16), generator=torch.Generator().manual_seed(2))
    u = torch.rand(16, 16, generator=torch.Generator().manual_seed(3))
    flagged.training_loss(x0, t, u).sum().backward()
    assert flagged.flag_embedding.weight.grad[1].abs().sum() > 0  # clean positions flagged
    flagged.zero_grad()
    flagged.bound_terms(x0, t, u)["diffusion"].sum().backward()  # the mask did not linger
    assert flagged.flag_embedding.weight.grad[1].abs().sum() == 0


def test_flag_refused_outside_cond(readz, tokens):
    with pytest.raises(SystemExit):
        readz.parse(["--arm", "plain", "--flag", "--tokens", str(tokens)])


def test_readz_pert_arm_sets_the_models_levels_and_runs(readz, tokens, capsys):
    args = readz.parse(
        ["--arm", "pert", "--independent-t", "1.0", "--jitter", "2.0"]
        + ["--tokens", str(tokens)]
        + TINY
    )
    model = readz.make(args, torch.zeros(8192))
    assert (model.cfg.independent_t, model.cfg.level_jitter) == (1.0, 2.0)
    t, u = torch.rand(4), torch.rand(4, 16)
    assert model.training_levels(t, u).shape == (4, 16)  # the model's own per-position path
    argv = ["--arm", "pert", "--tokens", str(tokens), "--wall", "20", "--every", "1"]
    rows = run(readz, capsys, argv + ["--max-steps", "2"] + TINY + DIAG)
    assert all(r["arm"] == "pert 0.5" for r in rows)
    assert [r.get("step", r.get("steps")) for r in rows if "bound" in r] == [0, 1, 2, 2]


def test_flag_init_starts_the_flag_off_zero_and_leaves_the_rest_as_plain(readz, tokens):
    base = ["--arm", "cond", "--flag", "--tokens", str(tokens)] + TINY
    zero = readz.make(readz.parse(base), torch.zeros(8192))
    moved = readz.make(readz.parse(base + ["--flag-init", "0.5"]), torch.zeros(8192))
    weight = moved.flag_embedding.weight
    assert 0.3 < weight.std().item() < 0.7 and not torch.equal(weight, zero.flag_embedding.weight)
    rest = {n: p for n, p in zero.named_parameters() if "flag" not in n}
    assert all(torch.equal(p, rest[n]) for n, p in moved.named_parameters() if "flag" not in n)
    with pytest.raises(SystemExit):
        readz.parse(["--arm", "cond", "--flag-init", "0.5", "--tokens", str(tokens)])


def test_held_out_windows_are_spread_across_the_tail(readz, tokens):
    """The pilots' bound and diagnosis windows sample the whole held-out tail (its first
    windows alone were a repetitive wiki-template passage in piece 0), without leaving it."""
    diagnose = importlib.import_module("diffusionlm_diagnose")
    args = readz.parse(["--tokens", str(tokens), *TINY, "--windows", "10"])
    _, xv, xd, _ = diagnose.split_tokens(args)
    tail = torch.from_numpy(np.load(tokens).astype(np.int64))[-200_000:]
    for windows in (xv, xd):
        starts = []
        for w in windows:  # where each window sits in the tail (ids are random: unique match)
            hits = (tail.unfold(0, 16, 1) == w).all(-1).nonzero().flatten()
            assert len(hits) >= 1
            starts.append(hits[0].item())
        assert starts == sorted(starts) and starts[0] < 20_000 and starts[-1] > 150_000
    assert xv.shape == (diagnose.N_VAL, 16) and xd.shape == (10, 16)
    # the two sets never share a window, whatever their sizes (16 = the default --windows)
    for windows in (10, 16, 32, 64):
        args = readz.parse(["--tokens", str(tokens), *TINY, "--windows", str(windows)])
        _, xv, xd, _ = diagnose.split_tokens(args)
        assert len(xd) == windows and not (xv[:, None] == xd[None]).all(-1).any()
