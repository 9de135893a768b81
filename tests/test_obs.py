"""Greedy removal by post-compensation error (what ``--allocation error`` measures): the maths
against direct computations on small random matrices, and the allocation end to end on tiny models."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import make_model, make_windows, same_threads_env
from test_prune import _RELOAD

from rcpu import RcpuError, obs
from rcpu import compensate as comp
from rcpu.api import prune
from rcpu.config import PruneConfig
from rcpu.export import PROVENANCE, save_pruned
from rcpu.scores import SCORES
from rcpu.select import select_channels
from rcpu.stats import InputStats


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


class _Block(torch.nn.Module):
    """h + out(act(norm(h))): a pre-norm residual sublayer, like a decoder layer's halves."""

    def __init__(self, d: int, inner: int):
        super().__init__()
        self.norm = torch.nn.LayerNorm(d)
        self.inner = torch.nn.Linear(d, inner)
        self.out = torch.nn.Linear(inner, d, bias=False)

    def forward(self, h):
        return h + self.out(torch.tanh(self.inner(self.norm(h))))


def test_singular_gram_without_regularisation_is_a_clear_error():
    w, x = _data(4, n=10)  # 10 tokens < 24 channels: X X^T is singular
    with pytest.raises(ValueError, match="not positive definite"):
        obs.greedy_remove(w, x @ x.T, torch.arange(24)[:, None], n_remove=3, lam=0.0)
    obs.greedy_remove(w, x @ x.T, torch.arange(24)[:, None], n_remove=3, lam=1e-3)  # regularised: fine
    with pytest.raises(RcpuError, match="selection_lambda"):
        PruneConfig(selection_lambda=-1.0).validate()


def _ours(ratio: float = 0.5) -> PruneConfig:
    return PruneConfig(method="flap-ridge", allocation="error", pruning_ratio=ratio, nholdout=8, batch_size=6)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_error_allocation_end_to_end_and_reload(tmp_path, family):
    model = make_model(family)
    pruned, report = prune(model, _ours(), windows=make_windows(), heldout_windows=make_windows(8, 32, seed=7),
                           device="cpu", progress=False)
    for layer in report.layers:
        for part in ("attn", "mlp"):
            info = layer[part]
            if "rel_error" in info:
                assert info["rel_error"] <= info["rel_error_uncompensated"]
    assert report.config["allocation"] == "error"
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
    for key in ("allocation", "selection_lambda", "selection_block", "ridge_lambda"):
        assert key in prov["config"]


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


