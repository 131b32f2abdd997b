"""Evaluation: the likelihood-bound perplexity and report writers."""

from faircalib.eval.bound import BoundResult, likelihood_bound

__all__ = ["BoundResult", "likelihood_bound"]
