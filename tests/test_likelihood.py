"""LLaDA's conditional log-likelihood estimator and our conditional bound, against exact
enumeration on a toy model and hand-derived cases."""

import itertools

import pytest
import torch

from faircalib import hub
from faircalib.data.tokenizers import EOS
from faircalib.errors import DataError
from faircalib.eval.likelihood import (
    conditional_bound,
    conditional_log_likelihood,
    encode_pair,
    fit_context,
    greedy_match,
    random_subsets,
    rolling_windows,
    stratified_counts,
)
from faircalib.models import MDLM, MDLMConfig

torch.set_num_threads(1)
MASK = 3


def toy_model(seed: int = 0) -> MDLM:
    torch.manual_seed(seed)
    model = MDLM(
        MDLMConfig(
            vocab_size=4, mask_id=MASK, seq_len=4, hidden_dim=16, n_heads=2, n_blocks=1, cond_dim=8
        )
    )
    with torch.no_grad():  # random everything, so predictions depend on context
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.eval()


def exact_expectation(model: MDLM, ctx: list[int], cont: list[int]) -> float:
    """-E[loss] of LLaDA's estimator by enumeration: l uniform in 1..C, then a uniform subset
    of l continuation positions, loss = C / l * sum of -log p over the subset."""
    n, c = len(ctx), len(cont)
    x0 = torch.tensor(ctx + cont)
    total = 0.0
    for size in range(1, c + 1):
        subsets = list(itertools.combinations(range(c), size))
        for subset in subsets:
            x = x0.clone()
            x[[n + i for i in subset]] = MASK
            lp = model.log_probs(x[None], torch.tensor([size / c]))[0]
            nll = sum(-lp[n + i, cont[i]].item() for i in subset)
            total += (1 / c) * (1 / len(subsets)) * (c / size) * nll
    return -total


def test_stratified_counts_by_hand():
    assert stratified_counts(3, 4, 4).tolist() == [3, 4, 1, 2]  # 3 4 5 6 wrapped into 1..4
    # 2 + [0, 2.5, 5, 7.5] = 2, 4.5, 7, 9.5 -> half to even: 2, 4, 7, 10
    assert stratified_counts(2, 10, 4).tolist() == [2, 4, 7, 10]
    # 9, 11.5, 14, 16.5 -> 9, 12, 14, 16 -> wrapped: 9, 2, 4, 6
    assert stratified_counts(9, 10, 4).tolist() == [9, 2, 4, 6]
    masks = random_subsets(torch.tensor([1, 3, 5]), 5, torch.Generator().manual_seed(0))
    assert masks.sum(-1).tolist() == [1, 3, 5]


@torch.no_grad()
def test_both_estimators_converge_to_the_enumerated_value():
    model = toy_model()
    ctx, cont = [1], [0, 2, 1]
    exact = exact_expectation(model, ctx, cont)
    # batch of 3 = C: each batch's counts are a permutation of 1..3, so every draw's count is
    # uniform and LLaDA's estimate is unbiased
    llada = conditional_log_likelihood(model, ctx, cont, mc_samples=3000, batch_size=3, seed=1)
    # the continuous-time NELBO has the same expectation (Beta weights = LLaDA's count weights)
    ours = conditional_bound(model, ctx, cont, mc_samples=20000, seed=1)
    # spread over 10 seeds: 0.7% (LLaDA, 3000 draws) and 1.2% (ours, 20000: its 1/t weight
    # makes the small-t draws heavy); the tolerances are about 3.5 standard deviations
    assert llada == pytest.approx(exact, rel=0.025)
    assert ours == pytest.approx(exact, rel=0.04)
    again = conditional_log_likelihood(model, ctx, cont, mc_samples=30, batch_size=3, seed=1)
    assert again == conditional_log_likelihood(
        model, ctx, cont, mc_samples=30, batch_size=3, seed=1
    )
    assert again != conditional_log_likelihood(
        model, ctx, cont, mc_samples=30, batch_size=3, seed=2
    )


@torch.no_grad()
def test_single_token_answer_is_exact_and_greedy_check_matches_argmax():
    model = toy_model(1)
    lp = model.log_probs(torch.tensor([[1, 2, MASK]]), torch.ones(1))[0, 2]  # [V]
    for token in range(3):
        est = conditional_log_likelihood(model, [1, 2], [token], mc_samples=5, seed=7)
        assert est == pytest.approx(lp[token].item(), rel=1e-5)  # every draw masks the token
        assert greedy_match(model, [1, 2], [token]) == (token == int(lp.argmax()))


@torch.no_grad()
def test_guidance_matches_the_formula_on_log_probs():
    model = toy_model(2)
    scale = 1.5
    cond = model.log_probs(torch.tensor([[1, 2, MASK]]), torch.ones(1))[0, 2]
    uncond = model.log_probs(torch.tensor([[MASK, MASK, MASK]]), torch.ones(1))[0, 2]
    finite = torch.isfinite(cond)
    mixed = (uncond + (scale + 1) * (cond - uncond))[finite]
    expected = (mixed - torch.logsumexp(mixed, 0))[0].item()  # token 0 is a finite entry
    est = conditional_log_likelihood(model, [1, 2], [0], mc_samples=1, cfg_scale=scale)
    assert est == pytest.approx(expected, rel=1e-5)


def test_rolling_windows_predict_every_token_once():
    windows = rolling_windows(list(range(10)), prefix=99, seq_len=4)
    assert windows == [
        ([99], [0, 1, 2]),
        ([2], [3, 4, 5]),
        ([5], [6, 7, 8]),
        ([6, 7, 8], [9]),  # the last window gets as much context as fits
    ]
    assert rolling_windows([5, 6], prefix=99, seq_len=4) == [([99], [5, 6])]
    assert rolling_windows([5, 6], prefix=None, seq_len=4) == [([], [5, 6])]


def test_pair_encoding_and_context_fitting():
    tok = hub.load_tokenizer("mdlm-tiny")
    ctx, cont = encode_pair(tok, "The cat ", "sat")
    assert ctx == tok.encode("The cat").ids  # the trailing space moves to the continuation
    assert tok.decode(cont) == " sat"
    assert encode_pair(tok, "", "Hello")[0] == [tok.token_to_id(EOS)]
    assert fit_context([1, 2, 3, 4, 5], [6, 7], 4) == [4, 5]
    assert fit_context([1, 2], [6, 7], 4) == [1, 2]
    with pytest.raises(DataError, match="more than the model's length 4"):
        fit_context([1], [1, 2, 3, 4, 5], 4)


def test_bad_pairs_raise_clear_errors():
    model = toy_model()
    with pytest.raises(DataError, match="continuation to score is empty"):
        conditional_log_likelihood(model, [1], [])
    with pytest.raises(DataError, match="exceed the model's length 4"):
        conditional_log_likelihood(model, [1, 2, 0], [1, 2])
    with pytest.raises(DataError, match="mask token id 3"):
        conditional_bound(model, [MASK], [1])
