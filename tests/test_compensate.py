import pytest
import torch

from rcpu import compensate as comp
from rcpu.stats import InputStats


def _data(d_out=12, d_in=20, n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, d_in, dtype=torch.float64)
    x = x + torch.randn(d_in, generator=g, dtype=torch.float64)  # non-zero means
    return w, x


def _objective(w, x, kept, new_kept):
    y = x @ w.T
    z = x[:, kept] @ new_kept.T
    return float((y - z).square().sum())


def test_procrustes_recovers_known_rotation():
    g = torch.Generator().manual_seed(3)
    q_true, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    z = torch.randn(16, 300, generator=g, dtype=torch.float64)
    y = q_true @ z
    q, _ = comp.procrustes(y @ z.T)
    torch.testing.assert_close(q, q_true, atol=1e-10, rtol=0)


def test_rotation_is_orthogonal_and_beats_random_rotations():
    w, x = _data()
    gram = x.T @ x
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11, 13, 14, 15, 17, 19])  # |K| = d_out: full-rank target
    res = comp.rotation(w, gram, kept, n_tokens=x.shape[0])
    assert "fallback" not in res.info
    w_k = w[:, kept]
    q = res.weight @ torch.linalg.pinv(w_k)
    torch.testing.assert_close(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-8, rtol=0)
    best = _objective(w, x, kept, res.weight)
    assert best < _objective(w, x, kept, w_k)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        r, _ = torch.linalg.qr(torch.randn(12, 12, generator=g, dtype=torch.float64))
        assert best <= _objective(w, x, kept, r @ w_k) + 1e-9


def test_rotation_scale_uses_optimal_scalar():
    w, x = _data()
    gram = x.T @ x
    kept = torch.arange(0, 20, 2)
    rot = comp.rotation(w, gram, kept)
    rs = comp.rotation(w, gram, kept, scale=True)
    s = rs.info["scale"]
    torch.testing.assert_close(rs.weight, s * rot.weight)
    base = _objective(w, x, kept, rs.weight)
    for eps in (-0.05, 0.05):
        assert base <= _objective(w, x, kept, (s + eps) * rot.weight)


def test_rank_deficient_rotation_falls_back():
    w, x = _data(d_out=12, d_in=20, n=6)  # 6 tokens < 12 outputs
    kept = torch.arange(0, 20, 2)
    res = comp.rotation(w, x.T @ x, kept, n_tokens=6)
    assert res.info["fallback"] == "none"
    torch.testing.assert_close(res.weight, w[:, kept])


def test_ridge_matches_direct_least_squares():
    w, x = _data()
    gram = x.T @ x
    kept = torch.tensor([1, 2, 4, 6, 9, 10, 12, 15, 16, 18, 19])
    y = x @ w.T
    xk = x[:, kept]
    for lam in (0.0, 0.3):
        res = comp.ridge(w, gram, kept, lam, relative=False)
        # stacked least squares: [X_K; sqrt(lam) I] B^T = [Y; sqrt(lam) W_K^T]
        a = torch.cat([xk, lam**0.5 * torch.eye(len(kept), dtype=torch.float64)])
        b = torch.cat([y, lam**0.5 * w[:, kept].T])
        direct = torch.linalg.lstsq(a, b).solution.T
        torch.testing.assert_close(res.weight, direct, atol=1e-9, rtol=1e-9)
    rel = comp.ridge(w, gram, kept, 0.1, relative=True)
    assert rel.info["lambda_abs"] == pytest.approx(0.1 * float(torch.trace(gram)) / 20)


def test_ridge_shrinks_to_original_weights():
    w, x = _data()
    kept = torch.arange(0, 20, 3)
    res = comp.ridge(w, x.T @ x, kept, 1e12, relative=True)
    torch.testing.assert_close(res.weight, w[:, kept], atol=1e-9, rtol=1e-9)


def test_bias_shift_is_mean_of_dropped_outputs():
    w, x = _data()
    stats = InputStats(20)
    stats.update(x.float())
    kept = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7])
    shift = comp.bias_shift(w.float(), stats, kept)
    expected = (x[:, 8:] @ w[:, 8:].T).mean(0)
    torch.testing.assert_close(shift.double(), expected, atol=1e-4, rtol=1e-4)


def test_reconstruction_error_matches_direct():
    w, x = _data()
    kept = torch.arange(0, 20, 2)
    new = torch.randn(12, 10, dtype=torch.float64)
    direct = _objective(w, x, kept, new) / float((x @ w.T).square().sum())
    assert comp.reconstruction_error(w, x.T @ x, kept, new) == pytest.approx(direct, rel=1e-9)


