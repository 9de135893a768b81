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


def test_proper_rotation_has_positive_determinant():
    w, x = _data(d_out=10, d_in=10)
    gram = x.T @ x
    kept = torch.arange(10)
    w_ref = w.clone()
    w_ref[0] = -w_ref[0]  # a reflection is the best orthogonal map from w to w_ref
    m = w_ref @ gram @ w.T
    q, _ = comp.procrustes(m)
    assert torch.linalg.det(q) < 0
    q, _ = comp.procrustes(m, proper=True)
    assert torch.linalg.det(q) > 0
    res = comp.rotation(w, gram, kept, proper=True)
    assert "fallback" not in res.info


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
    # the target-cross path (blocks of kept columns) gives the same rotation and errors
    rt = comp.rotation(w, gram, kept, scale=True, target_cross=y.T @ x, target_sq=float(y.square().sum()))
    torch.testing.assert_close(rt.weight, rs.weight, atol=1e-9, rtol=1e-9)
    assert rt.info["rel_error"] == pytest.approx(rs.info["rel_error"], rel=1e-9)
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


def _with_intercept(kind: str, w: torch.Tensor, stats: InputStats, kept: torch.Tensor, **cfg_kw):
    from rcpu.config import PruneConfig
    from rcpu.pipeline import _compensate

    cfg = PruneConfig(method="ridge", compensation=kind, intercept=True, **cfg_kw)
    return _compensate(kind, w, stats, kept, cfg)


