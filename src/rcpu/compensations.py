"""The compensations a pruned sublayer can get, behind one registry.

Each entry turns (the sublayer's weight W, its input statistics, the kept input columns K)
into new kept columns and possibly an output-bias increment. The maths lives in
:mod:`rcpu.compensate`; this module only says which formula each name means, what it
needs (a Gram matrix, held-out statistics) and how it reports. The pipeline asks
:data:`COMPENSATIONS` and never branches on a name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import compensate as comp
from .errors import RcpuError
from .report import release_free_memory
from .stats import InputStats

if TYPE_CHECKING:
    from .config import PruneConfig


@dataclass
class Problem:
    """One sublayer to compensate: ``weight`` (d_out x d_in) with input statistics ``stats``
    (with the Gram matrix where the compensation needs one), the kept input columns,
    held-out statistics (ridge-auto) and streamed rotation products (no Gram matrix)."""

    weight: torch.Tensor
    stats: InputStats
    kept: torch.Tensor
    cfg: PruneConfig
    heldout: InputStats | None = None
    products: comp.DirectProducts | None = None

    def kept_columns(self) -> torch.Tensor:
        return self.weight[:, self.kept.to(self.weight.device)].clone()


@dataclass(frozen=True)
class Compensation:
    """A named compensation: ``solve`` and what it needs."""

    name: str
    solve: Callable[[Problem], comp.Compensated]
    needs_gram: bool = False  #: solve reads the Gram matrix of the inputs
    adds_bias: bool = False  #: the result carries an output bias (o_proj / down_proj gain one)
    rotation: bool = False  #: RCPU's Procrustes family (needs min(d_out, |K|) calibration tokens)


def _none(p: Problem) -> comp.Compensated:
    return comp.Compensated(p.kept_columns())


def _bias(p: Problem) -> comp.Compensated:
    return comp.Compensated(p.kept_columns(), bias=comp.bias_shift(p.weight, p.stats, p.kept))


def _ridge_auto(p: Problem) -> comp.Compensated:
    """Ridge with the lambda of ``cfg.ridge_grid`` that reconstructs held-out calibration
    windows best (their own Gram matrix), never evaluation text."""
    cfg = p.cfg
    path = comp.ridge_path(p.weight, p.stats.gram, p.kept, list(cfg.ridge_grid), relative=cfg.ridge_lambda_relative)
    cands = [c for c in path if c is not None]  # a lambda whose system is not positive definite is skipped
    labels = [f"{lam:g}" for lam, c in zip(cfg.ridge_grid, path, strict=True) if c is not None]
    if not cands:
        raise RcpuError(f"ridge: the kept Gram matrix is not positive definite for any lambda of "
                        f"{', '.join(f'{lam:g}' for lam in cfg.ridge_grid)}; use larger --ridge_grid values or more "
                        "calibration tokens")
    held = p.heldout
    rows, y2 = comp.row_errors(p.weight, held.gram, p.kept, [c.weight for c in cands])
    errs = [float(r.sum()) / y2 for r in rows]
    result = cands[min(range(len(errs)), key=errs.__getitem__)]
    result.info.update({"lambda_auto": True, "heldout_tokens": held.n,
                        "heldout_errors": dict(zip(labels, errs, strict=True))})
    skipped = [f"{lam:g}" for lam, c in zip(cfg.ridge_grid, path, strict=True) if c is None]
    if skipped:
        result.info["lambdas_skipped"] = skipped
    return result


def _ridge(p: Problem) -> comp.Compensated:
    if p.cfg.ridge_lambda == "auto":
        return _ridge_auto(p)
    try:
        return comp.ridge(p.weight, p.stats.gram, p.kept, float(p.cfg.ridge_lambda),
                          relative=p.cfg.ridge_lambda_relative)
    except ValueError as exc:
        raise RcpuError(str(exc)) from None


def _rotation(scale: bool) -> Callable[[Problem], comp.Compensated]:
    def solve(p: Problem) -> comp.Compensated:
        if p.products is not None:  # streamed in a pass of their own (no Gram matrix)
            products = p.products.products()
        else:
            products = comp.rotation_products(p.weight, p.stats.gram, p.kept, dtype=getattr(torch, p.cfg.rotation_dtype))
        # the rotation reports its own errors and needs nothing more of the Gram matrix: free
        # it before the SVD (at 13B MLP widths it is the largest buffer of the layer)
        p.stats.gram = None
        release_free_memory()
        return comp.rotation_solve(p.weight, p.kept, products, scale=scale, n_tokens=p.stats.n)
    return solve


#: name -> compensation; ``PruneConfig.compensation`` chooses one
COMPENSATIONS: dict[str, Compensation] = {c.name: c for c in (
    Compensation("none", _none),
    Compensation("bias", _bias, adds_bias=True),  # FLAP
    Compensation("ridge", _ridge, needs_gram=True),
    Compensation("rotation", _rotation(False), needs_gram=True, rotation=True),  # RCPU
    Compensation("rotation_scale", _rotation(True), needs_gram=True, rotation=True),  # RCPU Rot.+Scale
)}


def starved(kind: str, d_out: int, n_kept: int, n_tokens: int) -> bool:
    """A rotation with fewer calibration tokens than it needs: it falls back to the kept
    columns as they are, without products or an SVD (known before any statistic is collected)."""
    return COMPENSATIONS[kind].rotation and n_tokens < comp.rotation_tokens_needed(d_out, n_kept)


def needs_gram(kind: str, d_out: int, n_kept: int, n_tokens: int) -> bool:
    """Whether compensating with ``kind`` reads the Gram matrix."""
    return COMPENSATIONS[kind].needs_gram and not starved(kind, d_out, n_kept, n_tokens)


def compensate(kind: str, problem: Problem) -> comp.Compensated:
    """Solve ``problem`` with compensation ``kind``; the result's info records the method and
    the relative output error before and after on the calibration tokens."""
    weight, stats, kept = problem.weight, problem.stats, problem.kept
    if starved(kind, weight.shape[0], len(kept), stats.n):
        result = comp.starved_rotation(weight, kept, stats.n)
    else:
        result = COMPENSATIONS[kind].solve(problem)
    result.info["method"] = kind
    if stats.gram is not None and "rel_error" not in result.info:  # the rotation reports its own
        before, after = comp.reconstruction_errors(weight, stats.gram, kept,
                                                   [weight[:, kept.to(weight.device)], result.weight])
        result.info["rel_error_uncompensated"], result.info["rel_error"] = before, after
    return result
