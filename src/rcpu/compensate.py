"""Compensation of the kept input columns of a pruned linear layer.

Notation: y = W x with W (d_out x d_in); K kept and D dropped input channels;
G = X X^T the Gram matrix of the calibration inputs (N tokens). Y = W X is the
output before pruning and Z = W_K X_K the output of the kept part. Everything
needed is a function of W and G, so no activation is stored:

    Y Z^T = W G[:, K] W_K^T      ||Z||_F^2 = tr(W_K G[K, K] W_K^T)

The rotation needs only M = Y Z^T, ||Y||^2 and ||Z||^2 once K is known, which
:class:`DirectProducts` streams from a second pass instead (no d_in x d_in Gram matrix).

All solves run in float64 (configurable for the rotation) and return new weights
in the input's dtype. The functions know nothing about transformers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .stats import InputStats, _accumulate

logger = logging.getLogger(__name__)


def rotation_tokens_needed(d_out: int, n_kept: int) -> int:
    """Fewest calibration tokens for which RCPU's rotation is determined by the data: Q W_K
    is pinned down only on range(Z), whose dimension is at most the token count, and it must
    reach min(d_out, |K|) (the rank of W_K for real weights). Known before any statistic is
    collected, so a run with fewer tokens skips the Gram matrix, its products and the SVD."""
    return min(d_out, n_kept)


def starved_rotation(weight: torch.Tensor, kept: torch.Tensor, n_tokens: int) -> Compensated:
    """The documented fallback of a rotation with fewer than :func:`rotation_tokens_needed`
    calibration tokens: W_K kept as it is, and the reason recorded."""
    needed = rotation_tokens_needed(weight.shape[0], len(kept))
    info = {"fallback": "none", "rank_needed": needed,
            "reason": f"rank-deficient target ({n_tokens} calibration tokens < {needed} needed)"}
    return Compensated(weight[:, kept.to(weight.device)].clone(), info=info)


@dataclass
class Compensated:
    """New kept columns (d_out x |K|), an optional output-bias increment, and a log."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    info: dict = field(default_factory=dict)


#: rows / columns of G per block in the blocked products below (bounds their temporaries)
_CHUNK = 512


def _blocks(n: int, device: torch.device) -> list[torch.Tensor]:
    return [torch.arange(s, min(s + _CHUNK, n), device=device) for s in range(0, n, _CHUNK)]


def _wg(w: torch.Tensor, g: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor,
        w_cols: torch.Tensor | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W' @ G[rows][:, cols]`` in ``dtype`` (default G's), where W' is ``w`` (its columns
    matching ``rows``, all of G's rows if None) or ``w[:, w_cols]``. W and G are converted
    and gathered one block of rows at a time, so no full-precision copy of W or of G and no
    copy of a large block of G is ever made: at 13B MLP widths each would be over a GiB."""
    dtype = dtype or g.dtype
    n = g.shape[0] if rows is None else len(rows)
    out = torch.zeros(w.shape[0], len(cols), dtype=dtype, device=g.device)
    for block in _blocks(n, g.device):
        g_rows = block if rows is None else rows[block]
        w_block = w[:, block] if w_cols is None else w[:, w_cols[block]]
        out.addmm_(w_block.to(dtype), g[g_rows[:, None], cols[None, :]].to(dtype))
    return out


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) without the elementwise temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _column_blocks(w: torch.Tensor, g: torch.Tensor, kept: torch.Tensor, dtype: torch.dtype):
    """Per block of G's columns: W G[:, cols] and W[:, cols] in ``dtype``, and
    each column's position in K (-1 for a dropped one). The one pass over G that both the
    least-squares and the rotation products make."""
    pos = torch.full((g.shape[0],), -1, dtype=torch.long, device=g.device)
    pos[kept] = torch.arange(len(kept), device=g.device)
    for cols in _blocks(g.shape[0], g.device):
        yield _wg(w, g, None, cols, dtype=dtype), w[:, cols].to(dtype), pos[cols]


def _gram_products(w: torch.Tensor, g: torch.Tensor, kept: torch.Tensor, with_energy: bool = True,
                   per_row: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W G)[:, K] and tr(W G W^T) = ||W X||^2 in G's dtype, one block of G's columns at a time
    (with ``per_row``, the diagonal of W G W^T: each output's energy)."""
    wg_k = torch.empty(w.shape[0], len(kept), dtype=g.dtype, device=g.device)
    y2 = torch.zeros(w.shape[0] if per_row else (), dtype=g.dtype, device=g.device) if with_energy else None
    for part, w_cols, where in _column_blocks(w, g, kept, g.dtype):
        if with_energy:
            y2 += (part * w_cols).sum(1) if per_row else _dot(part, w_cols)
        sel = where >= 0
        if bool(sel.any()):
            wg_k[:, where[sel]] = part[:, sel]
    return wg_k, y2