def test_intercept_equals_least_squares_with_a_constant_feature():
    """--intercept with ridge at lambda 0: the direct solve of Y on [X_K; 1] from stored activations."""
    w, x = _data()
    kept = torch.tensor([0, 1, 3, 4, 6, 9, 10, 12, 15, 16, 18, 19])
    res = _with_intercept("ridge", w, _stats(x), kept, ridge_lambda=0.0)
    xd = x
    design = torch.cat([xd[:, kept], torch.ones(len(xd), 1, dtype=torch.float64)], 1)
    sol = torch.linalg.lstsq(design, xd @ w.T).solution.T  # d_out x (|K| + 1)
    torch.testing.assert_close(res.weight, sol[:, :-1], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(res.bias, sol[:, -1], atol=1e-9, rtol=1e-9)
    y, fitted = xd @ w.T, xd[:, kept] @ res.weight.T + res.bias
    direct = float((y - fitted).square().sum() / y.square().sum())
    assert res.info["intercept"] and res.info["rel_error"] == pytest.approx(direct, rel=1e-9)
    without = comp.ridge(w, _stats(x).gram, kept, 0.0, relative=False)
    assert direct < _objective(w, xd, kept, without.weight) / float(y.square().sum())


@pytest.mark.parametrize("kind", ["rotation", "rotation_scale"])
def test_rotation_with_intercept_is_procrustes_on_centred_outputs(kind):
    """Rotation plus translation: Q (and s) from the centred Y and Z, c = mean(Y) - s Q mean(Z)."""
    w, x = _data(d_out=8, d_in=14, n=500, seed=2)
    kept = torch.tensor([0, 1, 2, 4, 6, 7, 9, 11, 12, 13])
    res = _with_intercept(kind, w, _stats(x), kept)
    xd = x
    y, z = xd @ w.T, xd[:, kept] @ w[:, kept].T
    yc, zc = y - y.mean(0), z - z.mean(0)
    u, _, vh = torch.linalg.svd(yc.T @ zc)
    q = u @ vh
    s = float(torch.trace(q.T @ (yc.T @ zc)) / zc.square().sum()) if kind == "rotation_scale" else 1.0
    torch.testing.assert_close(res.weight, s * q @ w[:, kept], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(res.bias, y.mean(0) - s * (z.mean(0) @ q.T), atol=1e-9, rtol=1e-9)
    fitted = xd[:, kept] @ res.weight.T + res.bias
    assert res.info["rel_error"] == pytest.approx(float((y - fitted).square().sum() / y.square().sum()), rel=1e-9)
    assert res.info["rel_error_uncompensated"] == pytest.approx(
        float((y - z).square().sum() / y.square().sum()), rel=1e-9)


def test_reconstruction_errors_with_biases_match_direct():
    w, x = _data(seed=4)
    kept = torch.arange(0, 20, 2)
    g = torch.Generator().manual_seed(5)
    cands = [torch.randn(12, 10, generator=g, dtype=torch.float64) for _ in range(2)]
    biases = [None, torch.randn(12, generator=g, dtype=torch.float64)]
    got = comp.reconstruction_errors(w, x.T @ x, kept, cands, biases=biases, mean=x.mean(0), n=len(x))
    y = x @ w.T
    for err, b, c in zip(got, cands, biases, strict=True):
        fitted = x[:, kept] @ b.T + (0 if c is None else c)
        assert err == pytest.approx(float((y - fitted).square().sum() / y.square().sum()), rel=1e-10)
    with pytest.raises(ValueError, match="mean and count"):
        comp.reconstruction_errors(w, x.T @ x, kept, cands, biases=biases)


def test_intercept_settings_are_validated():
    from rcpu import RcpuError
    from rcpu.config import PruneConfig

    for kw, msg in [({"method": "flap", "intercept": True}, "bias compensation fits a bias alone"),
                    ({"method": "wanda-sp", "intercept": True}, "not none"),
                    ({"method": "ridge", "intercept": True, "targets": "dense"}, "--targets sequential"),
                    ({"method": "ridge", "intercept": True, "token_weights": "inverse_rms"}, "--token_weights none")]:
        with pytest.raises(RcpuError, match=msg):
            PruneConfig(**kw).validate()
    PruneConfig(method="flap-ridge", intercept=True).validate()


@pytest.mark.parametrize("n_calib,grid", [(30, None), (2000, None), (12, (1e-4,))])
def test_auto_compensation_picks_the_best_heldout_candidate(n_calib, grid):
    """compensation auto: ridge over the grid, rotation and rotation+scale, scored on held-out
    windows; the reported errors equal direct computations and the lowest one is returned."""
    from rcpu.config import PruneConfig
    from rcpu.pipeline import _compensate

    w, x = _data(d_out=8, d_in=24, n=n_calib + 500, seed=6)
    calib, held = x[:n_calib], x[n_calib:]
    kept = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11, 13, 14, 16, 17, 19, 20, 22, 23])
    cfg = PruneConfig(method="ridge", compensation="auto", **({"ridge_grid": grid} if grid else {}))
    res = _compensate("auto", w, _stats(calib), kept, cfg, heldout=_stats(held))
    if grid:  # 12 tokens for 16 kept inputs: an almost unregularised least-squares fit overfits
        assert res.info["chosen"].startswith("rotation") and "lambda" not in res.info
    errors = res.info["heldout_errors"]
    assert set(errors) == {f"{lam:g}" for lam in cfg.ridge_grid} | {"rotation", "rotation_scale"}
    best = min(errors, key=errors.get)
    assert res.info["chosen"] == (best if best.startswith("rotation") else "ridge")
    y = held @ w.T
    rot = comp.rotation(w, calib.T @ calib, kept, n_tokens=n_calib)
    direct = float((y - held[:, kept] @ rot.weight.T).square().sum() / y.square().sum())
    assert errors["rotation"] == pytest.approx(direct, rel=1e-9)
    chosen_direct = float((y - held[:, kept] @ res.weight.T).square().sum() / y.square().sum())
    assert chosen_direct == pytest.approx(errors[best], rel=1e-9)


def test_lambdas_whose_system_is_not_positive_definite_are_skipped_or_refused():
    """An indefinite Gram matrix (float32 rounding of per-batch products with outlier channels
    can make one): ridge-auto skips the lambdas no jitter rescues and records them; one
    lambda, or a grid where all fail, gives a one-line error."""
    from rcpu import RcpuError
    from rcpu.config import PruneConfig
    from rcpu.pipeline import _compensate

    w, x = _data(d_out=6, d_in=16, n=40, seed=8)
    stats = _stats(x[:5])  # 5 tokens for 16 inputs: G has a null space
    mean_diag = float(stats.gram.diagonal().mean())
    stats.gram -= 5e-3 * mean_diag * torch.eye(16, dtype=torch.float64)  # eigenvalues down to -5e-3 * mean
    kept = torch.arange(1, 16)
    cfg = PruneConfig(method="ridge", ridge_lambda="auto", ridge_grid=(1e-4, 1e-3, 1e-2, 0.1))
    res = _compensate("ridge", w, stats, kept, cfg, heldout=_stats(x[5:]))
    assert res.info["lambdas_skipped"] == ["0.0001", "0.001"]
    assert set(res.info["heldout_errors"]) == {"0.01", "0.1"} and f"{res.info['lambda']:g}" in ("0.01", "0.1")
    with pytest.raises(RcpuError, match="not positive definite for any lambda"):
        _compensate("ridge", w, stats, kept, PruneConfig(method="ridge", ridge_lambda="auto", ridge_grid=(1e-4,)),
                    heldout=_stats(x[5:]))
    with pytest.raises(RcpuError, match="not positive definite at lambda 0.0001; use a larger --ridge_lambda"):
        _compensate("ridge", w, stats, kept, PruneConfig(method="ridge", ridge_lambda=1e-4))


