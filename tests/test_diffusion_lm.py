"""Diffusion-LM: the continuous-time bound against closed forms, the rounding frontier against
hand-built traces, and every CLI path on the shipped diffusionlm-tiny."""

from __future__ import annotations

import json
import math

import pytest
import torch

from faircalib import hub
from faircalib.calib import quantize
from faircalib.calib.engine import FakeQuantLinear
from faircalib.cli import main
from faircalib.config import CalibConfig, GPTQConfig, RTNConfig
from faircalib.frontier.metrics import compare_generations, flip_rate_by_step
from faircalib.frontier.samplers import SamplerConfig, generate, result_from_beliefs, stop_steps
from faircalib.models import build_model, load_model, save_model
from faircalib.models.gaussian import hashed_normal, keyed_normal, row_keys

V, L = 40, 12


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    cfg = dict(family="diffusion_lm", vocab_size=V, mask_id=1, seq_len=16, embed_dim=8)
    return build_model({**cfg, "hidden_dim": 32, "n_blocks": 2, "n_heads": 2}).eval()


def test_diffusion_term_matches_closed_form_for_a_constant_denoiser():
    # with x_hat constant (uniform p: the mean embedding) the integrand is SNR(t) ||e - c||^2
    # times -gamma'/2, whose integral over [t0, 1] is (SNR(t0) - SNR(1)) / 2 * ||e - c||^2
    model = tiny()
    emb = model.embeddings()
    uniform = torch.zeros(V).index_fill(0, torch.tensor([1]), float("-inf")).log_softmax(0)
    model.log_probs = lambda z, t: uniform.expand(*z.shape[:2], V)
    x0 = torch.randint(2, V, (1, L))
    n = 4000
    t0 = model.cfg.t_min
    t = t0 + (1 - t0) * (torch.arange(n) + 0.5) / n  # midpoint rule over U(t0, 1)
    with torch.no_grad():
        est = model.bound_terms(x0.expand(n, L), t, torch.rand(n, L))["diffusion"].double().mean()
    sch = model.schedule
    snr_gap = (sch.snr(torch.tensor(t0)) - sch.snr(torch.tensor(1.0))).item()
    mean_emb = uniform.exp() @ emb
    exact = 0.5 * snr_gap * (emb[x0[0]] - mean_emb).pow(2).sum().item()
    assert est.item() == pytest.approx(exact, rel=2e-3)


def test_prior_and_rounding_terms_match_explicit_gaussians():
    model = tiny()
    sch, emb = model.schedule, model.embeddings()
    x0 = torch.randint(2, V, (3, L))
    t, u = torch.rand(3), torch.rand(3, L)
    with torch.no_grad():
        terms = model.bound_terms(x0, t, u)
    # prior: KL(N(alpha_1 e, sigma_1^2) || N(0, 1)) by Monte Carlo of log q - log p
    one = torch.tensor(1.0)
    a1, s1 = sch.alpha(one).item(), sch.sigma(one).item()
    e = emb[x0[0]].double()
    z = a1 * e + s1 * torch.randn(20000, *e.shape, dtype=torch.float64)
    log_q = torch.distributions.Normal(a1 * e, s1).log_prob(z).sum((-2, -1))
    log_p = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum((-2, -1))
    assert terms["prior"][0].item() == pytest.approx((log_q - log_p).mean().item(), abs=2e-3)
    # rounding: the Bayes posterior of the token under N(z_t0; alpha e_w, sigma^2), uniform
    # over every token but [MASK], from explicit squared distances
    t0 = torch.tensor(model.cfg.t_min)
    eps = keyed_normal(row_keys(u), 1, (L, model.cfg.embed_dim))
    z0 = sch.alpha(t0) * emb[x0] + sch.sigma(t0) * eps  # [B, L, d]
    log_lik = -((z0[:, :, None] - sch.alpha(t0) * emb).pow(2).sum(-1)) / (2 * sch.sigma(t0) ** 2)
    log_lik[..., 1] = float("-inf")
    nll = -log_lik.log_softmax(-1).gather(-1, x0[..., None]).squeeze(-1).sum(-1)
    assert torch.allclose(terms["recon"], nll, rtol=1e-4, atol=1e-4)
    assert torch.allclose(
        model.nelbo(x0, t, u), terms["diffusion"] + terms["recon"] + terms["prior"]
    )