def test_compensation_reduces_error_ridge_best():
    w, x = _data(n=2000)
    gram = x.T @ x
    kept = torch.arange(0, 20, 2)
    err = {name: comp.reconstruction_error(w, gram, kept, r.weight) for name, r in {
        "none": comp.Compensated(w[:, kept]),
        "rotation": comp.rotation(w, gram, kept),
        "rotation_scale": comp.rotation(w, gram, kept, scale=True),
        "ridge": comp.ridge(w, gram, kept, 0.0),
    }.items()}
    assert err["ridge"] <= err["rotation_scale"] <= err["rotation"] < err["none"]


def test_chunked_products_match_direct_formulas(monkeypatch):
    """The Gram products run in column chunks (bounded temporaries at 13B widths); with
    chunks smaller than the widths they must equal the formulas on stored activations."""
    monkeypatch.setattr(comp, "_CHUNK", 3)
    w, x = _data(d_out=8, d_in=20)
    gram = x.T @ x
    kept = torch.tensor([1, 2, 4, 7, 8, 9, 12, 15, 16, 19])
    y = x @ w.T
    ridge = comp.ridge(w, gram, kept, 0.0, relative=False).weight
    direct = torch.linalg.lstsq(x[:, kept], y).solution.T
    torch.testing.assert_close(ridge, direct, atol=1e-9, rtol=1e-9)
    err = comp.reconstruction_error(w, gram, kept, ridge)
    assert err == pytest.approx(_objective(w, x, kept, ridge) / float(y.square().sum()), rel=1e-9)
    rs = comp.rotation(w, gram, kept, scale=True)
    z = x[:, kept] @ w[:, kept].T
    u, _, vh = torch.linalg.svd(y.T @ z)
    q = u @ vh
    s = torch.trace(q.T @ (y.T @ z)) / z.square().sum()
    torch.testing.assert_close(rs.weight, s * q @ w[:, kept], atol=1e-9, rtol=1e-9)
    # a float32 weight is converted block by block; the result comes back in float32
    r32 = comp.rotation(w.float(), gram, kept, scale=True)
    assert r32.weight.dtype == torch.float32
    torch.testing.assert_close(r32.weight.double(), s * q @ w.float().double()[:, kept], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("scale", [False, True])
def test_rotation_reports_the_errors_reconstruction_errors_computes(scale):
    w, x = _data()
    gram = x.T @ x
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11, 13, 14, 15, 17, 19])
    res = comp.rotation(w, gram, kept, scale=scale)
    before, after = comp.reconstruction_errors(w, gram, kept, [w[:, kept], res.weight])
    assert res.info["rel_error_uncompensated"] == pytest.approx(before, rel=1e-9)
    assert res.info["rel_error"] == pytest.approx(after, rel=1e-9)
    assert res.info["rel_error"] < res.info["rel_error_uncompensated"]


def _stats(x: torch.Tensor) -> InputStats:
    """Exact float64 moments of stored activations (streaming accumulation has its own tests)."""
    return InputStats(x.shape[1], n=len(x), sum=x.sum(0), gram=x.T @ x, with_gram=True)


def _compensate(w, stats, kept, cfg, heldout=None):
    """The registry's compensation of a validated ``cfg``, as the pipeline calls it."""
    from rcpu.compensations import Problem, compensate

    cfg = cfg.validate()
    return compensate(cfg.compensation, Problem(w, stats, kept, cfg, heldout))


@pytest.mark.parametrize("n_calib", [30, 2000])
def test_ridge_auto_picks_the_best_heldout_lambda(n_calib):
    """ridge-auto: ridge over the grid, scored on held-out windows; the reported errors equal
    direct computations on the held-out activations and the lowest one is returned."""
    from rcpu.config import PruneConfig

    w, x = _data(d_out=8, d_in=24, n=n_calib + 500, seed=6)
    calib, held = x[:n_calib], x[n_calib:]
    kept = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11, 13, 14, 16, 17, 19, 20, 22, 23])
    cfg = PruneConfig(method="ridge-auto")
    res = _compensate(w, _stats(calib), kept, cfg, heldout=_stats(held))
    errors = res.info["heldout_errors"]
    assert set(errors) == {f"{lam:g}" for lam in cfg.ridge_grid} and res.info["lambda_auto"]
    y = held @ w.T
    for lam in cfg.ridge_grid:
        fit = comp.ridge(w, calib.T @ calib, kept, lam).weight
        direct = float((y - held[:, kept] @ fit.T).square().sum() / y.square().sum())
        assert errors[f"{lam:g}"] == pytest.approx(direct, rel=1e-9)
    best = min(errors, key=errors.get)
    assert f"{res.info['lambda']:g}" == best
    chosen_direct = float((y - held[:, kept] @ res.weight.T).square().sum() / y.square().sum())
    assert chosen_direct == pytest.approx(errors[best], rel=1e-9)


