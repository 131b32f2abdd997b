"""Write-frontier samplers, trace and flip metrics on the shipped mdlm-tiny (issue: frontier)."""

import copy
import json
import math

import pytest
import torch

from faircalib import hub
from faircalib.cli import main
from faircalib.errors import ConfigError, DataError
from faircalib.frontier import (
    SamplerConfig,
    compare_generations,
    distinct_n,
    generate,
    repetition_rate,
)
from faircalib.frontier.samplers import filter_log_probs, plan_transfers


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: a second thread only adds contention on the shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model():
    return hub.load("mdlm-tiny")


@pytest.fixture(scope="module")
def prompt():
    ids = hub.load_tokenizer("mdlm-tiny").encode("The history of the city").ids
    return torch.tensor([ids, ids])  # [2, P]


def perturbed(model, rel: float = 0.3, seed: int = 1):
    """A copy with Gaussian noise of `rel` x each weight's std (a stand-in for quantization)."""
    other = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=gen) * p.std() * rel)
    return other


@pytest.mark.parametrize(
    "sampler,temperature", [("low_confidence", 0.0), ("random", 1.0), ("ancestral", 1.0)]
)
def test_committed_tokens_never_change(model, prompt, sampler, temperature):
    cfg = SamplerConfig(
        sampler=sampler, steps=16, gen_length=32, block_length=16, temperature=temperature
    )
    res = generate(model, prompt, cfg, seed=3, record_states=True)
    assert len(res.states) == 16 and len(res.committed) == 16
    inputs = [x for x, _ in res.states] + [res.tokens]
    for k in range(16):
        before, after = inputs[k], inputs[k + 1]
        was = before != model.mask_id  # [B, L]
        assert torch.equal(after[was], before[was])  # committed tokens unchanged
        assert torch.equal(res.committed[k], after != model.mask_id)
        assert bool((res.committed[k] | ~was).all())  # committed set only grows
    assert torch.equal(res.tokens[:, : prompt.shape[1]], prompt)
    assert int((res.tokens == model.mask_id).sum()) == 0


