"""Mechanism metrics (stabilization lag, post-commit mismatch) and the Stage-I position prior,
on a hand-built model whose beliefs are known exactly, plus sanity properties on mdlm-tiny."""

import pytest
import torch
from torch import nn

from faircalib import hub
from faircalib.errors import ConfigError
from faircalib.frontier import SamplerConfig, compare_generations, generate, position_prior
from faircalib.frontier.beliefs import belief_trajectories, commit_steps, masked_stage
from faircalib.frontier.beliefs import sample_positions as pairs_of
from faircalib.frontier.metrics import mechanism_metrics, stabilization_lags
from faircalib.frontier.prior import combine_prior, frontier_reliability
from faircalib.models.base import BlockContext, DiffusionLM

MASK, N_TOKENS = 6, 6  # tokens 0..5, then the mask
A, F, C, D, E = 1, 2, 3, 4, 5
# Generated position -> number of OTHER committed generated positions -> (token, probability).
# The rest of the mass is spread evenly over the other five tokens.
TABLE = {
    0: {0: (A, 0.9), 1: (F, 0.8), 2: (F, 0.8)},
    1: {0: (D, 0.5), 1: (D, 0.6), 2: (D, 0.7)},
    2: {0: (C, 0.4), 1: (C, 0.5), 2: (E, 0.7)},
}
PROMPT = torch.tensor([[0], [0]])  # two runs of one prompt token; 3 generated positions
CFG = SamplerConfig(steps=3, gen_length=3)  # low_confidence, greedy: one commit per step


