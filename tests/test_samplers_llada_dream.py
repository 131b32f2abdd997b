"""LLaDA's classifier-free guidance and Dream's orders (maskgit_plus, topk_margin, entropy,
alg_temp) on a stub model whose distributions are written by hand, so every expected commit
below is derived on paper."""

import math

import pytest
import torch
from torch import nn

from faircalib.errors import ConfigError
from faircalib.frontier import SamplerConfig, generate
from faircalib.frontier.samplers import dream_transfer_count, guided
from faircalib.models.base import subs_log_probs

MASK = 5  # tokens 0-4 are real


def log(p: list[float]) -> list[float]:
    return [math.log(v) if v > 0 else float("-inf") for v in p] + [float("-inf")]  # + [MASK]


# per generated position, over tokens 0-4: X has the top probability, Y the largest top-1 minus
# top-2 margin, Z the lowest entropy (0.777 nats, vs X 0.91 and Y 1.45)
X = [0.5, 0.45, 0.05 / 3, 0.05 / 3, 0.05 / 3]  # top 0.50, margin 0.05
Y = [0.45, 0.1375, 0.1375, 0.1375, 0.1375]  # top 0.45, margin 0.3125
Z = [0.49, 0.49, 0.02, 0.0, 0.0]  # top 0.49, margin 0


class Stub(nn.Module):
    """log p(x_0 | x_t) from fixed tables: `cond` when the prompt is visible, `uncond` when it is
    masked (what classifier-free guidance feeds). Records every input batch."""

    def __init__(self, cond: list[list[float]], uncond: list[list[float]] | None = None):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(1))  # where the samplers put their tensors
        self.vocab_size, self.mask_id, self.seq_len = MASK + 1, MASK, 16
        prompt_rows = [[0.0] * 6] * 2  # 2 prompt tokens, always committed
        self.cond = torch.tensor(prompt_rows + [log(p) for p in cond])  # [L, V]
        self.uncond = torch.tensor(prompt_rows + [log(p) for p in (uncond or cond)])
        self.inputs: list[torch.Tensor] = []

    @property
    def device(self) -> torch.device:
        return self.anchor.device

    def log_probs(self, x: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        self.inputs.append(x.clone())
        prompt_masked = (x[:, :2] == MASK).all(-1)[:, None, None]  # [B, 1, 1]
        return subs_log_probs(torch.where(prompt_masked, self.uncond, self.cond), x, MASK)


PROMPT = torch.tensor([[0, 1]])


def commits(res) -> list[list[int]]:
    """Generated-region positions written at each step (row 0)."""
    return [[p - 2 for p in step.positions[0]] for step in res.trace.steps]


def test_dream_transfer_counts_follow_the_hand_derived_grid():
    # grid = linspace(1, 1e-3, 5) = 1, .75025, .5005, .25075, .001; 8 masks:
    # int(8 x .24975) = 1, int(7 x .33289) = 2, int(5 x .49900) = 2, then the last 3
    grid = torch.linspace(1, 1e-3, 5)
    left, counts = 8, []
    for k in range(4):
        masked = torch.ones(2, left, dtype=torch.bool)  # two rows, `left` masks each
        counts.append(dream_transfer_count(masked, grid[k], grid[k + 1], last=k == 3))
        left -= counts[-1]
    assert counts == [1, 2, 2, 3]


@pytest.mark.parametrize("sampler,first", [("maskgit_plus", 0), ("topk_margin", 1), ("entropy", 2)])
def test_each_dream_order_commits_its_own_most_confident_position(sampler, first):
    # 3 masks on linspace(1, 1e-3, 4) = 1, .667, .3337, .001: int(3 x .333) = 0 at step 0,
    # int(3 x .4997) = 1 at step 1, the last 2 at step 2
    cfg = SamplerConfig(sampler=sampler, steps=3, gen_length=3)
    res = generate(Stub([X, Y, Z]), PROMPT, cfg, seed=0)
    assert commits(res)[0] == [] and commits(res)[1] == [first]
    assert sorted(commits(res)[2]) == sorted({0, 1, 2} - {first})
    assert res.tokens[0, 2:].tolist() == [0, 0, 0]  # greedy proposals: token 0 (Z: first of a tie)


def test_alg_temp_draws_positions_in_proportion_to_softmax_of_confidence():
    alg_temp, runs = 0.05, 600
    confidence = torch.tensor([max(X), max(Y), max(Z)])  # maskgit_plus: the top probability
    expected = torch.softmax(confidence.double() / alg_temp, 0)  # .49, .18, .33
    cfg = SamplerConfig(sampler="maskgit_plus", steps=3, gen_length=3, alg_temp=alg_temp)
    stub = Stub([X, Y, Z])
    picks = torch.zeros(3)
    for seed in range(runs):
        picks[commits(generate(stub, PROMPT, cfg, seed=seed))[1][0]] += 1
    freq = picks / runs
    sigma = (expected * (1 - expected) / runs).sqrt()
    assert ((freq - expected).abs() < 4 * sigma).all(), (freq, expected)


def test_guidance_on_log_probs_equals_llada_guidance_on_logits():
    g = torch.Generator().manual_seed(0)
    cond_logits, uncond_logits = torch.randn(2, 3, 7, generator=g).unbind(0)
    for scale in (0.5, 1.0, 3.0):
        ours = guided(cond_logits.log_softmax(-1), uncond_logits.log_softmax(-1), scale)
        llada = uncond_logits + (scale + 1) * (cond_logits - uncond_logits)  # LLaDA generate()
        assert torch.allclose(ours, llada.log_softmax(-1), atol=1e-6)
    one_hot = torch.tensor([[0.0, float("-inf"), float("-inf")]])
    assert torch.equal(guided(one_hot, one_hot, 2.0), one_hot)  # committed positions stay put


def test_cfg_feeds_the_prompt_masked_and_commits_the_guided_argmax():
    # cond prefers token 0 (.40 vs .35); uncond .60 vs .10. Guided with scale 1 in log space:
    # token 0: 2 ln .40 - ln .60 = -1.32, token 1: 2 ln .35 - ln .10 = +0.20 -> token 1
    cond = [[0.40, 0.35, 0.15, 0.05, 0.05]] * 2
    uncond = [[0.60, 0.10, 0.10, 0.10, 0.10]] * 2
    cfg = SamplerConfig(steps=2, gen_length=2)
    assert generate(Stub(cond, uncond), PROMPT, cfg, seed=0).tokens[0, 2:].tolist() == [0, 0]
    stub = Stub(cond, uncond)
    res = generate(stub, PROMPT, SamplerConfig(steps=2, gen_length=2, cfg_scale=1.0), seed=0)
    assert res.tokens[0, 2:].tolist() == [1, 1]
    first = stub.inputs[0]  # [2, L]: the sequence, then the sequence with its prompt masked
    assert first[0, :2].tolist() == [0, 1] and first[1, :2].tolist() == [MASK, MASK]
    assert torch.equal(first[0, 2:], first[1, 2:])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"sampler": "entropy", "block_length": 2},
        {"sampler": "maskgit_plus", "eps": 0.0},
        {"sampler": "topk_margin", "alg_temp": -1.0},
        {"cfg_scale": -0.5},
    ],
)
def test_bad_sampler_settings_are_refused(kwargs):
    with pytest.raises(ConfigError):
        SamplerConfig(steps=4, gen_length=4, **kwargs).validate()
