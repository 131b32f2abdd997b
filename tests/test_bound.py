"""The NELBO on a toy model against exact enumeration (issue: likelihood-bound perplexity)."""

import itertools
import math

import torch

from faircalib.eval import likelihood_bound
from faircalib.models import MDLM, MDLMConfig
from faircalib.models.objective import nelbo_per_sequence

L = 3
MASK = 3


def toy_model() -> MDLM:
    torch.manual_seed(0)
    model = MDLM(
        MDLMConfig(
            vocab_size=4, mask_id=MASK, seq_len=L, hidden_dim=16, n_heads=2, n_blocks=1, cond_dim=8
        )
    )
    with torch.no_grad():  # random everything, so predictions depend on context
        for p in model.parameters():
            p.normal_(0, 0.7)
    return model.eval()


def masked_nll(model: MDLM, x0: torch.Tensor, masked: tuple[int, ...]) -> list[float]:
    x_t = x0.clone()
    x_t[list(masked)] = MASK
    log_probs = model.log_probs(x_t[None], torch.zeros(1))[0]
    return [-log_probs[pos, x0[pos]].item() for pos in masked]


def analytic_nelbo(model: MDLM, x0: torch.Tensor) -> float:
    """sum over masks m of Beta(|m|, L-|m|+1) * sum_{l in m} -log p(x0_l | x_m)."""
    total = 0.0
    for k in range(1, L + 1):
        beta = math.gamma(k) * math.gamma(L - k + 1) / math.gamma(L + 1)
        for masked in itertools.combinations(range(L), k):
            total += beta * sum(masked_nll(model, x0, masked))
    return total


def order_log_likelihoods(model: MDLM, x0: torch.Tensor) -> list[float]:
    """log P_sigma(x0) of unmasking in order sigma, for every order."""
    out = []
    for order in itertools.permutations(range(L)):
        nll = sum(masked_nll(model, x0, order[k:])[0] for k in range(L))
        out.append(-nll)
    return out


@torch.no_grad()
def test_nelbo_matches_enumeration_and_bounds_exact_nll():
    model = toy_model()
    for x0 in ([0, 1, 2], [2, 2, 0], [1, 0, 1]):
        x0 = torch.tensor(x0)
        nelbo = analytic_nelbo(model, x0)
        logs = torch.tensor(order_log_likelihoods(model, x0), dtype=torch.float64)
        # the NELBO is the any-order autoregressive NLL averaged over orders ...
        assert abs(nelbo - (-logs.mean().item())) < 1e-4
        # ... and the model's exact NLL (random-order generation = mixture over orders) is below it
        exact_nll = -(torch.logsumexp(logs, 0) - math.log(len(logs))).item()
        assert exact_nll <= nelbo + 1e-9
        assert nelbo - exact_nll > 1e-4  # strict for a context-dependent model


@torch.no_grad()
def test_monte_carlo_estimator_is_unbiased():
    model = toy_model()
    x0 = torch.tensor([0, 1, 2])
    n = 20000
    gen = torch.Generator().manual_seed(1)
    t = torch.rand(n, generator=gen)
    u = torch.rand(n, L, generator=gen)
    est = nelbo_per_sequence(model, x0.expand(n, L), t, u).double()
    mean, se = est.mean().item(), est.std().item() / math.sqrt(n)
    assert abs(mean - analytic_nelbo(model, x0)) < 4 * se


@torch.no_grad()
def test_common_random_numbers_make_identical_models_agree_exactly():
    model = toy_model()
    seqs = torch.randint(0, 3, (16, L), generator=torch.Generator().manual_seed(2))
    a = likelihood_bound(model, seqs, n_bytes=48, mc_samples=2, seed=5, progress=False)
    b = likelihood_bound(model, seqs, n_bytes=48, mc_samples=2, seed=5, progress=False)
    c = likelihood_bound(model, seqs, n_bytes=48, mc_samples=2, seed=6, progress=False)
    assert a.ppl == b.ppl
    assert a.ppl != c.ppl
    assert a.ci95[0] < a.ppl < a.ci95[1]
    assert abs(a.bits_per_byte - a.nll_per_token * a.tokens / (math.log(2) * 48)) < 1e-9
