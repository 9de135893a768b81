"""Selection that knows the compensation: greedy OBS-style removal of input columns.

For one linear sublayer y = W x with Gram matrix G = X X^T, dropping a set D of input
columns and re-fitting the kept ones K by least squares leaves the error

    E(D) = min_B ||W X - B X_K||_F^2 = tr(W_D S W_D^T),   S = G_DD - G_DK G_KK^-1 G_KD,

the Schur complement of the kept block (equivalently S = ((G^-1)_DD)^-1). A score
computed before compensation ignores that the kept columns absorb part of a dropped
column's contribution; ranking by E does not. Exact subset search is combinatorial, so
units (single columns, or blocks such as the head_dim columns of one attention head)
are removed greedily, cheapest first, as in OBS, SparseGPT, ZipLM and SlimGPT: with
H = G^-1 and the current, already compensated weight W, removing unit u costs

    tr(W_u (H_uu)^-1 W_u^T)

and the rest of W and H are updated by a rank-|u| downdate, so every step is exact and
the costs add up to E of the final set. A ridge penalty lam ||B - W_K||^2 is the same
problem on G + lam I (it equals least squares on data augmented with sqrt(lam) I), so
the weights left at the end are exactly ridge compensation of the kept columns.

Everything runs in float64 and knows nothing about transformers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class GreedyResult:
    """Kept columns (ascending), the removed units in removal order, the compensated
    kept columns (d_out x |K|) and the error: ``error`` is the sum of step costs on the
    regularised Gram, i.e. ||W X - B X_K||^2 + lam ||B - W_K||^2 + lam ||W_D||^2."""

    kept: torch.Tensor
    removed_units: list[int]
    weight: torch.Tensor
    error: float
    costs: list[float] = field(default_factory=list)


def regularised_gram(gram: torch.Tensor, lam: float, relative: bool = True) -> tuple[torch.Tensor, float]:
    """G + lam' I in float64 with lam' = lam * tr(G) / d_in when ``relative`` (ridge's scale)."""
    g = gram.double()
    lam_abs = lam * float(torch.trace(g) / g.shape[0]) if relative else float(lam)
    return g + lam_abs * torch.eye(g.shape[0], dtype=g.dtype, device=g.device), lam_abs


def _inverse(g: torch.Tensor) -> torch.Tensor:
    chol, info = torch.linalg.cholesky_ex(g)
    if int(info) != 0:
        raise ValueError("the (regularised) Gram matrix is not positive definite; use a larger lambda")
    return torch.cholesky_inverse(chol)


def greedy_remove(weight: torch.Tensor, gram: torch.Tensor, units: torch.Tensor, *, n_remove: int | None = None,
                  groups: torch.Tensor | None = None, per_group: int | None = None, lam: float = 0.0,
                  relative: bool = True, block: int = 1) -> GreedyResult:
    """Greedily remove units (rows of ``units``: equal-sized sets of input columns) with
    the smallest post-compensation error.

    Either ``n_remove`` units in total, or exactly ``per_group`` units from every group
    (``groups[u]`` = group of unit u; used to keep GQA groups equal). With single-column
    units, ``block`` > 1 removes the ``block`` cheapest columns per step with one block
    downdate (fewer passes over H; each step's cost is still exact for what it removes).
    Ties go to the lower unit index.
    """
    w = weight.detach().double().clone()
    g_reg, _ = regularised_gram(gram.to(w.device), lam, relative)
    h = _inverse(g_reg)
    del g_reg
    units = units.to(w.device).long()
    n_units, size = units.shape
    active = torch.ones(n_units, dtype=torch.bool, device=w.device)
    if groups is not None:
        groups = groups.to(w.device)
        n_groups = int(groups.max()) + 1
        need = torch.full((n_groups,), int(per_group or 0), dtype=torch.long, device=w.device)
        total = int(need.sum())
    else:
        total = int(n_remove or 0)
    if not 0 <= total <= n_units:
        raise ValueError(f"cannot remove {total} of {n_units} units")
    removed: list[int] = []
    costs: list[float] = []
    while len(removed) < total:
        allowed = active if groups is None else active & (need[groups] > 0)
        cand = allowed.nonzero().squeeze(1)
        if size == 1:
            cols = units[cand, 0]
            cost = w[:, cols].square().sum(0) / torch.diagonal(h)[cols].clamp_min(1e-300)
        else:
            idx = units[cand]                                      # (c, s)
            h_uu = h[idx[:, :, None], idx[:, None, :]]             # (c, s, s)
            w_u = w[:, idx].permute(1, 0, 2)                        # (c, d_out, s)
            chol = torch.linalg.cholesky(h_uu)
            sol = torch.cholesky_solve(w_u.transpose(1, 2), chol)  # (c, s, d_out)
            cost = (w_u.transpose(1, 2) * sol).sum((1, 2))
        take = 1 if (size > 1 or groups is not None) else min(block, total - len(removed))
        order = torch.argsort(cost, stable=True)[:take]
        chosen = cand[order]
        cols = units[chosen].reshape(-1)
        h_cc = h[cols][:, cols]
        chol = torch.linalg.cholesky(h_cc)
        w_c = w[:, cols]
        step = float((w_c * torch.cholesky_solve(w_c.T, chol).T).sum())
        h_c = h[cols]                                               # (|c|, d_in)
        sol_h = torch.cholesky_solve(h_c, chol)                     # H_cc^-1 H_c,:
        w -= w_c @ sol_h
        h -= h_c.T @ sol_h
        w[:, cols] = 0.0
        h[cols, :] = 0.0
        h[:, cols] = 0.0
        h[cols, cols] = 1.0  # keeps the removed diagonal harmless; those units are inactive
        active[chosen] = False
        if groups is not None:
            need[groups[chosen]] -= 1
        removed += chosen.tolist()
        costs.append(step)
    dropped = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
    if removed:
        dropped[units[torch.tensor(removed, device=w.device)].reshape(-1)] = True
    kept = (~dropped).nonzero().squeeze(1)
    return GreedyResult(kept.cpu(), removed, w[:, kept].to(weight.dtype), float(sum(costs)), costs)


def removal_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, lam: float = 0.0,
                  relative: bool = True) -> float:
    """E(D) = tr(W_D S W_D^T) with S the Schur complement of the kept block of G + lam' I:
    the least-squares error left after compensating the kept columns (direct formula)."""
    g, _ = regularised_gram(gram, lam, relative)
    w = weight.double().to(g.device)
    kept = kept.to(g.device)
    dropped = torch.ones(g.shape[0], dtype=torch.bool, device=g.device)
    dropped[kept] = False
    g_kk, g_kd, g_dd = g[kept][:, kept], g[kept][:, dropped], g[dropped][:, dropped]
    schur = g_dd - g_kd.T @ torch.linalg.solve(g_kk, g_kd)
    w_d = w[:, dropped]
    return float(((w_d @ schur) * w_d).sum())


