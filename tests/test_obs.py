"""Greedy selection by post-compensation error and dense-model targets: the maths against
direct computations on small random matrices, and the method end to end on tiny models."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import make_model, make_windows, same_threads_env
from test_prune import _RELOAD

from rcpu import RcpuError, obs, sensitivity
from rcpu import compensate as comp
from rcpu.api import prune
from rcpu.config import PruneConfig
from rcpu.export import PROVENANCE, save_pruned
from rcpu.scores import SCORES
from rcpu.select import select_channels
from rcpu.stats import InputStats, StatsCollector


def _data(seed: int, d_out: int = 12, d_in: int = 24, n: int = 300):
    """Correlated inputs with uneven channel scales, so selections really differ."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64) * 0.4 + torch.eye(d_in, dtype=torch.float64)
    x = (mix @ torch.randn(d_in, n, generator=g, dtype=torch.float64)) * (0.2 + 2 * torch.rand(d_in, 1, generator=g,
                                                                                                  dtype=torch.float64))
    x += 0.5 * torch.rand(d_in, 1, generator=g, dtype=torch.float64)  # non-zero means
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    return w, x


def _direct_error(w, x, kept, b, lam_abs):
    """||W X - B X_K||^2 + lam ||B - W_K||^2 + lam ||W_D||^2 from the stored activations."""
    dropped = torch.ones(w.shape[1], dtype=torch.bool)
    dropped[kept] = False
    fit = (w @ x - b @ x[kept]).square().sum()
    return float(fit + lam_abs * ((b - w[:, kept]).square().sum() + w[:, dropped].square().sum()))


@pytest.mark.parametrize("lam", [0.0, 0.05])
@pytest.mark.parametrize("block", [1, 3])
def test_greedy_error_equals_direct_post_compensation_error(lam, block):
    w, x = _data(0)
    gram = x @ x.T
    res = obs.greedy_remove(w, gram, torch.arange(24)[:, None], n_remove=9, lam=lam, block=block)
    assert len(res.kept) == 15 and len(res.removed_units) == 9
    _, lam_abs = obs.regularised_gram(gram, lam)
    # the kept weights are ridge compensation of the kept columns, and the reported
    # error is what is left after it, by the Schur complement and from the activations
    torch.testing.assert_close(res.weight, comp.ridge(w, gram, res.kept, lam).weight, atol=1e-10, rtol=1e-10)
    assert res.error == pytest.approx(obs.removal_error(w, gram, res.kept, lam), rel=1e-10)
    assert res.error == pytest.approx(_direct_error(w, x, res.kept, res.weight, lam_abs), rel=1e-10)


def test_greedy_heads_respect_groups_and_report_exact_error():
    w, x = _data(1, d_in=24)
    gram = x @ x.T
    units = torch.arange(24).reshape(6, 4)  # 6 heads of 4 channels, 2 KV groups of 3 heads
    groups = torch.arange(6) // 3
    res = obs.greedy_remove(w, gram, units, groups=groups, per_group=2, lam=1e-3)
    removed = torch.tensor(res.removed_units)
    assert torch.bincount(groups[removed], minlength=2).tolist() == [2, 2]
    assert res.kept.tolist() == units[sorted(set(range(6)) - set(res.removed_units))].reshape(-1).tolist()
    assert res.error == pytest.approx(obs.removal_error(w, gram, res.kept, 1e-3), rel=1e-10)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_never_worse_than_score_then_ridge(seed):
    w, x = _data(seed)
    gram = x @ x.T
    lam = 1e-3
    stats = InputStats(24)
    stats.update(x.T.float())
    greedy = obs.greedy_remove(w, gram, torch.arange(24)[:, None], n_remove=10, lam=lam)
    for name in SCORES:
        kept = select_channels(SCORES[name](w, stats), 10)
        assert greedy.error <= obs.removal_error(w, gram, kept, lam) * (1 + 1e-9), name