def _quadratic(b: torch.Tensor, g: torch.Tensor, kept: torch.Tensor, b_cols: torch.Tensor | None = None,
               dtype: torch.dtype | None = None, per_row: bool = False) -> torch.Tensor:
    """tr(B G[K, K] B^T) = ||B X_K||^2 in ``dtype`` (default G's), in blocks; B's columns
    match K, and B = ``b[:, b_cols]`` when ``b_cols`` is given (without forming that copy).
    With ``per_row``, the diagonal of B G[K, K] B^T instead (each output's energy)."""
    dtype = dtype or g.dtype
    total = torch.zeros(b.shape[0] if per_row else (), dtype=dtype, device=g.device)
    for block in _blocks(len(kept), g.device):
        b_block = b[:, block] if b_cols is None else b[:, b_cols[block]]
        part = _wg(b, g, kept, kept[block], b_cols, dtype)
        total += (part * b_block.to(dtype)).sum(1) if per_row else _dot(part, b_block.to(dtype))
    return total


def reconstruction_errors(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor,
                          candidates: list[torch.Tensor]) -> list[float]:
    """||Y - B X_K||_F^2 / ||Y||_F^2 for each B in ``candidates``, from the Gram matrix
    alone; W G and ||Y||^2 are formed once for all candidates."""
    rows, y2 = row_errors(weight, gram, kept, candidates)
    return [float(r.sum() / y2) for r in rows]


def row_errors(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor,
               candidates: list[torch.Tensor]) -> tuple[list[torch.Tensor], float]:
    """Per output row, ||Y_i - B_i X_K||^2 for each B in ``candidates`` (float64 vectors), and
    ||Y||_F^2; the errors of :func:`reconstruction_errors` are the sums of these."""
    w = weight.double()
    g = gram.to(w.device).double()
    kept = kept.to(w.device)
    wg_k, y2_rows = _gram_products(w, g, kept, per_row=True)
    y2 = max(float(y2_rows.sum()), torch.finfo(torch.float64).tiny)
    out = []
    for b in candidates:
        b = b.to(w.device).double()
        out.append(y2_rows - 2 * (wg_k * b).sum(1) + _quadratic(b, g, kept, per_row=True))
    return out, y2


def reconstruction_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor,
                         new_kept: torch.Tensor) -> float:
    """||Y - B X_K||_F^2 / ||Y||_F^2 for B = new_kept."""
    return reconstruction_errors(weight, gram, kept, [new_kept])[0]


def bias_shift(weight: torch.Tensor, stats: InputStats, kept: torch.Tensor) -> torch.Tensor:
    """FLAP's baseline bias: W_D mean(x_D), the average output of the dropped inputs."""
    dropped = torch.ones(weight.shape[1], dtype=torch.bool)
    dropped[kept.cpu()] = False
    dropped = dropped.to(weight.device)
    mean = stats.mean.to(weight.device)
    return (weight.double()[:, dropped] @ mean[dropped]).to(weight.dtype)


#: diagonal jitters tried, relative to the mean diagonal of G[K, K], when a ridge system is not
#: numerically positive definite (a singular Gram matrix at lambda 0, or the float32 rounding of
#: the per-batch products, which with outlier channels can exceed a small lambda)
_JITTERS = (1e-10, 1e-8, 1e-6, 1e-4)