@pytest.mark.parametrize("intercept", [False, True])
def test_row_errors_are_direct_row_errors_and_sum_to_the_totals(intercept):
    w, x = _data(d_out=9, d_in=20, n=300, seed=11)
    kept = torch.tensor([0, 1, 3, 4, 6, 8, 9, 12, 13, 15, 16, 19])
    gen = torch.Generator().manual_seed(2)
    cands = [w[:, kept] + 0.1 * torch.randn(9, len(kept), generator=gen, dtype=torch.float64) for _ in range(3)]
    biases = [torch.randn(9, generator=gen, dtype=torch.float64) for _ in cands] if intercept else None
    kw = {"biases": biases, "mean": x.mean(0), "n": x.shape[0]} if intercept else {}
    rows, y2 = comp.row_errors(w, x.T @ x, kept, cands, **kw)
    y = x @ w.T
    assert y2 == pytest.approx(float(y.square().sum()), rel=1e-12)
    totals = comp.reconstruction_errors(w, x.T @ x, kept, cands, **kw)
    for i, (b, r) in enumerate(zip(cands, rows, strict=True)):
        fitted = x[:, kept] @ b.T + (biases[i] if intercept else 0)
        torch.testing.assert_close(r, (y - fitted).square().sum(0), rtol=1e-10, atol=1e-9)
        assert totals[i] == pytest.approx(float(r.sum()) / y2, rel=1e-12)


@pytest.mark.parametrize("compensation", ["ridge", "auto"])
def test_choice_per_row_takes_each_row_from_its_best_candidate(compensation):
    """--choice_per_row: row i of the result is row i of the candidate with the lowest held-out
    error for output i; the recorded error is the direct one and never above the best whole-matrix
    candidate's."""
    from rcpu.config import PruneConfig
    from rcpu.pipeline import _compensate

    g = torch.Generator().manual_seed(12)
    x = torch.randn(560, 10, generator=g, dtype=torch.float64) @ torch.randn(10, 24, generator=g, dtype=torch.float64)
    x += 0.3 * torch.randn(560, 24, generator=g, dtype=torch.float64)  # correlated inputs: compensation helps
    kept = torch.tensor([0, 2, 3, 5, 6, 8, 9, 11, 13, 14, 16, 17, 19, 20, 22, 23])
    dropped = torch.ones(24, dtype=torch.bool)
    dropped[kept] = False
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    w[5:, dropped] *= 0.01  # these outputs barely use the dropped inputs: they want a larger lambda
    calib, held = x[:40], x[40:]
    base = {"method": "ridge", "compensation": compensation, "ridge_lambda": "auto"}
    whole = _compensate(compensation, w, _stats(calib), kept, PruneConfig(**base).validate(), heldout=_stats(held))
    res = _compensate(compensation, w, _stats(calib), kept, PruneConfig(**base, choice_per_row=True).validate(),
                      heldout=_stats(held))
    y = held @ w.T
    row_err = (y - held[:, kept] @ res.weight.T).square().sum(0)
    direct = float(row_err.sum() / y.square().sum())
    assert res.info["heldout_error_per_row"] == pytest.approx(direct, rel=1e-9)
    assert direct < min(whole.info["heldout_errors"].values())
    assert sum(res.info["rows_chosen"].values()) == 10 and len(res.info["rows_chosen"]) >= 2
    assert "lambda" not in res.info
    # every row is the best of the candidates for that row
    cfg = PruneConfig(**base).validate()
    cands = [c.weight for c in comp.ridge_path(w, _stats(calib).gram, kept, list(cfg.ridge_grid)) if c is not None]
    if compensation == "auto":
        cands += [comp.rotation(w, calib.T @ calib, kept, scale=s, n_tokens=40).weight for s in (False, True)]
    per_cand = torch.stack([(y - held[:, kept] @ b.T).square().sum(0) for b in cands])
    torch.testing.assert_close(row_err, per_cand.min(0).values, rtol=1e-9, atol=1e-9)