def test_dense_target_fit_equals_direct_least_squares():
    w, x = _data(2)
    x_dense = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 5, 8, 9, 10, 13, 14, 17, 19, 20, 22, 23])
    y = w @ x_dense  # the dense sublayer's outputs on its own inputs
    # streamed statistics of (target, pruned input) pairs, in batches
    stats = InputStats(24, with_gram=True)
    for cols in torch.arange(300).split(70):
        stats.update(x[:, cols].T.float())
        stats.update_target(y[:, cols].T.float(), x[:, cols].T.float())
    torch.testing.assert_close(stats.target_cross, y @ x.T, rtol=1e-4, atol=1e-3)  # fp32 batch products
    assert stats.target_sq == pytest.approx(float(y.square().sum()), rel=1e-5)
    gram, target_cross = x @ x.T, y @ x.T
    direct = torch.linalg.lstsq(x[kept].T, y.T).solution.T  # min ||W X_d - B X_K||
    fit = comp.ridge(w, gram, kept, 0.0, target_cross=target_cross).weight
    torch.testing.assert_close(fit, direct, atol=1e-9, rtol=1e-9)
    err = comp.reconstruction_error(w, gram, kept, fit, target_cross=target_cross,
                                    target_sq=float(y.square().sum()))
    assert err == pytest.approx(float((y - direct @ x[kept]).square().sum() / y.square().sum()), rel=1e-8)
    # greedy selection on W* = Y X^T G^-1 leaves the same direct least-squares fit for its set
    res = obs.greedy_remove(w, gram, torch.arange(24)[:, None], n_remove=10, target_cross=target_cross)
    ref = obs.greedy_remove(obs.dense_target_weight(w, gram, target_cross), gram, torch.arange(24)[:, None],
                            n_remove=10)
    assert res.removed_units == ref.removed_units
    direct = torch.linalg.lstsq(x[res.kept].T, y.T).solution.T
    torch.testing.assert_close(res.weight, direct, atol=1e-8, rtol=1e-8)


def test_paired_collector_matches_direct_cross_products():
    dense, pruned = torch.nn.Linear(6, 3), torch.nn.Linear(6, 3)
    xs = [torch.randn(2, 5, 6) for _ in range(3)]
    xds = [x + 0.1 * torch.randn_like(x) for x in xs]
    with StatsCollector({"a": pruned}, {"a": True}, {"a": dense}) as col:
        for x, xd in zip(xs, xds, strict=True):
            dense(xd)
            pruned(x)
        with pytest.raises(RuntimeError, match="dense copy"):
            pruned(xs[0])
    x, xd = torch.cat(xs).reshape(-1, 6).double(), torch.cat(xds).reshape(-1, 6).double()
    y = xd @ dense.weight.detach().double().T  # bias removed
    torch.testing.assert_close(col.stats["a"].target_cross, y.T @ x, rtol=1e-5, atol=1e-5)
    assert col.stats["a"].target_sq == pytest.approx(float(y.square().sum()), rel=1e-5)


class _Block(torch.nn.Module):
    """h + out(act(norm(h))): a pre-norm residual sublayer, like a decoder layer's halves."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.inner = torch.nn.Linear(d, inner)
        self.out = torch.nn.Linear(inner, d, bias=False)

    def forward(self, h):
        return h + self.out(torch.tanh(self.inner(self.norm(h))))


def test_residual_targets_fit_dense_output_plus_residual_error():
    """With residual targets the collector streams Y = W X_d + (h_d - h) for each token, and
    ridge on those statistics equals a direct least-squares fit of the block's output
    h + B x_K to the dense block's output h_d + W x_d on stored activations."""
    torch.manual_seed(0)
    d, inner = 6, 10
    dense = _Block(d, inner).double()
    pruned = copy.deepcopy(dense)
    with torch.no_grad():
        pruned.inner.weight += 0.2 * torch.randn_like(pruned.inner.weight)  # "pruned below": different inputs
    hs = [torch.randn(3, 7, d, dtype=torch.float64) for _ in range(4)]
    hds = [h + 0.3 * torch.randn_like(h) for h in hs]
    with StatsCollector({"mlp": pruned.out}, {"mlp": True}, {"mlp": dense.out},
                        {"mlp": (pruned.norm, dense.norm)}) as col:
        for h, hd in zip(hs, hds, strict=True):
            dense(hd)
            pruned(h)
    st = col.stats["mlp"]
    h, hd = torch.cat(hs).reshape(-1, d), torch.cat(hds).reshape(-1, d)
    x = torch.tanh(pruned.inner(pruned.norm(h))).detach()
    y = (dense.out(torch.tanh(dense.inner(dense.norm(hd)))) + hd - h).detach()
    torch.testing.assert_close(st.target_cross, y.T @ x, rtol=1e-5, atol=1e-5)
    assert st.target_sq == pytest.approx(float(y.square().sum()), rel=1e-5)
    kept = torch.tensor([0, 1, 3, 4, 6, 8, 9])
    fit = comp.ridge(pruned.out.weight.detach(), st.gram, kept, 0.0, target_cross=st.target_cross).weight
    direct = torch.linalg.lstsq(x[:, kept], y).solution.T
    torch.testing.assert_close(fit, direct, rtol=1e-4, atol=1e-4)
    # the fitted block's output is closer to the dense block's than the uncompensated one's
    out_fit = h + x[:, kept] @ fit.T
    out_plain = h + x[:, kept] @ pruned.out.weight.detach()[:, kept].T
    target = dense(hd).detach()
    assert (out_fit - target).square().sum() < (out_plain - target).square().sum()