def ridge_path(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, lams: list[float],
               relative: bool = True) -> list[Compensated | None]:
    """argmin_B ||Y - B X_K||^2 + lam ||B - W_K||^2 = (W G[:,K] + lam W_K)(G[K,K] + lam I)^-1
    for every lam in ``lams`` (the shared products are formed once).

    With ``relative`` the penalty is lam * tr(G) / d_in (the mean squared activation
    times N), so one lam works across layers, models and calibration sizes. Solved
    with a float64 Cholesky factorisation, never an explicit inverse.

    A system that is not numerically positive definite gets the smallest jitter of
    ``_JITTERS`` that makes it so (recorded as ``jitter``, with a warning); where none does,
    that lambda's entry is None (callers with one lambda raise, the held-out choice skips it).
    """
    w = weight.double()
    g = gram.to(w.device).double()
    kept = kept.to(w.device)
    scale = float(torch.trace(g) / g.shape[0]) if relative else 1.0
    g_kk = g[kept[:, None], kept[None, :]]
    w_k = w[:, kept]
    wg_k = _gram_products(w, g, kept, False)[0]
    mean_diag = max(float(torch.diagonal(g_kk).mean()), 1e-30)

    def factor(shift: float) -> tuple[torch.Tensor, torch.Tensor]:
        a = g_kk.clone()
        a.diagonal().add_(shift)
        return torch.linalg.cholesky_ex(a)

    results: list[Compensated | None] = []
    for lam in lams:
        lam_abs = lam * scale
        jitter = 0.0
        chol, info = factor(lam_abs)
        for rel in _JITTERS:
            if int(info) == 0:
                break
            jitter = rel * mean_diag
            chol, info = factor(lam_abs + jitter)
        if int(info) != 0:
            logger.warning("ridge: lambda %g: the kept Gram matrix is not positive definite even with jitter %.3g",
                           lam, jitter)
            results.append(None)
            continue
        if jitter:
            logger.warning("ridge: lambda %g: the kept Gram matrix is not numerically positive definite; "
                           "added jitter %.3g (%.0e of its mean diagonal)", lam, jitter, jitter / mean_diag)
        new = torch.cholesky_solve((wg_k + lam_abs * w_k).T, chol).T
        results.append(Compensated(new.to(weight.dtype), info={"lambda": lam, "lambda_abs": lam_abs,
                                                               "lambda_relative": relative, "jitter": jitter}))
    return results


def ridge(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, lam: float,
          relative: bool = True) -> Compensated:
    """Ridge compensation for one lam; see :func:`ridge_path`."""
    result = ridge_path(weight, gram, kept, [lam], relative)[0]
    if result is None:
        raise ValueError(f"ridge: the kept Gram matrix is not positive definite at lambda {lam:g}; "
                         "use a larger --ridge_lambda")
    return result