def test_low_confidence_commits_planned_count_inside_block(model, prompt):
    cfg = SamplerConfig(steps=12, gen_length=32, block_length=16)
    plan = plan_transfers(cfg)
    assert plan == [3, 3, 3, 3, 2, 2] * 2  # 16 tokens over 6 steps per block, remainder first
    res = generate(model, prompt, cfg, seed=0)
    p = prompt.shape[1]
    for k, step in enumerate(res.trace.steps):
        block_start = p + (k // 6) * 16
        for row in range(2):
            assert len(step.positions[row]) == plan[k]
            assert all(block_start <= pos < block_start + 16 for pos in step.positions[row])
            assert int(res.frontier(k)[row].sum()) == plan[k]
            # trace values are probabilities / entropies within their ranges
            assert all(0.0 < q <= 1.0 + 1e-6 for q in step.top1_prob[row])
            assert all(-1e-6 <= m <= 1.0 for m in step.margin[row])
            assert all(0.0 <= e <= math.log(model.vocab_size) + 1e-4 for e in step.entropy[row])


def test_low_confidence_picks_highest_confidence(model, prompt):
    """At step 0 the committed positions' top-1 probability is >= that of every other position."""
    cfg = SamplerConfig(steps=16, gen_length=32)
    res = generate(model, prompt, cfg, seed=0, record_states=True)
    x0, t0 = res.states[0]
    with torch.no_grad():
        conf = model.log_probs(x0, t0)[:, prompt.shape[1] :].exp().amax(-1)  # [B, G]
    for row in range(2):
        chosen = [pos - prompt.shape[1] for pos in res.trace.steps[0].positions[row]]
        others = [i for i in range(32) if i not in chosen]
        assert conf[row, chosen].min() >= conf[row, others].max() - 1e-6


def test_same_seed_bit_identical_and_seed_matters(model, prompt):
    cfg = SamplerConfig(steps=16, gen_length=32, temperature=1.0, top_p=0.9)
    a = generate(model, prompt, cfg, seed=7)
    b = generate(model, prompt, cfg, seed=7)
    c = generate(model, prompt, cfg, seed=8)
    assert torch.equal(a.tokens, b.tokens)
    assert a.trace.to_dict() == b.trace.to_dict()
    assert (a.tokens != c.tokens).float().mean().item() > 0.1


def test_ancestral_unmasks_everything_on_grid(model, prompt):
    cfg = SamplerConfig(sampler="ancestral", steps=16, gen_length=32, temperature=1.0)
    res = generate(model, prompt, cfg, seed=0, record_states=True)
    assert int((res.tokens == model.mask_id).sum()) == 0
    grid = [t[0].item() for _, t in res.states]
    assert grid == pytest.approx([1 - k / 16 for k in range(16)], abs=1e-6)
    # tokens revealed per step average (a_s - a_t)/(1 - a_t) of those left: 2 per row per step
    counts = [int(res.frontier(k).sum()) for k in range(16)]
    assert sum(counts) == 64 and max(counts) < 20


def test_temperature_zero_equals_top_k_one(model, prompt):
    for sampler in ("low_confidence", "ancestral"):
        greedy = SamplerConfig(sampler=sampler, steps=16, gen_length=32, block_length=8)
        top1 = SamplerConfig(
            sampler=sampler, steps=16, gen_length=32, block_length=8, temperature=1.5, top_k=1
        )
        a = generate(model, prompt, greedy, seed=5)
        b = generate(model, prompt, top1, seed=5)
        assert torch.equal(a.tokens, b.tokens)


def test_flip_rate_zero_for_identical_and_positive_for_perturbed(model, prompt):
    cfg = SamplerConfig(steps=16, gen_length=32, temperature=1.0)
    same = compare_generations(model, copy.deepcopy(model), prompt, cfg, seed=0)
    assert same["flip_rate"] == 0.0 and same["exact_match_rate"] == 1.0
    assert same["first_divergence_step"] == [None, None]
    assert all(r == 0.0 for r in same["flip_rate_by_step"])
    other = perturbed(model)
    diff = compare_generations(model, other, prompt, cfg, seed=0)
    assert diff["flip_rate"] > 0.05
    assert diff["token_agreement"] == pytest.approx(1 - diff["flip_rate"])
    assert diff["exact_match_rate"] == 0.0
    first = diff["first_divergence_step"]
    assert all(s is not None and 0 <= s < 16 for s in first)
    assert diff["mean_first_divergence_step"] == pytest.approx(sum(first) / 2)
    assert len(diff["flip_rate_by_step"]) == 16 and max(diff["flip_rate_by_step"]) > 0.0


def test_random_sampler_positions_depend_only_on_noise(model, prompt):
    """Common random numbers: the random sampler writes the same positions for any model."""
    cfg = SamplerConfig(sampler="random", steps=16, gen_length=32, temperature=1.0)
    a = generate(model, prompt, cfg, seed=2)
    b = generate(perturbed(model), prompt, cfg, seed=2)
    for k in range(16):
        assert torch.equal(a.frontier(k), b.frontier(k))


def test_filter_log_probs_top_k_top_p():
    lp = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert torch.isfinite(filter_log_probs(lp, 2, None)).sum().item() == 2
    assert torch.isfinite(filter_log_probs(lp, None, 0.6)).sum().item() == 2  # 0.5 < 0.6 <= 0.8
    assert torch.isfinite(filter_log_probs(lp, None, 0.4)).sum().item() == 1
    assert torch.isfinite(filter_log_probs(lp, None, 1.0)).sum().item() == 4


def test_repetition_and_distinct():
    rows = [[1, 2, 3, 4, 1, 2, 3, 4], [5, 6, 7, 8, 9, 10, 11, 12]]
    # row 0: 5 four-grams, 4 distinct -> 0.2 repeated; row 1: none repeated
    assert repetition_rate(torch.tensor(rows), n=4) == pytest.approx(0.1)
    assert distinct_n(rows, 1) == pytest.approx((4 / 8 + 8 / 8) / 2)
    with pytest.raises(ConfigError, match="at least n=9"):
        distinct_n(rows, 9)


def test_bad_requests_raise(model, prompt):
    with pytest.raises(ConfigError, match="exceeds"):
        generate(model, prompt, SamplerConfig(gen_length=128), seed=0)
    with pytest.raises(ConfigError, match="must divide"):
        generate(model, prompt, SamplerConfig(gen_length=32, block_length=12), seed=0)
    with pytest.raises(ConfigError, match="multiple of the number of blocks"):
        generate(model, prompt, SamplerConfig(gen_length=32, block_length=8, steps=6), seed=0)
    with pytest.raises(DataError, match="mask token"):
        generate(model, torch.tensor([[5, model.mask_id]]), SamplerConfig(gen_length=8), seed=0)


def test_generate_cli_json(capsys):
    rc = main(
        [
            "generate",
            "mdlm-tiny",
            "--prompt",
            "The river",
            "--gen-length",
            "32",
            "--steps",
            "16",
            "--block-length",
            "16",
            "--num-samples",
            "2",
            "--json",
        ]
    )
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"texts", "tokens", "trace", "stats"}
    assert out["stats"]["generated_tokens"] == 2 * 32 and out["stats"]["row_fraction"] == 1.0
    assert len(out["texts"]) == 2 and all(isinstance(t, str) for t in out["texts"])
    assert len(out["tokens"]) == 2 and len(out["tokens"][0]) == len(out["tokens"][1])
    assert len(out["trace"]["steps"]) == 16
    assert sum(len(s["positions"][0]) for s in out["trace"]["steps"]) == 32
    assert main(["generate", "mdlm-tiny", "--prompt", "x", "--gen-length", "200"]) == 2