def test_singular_gram_without_regularisation_is_a_clear_error():
    w, x = _data(4, n=10)  # 10 tokens < 24 channels: X X^T is singular
    with pytest.raises(ValueError, match="not positive definite"):
        obs.greedy_remove(w, x @ x.T, torch.arange(24)[:, None], n_remove=3, lam=0.0)
    obs.greedy_remove(w, x @ x.T, torch.arange(24)[:, None], n_remove=3, lam=1e-3)  # regularised: fine
    model = make_model(hidden=64, intermediate=96)
    with pytest.raises(RcpuError, match="greedy selection.*--selection_lambda"):
        prune(model, PruneConfig(method="ridge", selection="greedy", selection_lambda=0.0, pruning_ratio=0.3),
              windows=make_windows(2, 8), device="cpu", progress=False)


def test_bad_combinations_fail_fast():
    with pytest.raises(RcpuError, match="targets dense needs --statistics sequential"):
        PruneConfig(method="obs-ridge", statistics="dense", mlp_stats="before_attention").validate()
    with pytest.raises(RcpuError, match="least-squares or rotation"):
        PruneConfig(method="wanda-sp", targets="dense").validate()
    with pytest.raises(RcpuError, match="--selection must be"):
        PruneConfig(selection="best").validate()
    with pytest.raises(RcpuError, match="selection_lambda"):
        PruneConfig(selection_lambda=-1.0).validate()


def _ours(ratio: float = 0.5) -> PruneConfig:
    return PruneConfig(method="obs-ridge", pruning_ratio=ratio, nholdout=8, batch_size=6)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_obs_ridge_end_to_end_and_reload(tmp_path, family):
    model = make_model(family)
    dense = copy.deepcopy(model)
    pruned, report = prune(model, _ours(), windows=make_windows(), heldout_windows=make_windows(8, 32, seed=7),
                           device="cpu", progress=False)
    if family == "llama":  # same global budget as the other global-allocation presets
        _, ref = prune(dense, PruneConfig(method="flap-ridge", pruning_ratio=0.5, nholdout=8, batch_size=6),
                       windows=make_windows(), heldout_windows=make_windows(8, 32, seed=7), device="cpu",
                       progress=False)
        assert report.params["attn_mlp_after"] == pytest.approx(ref.params["attn_mlp_after"], rel=0.005)
    for layer in report.layers:
        for part in ("attn", "mlp"):
            info = layer[part]
            if "rel_error" in info:
                assert info["rel_error"] <= info["rel_error_uncompensated"]
        assert layer["mlp"]["selection"] == "greedy"
    cfg = report.config
    assert (cfg["selection"], cfg["targets"], cfg["mlp_stats"]) == ("greedy", "dense", "after_attention")
    out = save_pruned(pruned, None, tmp_path / "out", report.to_dict())
    x = make_windows(2, 16, seed=5)
    torch.save(x, tmp_path / "x.pt")
    remote = str(int(not report.params["uniform"]))
    subprocess.run([sys.executable, "-c", _RELOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"), remote],
                   capture_output=True, text=True, check=True,
                   env=same_threads_env(HF_MODULES_CACHE=str(tmp_path / "modules")))
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), pruned(x).logits, atol=0, rtol=0)
    prov = json.loads((out / PROVENANCE).read_text())
    for key in ("selection", "selection_lambda", "selection_block", "targets", "mlp_stats", "ridge_lambda"):
        assert key in prov["config"]


