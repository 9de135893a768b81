"""Importance scores of the input channels of o_proj / down_proj.

Pure functions of the weight W (d_out x d_in, y = W x) and the streaming input
statistics; higher means more important. Formulas follow the RCPU paper, its
reference code and FLAP; see README "Methods".
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .stats import InputStats

ScoreFn = Callable[[torch.Tensor, InputStats], torch.Tensor]


#: rows of W converted to float64 at a time by :func:`_column_sums`
_ROWS = 256


def _column_sums(weight: torch.Tensor, power: int) -> torch.Tensor:
    """sum_i |w_ij|^power per column j, in float64, a block of rows at a time: a float64
    copy of a 13B down_proj (5120 x 13824) would add 540 MiB beside its Gram matrix."""
    w = weight.detach()
    total = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
    for start in range(0, w.shape[0], _ROWS):
        block = w[start:start + _ROWS].double()
        total += block.abs().sum(0) if power == 1 else block.square().sum(0)
    return total


def _column_norms(weight: torch.Tensor) -> torch.Tensor:
    return _column_sums(weight, 2).sqrt()


def magnitude(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """||w_j||_2: data-free column norm."""
    return _column_norms(weight)


def wanda_sp(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Wanda-sp as in the RCPU reference code: ||w_j||_1 * mean_t |x_jt|."""
    return _column_sums(weight, 1).to(stats.mean_abs.device) * stats.mean_abs


def fluctuation(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """FLAP's WIFV: sample variance of x_j times ||w_j||_2^2."""
    return stats.var_sample * _column_sums(weight, 2).to(stats.sum.device)


def rcpu_variance(weight: torch.Tensor, stats: InputStats, activation_norm: str = "mean_abs") -> torch.Tensor:
    """RCPU's variance-aware score gamma_j = ||w_j||_2 * a_j * Var_t(x_j).

    ``activation_norm`` picks a_j: "mean_abs" (mean_t |x_jt|, the reference code and
    our default) or "l2" (||x_j||_2, the paper's text). They can rank differently.
    """
    if activation_norm == "mean_abs":
        a = stats.mean_abs
    elif activation_norm == "l2":
        a = stats.l2
    else:
        raise ValueError(f"unknown activation_norm {activation_norm!r}")
    return _column_norms(weight).to(a.device) * a * stats.var_population


def rcpu_variance_l2(weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    return rcpu_variance(weight, stats, activation_norm="l2")


SCORES: dict[str, ScoreFn] = {
    "magnitude": magnitude,
    "wanda-sp": wanda_sp,
    "fluctuation": fluctuation,
    "rcpu": rcpu_variance,
    "rcpu-l2": rcpu_variance_l2,
}


def channel_scores(name: str, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Score of every input channel of ``weight`` with the named score (float64)."""
    try:
        fn = SCORES[name]
    except KeyError:
        raise ValueError(f"unknown score {name!r}; choose from {sorted(SCORES)}") from None
    return fn(weight, stats).double()


def group_scores(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """Sum consecutive channels into units (e.g. head_dim channels per head)."""
    return scores.reshape(-1, group_size).sum(-1)