def procrustes(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Orthogonal Q maximising tr(Q^T M) (= argmin ||Y - Q Z|| for M = Y Z^T), and M's
    singular values."""
    u, s, vh = torch.linalg.svd(m)
    return u @ vh, s


@dataclass
class RotationProducts:
    """What the rotation needs from the Gram matrix: M = Y Z^T (d_out x d_out), ||Y||^2 and
    ||Z||^2. Once formed, the Gram matrix can be freed before the SVD."""

    m: torch.Tensor
    y2: float
    z2: float


def rotation_products(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, *,
                      dtype: torch.dtype = torch.float64) -> RotationProducts:
    """M = (W G)[:, K] W_K^T, ||Y||^2 and ||Z||^2 = tr(W_K G_KK W_K^T),
    accumulated one block of G's columns at a time: no d_out x |K| product and no
    full-precision copy of W is held (at 13B MLP widths each is about half a GiB)."""
    g = gram.to(weight.device)  # any dtype: blocks are converted to ``dtype`` on the fly
    kept = kept.to(weight.device)
    d_out = weight.shape[0]
    m = torch.zeros(d_out, d_out, dtype=dtype, device=weight.device)
    y2 = torch.zeros((), dtype=dtype, device=g.device)
    for part, w_cols, where in _column_blocks(weight, g, kept, dtype):
        y2 += _dot(part, w_cols)
        sel = where >= 0
        if bool(sel.all()):
            m.addmm_(part, w_cols.T)
        elif bool(sel.any()):
            m.addmm_(part[:, sel], w_cols[:, sel].T)
    y2 = float(y2)
    z2 = float(_quadratic(weight, g, kept, b_cols=kept, dtype=dtype))
    return RotationProducts(m, max(y2, torch.finfo(dtype).tiny), z2)


def _times_wt(x: torch.Tensor, weight: torch.Tensor, cols: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (or x[:, cols] @ W[:, cols]^T) in float32 for float32 rows x of W's inputs,
    W converted and x's columns gathered one block at a time (no float32 copy of W)."""
    n_cols = weight.shape[1] if cols is None else len(cols)
    out = torch.zeros(x.shape[0], weight.shape[0], dtype=torch.float32, device=x.device)
    for block in _blocks(n_cols, x.device):
        idx = block if cols is None else cols[block]
        out.addmm_(x[:, idx], weight[:, idx].to(torch.float32).T)
    return out


def _squared_norm(t: torch.Tensor) -> float:
    v = t.reshape(-1).double()
    return float(v.dot(v))


class DirectProducts:
    """:class:`RotationProducts` streamed from a sublayer's inputs once the kept set K is known:
    each batch X gives Y = W X and Z = W_K X_K (float32), and M += Y Z^T (float32 products
    added into a float64 total, like the Gram matrix), ||Y||^2, ||Z||^2. It needs a second
    pass over the calibration batches but never a d_in x d_in Gram matrix, and costs
    N (d_in + |K| + d_out) d_out per token instead of N d_in^2 plus the Gram products
    (about d_out |K| (d_in + d_out + |K|)): the cheaper route for wide MLPs and few tokens
    (a 13B down_proj's Gram matrix is 1.46 GiB in float64)."""

    def __init__(self, weight: torch.Tensor, kept: torch.Tensor, dtype: torch.dtype = torch.float64):
        self.weight, self.kept = weight, kept.to(weight.device)
        self.m = torch.zeros(weight.shape[0], weight.shape[0], dtype=dtype, device=weight.device)
        self.y2 = self.z2 = 0.0
        self.n = 0
        self.seconds = 0.0  # the pass's wall time, set by its caller

    def update(self, x: torch.Tensor) -> None:
        x32 = x.detach().reshape(-1, self.weight.shape[1]).to(device=self.weight.device, dtype=torch.float32)
        y, z = _times_wt(x32, self.weight), _times_wt(x32, self.weight, self.kept)
        _accumulate(self.m, y, z)
        self.y2 += _squared_norm(y)
        self.z2 += _squared_norm(z)
        self.n += x32.shape[0]

    def products(self) -> RotationProducts:
        return RotationProducts(self.m, max(self.y2, torch.finfo(self.m.dtype).tiny), self.z2)


def direct_products_cheaper(n_tokens: int, layer_params: int, d_in: int, d_out: int, n_kept: int,
                            products_dtype: torch.dtype = torch.float64) -> bool:
    """Whether :class:`DirectProducts` (one more forward pass of the layer, then float32
    per-token products) costs fewer multiply-adds than the Gram route (the float32-accumulated
    Gram matrix, then W G W_K^T and W_K G_KK W_K^T in ``products_dtype``, whose float64
    multiply-adds count twice: half the float32 rate on CPUs, less on most GPUs). Both give
    the same M up to float32 rounding. For a Llama-2-13B MLP the second pass wins below
    about 12k calibration tokens."""
    direct = n_tokens * (layer_params + d_out * (d_in + n_kept + d_out))
    weight = 2 if products_dtype == torch.float64 else 1
    gram = n_tokens * d_in**2 + weight * d_out * n_kept * (d_in + d_out + n_kept)
    return direct < gram


def rotation_solve(weight: torch.Tensor, kept: torch.Tensor, products: RotationProducts, *, scale: bool = False,
                   n_tokens: int | None = None, rank_rtol: float | None = None) -> Compensated:
    """Q* = U V^T from M = U S V^T, the optional scale, and W_K <- s* Q* W_K; see :func:`rotation`."""
    m, y2, z2 = products.m, products.y2, products.z2
    dtype = m.dtype
    d_out = weight.shape[0]
    kept = kept.to(weight.device)

    def rel_error(s_tr: float, s2: float) -> float:
        return (y2 - 2 * s_tr + s2 * z2) / y2

    q, s = procrustes(m)
    if rank_rtol is None:  # structural zeros sit at rounding level; real directions far above
        rank_rtol = 1e-11 if dtype == torch.float64 else 1e-5
    rank = int((s > s[0] * rank_rtol).sum()) if s[0] > 0 else 0
    # Q W_K is determined by the data only on range(Z); it equals range(W_K) (rank
    # min(d_out, |K|) generically) unless the calibration tokens do not span it.
    needed = rotation_tokens_needed(d_out, len(kept))
    if rank < needed and (n_tokens is None or n_tokens >= needed):  # degenerate weights need less
        needed = min(needed, int(torch.linalg.matrix_rank(weight[:, kept].to(dtype))))
    info: dict = {"rank": rank, "rank_needed": needed, "rel_error_uncompensated": rel_error(float(torch.trace(m)), 1.0)}
    if (n_tokens is not None and n_tokens < needed) or rank < needed:
        info["fallback"] = "none"
        info["rel_error"] = info["rel_error_uncompensated"]
        tokens = f", {n_tokens} calibration tokens" if n_tokens is not None else ""
        info["reason"] = (f"rank-deficient target (rank {rank} < {needed}{tokens})" if rank < needed else
                          f"rank-deficient target ({n_tokens} calibration tokens < {needed} needed)")
        return Compensated(weight[:, kept].clone(), info=info)
    tr_qm = float(torch.trace(q.T @ m))
    s_star = tr_qm / z2 if scale else 1.0
    if scale:
        info["scale"] = s_star
    info["rel_error"] = rel_error(s_star * tr_qm, s_star**2)
    # s Q W_K, one block of kept columns at a time, straight into the weight's dtype
    new = torch.empty(d_out, len(kept), dtype=weight.dtype, device=weight.device)
    for block in _blocks(len(kept), weight.device):
        new[:, block] = (s_star * (q @ weight[:, kept[block]].to(dtype))).to(weight.dtype)
    return Compensated(new, info=info)


def rotation(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, *, scale: bool = False,
             dtype: torch.dtype = torch.float64, n_tokens: int | None = None,
             rank_rtol: float | None = None) -> Compensated:
    """RCPU: W_K <- s* Q* W_K with Q* = U V^T from M = Y Z^T = U S V^T.

    ``scale`` adds the optimal scalar s* = tr(Q^T M) / ||Z||^2 (RCPU "Rot.+Scale").
    Q is arbitrary on M's null space. That is harmless while the calibration outputs
    Z span the whole range of W_K (then Q W_K does not depend on the arbitrary part),
    but with fewer calibration tokens than min(d_out, |K|) or degenerate data it
    rotates unseen directions at random and can wreck the layer: we detect it,
    keep W_K unchanged and report ``fallback`` instead of returning that rotation.

    The relative errors before and after (``rel_error_uncompensated``, ``rel_error``) come
    from the same products, ||Y - s Q Z||^2 = ||Y||^2 - 2 s tr(Q^T M) + s^2 ||Z||^2 (Q is
    orthogonal), so no second pass over the Gram matrix is needed. :func:`rotation_products`
    and :func:`rotation_solve` are the two
    halves, for callers that free the Gram matrix in between.
    """
    products = rotation_products(weight, gram, kept, dtype=dtype)
    return rotation_solve(weight, kept, products, scale=scale, n_tokens=n_tokens, rank_rtol=rank_rtol)