def test_bound_of_an_exact_posterior_is_minus_log_its_prior():
    # a denoiser that is the exact posterior of w under a prior pi (computed here from
    # explicit Gaussian densities, not the model's head) makes the continuous-time bound
    # tight: diffusion + recon + prior integrate to -log pi(w) up to the endpoint gaps
    # (KL at t = 1, rounding at t0), both ~1e-3 here. A wrong weight (per-dim vs summed,
    # the factor 1/2, the SNR direction) misses this by O(1) nats.
    model = tiny()
    sch, emb = model.schedule, model.embeddings()
    log_pi = torch.randn(V).index_fill(0, torch.tensor([1]), float("-inf")).log_softmax(0)

    def posterior(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, s2 = sch.alpha(t)[:, None, None, None], sch.sigma(t)[:, None, None, None] ** 2
        dist = (z[:, :, None] - a * emb).pow(2).sum(-1)  # [B, L, V]
        return (log_pi - dist / (2 * s2[..., 0])).log_softmax(-1)

    model.log_probs = posterior
    x0 = torch.randint(2, V, (1, L))
    n = 16000
    t0 = model.cfg.t_min
    t = t0 + (1 - t0) * (torch.arange(n) + 0.5) / n
    with torch.no_grad():
        draws = model.nelbo(x0.expand(n, L), t, torch.rand(n, L)).double()
    bound, se = draws.mean().item(), draws.std().item() / math.sqrt(n)
    exact = -log_pi[x0].sum().item()
    assert se < 0.02 * exact  # the check below resolves a few percent
    assert abs(bound - exact) < 4 * se


def test_final_norm_is_off_for_old_configs_and_normalises_the_head_input(tmp_path):
    from faircalib.errors import CheckpointError

    assert hub.load("diffusionlm-tiny").norm_f is None  # config.json predates the field
    cfg = dict(family="diffusion_lm", vocab_size=V, mask_id=1, seq_len=16, embed_dim=8)
    cfg |= {"hidden_dim": 32, "n_blocks": 2, "n_heads": 2}
    with pytest.raises(CheckpointError, match="final_norm"):
        build_model({**cfg, "final_norm": "yes"})
    torch.manual_seed(0)
    model = build_model({**cfg, "final_norm": True}).eval()
    x, t = torch.randint(2, V, (2, 16)), torch.rand(2)
    h, ctx = model.stem(x, t)
    with torch.no_grad():  # a LayerNorm'ed head input: a blown-up residual stream reads the same
        assert torch.allclose(model.head(h, ctx, x), model.head(50 * h, ctx, x), atol=1e-4)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.cfg.final_norm is True
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x, t), model.log_probs(x, t))


def test_head_gives_no_mass_to_mask_and_rounds_clean_embeddings():
    model = tiny()
    x = torch.randint(2, V, (2, L))
    with torch.no_grad():
        lp = model.log_probs(x, torch.full((2,), model.cfg.t_min))  # tokens: noised in the stem
    assert torch.isneginf(lp[..., 1]).all()
    assert torch.allclose(lp.exp().sum(-1), torch.ones(2, L), atol=1e-5)
    assert (lp.argmax(-1) == x).all()  # at t_min the exact Gaussian term decides


def test_stem_noise_is_keyed_by_tokens_and_t():
    model = tiny()
    x, t = torch.randint(2, V, (2, L)), torch.tensor([0.3, 0.7])
    h1, ctx1 = model.stem(x, t)
    h2, _ = model.stem(x, t)
    assert torch.equal(h1, h2)
    eps = keyed_normal(row_keys(x, t), 0, (L, model.cfg.embed_dim))
    assert torch.allclose(ctx1.tensors["batch_z"], model.noised(x, t, eps))
    h3, _ = model.stem(x, t + 0.01)
    assert not torch.allclose(h1, h3)


def test_stop_steps_and_frontier_on_a_hand_built_trace():
    # two rows, three positions, four steps; beliefs[k] = rounded tokens after step k
    beliefs = torch.tensor(
        [
            [[5, 6, 7], [1, 2, 3]],
            [[5, 9, 7], [1, 2, 4]],
            [[5, 6, 8], [2, 2, 4]],
            [[5, 6, 8], [1, 2, 4]],
        ]
    )
    # row 0: pos 0 never changes (0), pos 1 settles at step 2, pos 2 at step 2
    # row 1: pos 0 changes back at step 3 (3), pos 1 never changes (0), pos 2 from step 1
    assert stop_steps(beliefs).tolist() == [[0, 2, 2], [3, 0, 1]]
    stats = {k: torch.rand(4, 2, 3) for k in ("top1_prob", "margin", "entropy")}
    prompt = torch.tensor([[11], [12]])
    res = result_from_beliefs(prompt, beliefs, stats, [1.0, 0.7, 0.4, 0.1], None, "x", trace=True)
    assert res.tokens.tolist() == [[11, 5, 6, 8], [12, 1, 2, 4]]
    assert [s.positions for s in res.trace.steps] == [
        [[1], [2]],
        [[], [3]],
        [[2, 3], []],
        [[], [1]],
    ]
    assert res.trace.steps[2].tokens == [[6, 8], []]
    assert res.trace.steps[2].top1_prob[0] == stats["top1_prob"][2, 0, 1:].tolist()
    assert all(res.committed[k].sum() <= res.committed[k + 1].sum() for k in range(3))
    assert res.committed[-1].all()
    # flips: a second run that differs only at row 1 position 0's final token
    other = beliefs.clone()
    other[3, 1, 0] = 2
    res_b = result_from_beliefs(prompt, other, stats, [1.0, 0.7, 0.4, 0.1], None, "x", trace=False)
    # A writes (1, 0) at step 3 and B has 2 there: step 3's only write flipped
    assert flip_rate_by_step(res, res_b) == [0.0, 0.0, 0.0, 1.0]


def test_sampler_trace_replay_and_metrics():
    model = tiny()
    prompt = torch.randint(2, V, (2, 3))
    cfg = SamplerConfig(steps=6, gen_length=8)
    res = generate(model, prompt, cfg, seed=3, record_states=True)
    again = generate(model, prompt, cfg, seed=3)
    assert torch.equal(res.tokens, again.tokens) and torch.equal(res.tokens[:, :3], prompt)
    written = sorted(p for s in res.trace.steps for p in s.positions[0])
    assert written == list(range(3, 11))  # every generated position written exactly once
    assert torch.equal(res.beliefs[-1], res.tokens[:, 3:])
    for k, (x, t) in enumerate(res.states):  # token states, as calibration inputs are
        assert torch.equal(x[:, 3:], res.beliefs[k]) and torch.equal(x[:, :3], prompt)
        assert t.tolist() == pytest.approx([res.trace.steps[k].t[0]] * 2)
    same = compare_generations(model, model, prompt, cfg, seed=3, max_positions=8)
    assert same["flip_rate"] == 0 and same["first_divergence_step"] == [None, None]
    assert same["stabilization_lag_a"] == 0 and same["post_commit_mismatch_a"] == 0


