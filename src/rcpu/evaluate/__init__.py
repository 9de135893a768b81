"""Evaluation of (pruned) models: perplexity, zero-shot accuracy (lm-eval), speed."""

from .perplexity import PerplexityResult, perplexity
from .speed import SpeedComparison, SpeedStats, compare_speed
from .streamed import perplexity_streamed
from .zeroshot import PAPER_TASKS, ZeroShotResult, zero_shot

__all__ = ["PAPER_TASKS", "PerplexityResult", "SpeedComparison", "SpeedStats", "ZeroShotResult", "compare_speed",
           "perplexity", "perplexity_streamed", "zero_shot"]