def _running_max(x: torch.Tensor) -> torch.Tensor:
    return torch.cummax(x, 0).values if x.numel() else x


def allocation_scores(weight: torch.Tensor, gram: torch.Tensor, units: torch.Tensor, unit_params: float, *,
                      n_remove: int, lam: float, relative: bool = True, block: int = 1,
                      groups: torch.Tensor | None = None, norm: float = 1.0) -> torch.Tensor:
    """One score per removable unit of a sublayer for error-based global allocation: the
    post-compensation error each greedy removal step adds, per parameter it frees and
    divided by ``norm`` (the energy of the residual stream the sublayer writes into), made
    non-decreasing along the removal order so that any threshold removes a prefix of it.
    Lower = cheaper to remove.

    Without ``groups``: ``n_remove`` rows of ``units`` are removed greedily (single columns
    ``block`` at a time, a block's cost shared by its columns) and the result has one score
    per row. With ``groups`` (query heads under GQA, ``groups[h]`` = KV group of head h):
    ``n_remove`` heads are removed from every group, and allocation unit j (the j-th head
    of every group) gets the summed cost of removal steps j*G ... (j+1)*G - 1, G groups;
    the result has one score per head of a group. Units beyond ``n_remove`` get +inf: they
    are never offered for removal.
    """
    if groups is not None:
        n_groups = int(groups.max()) + 1
        n_units = units.shape[0] // n_groups
    else:
        n_units = units.shape[0]
    out = torch.full((n_units,), float("inf"), dtype=torch.float64)
    if n_remove <= 0:
        return out
    if groups is not None:
        res = greedy_remove(weight, gram, units, groups=groups, per_group=n_remove, lam=lam, relative=relative)
        costs = torch.tensor(res.costs, dtype=torch.float64).reshape(n_remove, n_groups).sum(1)
    else:
        res = greedy_remove(weight, gram, units, n_remove=n_remove, lam=lam, relative=relative, block=block)
        step = block if units.shape[1] == 1 else 1
        sizes = [min(step, n_remove - i) for i in range(0, n_remove, step)]
        costs = torch.cat([torch.full((size,), cost / size, dtype=torch.float64)
                           for size, cost in zip(sizes, res.costs, strict=True)])
    out[:n_remove] = _running_max(costs.clamp_min(0) / (unit_params * max(norm, 1e-300)))
    return out