def test_engine_quantizes_blocks_and_round_trips(tmp_path):
    model = tiny()
    tokens = torch.randint(2, V, (8, 16))
    for config in (RTNConfig(bits=4, group_size=32), GPTQConfig(bits=4, group_size=32)):
        q = tiny()
        report = quantize(q, config, tokens, CalibConfig(n_samples=8, seq_len=16), progress=False)
        assert len(report.layers) == 8
        assert isinstance(q.blocks[1].mlp[2], FakeQuantLinear)
        x, t = torch.randint(2, V, (2, 16)), torch.rand(2)
        with torch.no_grad():
            diff = (q.log_probs(x, t).exp() - model.log_probs(x, t).exp()).abs().max()
        assert 0 < diff < 0.5
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    x, t = torch.randint(2, V, (2, 16)), torch.rand(2)
    with torch.no_grad():
        assert torch.equal(loaded.log_probs(x, t), model.log_probs(x, t))


# --- the shipped model, through the command line ---------------------------------------------
def test_shipped_model_cli_paths(tmp_path, capsys):
    model = hub.load("diffusionlm-tiny")
    assert model.family == "diffusion_lm" and model.num_parameters() < 10**6
    assert main(["eval", "diffusionlm-tiny", "--data", "wikitext2", "--limit", "2", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert math.isfinite(result["bits_per_byte"]) and result["ppl"] > 1
    gen = ["generate", "diffusionlm-tiny", "--prompt", "The", "--gen-length", "8", "--steps", "8"]
    assert main([*gen, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(len(s["positions"][0]) for s in out["trace"]["steps"]) == 8
    for method in ("rtn", "gptq"):
        q = tmp_path / method
        args = ["quantize", "diffusionlm-tiny", "--method", method, "--nsamples", "4"]
        assert main([*args, "--seq-len", "32", "--out", str(q), "--json"]) == 0
        capsys.readouterr()
        assert main(["eval", str(q), "--data", "wikitext2", "--limit", "2", "--json"]) == 0
        assert math.isfinite(json.loads(capsys.readouterr().out)["bits_per_byte"])


@pytest.mark.parametrize("preset", ["diffusionlm-tiny", "planner-tiny"])
def test_training_path_trains_the_gaussian_families(tmp_path, preset):
    from faircalib.data.tokenizers import train_bpe
    from faircalib.training import TrainConfig, train

    sentences = [f"the {w} sat on the mat and the {w} was happy." for w in ("cat", "dog", "bird")]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": s * 4}) for s in sentences * 20))
    tok = train_bpe(sentences * 10, vocab_size=300, min_frequency=1)
    tok.save(str(tmp_path / "tokenizer.json"))
    small = {"hidden_dim": 32, "n_heads": 2, "embed_dim": 8, "seq_len": 32}
    if preset == "planner-tiny":
        small |= {"plan_dim": 32, "n_latents": 2, "latent_dim": 4}
    cfg = TrainConfig(
        corpus=[str(corpus)],
        tokenizer=str(tmp_path / "tokenizer.json"),
        out=str(tmp_path / "out"),
        preset=preset,
        model_overrides=small,
        batch_size=8,
        lr=3e-3,
        warmup_steps=5,
        max_steps=40,
        eval_every=10,
        eval_batches=2,
        device="cpu",
        val_fraction=0.2,
    )
    train(cfg)
    log = json.loads((tmp_path / "out" / "train_log.json").read_text())["log"]
    assert log[-1]["val_nelbo"] < log[0]["val_nelbo"]  # the held-out bound (fixed noise) falls
    family = {"diffusionlm-tiny": "diffusion_lm", "planner-tiny": "planner"}[preset]
    assert load_model(tmp_path / "out").family == family


def test_the_gpu_preset_normalises_before_the_head():
    """diffusionlm-base trains with the LayerNorm before the head's tanh (without it the
    2026-11-29 lease's run saturated and stayed at unigram level); the shipped tiny does not."""
    from faircalib.training import PRESETS, TrainConfig, build_model, load_tokenizer

    tok, _ = load_tokenizer("src/faircalib/assets/tokenizers/wiki-bpe-8k.json")
    overrides = {"n_blocks": 1, "hidden_dim": 64, "n_heads": 2, "embed_dim": 8}
    cfg = TrainConfig(corpus=[], tokenizer="", out="", preset="diffusionlm-base")
    cfg.model_overrides = overrides
    model = build_model(cfg, tok)
    assert PRESETS["diffusionlm-base"]["final_norm"] and model.norm_f is not None
    cfg.preset = "diffusionlm-tiny"
    assert build_model(cfg, tok).norm_f is None


def test_per_position_levels_equal_shared_ones_when_all_equal_and_noise_each_position_alone():
    # t [B, L] is a generalisation of t [B]: every position at the sequence's level must give
    # the same distributions; and each position's noising uses its own alpha/sigma only
    model = tiny()
    x, t, eps = torch.randint(2, V, (3, L)), torch.rand(3), torch.randn(3, L, 8)
    with torch.no_grad():
        shared = model.log_probs(model.noised(x, t, eps), t)
        spread = t[:, None].expand(-1, L)
        per_pos = model.log_probs(model.noised(x, spread, eps), spread)
        assert torch.allclose(shared, per_pos, atol=1e-5)
        levels = torch.rand(3, L)
        z = model.noised(x, levels, eps)
        emb, sch = model.embeddings(), model.schedule
        for b in range(3):
            for pos in range(L):
                lv = levels[b, pos]
                ref = sch.alpha(lv) * emb[x[b, pos]] + sch.sigma(lv) * eps[b, pos]
                assert torch.allclose(z[b, pos], ref, atol=1e-6)


def test_independent_levels_draw_a_share_of_sequences_and_leave_the_bound_alone():
    from faircalib.errors import CheckpointError

    cfg = dict(family="diffusion_lm", vocab_size=V, mask_id=1, seq_len=16, embed_dim=8)
    cfg |= {"hidden_dim": 32, "n_blocks": 2, "n_heads": 2}
    with pytest.raises(CheckpointError, match="independent_t"):
        build_model({**cfg, "independent_t": 1.5})
    model = tiny()
    n, t, u = 400, torch.rand(400), torch.rand(400, L)
    assert torch.equal(model.training_levels(t, u), t)  # off by default: one level a sequence
    model.cfg.independent_t = 0.3
    levels = model.training_levels(t, u)
    assert torch.equal(levels, model.training_levels(t, u.clone()))  # keyed by u: repeatable
    own = (levels != t[:, None]).any(-1)
    # the chosen share is Binomial(400, 0.3): 120 +- 9.2; a 5-sigma window
    assert abs(own.sum().item() - 0.3 * n) < 5 * math.sqrt(n * 0.3 * 0.7)
    assert torch.equal(levels[~own], t[~own, None].expand(-1, L))
    mine = levels[own]
    assert mine.min() >= model.cfg.t_min and mine.max() <= 1
    assert mine.std(-1).min() > 0.05  # distinct levels inside each chosen sequence
    # U(t_min, 1): the mean of ~1400 draws sits within 5 standard errors of 0.5
    assert abs(mine.mean().item() - 0.5) < 5 * (1 / math.sqrt(12)) / math.sqrt(mine.numel())
    x0 = torch.randint(2, V, (4, L))
    tt, uu = torch.rand(4), torch.rand(4, L)
    with torch.no_grad():
        bound_on = model.nelbo(x0, tt, uu)
        model.cfg.independent_t = 0.0
        assert torch.equal(model.nelbo(x0, tt, uu), bound_on)  # the bound keeps shared levels


def test_training_loss_with_own_levels_is_the_cross_entropy_at_those_levels():
    # share 1: every sequence per position; the loss must be CE of p(w | z) with z noised at
    # the drawn levels + the (level-free) rounding and prior terms, built here by hand
    model = tiny()
    model.cfg.independent_t = 1.0
    x0, t, u = torch.randint(2, V, (2, L)), torch.rand(2), torch.rand(2, L)
    with torch.no_grad():
        loss = model.training_loss(x0, t, u)
        levels = model.training_levels(t, u)
        eps = hashed_normal(row_keys(u), 3, (L, 8))  # training's stream (TRAIN_STREAM)
        emb, sch = model.embeddings(), model.schedule
        z = sch.alpha(levels)[..., None] * emb[x0] + sch.sigma(levels)[..., None] * eps
        ce = -model.log_probs(z, levels).gather(-1, x0[..., None]).squeeze(-1).sum(-1)
        # rounding and prior do not depend on t; rounding takes training's draw too
        shared = model.bound_terms(x0, t, u, eps=eps)
    assert torch.allclose(loss, ce + shared["recon"] + shared["prior"], rtol=1e-5)


def test_level_jitter_spreads_log_snr_around_the_sequence_level():
    # gamma_l - gamma(t) must be N(0, jitter^2) where no clamp binds: pick t mid-schedule
    model = tiny()
    model.cfg.independent_t, model.cfg.level_jitter = 1.0, 0.5
    sch = model.schedule
    t = torch.full((300,), 0.5)  # gamma -1.5, 7.5 nats (15 sigma) from either end
    delta = sch.gamma(model.training_levels(t, torch.rand(300, L))) - sch.gamma(t)[:, None]
    n = delta.numel()
    assert abs(delta.mean().item()) < 5 * 0.5 / math.sqrt(n)
    # the sample std of n normals: standard error ~ sigma / sqrt(2n)
    assert abs(delta.std().item() - 0.5) < 5 * 0.5 / math.sqrt(2 * n)


def test_train_cli_sets_independent_t_for_diffusion_lm_only(tmp_path, capsys):
    from faircalib.data.tokenizers import train_bpe

    sentences = [f"the {w} sat on the mat and the {w} was happy." for w in ("cat", "dog", "owl")]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": s * 4}) for s in sentences * 20))
    train_bpe(sentences * 10, vocab_size=300, min_frequency=1).save(str(tmp_path / "tok.json"))
    common = ["train", "--data", str(corpus), "--tokenizer", str(tmp_path / "tok.json")]
    common += ["--max-steps", "2", "--eval-every", "2", "--batch-size", "4", "--device", "cpu"]
    out = tmp_path / "dlm"
    rc = main(
        common + ["--preset", "diffusionlm-tiny", "--independent-t", "0.5", "--out", str(out)]
    )
    assert rc == 0 and load_model(out).cfg.independent_t == 0.5
    assert json.loads((out / "config.json").read_text())["independent_t"] == 0.5
    capsys.readouterr()
    rc = main(common + ["--preset", "tiny", "--independent-t", "0.5", "--out", str(tmp_path / "m")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--independent-t" in err[0]
    assert not (tmp_path / "m").exists()  # refused before anything is written
    bad = common + ["--preset", "diffusionlm-tiny", "--independent-t", "1.5"]
    rc = main(bad + ["--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "[0, 1]" in err[0] and not (tmp_path / "d").exists()
    # the time warp and the embedding width: Diffusion-LM only, written into config.json
    warped = tmp_path / "warped"
    extra = ["--time-warp", "16", "--embed-dim", "4", "--train-on-bound", "--posterior-input"]
    extra += ["--untied-head", "--warp-on-bound"]
    assert main(common + ["--preset", "diffusionlm-tiny"] + extra + ["--out", str(warped)]) == 0
    config = json.loads((warped / "config.json").read_text())
    fields = ("time_warp_bins", "embed_dim", "train_on_bound", "posterior_input", "untied_head")
    assert tuple(config[f] for f in fields + ("warp_on_bound",)) == (16, 4, True, True, True, True)
    assert {"input_embedding", "lm_head.weight"} <= set(dict(load_model(warped).named_parameters()))
    capsys.readouterr()
    only_dlm = (["--time-warp", "16"], ["--embed-dim", "4"], ["--train-on-bound"])
    for flags in only_dlm + (["--posterior-input"], ["--untied-head"], ["--warp-on-bound"]):
        rc = main(common + ["--preset", "tiny"] + flags + ["--out", str(tmp_path / "m2")])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and flags[0] in err[0] and not (tmp_path / "m2").exists()
    rc = main(
        common + ["--preset", "diffusionlm-tiny", "--time-warp", "1", "--out", str(tmp_path / "m3")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--time-warp" in err[0]
    rc = main(
        common + ["--preset", "diffusionlm-tiny", "--warp-on-bound", "--out", str(tmp_path / "m4")]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert rc != 0 and len(err) == 1 and "--time-warp" in err[0] and not (tmp_path / "m4").exists()


def test_stem_and_head_read_each_positions_own_level():
    # the stem is position-wise (no attention), so h[b, l] under levels [B, L] must equal h[b, l]
    # with every position at levels[b, l]; with the network's logits zeroed the head is the
    # Gaussian likelihood alone, log_softmax(alpha/sigma^2 (t_l) <z_l, e_w>), built here by hand
    model = tiny()
    z, levels = torch.randn(2, L, 8), torch.rand(2, L)
    emb, sch = model.embeddings(), model.schedule
    with torch.no_grad():
        h, ctx = model.stem(z, levels)
        for b in range(2):
            for pos in range(L):
                one_level = torch.full((2,), levels[b, pos].item())
                assert torch.allclose(h[b, pos], model.stem(z, one_level)[0][b, pos], atol=1e-5)
        hook = model.output_down_proj.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        try:
            got = model.head(h, ctx, z)
        finally:
            hook.remove()
        logits = (sch.alpha(levels) / sch.sigma(levels) ** 2)[..., None] * (z @ emb.T)
        logits[..., 1] = float("-inf")
        assert torch.allclose(got, torch.log_softmax(logits, -1), atol=1e-4)
    with pytest.raises(ValueError, match="one level a sequence"):
        model.stem(torch.randint(2, V, (2, L)), levels)  # ids: keyed noise needs t [B]


def test_min_lr_ratio_one_keeps_the_rate_constant_after_warm_up(tmp_path, capsys):
    # the schedule by its definition: linear warm-up, then a cosine from lr down to ratio * lr
    from faircalib.training import TrainConfig, lr_at

    cfg = TrainConfig(corpus=[], tokenizer="t", out="o", lr=1e-3, warmup_steps=10)
    cfg_const = TrainConfig(corpus=[], tokenizer="t", out="o", lr=1e-3, warmup_steps=10)
    cfg_const.min_lr_ratio = 1.0
    assert lr_at(4, 100, cfg_const) == pytest.approx(5e-4)  # warm-up unchanged
    assert all(lr_at(s, 100, cfg_const) == pytest.approx(1e-3) for s in range(10, 200, 7))
    assert lr_at(100, 100, cfg) == pytest.approx(1e-4)  # the default floor: 0.1 x lr
    bad = ["train", "--data", "x.jsonl", "--tokenizer", "t.json", "--preset", "tiny"]
    rc = main(bad + ["--min-lr-ratio", "1.5", "--out", str(tmp_path / "d")])
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        rc != 0 and len(err) == 1 and "--min-lr-ratio" in err[0] and not (tmp_path / "d").exists()
    )


# --- training's vectorised noise (gaussian.hashed_normal) ---------------------------------------
def test_hashed_normal_is_a_standard_normal_keyed_by_row_and_stream():
    keys = row_keys(torch.rand(400, 16))
    z = hashed_normal(keys, 3, (25, 10))  # 250 values a row: odd pairs are cut back
    assert z.shape == (400, 25, 10)
    flat = z.flatten().double().sort().values  # 100,000 values
    # Kolmogorov-Smirnov distance to the normal CDF; 0.0062 is the 0.1% critical value at n=1e5
    n = flat.numel()
    cdf = torch.special.ndtr(flat)
    ks = torch.maximum(torch.arange(1, n + 1) / n - cdf, cdf - torch.arange(n) / n).max()
    assert ks < 0.0062
    # no structure along a row or across rows: lag-1 and row-to-row correlations stay small
    rows = z.view(400, -1)
    assert (
        abs(torch.corrcoef(torch.stack([rows[:, :-1].flatten(), rows[:, 1:].flatten()]))[0, 1])
        < 0.015
    )
    assert abs(torch.corrcoef(torch.stack([rows[:-1].flatten(), rows[1:].flatten()]))[0, 1]) < 0.015
    # a pure function of (key, stream): a row alone draws what it draws in a batch, another
    # stream draws something else, and equal keys draw equal rows
    assert torch.equal(hashed_normal(keys[7:8], 3, (25, 10))[0], z[7])
    assert not torch.allclose(hashed_normal(keys, 4, (25, 10)), z)
    assert torch.equal(hashed_normal(keys[[5, 5]], 3, (25, 10))[1], z[5])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_hashed_normal_draws_the_same_on_the_gpu():
    keys = row_keys(torch.rand(64, 16))
    cpu = hashed_normal(keys, 3, (128, 8))
    gpu = hashed_normal(keys.cuda(), 3, (128, 8)).cpu()
    assert torch.allclose(cpu, gpu, atol=1e-5)


# --- time warping (training only) ----------------------------------------------------------------
def warped_tiny(bins: int, **extra):
    torch.manual_seed(0)
    cfg = dict(family="diffusion_lm", vocab_size=V, mask_id=1, seq_len=16, embed_dim=8)
    return build_model(
        {**cfg, "hidden_dim": 32, "n_blocks": 1, "n_heads": 2, "time_warp_bins": bins, **extra}
    )


def test_time_warp_draws_levels_where_the_cross_entropy_rises():
    from faircalib.models.diffusion_lm import WARP_START

    model = warped_tiny(10)
    t_min, n = model.cfg.t_min, 100_000
    grid = t_min + (1 - t_min) * (torch.arange(n) + 0.5) / n  # evenly spaced uniform levels
    assert torch.allclose(model.warp_levels(grid), grid, atol=1e-6)  # no curve yet: uniform
    # CE rises by 1 in each of bins 3, 4, 5 (a dip in bin 8 is noise: the curve is monotone)
    model.warp_ce.copy_(torch.tensor([0.0, 0, 0, 1, 2, 3, 3, 3, 2.5, 3]))
    model.warp_updates.fill_(WARP_START)
    warped = model.warp_levels(grid)
    # by hand: 80% spread over the three rising bins, 20% uniform -> 0.8 + 0.2 * 3 / 10 = 0.86
    v = (warped - t_min) / (1 - t_min)
    share = ((v >= 0.3) & (v < 0.6)).float().mean().item()
    assert abs(share - 0.86) < 1e-3
    assert abs(((v >= 0.8) & (v < 0.9)).float().mean().item() - 0.02) < 1e-3  # the dip's bin
    assert torch.all(warped[1:] >= warped[:-1])  # monotone: stratified t stays stratified
    ends = model.warp_levels(torch.tensor([t_min, 1.0]))
    assert torch.allclose(ends, torch.tensor([t_min, 1.0]), atol=1e-6)


def test_time_warp_curve_is_a_running_mean_of_the_per_bin_cross_entropy():
    from faircalib.models.diffusion_lm import WARP_RATE

    model = warped_tiny(4)
    t_min = model.cfg.t_min
    levels = torch.tensor([0.1, 0.3, 0.35, 0.9])  # bins 0, 1, 1, 3; bin 2 unseen
    ce = torch.arange(16.0).view(4, 4) + 1
    model.update_warp(levels, ce)
    bin_of = (((levels - t_min) / (1 - t_min)) * 4).long()
    first = torch.zeros(4)
    for b in range(4):  # per-bin mean of every position's CE, by hand
        rows = ce[bin_of == b]
        first[b] = rows.mean() if len(rows) else 0.0
    assert torch.allclose(model.warp_ce, first)
    model.update_warp(torch.tensor([0.1, 0.6]), torch.full((2, 4), 9.0))  # bins 0 and 2
    expect = first.clone()
    expect[0] = (1 - WARP_RATE) * first[0] + WARP_RATE * 9.0
    expect[2] = 9.0  # its first data
    assert torch.allclose(model.warp_ce, expect) and model.warp_updates.item() == 2


def test_time_warp_trains_only_in_training_and_is_never_saved(tmp_path):
    model = warped_tiny(8).train()
    x0, t, u = torch.randint(2, V, (4, L)), torch.rand(4), torch.rand(4, L)
    model.training_loss(x0, t, u).mean().backward()
    assert model.warp_updates.item() == 1 and model.warp_ce.sum() > 0
    model.eval()
    with torch.no_grad():
        model.training_loss(x0, t, u)
    assert model.warp_updates.item() == 1  # evaluation leaves the curve alone
    save_model(model, tmp_path / "m")
    assert not any("warp" in k for k in load_model(tmp_path / "m").state_dict())
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["time_warp_bins"] == 8
    with pytest.raises(Exception, match="time_warp_bins"):
        warped_tiny(-1)


def test_time_warp_state_survives_the_compile_warm_up_and_a_bf16_cast(monkeypatch):
    from types import SimpleNamespace

    from faircalib.models.diffusion_lm import WARP_RATE
    from faircalib.training import step_loss_fn

    model = warped_tiny(4).train()
    monkeypatch.setattr(torch, "compile", lambda fn: fn)  # the warm-up then runs eagerly
    step_loss_fn(model, SimpleNamespace(compile=True), "cpu")
    assert model.warp_updates.item() == 0 and model.warp_ce.abs().sum() == 0
    # cast whole to bf16, the running curve still moves by WARP_RATE of the gap (7.0 -> 7.2)
    model.to(torch.bfloat16)
    levels, ce = torch.full((2,), 0.1), torch.full((2, 4), 7.0)
    model.update_warp(levels, ce)
    model.update_warp(levels, ce + 0.2)
    assert model.warp_ce.dtype == torch.float32
    assert model.warp_ce[0].item() == pytest.approx(7.0 + WARP_RATE * 0.2, abs=1e-5)


def test_training_on_the_bound_is_the_bound_under_the_same_noise(monkeypatch):
    """train_on_bound: with one level a sequence and the bound's own noise draw substituted for
    training's, the training loss is the model's (separately tested) NELBO exactly."""
    import faircalib.models.diffusion_lm as dlm

    model = tiny()
    model.cfg.train_on_bound = True
    monkeypatch.setattr(
        dlm,
        "hashed_normal",
        lambda keys, stream, shape: keyed_normal(keys, dlm.BOUND_STREAM, shape),
    )
    x0, t, u = torch.randint(2, V, (3, L)), torch.rand(3), torch.rand(3, L)
    with torch.no_grad():
        assert torch.allclose(model.training_loss(x0, t, u), model.nelbo(x0, t, u), rtol=1e-6)
        model.cfg.train_on_bound = False  # the cross-entropy objective is something else
        assert not torch.allclose(model.training_loss(x0, t, u), model.nelbo(x0, t, u), rtol=1e-3)


def test_variance_optimal_levels_follow_the_root_second_moment_and_stay_unbiased():
    from faircalib.models.diffusion_lm import WARP_START, WARP_UNIFORM

    model = warped_tiny(4, warp_on_bound=True, train_on_bound=True)
    t_min, n = model.cfg.t_min, 400_000
    # the running second moment E[l^2] per bin (by hand): 0, 1, 4, 16 -> roots 0, 1, 2, 4
    model.warp_ce.copy_(torch.tensor([0.0, 1.0, 4.0, 16.0]))
    model.warp_updates.fill_(WARP_START)
    expected = (1 - WARP_UNIFORM) * torch.tensor([0.0, 1, 2, 4]) / 7 + WARP_UNIFORM / 4
    assert torch.allclose(model.warp_density(), expected)
    grid = t_min + (1 - t_min) * (torch.arange(n) + 0.5) / n
    warped, bins = model.warp_levels(grid, return_bins=True)
    weight = model.warp_weight(bins)
    # importance sampling: any function of the level, weighted, has its uniform-t average
    f = lambda t: torch.sin(7 * t) + t**2  # noqa: E731
    assert (f(warped) * weight).mean().item() == pytest.approx(f(grid).mean().item(), abs=2e-4)
    assert weight.mean().item() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(warped, model.warp_levels(grid))  # the bins change nothing else
    # before WARP_START the density is uniform: no warp and weight 1, the unwarped loss
    x0, t, u = torch.randint(2, V, (3, L)), torch.rand(3), torch.rand(3, L)
    plain = warped_tiny(4, train_on_bound=True).train()
    early = warped_tiny(4, warp_on_bound=True, train_on_bound=True).train()
    with torch.no_grad():
        assert torch.allclose(early.training_loss(x0, t, u), plain.training_loss(x0, t, u))
        early.warp_ce.copy_(torch.tensor([0.0, 1.0, 4.0, 16.0]))
        early.warp_updates.fill_(WARP_START)
        shaped = early.training_loss(x0, t, u)  # warped levels, weighted: another loss
    assert not torch.allclose(shaped, plain.training_loss(x0, t, u))
    # refused where the weights or the density would not fit
    for bad in ({}, {"train_on_bound": True, "independent_t": 1.0, "level_jitter": 1.0}):
        with pytest.raises(Exception, match="warp_on_bound"):
            warped_tiny(4, warp_on_bound=True, **bad)
    with pytest.raises(Exception, match="warp_on_bound"):
        warped_tiny(0, warp_on_bound=True, train_on_bound=True)


def test_variance_optimal_statistic_is_the_squared_sequence_mean_or_each_position():
    # the running statistic fed by training_loss, against the integrand set by hand: one level
    # a sequence -> (mean over positions)^2 in the sequence's bin; a level a position -> each
    # position's square in its own bin
    integrand = torch.arange(1.0, 1.0 + 2 * L).reshape(2, L)
    for share in (0.0, 1.0):
        model = warped_tiny(4, warp_on_bound=True, train_on_bound=True, independent_t=share)
        model.train()
        real, seen = model.bound_terms, []

        def fixed(x0, levels, u, eps=None, real=real, seen=seen):
            seen.append(levels)
            return {**real(x0, levels, u, eps=eps), "diffusion_positions": integrand}

        model.bound_terms = fixed
        x0, t, u = torch.randint(2, V, (2, L)), torch.tensor([0.1, 0.9]), torch.rand(2, L)
        with torch.no_grad():
            model.training_loss(x0, t, u)
        (levels,) = seen
        assert levels.dim() == (1 if share == 0.0 else 2)
        t_min = model.cfg.t_min
        idx = (((levels - t_min) / (1 - t_min)) * 4).long().clamp(0, 3).flatten()
        values = (integrand.mean(-1) ** 2 if share == 0.0 else integrand**2).flatten()
        expect = torch.zeros(4)
        for b in range(4):
            if (idx == b).any():
                expect[b] = values[idx == b].mean()
        assert torch.allclose(model.warp_ce, expect), (share, model.warp_ce, expect)


# --- posterior input -----------------------------------------------------------------------------
def test_own_posterior_is_bayes_rule_on_explicit_gaussian_densities():
    # p(w | z_l) under a uniform prior over the tokens but [MASK], from log N(z; alpha e_w,
    # sigma^2 I) written out per token (the norms cancel only because every e_w has norm sqrt(d))
    model = tiny()
    sch, emb = model.schedule, model.embeddings().double()
    z, t = torch.randn(2, L, model.cfg.embed_dim), torch.tensor([0.3, 0.6])
    a = sch.alpha(t).double()[:, None, None, None]
    s = sch.sigma(t).double()[:, None, None, None]
    log_density = -((z.double()[:, :, None, :] - a * emb) ** 2).sum(-1) / (2 * s[..., 0] ** 2)
    log_density[..., 1] = float("-inf")  # mask_id
    expected = torch.softmax(log_density, -1)
    got = model.own_posterior(z, t).double()
    assert torch.allclose(got, expected, atol=1e-5)
    # per-position levels give each position its own posterior
    per_pos = model.own_posterior(z, t[:, None].expand(2, L))
    assert torch.allclose(per_pos.double(), expected, atol=1e-5)


def test_posterior_input_feeds_the_trunk_what_each_position_says():
    torch.manual_seed(0)
    cfg = dict(family="diffusion_lm", vocab_size=V, mask_id=1, seq_len=16, embed_dim=8)
    model = build_model(
        {**cfg, "hidden_dim": 32, "n_blocks": 2, "n_heads": 2, "posterior_input": True}
    ).eval()
    z, t = torch.randn(2, L, 8), torch.tensor([0.2, 0.9])
    h, _ = model.stem(z, t)
    table = model.input_embedding
    with torch.no_grad():  # the same stem with the table's contribution zeroed
        saved = table.clone()
        table.zero_()
        h0, _ = model.stem(z, t)
        table.copy_(saved)
    assert not torch.allclose(h, h0)
    # a clean position enters as its token's row; at t = 1 the mixture is the table's mean
    tokens = torch.randint(2, V, (1, L))
    clean = model.noised(tokens, torch.tensor([model.cfg.t_min]), torch.zeros(1, L, 8))
    p_clean = model.own_posterior(clean, torch.tensor([model.cfg.t_min]))
    assert torch.equal(p_clean.argmax(-1), tokens) and p_clean.max(-1).values.min() > 0.999
    p_noise = model.own_posterior(torch.randn(1, L, 8), torch.tensor([1.0]))
    assert (p_noise[..., 2:] * (V - 1) - 1).abs().max() < 0.5  # within 50% of uniform
    # training runs through it and reaches the table
    x0 = torch.randint(2, V, (4, L))
    model.train()
    model.training_loss(x0, torch.rand(4), torch.rand(4, L)).mean().backward()
    assert table.grad is not None and table.grad.abs().sum() > 0


def test_untied_head_adds_its_logits_to_the_exact_likelihood():
    # log p(w | z_t) = log_softmax(lm_head(norm_f(h)) + alpha/sigma^2 <z, e_w>), [MASK] at -inf
    torch.manual_seed(0)
    cfg = dict(family="diffusion_lm", vocab_size=V, mask_id=1, seq_len=16, embed_dim=8)
    model = build_model(
        {
            **cfg,
            "hidden_dim": 32,
            "n_blocks": 1,
            "n_heads": 2,
            "untied_head": True,
            "final_norm": True,
        }
    ).eval()
    z, t = torch.randn(2, L, 8), torch.tensor([0.4, 0.7])
    with torch.no_grad():
        h, ctx = model.stem(z, t)
        for block in model.blocks:
            h = block(h, ctx)
        got = model.log_probs(z, t)
        sch, emb = model.schedule, model.embeddings()
        skip = (sch.alpha(t) / sch.sigma(t) ** 2)[:, None, None] * (z @ emb.T)
        logits = model.lm_head(model.norm_f(h)) + skip
        logits[..., 1] = float("-inf")
    assert torch.allclose(got, torch.log_softmax(logits, -1), atol=1e-5)


def test_bound_under_bf16_autocast_keeps_its_high_snr_terms_in_float32():
    # at low t the diffusion term weighs ||e - x_hat||^2 by SNR ~ e^9: a bf16 x_hat would add
    # ~1 nat/token of rounding (measured before the fix); the float32 bound is the reference
    torch.manual_seed(0)
    cfg = dict(family="diffusion_lm", vocab_size=512, mask_id=1, seq_len=32, embed_dim=128)
    model = build_model({**cfg, "hidden_dim": 64, "n_blocks": 1, "n_heads": 2}).eval()
    x0, u = torch.randint(2, 512, (8, 32)), torch.rand(8, 32)
    for level in (0.001, 0.05):
        t = torch.full((8,), level)
        with torch.no_grad():
            ref = model.bound_terms(x0, t, u)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                low = model.bound_terms(x0, t, u)
        assert (low["diffusion"] - ref["diffusion"]).abs().max().item() / 32 < 1e-3, level
