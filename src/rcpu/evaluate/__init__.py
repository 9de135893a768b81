"""Evaluation of (pruned) models."""

from .perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