class TableLM(DiffusionLM):
    """A masked position's distribution depends only on how many other generated positions are
    committed (TABLE); committed positions are one-hot (SUBS). Hand derivation with CFG:
    step 0 commits g0 = A (0.9 > 0.5 > 0.4); step 1 commits g1 = D (0.6 > C's 0.5); step 2
    commits g2 = E. Final sequence A D E."""

    vocab_size, mask_id, seq_len = N_TOKENS + 1, MASK, 4

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList()
        self.anchor = nn.Parameter(torch.zeros(1))  # gives the model a device

    def stem(self, x_t, t):
        return x_t.float().unsqueeze(-1), BlockContext()

    def head(self, h, ctx, x_t):
        b, seq = x_t.shape
        probs = torch.zeros(b, seq, self.vocab_size)
        masked = x_t == MASK
        for row in range(b):
            for i in range(seq):
                if not masked[row, i]:
                    probs[row, i, x_t[row, i]] = 1.0
                    continue
                others = int((~masked[row, 1:]).sum())  # generated positions are 1..3
                token, p = TABLE[i - 1][others]
                probs[row, i, :N_TOKENS] = (1 - p) / (N_TOKENS - 1)
                probs[row, i, token] = p
        return probs.log()

    def quantizable_linears(self, block):
        return []

    def config_dict(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls()


@pytest.fixture(scope="module")
def table_run():
    model = TableLM()
    return model, generate(model, PROMPT, CFG, seed=0, trace=False, record_states=True)


def test_table_model_generates_the_hand_derived_sequence(table_run):
    _, res = table_run
    assert res.tokens.tolist() == [[0, A, D, E]] * 2
    assert commit_steps(res).tolist() == [[0, 1, 2]] * 2


def test_belief_trajectories_match_the_hand_derivation(table_run):
    """g0 (committed at 0): A while masked, A with g1, g2 masked, then F once another position is
    committed. g1 (at 1): D throughout. g2 (at 2): C, C, then E."""
    model, res = table_run
    pairs = torch.tensor([[0, 0], [1, 1], [0, 2]])
    for batch_rows in (1, 16):  # one row per forward or all at once: same beliefs
        traj = belief_trajectories(
            model, res, masked_stage(model, res), pairs, batch_rows=batch_rows
        )
        assert traj.tolist() == [[A, A, F, F], [D, D, D, D], [C, C, E, E]]
    lags = stabilization_lags(traj, torch.tensor([0, 1, 2]))
    assert lags.tolist() == [2, -1, 0]  # settles at 2 / 0 / 2, committed at 0 / 1 / 2


def test_mechanism_metrics_on_the_table_model(table_run):
    model, res = table_run
    m = mechanism_metrics(model, res, max_positions=64)  # all six (row, position) pairs
    assert m["stabilization_lag"] == pytest.approx(2 / 3)  # (2 + 0 + 0) / 3 per row
    assert m["late_stabilization_rate"] == pytest.approx(1 / 3)  # g0 only
    assert m["post_commit_mismatch"] == pytest.approx(1 / 3)  # g0: F at the end, A committed


def test_position_subset_is_seeded_and_shared(table_run):
    model, res = table_run
    assert pairs_of(2, 3, 64, seed=0).tolist() == [[r, p] for r in range(2) for p in range(3)]
    pick = pairs_of(2, 3, 1, seed=4)
    assert torch.equal(pick, pairs_of(2, 3, 1, seed=4)) and pick.shape == (1, 2)
    m = mechanism_metrics(model, res, max_positions=1, seed=4)
    g = int(pick[0, 1])
    assert m["stabilization_lag"] == [2.0, 0.0, 0.0][g]  # the one drawn position's lag
    assert m["post_commit_mismatch"] == [1.0, 0.0, 0.0][g]
    with pytest.raises(ConfigError, match="max_positions"):
        mechanism_metrics(model, res, max_positions=0)


def test_position_prior_components_and_formula():
    """phi = 1 / (c + 1) (each run writes a position once): 1, 1/2, 1/3. rho = mean teacher
    probability of the final token over the masked steps: g0 0.9; g1 (0.5 + 0.6) / 2; g2 puts
    E at (1 - 0.4) / 5, (1 - 0.5) / 5, then 0.7."""
    model = TableLM()
    phi, rho = frontier_reliability(model, PROMPT, CFG, seed=0)
    assert phi.tolist() == pytest.approx([1.0, 0.5, 1 / 3])
    assert rho.tolist() == pytest.approx([0.9, 0.55, (0.12 + 0.1 + 0.7) / 3])
    fragility = torch.tensor([1.0 * 0.1, 0.5 * 0.45, (1 / 3) * (1 - 0.92 / 3)])
    for temperature, floor in ((1.0, 0.1), (0.5, 0.0), (4.0, 0.3)):
        share = fragility ** (1 / temperature) / (fragility ** (1 / temperature)).sum()
        expected = floor + (1 - floor) * 3 * share
        prior = position_prior(model, PROMPT, CFG, 0, temperature=temperature, floor=floor)
        assert prior.tolist() == pytest.approx(expected.tolist(), rel=1e-5)
        assert float(prior.mean()) == pytest.approx(1.0)


def test_combine_prior_edge_cases():
    phi = torch.tensor([1.0, 0.5])
    assert combine_prior(phi, torch.ones(2)).tolist() == [1.0, 1.0]  # nothing fragile: uniform
    one_sided = combine_prior(phi, torch.tensor([1.0, 0.0]), floor=0.25)
    assert one_sided.tolist() == pytest.approx([0.25, 1.75])
    with pytest.raises(ConfigError, match="temperature"):
        combine_prior(phi, phi, temperature=0.0)
    with pytest.raises(ConfigError, match="floor"):
        combine_prior(phi, phi, floor=1.5)


# --- mdlm-tiny -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # tiny matmuls on a shared 2-core machine
    model = hub.load("mdlm-tiny")
    ids = hub.load_tokenizer("mdlm-tiny").encode("The history of the city").ids
    return model, torch.tensor([ids, ids[::-1]])


def test_float_model_against_itself_has_no_flips_and_equal_mechanism_metrics(tiny):
    model, prompt = tiny
    cfg = SamplerConfig(steps=8, gen_length=16)
    res = compare_generations(model, model, prompt, cfg, seed=0, max_positions=12)
    assert res["flip_rate"] == 0.0 and res["mechanism_positions"] == 12
    for key in ("stabilization_lag", "late_stabilization_rate", "post_commit_mismatch"):
        assert res[f"{key}_a"] == res[f"{key}_b"], key
    assert 0.0 <= res["stabilization_lag_a"] <= cfg.steps
    for key in ("late_stabilization_rate_a", "post_commit_mismatch_a"):
        assert 0.0 <= res[key] <= 1.0
    # the same numbers as mechanism_metrics on that generation, over the same positions
    own = generate(model, prompt, cfg, 0, trace=False, record_states=True)
    direct = mechanism_metrics(model, own, max_positions=12, seed=0)
    assert all(res[f"{key}_a"] == value for key, value in direct.items())
    off = compare_generations(model, model, prompt, cfg, seed=0, max_positions=0)
    assert off["stabilization_lag_a"] is None and off["post_commit_mismatch_b"] is None
    assert off["flip_rate"] == 0.0 and off["mechanism_positions"] == 0
    with pytest.raises(ConfigError, match="max_positions"):
        compare_generations(model, model, prompt, cfg, seed=0, max_positions=-1)


def test_greedy_beliefs_at_commit_are_the_committed_tokens(tiny):
    """Under greedy low-confidence sampling a position's belief at its commit step is what the
    sampler wrote; the trajectory's masked stage must reproduce the sampler exactly."""
    model, prompt = tiny
    res = generate(model, prompt, SamplerConfig(steps=8, gen_length=16), 1, record_states=True)
    pairs = pairs_of(2, 16, 32, seed=0)
    traj = belief_trajectories(model, res, masked_stage(model, res), pairs)
    commit = commit_steps(res)[pairs[:, 0], pairs[:, 1]]
    at_commit = traj[torch.arange(len(pairs)), commit]
    assert torch.equal(at_commit, res.tokens[:, prompt.shape[1] :][pairs[:, 0], pairs[:, 1]])