def test_lambdas_whose_system_is_not_positive_definite_are_skipped_or_refused():
    """An indefinite Gram matrix (float32 rounding of per-batch products with outlier channels
    can make one): ridge-auto skips the lambdas no jitter rescues and records them; one
    lambda, or a grid where all fail, gives a one-line error."""
    from rcpu import RcpuError
    from rcpu.config import PruneConfig
    w, x = _data(d_out=6, d_in=16, n=40, seed=8)
    stats = _stats(x[:5])  # 5 tokens for 16 inputs: G has a null space
    mean_diag = float(stats.gram.diagonal().mean())
    stats.gram -= 5e-3 * mean_diag * torch.eye(16, dtype=torch.float64)  # eigenvalues down to -5e-3 * mean
    kept = torch.arange(1, 16)
    cfg = PruneConfig(method="ridge", ridge_lambda="auto", ridge_grid=(1e-4, 1e-3, 1e-2, 0.1))
    res = _compensate(w, stats, kept, cfg, heldout=_stats(x[5:]))
    assert res.info["lambdas_skipped"] == ["0.0001", "0.001"]
    assert set(res.info["heldout_errors"]) == {"0.01", "0.1"} and f"{res.info['lambda']:g}" in ("0.01", "0.1")
    with pytest.raises(RcpuError, match="not positive definite for any lambda"):
        _compensate(w, stats, kept, PruneConfig(method="ridge", ridge_lambda="auto", ridge_grid=(1e-4,)),
                    heldout=_stats(x[5:]))
    with pytest.raises(RcpuError, match="not positive definite at lambda 0.0001; use a larger --ridge_lambda"):
        _compensate(w, stats, kept, PruneConfig(method="ridge", ridge_lambda=1e-4))


def test_row_errors_are_direct_row_errors_and_sum_to_the_totals():
    w, x = _data(d_out=9, d_in=20, n=300, seed=11)
    kept = torch.tensor([0, 1, 3, 4, 6, 8, 9, 12, 13, 15, 16, 19])
    gen = torch.Generator().manual_seed(2)
    cands = [w[:, kept] + 0.1 * torch.randn(9, len(kept), generator=gen, dtype=torch.float64) for _ in range(3)]
    rows, y2 = comp.row_errors(w, x.T @ x, kept, cands)
    y = x @ w.T
    assert y2 == pytest.approx(float(y.square().sum()), rel=1e-12)
    totals = comp.reconstruction_errors(w, x.T @ x, kept, cands)
    for i, (b, r) in enumerate(zip(cands, rows, strict=True)):
        fitted = x[:, kept] @ b.T
        torch.testing.assert_close(r, (y - fitted).square().sum(0), rtol=1e-10, atol=1e-9)
        assert totals[i] == pytest.approx(float(r.sum()) / y2, rel=1e-12)


def test_direct_products_equal_the_gram_route():
    """M = Y Z^T, ||Y||^2 and ||Z||^2 streamed from the inputs in batches equal those formed
    from the Gram matrix (float32 inputs and weights, as in a model)."""
    w, x = _data(d_out=24, d_in=1100, n=900)  # wider than one block of columns
    w32, x32 = w.float(), x.float()
    kept = torch.sort(torch.randperm(1100, generator=torch.Generator().manual_seed(1))[:800]).values
    via_gram = comp.rotation_products(w32, x32.double().T @ x32.double(), kept)
    acc = comp.DirectProducts(w32, kept)
    for batch in x32.split(300):
        acc.update(batch.reshape(6, 50, 1100))  # (..., d_in) like a layer's activations
    direct = acc.products()
    assert acc.n == 900
    torch.testing.assert_close(direct.m, via_gram.m, rtol=1e-5, atol=1e-5 * float(via_gram.m.abs().max()))
    assert direct.y2 == pytest.approx(via_gram.y2, rel=1e-6) and direct.z2 == pytest.approx(via_gram.z2, rel=1e-6)
    for scale in (False, True):
        a = comp.rotation_solve(w32, kept, direct, scale=scale, n_tokens=900)
        b = comp.rotation_solve(w32, kept, via_gram, scale=scale, n_tokens=900)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-4, atol=1e-5)
        assert a.info["rel_error"] == pytest.approx(b.info["rel_error"], rel=1e-5)


def test_direct_products_cost_model():
    """The second pass wins for a Llama-2-13B MLP with a few thousand tokens, not with 128 x 128,
    and loses for SmolLM2-135M with 128 x 128 (whose tables were made by the Gram route)."""
    p13 = 4 * 5120**2 + 3 * 5120 * 13824
    assert comp.direct_products_cheaper(6144, p13, 13824, 5120, 11060)
    assert not comp.direct_products_cheaper(128 * 128, p13, 13824, 5120, 11060)
    p135 = 576 * (576 + 2 * 192 + 576) + 3 * 576 * 1536
    assert not comp.direct_products_cheaper(128 * 128, p135, 1536, 576, 1229)