def test_choice_per_row_needs_a_heldout_choice():
    from rcpu import RcpuError
    from rcpu.config import PruneConfig

    with pytest.raises(RcpuError, match="--choice_per_row needs a held-out choice"):
        PruneConfig(method="rcpu", choice_per_row=True).validate()
    PruneConfig(method="flap-ridge", choice_per_row=True).validate()


def test_score_auto_keeps_the_candidate_with_the_lowest_direct_heldout_error():
    """--score auto's per-sublayer choice: each candidate kept set is compensated with
    ridge-auto on the calibration statistics, and the one with the lowest held-out error,
    computed directly on the held-out activations, wins; equal kept sets are solved once."""
    from rcpu.config import PruneConfig
    from rcpu.pipeline import _best_score

    w, x = _data(d_out=8, d_in=24, n=700, seed=13)
    calib, held = x[:200], x[200:]
    choice = {"a": (torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]),),
              "b": (torch.tensor([8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]),),
              "c": (torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]),)}
    cfg = PruneConfig(method="ridge-auto").validate()
    warnings: list[str] = []
    label, res, info = _best_score(choice, "ridge", True, w, _stats(calib), _stats(held), cfg, 0, "x", warnings)
    y = held @ w.T
    direct = {}
    for name, (kept,) in choice.items():
        path = comp.ridge_path(w, calib.T @ calib, kept, list(cfg.ridge_grid))
        direct[name] = min(float((y - held[:, kept] @ c.weight.T).square().sum() / y.square().sum()) for c in path)
    assert label == min(direct, key=direct.get) and info["score_chosen"] == label
    for name in choice:
        assert info["score_heldout_errors"][name] == pytest.approx(direct[name], rel=1e-9)
    assert info["score_same_selection"] == {"c": "a"}
    kept = choice[label][0]
    assert float((y - held[:, kept] @ res.weight.T).square().sum() / y.square().sum()) == pytest.approx(direct[label],
                                                                                                        rel=1e-9)


def test_score_auto_is_validated():
    from rcpu import RcpuError
    from rcpu.config import PruneConfig

    with pytest.raises(RcpuError, match="--score auto .* needs --ridge_lambda auto or --compensation auto"):
        PruneConfig(method="rcpu", score="auto").validate()
    with pytest.raises(RcpuError, match="cannot be combined with --selection greedy"):
        PruneConfig(method="flap-ridge", score="auto", selection="greedy").validate()
    assert PruneConfig(method="flap-ridge", score="auto").validate().allocation_score == "fluctuation"


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


def test_proximal_procrustes_moves_from_the_rotation_to_plain_slicing():
    """polar(M + mu I): mu = 0 is RCPU's rotation, a huge mu keeps W_K (Q = I); in between Q
    stays orthogonal and the calibration error lies between the two, rising with mu."""
    w, x = _data()
    kept = torch.tensor([0, 2, 3, 5, 7, 8, 11, 13, 14, 15, 17, 19])
    products = comp.rotation_products(w, x.T @ x, kept)
    errs = []
    for prox in (0.0, 0.3, 3.0, 1e9):
        res = comp.rotation_solve(w, kept, products, n_tokens=x.shape[0], proximal=prox)
        q = res.weight @ torch.linalg.pinv(w[:, kept])
        torch.testing.assert_close(q.T @ q, torch.eye(12, dtype=torch.float64), atol=1e-8, rtol=0)
        assert res.info["rel_error"] == pytest.approx(_objective(w, x, kept, res.weight)
                                                      / float((x @ w.T).square().sum()), rel=1e-9)
        errs.append(res.info["rel_error"])
    rcpu = comp.rotation_solve(w, kept, products, n_tokens=x.shape[0])
    assert errs[0] == rcpu.info["rel_error"]
    assert errs[0] < errs[1] < errs[2] < errs[3]
    plain = comp.rotation_solve(w, kept, products, n_tokens=x.shape[0], proximal=1e9)
    torch.testing.assert_close(plain.weight, w[:, kept], atol=1e-7, rtol=0)
