import pytest
import torch

from rcpu.scores import channel_scores, group_scores
from rcpu.stats import InputStats, StatsCollector


def _acts(n=500, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.linspace(0.1, 2.0, d) + torch.linspace(-1, 1, d)


def _stats(x, with_gram=True, batches=7):
    st = InputStats(x.shape[1], with_gram=with_gram)
    for chunk in x.chunk(batches):
        st.update(chunk.reshape(1, -1, x.shape[1]))  # (batch, seq, d) like a real hook
    return st


def test_gram_accumulates_in_row_blocks(monkeypatch):
    """The Gram product is added to its float64 total a block of rows at a time (bounded
    temporaries at 13B widths); with blocks smaller than the width it equals the direct sum."""
    import rcpu.stats

    monkeypatch.setattr(rcpu.stats, "_ROWS", 3)
    x = torch.randn(2, 50, 10)
    st = InputStats(10, with_gram=True)
    for i in range(2):
        st.update(x[i])
    xd = x.reshape(-1, 10).double()
    torch.testing.assert_close(st.gram, xd.T @ xd, atol=1e-4, rtol=1e-6)


def test_float32_gram_is_float32_and_close_to_float64():
    x = torch.randn(4, 64, 10)
    a, b = InputStats(10, with_gram=True), InputStats(10, with_gram=True, gram_dtype=torch.float32)
    for st in (a, b):
        for i in range(4):
            st.update(x[i])
    assert b.gram.dtype == torch.float32 and a.gram.dtype == torch.float64
    torch.testing.assert_close(b.gram.double(), a.gram, rtol=1e-5, atol=1e-4)


def test_streaming_stats_equal_direct():
    x = _acts()
    st = _stats(x)
    xd = x.double()
    assert st.n == 500
    torch.testing.assert_close(st.mean, xd.mean(0))
    torch.testing.assert_close(st.mean_abs, xd.abs().mean(0))
    torch.testing.assert_close(st.l2, xd.norm(dim=0))
    torch.testing.assert_close(st.var_population, xd.var(0, unbiased=False))
    torch.testing.assert_close(st.var_sample, xd.var(0, unbiased=True))
    torch.testing.assert_close(st.gram, xd.T @ xd, atol=1e-3, rtol=1e-6)


@pytest.mark.parametrize("name", ["magnitude", "wanda-sp", "fluctuation", "rcpu", "rcpu-l2"])
def test_scores_match_direct_computation(name):
    x = _acts()
    w = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    xd, wd = x.double(), w.double()
    direct = {
        "magnitude": wd.norm(dim=0),
        "wanda-sp": wd.abs().sum(0) * xd.abs().mean(0),
        "fluctuation": xd.var(0, unbiased=True) * wd.square().sum(0),
        "rcpu": wd.norm(dim=0) * xd.abs().mean(0) * xd.var(0, unbiased=False),
        "rcpu-l2": wd.norm(dim=0) * xd.norm(dim=0) * xd.var(0, unbiased=False),
    }[name]
    torch.testing.assert_close(channel_scores(name, w, _stats(x, with_gram=False)), direct)


def test_rcpu_score_variants_can_rank_differently():
    # channel 0: +-1 alternating (mean|x| 1, var 1); channel 1: two spikes of +-11 in 200
    # tokens (mean|x| 0.11, var 1.21, larger L2 norm). Reference a_j=mean|x| prefers 0,
    # the paper's a_j=||x||_2 prefers 1.
    ch0 = torch.tensor([1.0, -1.0]).repeat(100)
    ch1 = torch.zeros(200)
    ch1[10], ch1[150] = 11.0, -11.0
    st = _stats(torch.stack([ch0, ch1], 1), with_gram=False)
    w = torch.ones(4, 2)
    ref = channel_scores("rcpu", w, st)
    paper = channel_scores("rcpu-l2", w, st)
    assert ref[0] > ref[1]
    assert paper[1] > paper[0]


def test_group_scores_sum_heads():
    s = torch.arange(12, dtype=torch.float64)
    torch.testing.assert_close(group_scores(s, 4), torch.tensor([6.0, 22.0, 38.0], dtype=torch.float64))


def test_collector_hooks_and_removes():
    lin = torch.nn.Linear(16, 4)
    x = _acts(n=60)
    with StatsCollector({"lin": lin}, {"lin": True}) as col:
        lin(x[:30])
        lin(x[30:])
    assert col.stats["lin"].n == 60
    lin(x)
    assert col.stats["lin"].n == 60  # hook removed


def test_variance_survives_large_means():
    # massive-activation channels: mean 1000, std 0.01. E[x^2] - E[x]^2 in fp32 would
    # cancel to noise; the centred pairwise update keeps ~fp32-input precision.
    g = torch.Generator().manual_seed(0)
    x = 1000 + 0.01 * torch.randn(4096, 3, generator=g, dtype=torch.float64)
    st = _stats(x.float(), with_gram=False, batches=16)
    direct = x.float().double().var(0, unbiased=False)
    torch.testing.assert_close(st.var_population, direct, rtol=1e-3, atol=0)
