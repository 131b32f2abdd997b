"""PLANNER: the latent prior's bound against a Gaussian's exact entropy, the decoder term
against explicit left-to-right decoding, the frontier, and the CLI paths on planner-tiny."""

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
from faircalib.frontier.samplers import SamplerConfig, generate
from faircalib.models import build_model

V, L = 40, 12


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    cfg = dict(family="planner", vocab_size=V, mask_id=1, seq_len=16, embed_dim=8)
    sizes = dict(hidden_dim=32, plan_dim=32, n_blocks=2, n_heads=2, n_latents=2, latent_dim=4)
    return build_model({**cfg, **sizes}).eval()


def test_latent_prior_bound_is_tight_for_gaussian_codes_with_the_optimal_denoiser():
    # codes z ~ N(0, s^2 I): the optimal noise prediction is sigma z_t / (alpha^2 s^2 + sigma^2)
    # and the bound's expectation must sit just above the exact entropy 0.5 log(2 pi e s^2)
    model, s = tiny(), 0.7
    sch = model.schedule

    def optimal(z_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a, sig = sch.alpha(t)[:, None, None], sch.sigma(t)[:, None, None]
        return sig * z_t / (a**2 * s**2 + sig**2)

    model.denoise_eps = optimal
    n, t0 = 20000, model.cfg.t_min
    z = s * torch.randn(n, 2, 4, generator=torch.Generator().manual_seed(0))
    t = t0 + (1 - t0) * (torch.arange(n) + 0.5) / n
    keys = torch.arange(n) * 7 + 1
    with torch.no_grad():
        terms = model.prior_terms(z, t, keys)
    bound = sum(terms.values()).double().mean().item() / 8  # per dimension
    exact = 0.5 * math.log(2 * math.pi * math.e * s**2)
    assert exact - 0.02 < bound < exact + 0.03  # MC error ~0.01; the t0 decoder's gap ~0.005


def test_decoder_term_equals_explicit_left_to_right_likelihood():
    model = tiny()
    x0, t, u = torch.randint(2, V, (2, L)), torch.rand(2), torch.rand(2, L)
    codes = torch.randn(2, 2, 4)
    with torch.no_grad():
        teacher = model.decode_log_probs(x0, codes).gather(-1, x0[..., None]).squeeze(-1)
        explicit = []
        for pos in range(L):  # position pos sees only x0[:, :pos] (any filler after it)
            filler = torch.full((2, L - pos), 5)
            lp = model.decode_log_probs(torch.cat([x0[:, :pos], filler], 1), codes)[:, pos]
            explicit.append(lp.gather(-1, x0[:, pos : pos + 1]).squeeze(-1))
        terms = model.bound_terms(x0, t, u)
    assert torch.allclose(teacher, torch.stack(explicit, 1), atol=1e-5)
    nelbo = model.nelbo(x0, t, u)
    prior = terms["diffusion"] + terms["prior"] + terms["latent_recon"]
    assert torch.allclose(nelbo, terms["decoder"] + prior - terms["entropy"])
    # the entropy of q(z | x) = N(enc(x), s^2 I) against its Monte Carlo estimate
    s, dims = model.cfg.latent_noise, 8
    eps = torch.randn(50000, dims, dtype=torch.float64)
    mc = -(torch.distributions.Normal(0.0, s).log_prob(s * eps)).sum(-1).mean().item()
    assert terms["entropy"][0].item() == pytest.approx(mc, abs=0.05)


def test_log_probs_are_the_decoders_given_the_denoised_plan():
    model = tiny()
    x, t = torch.randint(2, V, (2, L)), torch.tensor([0.2, 0.9])
    with torch.no_grad():
        lp = model.log_probs(x, t)
        h, ctx = model.stem(x, t)
        assert torch.equal(model.stem(x, t)[0], h)  # keyed noise: one draw per (x, t)
    assert torch.isneginf(lp[..., 1]).all()
    assert ctx.tensors["batch_memory"].shape == (2, 2, 32)


def test_sampler_frontier_is_where_the_decoded_text_stops_changing():
    model = tiny()
    prompt = torch.randint(2, V, (2, 2))
    cfg = SamplerConfig(steps=5, gen_length=6)
    res = generate(model, prompt, cfg, seed=1, record_states=True)
    assert torch.equal(res.tokens, generate(model, prompt, cfg, seed=1).tokens)
    assert torch.equal(res.tokens[:, :2], prompt)
    written = sorted(p for s in res.trace.steps for p in s.positions[1])
    assert written == list(range(2, 8))
    # the final text is the greedy decoding of the last plan: re-decode it explicitly
    first = res.beliefs[-1]
    assert torch.equal(first, res.tokens[:, 2:])
    for k in range(cfg.steps):  # a position written at step k keeps its token from then on
        for i, step_positions in enumerate(res.trace.steps[k].positions):
            for p in step_positions:
                assert (res.beliefs[k:, i, p - 2] == res.tokens[i, p]).all()
    assert len(res.states) == cfg.steps and res.states[0][0].shape == (2, 8)


def test_unconditional_decoding_starts_from_bos_alone(capsys):
    # an empty prompt: the first token's distribution is the decoder's at position 0 (BOS
    # only), each later one sees the tokens written before it; and the CLI writes G tokens
    model, plan = tiny(), torch.randn(2, 2, 4)
    with torch.no_grad():
        tokens, lps = model.greedy_decode(torch.zeros(2, 0, dtype=torch.long), plan, 3)
        assert tokens.shape == (2, 3) and lps.shape == (2, 3, V)
        for pos in range(3):
            filler = torch.full((2, 3 - pos), 5)
            lp = model.decode_log_probs(torch.cat([tokens[:, :pos], filler], 1), plan)[:, pos]
            assert torch.allclose(lps[:, pos], lp, atol=1e-5)
            assert torch.equal(tokens[:, pos], lp.argmax(-1))
    assert main(["generate", "planner-tiny", "--gen-length", "4", "--steps", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(len(s["positions"][0]) for s in out["trace"]["steps"]) == 4


def test_engine_quantizes_the_decoder_and_the_prior_blocks():
    tokens = torch.randint(2, V, (8, 16))
    for config in (RTNConfig(bits=4, group_size=32), GPTQConfig(bits=4, group_size=32)):
        q, ref = tiny(), tiny()
        report = quantize(q, config, tokens, CalibConfig(n_samples=8, seq_len=16), progress=False)
        assert len(report.layers) == 16  # 4 linears x (2 prior + 2 decoder blocks)
        assert [r["layer"] for r in report.layers[:4]] == [
            f"prior_blocks.0.{n}" for n in ("attn_qkv", "attn_out", "mlp.0", "mlp.2")
        ]
        for block in (*q.prior_blocks, *q.blocks):
            assert all(isinstance(m, FakeQuantLinear) for _, m in q.quantizable_linears(block))
        # the prior's input, time and output layers stay in float, like every stem and head
        assert torch.equal(q.prior_out[1].weight, ref.prior_out[1].weight)
        assert torch.equal(q.prior_in.weight, ref.prior_in.weight)
        x, t = torch.randint(2, V, (2, 16)), torch.rand(2)
        with torch.no_grad():
            diff = (q.log_probs(x, t).exp() - ref.log_probs(x, t).exp()).abs().max()
        assert 0 < diff < 0.5


def test_shipped_model_cli_paths(tmp_path, capsys):
    model = hub.load("planner-tiny")
    assert model.family == "planner"
    assert main(["eval", "planner-tiny", "--data", "wikitext2", "--limit", "2", "--json"]) == 0
    assert math.isfinite(json.loads(capsys.readouterr().out)["bits_per_byte"])
    gen = ["generate", "planner-tiny", "--prompt", "The", "--gen-length", "6", "--steps", "4"]
    assert main([*gen, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sum(len(s["positions"][0]) for s in out["trace"]["steps"]) == 6
    for method in ("rtn", "gptq"):
        q = tmp_path / method
        args = ["quantize", "planner-tiny", "--method", method, "--nsamples", "4"]
        assert main([*args, "--seq-len", "32", "--out", str(q), "--json"]) == 0
        capsys.readouterr()
        assert main(["eval", str(q), "--data", "wikitext2", "--limit", "2", "--json"]) == 0
        assert math.isfinite(json.loads(capsys.readouterr().out)["bits_per_byte"])