def test_uniform_greedy_is_a_stock_checkpoint_with_equal_groups():
    pruned, report = prune(make_model("qwen2"), PruneConfig(method="ridge", selection="greedy", pruning_ratio=0.5),
                           windows=make_windows(), device="cpu", progress=False)
    assert report.params["uniform"]
    assert pruned.config.num_attention_heads == 4 and pruned.config.num_key_value_heads == 2
    for layer in report.layers:
        assert [h // 4 for h in layer["kept_heads"]] == [0, 0, 1, 1]


def test_extreme_ratio_keeps_every_layer_non_empty():
    _, report = prune(make_model(), _ours(0.95), windows=make_windows(), heldout_windows=make_windows(8, 32, seed=7),
                      device="cpu", progress=False)
    for layer in report.layers:
        assert layer["kept_heads"] and layer["kept_channels"]


def test_allocation_scores_follow_the_greedy_costs():
    w, x = _data(5)
    gram = x @ x.T
    res = obs.greedy_remove(w, gram, torch.arange(24)[:, None], n_remove=10, lam=1e-3)
    s = obs.allocation_scores(w, gram, torch.arange(24)[:, None], 36.0, n_remove=10, lam=1e-3, norm=2.0)
    assert s.shape == (24,) and torch.isinf(s[10:]).all() and torch.isfinite(s[:10]).all()
    assert (s[1:10] >= s[:9]).all()  # non-decreasing: a threshold removes a prefix
    raw = torch.tensor(res.costs, dtype=torch.float64) / (36.0 * 2.0)
    torch.testing.assert_close(s[:10], torch.cummax(raw, 0).values)
    # blocks share their cost; heads under GQA: one unit = one head of every group
    sb = obs.allocation_scores(w, gram, torch.arange(24)[:, None], 36.0, n_remove=10, lam=1e-3, block=4)
    assert torch.isfinite(sb[:10]).all() and (sb[1:10] >= sb[:9]).all()
    heads = torch.arange(24).reshape(6, 4)
    sh = obs.allocation_scores(w, gram, heads, 1.0, n_remove=2, lam=1e-3, groups=torch.arange(6) // 3)
    assert sh.shape == (3,) and torch.isinf(sh[2]) and sh[1] >= sh[0]


def test_error_allocation_removes_redundant_channels_first():
    """Layer 0's MLP channels come in identical pairs: after compensation, removing one of a
    pair costs nothing, so error allocation takes the MLP budget from layer 0 and spares
    layer 1, whose outputs are large (an inverted ranking would strip layer 1 instead)."""
    model = make_model(layers=2, intermediate=96)
    with torch.no_grad():
        mlp = model.model.layers[0].mlp
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight[48:] = lin.weight[:48]
        model.model.layers[1].mlp.down_proj.weight.mul_(4.0)
    cfg = PruneConfig(method="flap-ridge", allocation="error", pruning_ratio=0.2, nholdout=8, batch_size=6,
                      selection_block=1)  # blocks of cheapest-alone columns would take both of a pair at once
    pruned, report = prune(copy.deepcopy(model), cfg, windows=make_windows(), heldout_windows=make_windows(8, 32, seed=7),
                           device="cpu", progress=False)
    widths = [len(layer["kept_channels"]) for layer in report.layers]
    assert widths[0] <= 48 and widths[1] >= 90  # the duplicates of layer 0 go before anything costly
    _, ref = prune(copy.deepcopy(model), PruneConfig(method="flap-ridge", pruning_ratio=0.2, nholdout=8, batch_size=6),
                   windows=make_windows(), heldout_windows=make_windows(8, 32, seed=7), device="cpu", progress=False)
    assert report.params["attn_mlp_after"] == pytest.approx(ref.params["attn_mlp_after"], rel=0.005)
    assert report.to_dict()["plan"]["allocation"] == "error"


def test_token_weights_give_weighted_least_squares():
    """inverse_rms weights: each token's squared error counts relative to the residual
    stream it is added to, 1 / rms(h_t)^2; ridge on the weighted statistics equals weighted
    least squares on stored activations, and scores (per-channel moments) are unweighted."""
    torch.manual_seed(1)
    block = _Block(6, 10).double()
    hs = [torch.randn(2, 9, 6, dtype=torch.float64) * torch.rand(2, 9, 1, dtype=torch.float64) * 5 for _ in range(3)]
    with StatsCollector({"mlp": block.out}, {"mlp": True}, token_weights={"mlp": block.norm}) as col:
        for h in hs:
            block(h)
    st = col.stats["mlp"]
    h = torch.cat(hs).reshape(-1, 6)
    x = torch.tanh(block.inner(block.norm(h))).detach()
    wt = 1.0 / (h.square().mean(-1) + 1e-6)
    torch.testing.assert_close(st.gram, (x * wt[:, None]).T @ x, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.sum, x.sum(0), rtol=1e-5, atol=1e-6)
    kept = torch.tensor([0, 2, 3, 5, 6, 9])
    w = block.out.weight.detach()
    fit = comp.ridge(w, st.gram, kept, 0.0).weight
    sw = wt.sqrt()[:, None]
    direct = torch.linalg.lstsq(x[:, kept] * sw, (x @ w.T) * sw).solution.T
    torch.testing.assert_close(fit, direct, rtol=1e-4, atol=1e-5)


def test_quadratic_unit_scores():
    s = sensitivity.quadratic_unit_scores(0.02, 4, 10, 2.0, 1e-6, 7)
    torch.testing.assert_close(s[:7], 0.02 / 16 * (2 * torch.arange(1, 8, dtype=torch.float64) - 1) / 2.0)
    assert torch.isinf(s[7:]).all()
    assert (sensitivity.quadratic_unit_scores(-1.0, 1, 3, 1.0, 1e-6, 2)[:2] > 0).all()  # a gain is floored


def _mean_nll(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[:, :-1]
    return float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_loss_probe_equals_direct_forward_of_the_probed_model():
    """The probed loss increase of layer 1's MLP equals the loss of a copy of the model with
    only that MLP pruned (same score, same channels), evaluated directly on the held-out
    windows; and the allocation keeps the attention+MLP budget of the other presets."""
    from rcpu.models import get_adapter
    from rcpu.scores import channel_scores

    model = make_model(layers=3, intermediate=96)
    calib, held = make_windows(), make_windows(8, 32, seed=7)
    cfg = PruneConfig(method="flap-ridge", allocation="loss", compensation="none", pruning_ratio=0.2, nholdout=8,
                      batch_size=6)
    _, report = prune(copy.deepcopy(model), cfg, windows=calib, heldout_windows=held, device="cpu", progress=False)
    probe = report.to_dict()["plan"]["layers"][1]["probe_loss"]
    direct = copy.deepcopy(model)
    adapter = get_adapter(direct)
    down = adapter.mlp_out(adapter.layers[1])
    with StatsCollector({"mlp": down}, {}) as col, torch.no_grad():
        direct(calib)
    kept = select_channels(channel_scores("fluctuation", down.weight, col.stats["mlp"]), probe["mlp_channels"])
    adapter.prune_mlp(adapter.layers[1], kept)
    assert probe["base"] == pytest.approx(_mean_nll(model, held), rel=1e-5)
    assert probe["mlp"] == pytest.approx(_mean_nll(direct, held) - _mean_nll(model, held), abs=1e-5)
    _, ref = prune(copy.deepcopy(model), PruneConfig(method="flap-ridge", compensation="none", pruning_ratio=0.2,
                                                     nholdout=8, batch_size=6),
                   windows=calib, heldout_windows=held, device="cpu", progress=False)
    # the same budget up to one attention unit (2 heads = 3.6 % of this tiny model's attn+MLP)
    assert report.params["attn_mlp_after"] == pytest.approx(ref.params["attn_mlp_after"], rel=0.04)
    with pytest.raises(RcpuError, match="in memory"):
        from rcpu.streaming import prune_checkpoint
        prune_checkpoint("unused", cfg, "unused-out", windows=calib)
