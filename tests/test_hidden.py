"""Hidden-size pruning: the pruned model against the dense model with the channels zeroed and
kept-only norms (built directly here), a stock reload, the scores against a direct computation,
compensation against the projections' own outputs, and bad input."""

import copy
import os

import pytest
import torch
from conftest import make_model, make_windows
from torch import nn
from transformers import AutoModelForCausalLM

from rcpu import RcpuError
from rcpu.compensate import ridge
from rcpu.hidden import (
    _PairStats,
    channel_scores,
    channels_to_keep,
    prune_hidden,
    prune_hidden_size,
    residual_norms,
    ridge_diagonal,
    ridge_inputs,
)
from rcpu.models import get_adapter

D = 64  # conftest's hidden size


def _kept(n: int = 40, seed: int = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(D, generator=g)[:n].sort().values


class KeptNorm(nn.Module):
    """An RMSNorm whose mean square runs over the kept channels only, and whose output is zero on
    the removed ones (written from the formula, not from rcpu's surgery)."""

    def __init__(self, norm: nn.Module, mask: torch.Tensor, offset: float):
        super().__init__()
        self.weight = norm.weight
        self.eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        self.mask, self.offset = mask, offset

    def forward(self, x):
        xf = x.float()
        var = (xf.square() * self.mask).sum(-1, keepdim=True) / self.mask.sum()
        y = xf * torch.rsqrt(var + self.eps) * (self.offset + self.weight.float())
        return (y * self.mask).to(x.dtype)


def masked_reference(model: nn.Module, kept: torch.Tensor) -> nn.Module:
    """The dense model with residual channels outside ``kept`` zeroed at the embedding output and at
    every residual write, and every residual norm taken over the kept channels."""
    ref = copy.deepcopy(model)
    adapter = get_adapter(ref)
    mask = torch.zeros(D)
    mask[kept] = 1.0
    dropped = mask == 0
    offset = 1.0 if ref.config.model_type == "gemma3_text" else 0.0
    with torch.no_grad():
        ref.model.embed_tokens.weight[:, dropped] = 0.0
        for layer in adapter.layers:
            for lin in (adapter.attn_out(layer), adapter.mlp_out(layer)):
                lin.weight[dropped] = 0.0
                if lin.bias is not None:
                    lin.bias[dropped] = 0.0
            for name in (adapter.attn_norm_name, adapter.mlp_norm_name, *adapter.post_norm_names):
                if name is not None:
                    setattr(layer, name, KeptNorm(getattr(layer, name), mask, offset))
        ref.model.norm = KeptNorm(ref.model.norm, mask, offset)
    return ref


def test_pruning_equals_the_masked_dense_model(family):
    model = make_model(family, layers=3)
    kept = _kept()
    ref = masked_reference(model, kept)
    pruned = copy.deepcopy(model)
    info = prune_hidden(pruned, kept)
    assert pruned.config.hidden_size == len(kept) and pruned.config.head_dim == 8
    assert pruned.model.embed_tokens.weight.shape == (128, len(kept))
    assert pruned.get_output_embeddings().weight.shape == (128, len(kept))
    assert info["tied_head"] == bool(model.config.tie_word_embeddings)
    assert info["tied_head"] == (pruned.get_output_embeddings().weight is pruned.model.embed_tokens.weight)
    x = make_windows(3, 20, seed=5)
    with torch.no_grad():
        dense, expected, got = model(x).logits, ref(x).logits, pruned(x).logits
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
    assert (dense - expected).abs().max() > 1e-2  # the removed channels mattered


def test_the_reference_is_the_dense_model_when_every_channel_is_kept(family):
    model = make_model(family, layers=2)
    ref = masked_reference(model, torch.arange(D))
    x = make_windows(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(ref(x).logits, model(x).logits, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("tied", [True, False])
def test_gemma3_embedding_scale_is_folded(tied):
    model = make_model("gemma3", layers=2, tie_word_embeddings=tied)
    kept = _kept()
    pruned = copy.deepcopy(model)
    info = prune_hidden(pruned, kept)
    embed = pruned.model.embed_tokens
    assert float(embed.embed_scale) == pytest.approx(len(kept) ** 0.5)
    assert info["embed_scale"] == pytest.approx([D ** 0.5, len(kept) ** 0.5])
    ratio = (D / len(kept)) ** 0.5
    torch.testing.assert_close(embed.weight, model.model.embed_tokens.weight[:, kept] * ratio)
    norm = pruned.model.norm.weight
    expected_norm = (1 + model.model.norm.weight[kept]) / ratio - 1 if tied else model.model.norm.weight[kept]
    torch.testing.assert_close(norm, expected_norm)
    x = make_windows(2, 16, seed=6)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, masked_reference(model, kept)(x).logits, atol=2e-5, rtol=1e-4)


def _reload_check(model, tmp_path, x):
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded) is type(model)
    assert reloaded.config.hidden_size == model.config.hidden_size
    assert reloaded.config.head_dim == model.config.head_dim
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)


def test_pruned_checkpoint_reloads_stock(family, tmp_path):
    model = make_model(family, layers=2)
    windows = make_windows(8, 16)
    prune_hidden(model, _kept(), windows, compensation="ridge_sequential", batch_size=4)
    _reload_check(model, tmp_path, make_windows(2, 20, seed=4))


def test_untied_gemma3_reloads_stock(tmp_path):
    model = make_model("gemma3", layers=2, tie_word_embeddings=False)
    prune_hidden(model, _kept(), make_windows(8, 16), compensation="ridge", batch_size=4)
    _reload_check(model, tmp_path, make_windows(2, 20, seed=4))


def _projection_outputs(model, windows):
    """Every q/k/v/gate/up output W x (fused ones too, without a bias) on ``windows``, by module name."""
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    outs, hooks = {}, []

    def hook(m, a, y):
        outs[names[id(m)]] = y.double() - (0 if m.bias is None else m.bias.double())

    for layer in adapter.layers:
        for lin in (*adapter.attn_in(layer), *adapter.mlp_in(layer)):
            hooks.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    return outs


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "phi3", "olmo2"])
def test_compensation_lowers_the_projection_error(family):
    model = make_model(family, layers=3)
    windows = make_windows(16, 16)
    dense = _projection_outputs(model, windows)
    kept = _kept(40)
    errors, infos, logits = {}, {}, {}
    for compensation in ("none", "ridge", "ridge_sequential"):
        pruned = copy.deepcopy(model)
        infos[compensation] = prune_hidden(pruned, kept, windows, compensation=compensation, ridge_lambda=1e-3,
                                           batch_size=4)
        outs = _projection_outputs(pruned, windows)
        errors[compensation] = {n: float((outs[n] - y).square().sum()) for n, y in dense.items()}
        with torch.no_grad():
            logits[compensation] = pruned(windows).logits.double()
    with torch.no_grad():
        dense_logits = model(windows).logits.double()
    # the LM head (untied: its kept columns; tied: the final norm's weights) reports the logits' own error
    head = infos["ridge_sequential"]["final_norm" if model.config.tie_word_embeddings else "lm_head"]
    direct = float((logits["ridge_sequential"] - dense_logits).square().sum() / dense_logits.square().sum())
    assert head["rel_error"] == pytest.approx(direct, rel=1e-3)
    assert head["rel_error"] < head["rel_error_uncompensated"]
    # the sequential fit's reported errors are the compensated model's own, per layer and sublayer
    adapter = get_adapter(model)
    names = {id(m): n for n, m in model.named_modules()}
    for layer, record in zip(adapter.layers, infos["ridge_sequential"]["layers"], strict=True):
        for part, group in (("attn", adapter.attn_in(layer)), ("mlp", adapter.mlp_in(layer))):
            group_names = [names[id(lin)] for lin in group]
            direct = sum(errors["ridge_sequential"][n] for n in group_names) / sum(
                float(dense[n].square().sum()) for n in group_names)
            assert record[part]["rel_error"] == pytest.approx(direct, rel=1e-3)
            assert record[part]["rel_error"] < 0.9 * record[part]["rel_error_uncompensated"]
    total = {c: sum(e.values()) for c, e in errors.items()}
    assert total["ridge_sequential"] < 0.7 * total["none"]
    assert total["ridge"] < total["none"]
    first = [n for n in dense if ".layers.0." in n]  # the same inputs in every model: a strict win
    for n in first[:1]:
        assert errors["ridge_sequential"][n] < errors["none"][n]


def test_dense_statistics_ridge_is_compensates_ridge():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, 24, dtype=torch.float64)
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)
    kept = torch.tensor([0, 2, 3, 7, 8, 11, 15, 16, 20, 23])
    pairs = _PairStats(24, kept, torch.device("cpu"), separate=False)
    pairs.update(x, None)
    gram, cross, gram_kept = pairs.products()
    for lam in (0.0, 5.0):
        new, info = ridge_inputs(w, gram, cross, gram_kept, kept, lam, relative=False)
        reference = ridge(w, gram, kept, lam, relative=False)
        torch.testing.assert_close(new, reference.weight, rtol=1e-9, atol=1e-9)
    y = x @ w.T
    direct = float((y - x[:, kept] @ new.T).square().sum() / y.square().sum())
    assert info["rel_error"] == pytest.approx(direct, rel=1e-6)
    assert info["rel_error_uncompensated"] == pytest.approx(
        float((y - x[:, kept] @ w[:, kept].T).square().sum() / y.square().sum()), rel=1e-6)


def test_ridge_diagonal_is_the_least_squares_scale_per_input():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 9, generator=g, dtype=torch.float64)
    xp = x[:, [1, 2, 4, 5, 8]] * (1 + 0.3 * torch.randn(40, 1, generator=g, dtype=torch.float64))
    kept = torch.tensor([1, 2, 4, 5, 8])
    w = torch.randn(6, 9, generator=g, dtype=torch.float64)
    pairs = _PairStats(9, kept, torch.device("cpu"), separate=True)
    pairs.update(x, xp)
    lam = 0.5
    scales, info = ridge_diagonal(w, *pairs.products(), kept, lam, relative=False)
    # directly: the output is linear in s, column j = W_K[:, j] x'_j; ridge towards s = 1
    y = (x @ w.T).reshape(-1)
    design = torch.stack([(xp[:, j:j + 1] * w[:, kept[j]]).reshape(-1) for j in range(5)], 1)
    a = torch.cat([design, lam**0.5 * torch.eye(5, dtype=torch.float64)])
    rhs = torch.cat([y, lam**0.5 * torch.ones(5, dtype=torch.float64)])
    torch.testing.assert_close(scales, torch.linalg.lstsq(a, rhs[:, None]).solution[:, 0])
    assert info["rel_error"] == pytest.approx(float((y - design @ scales).square().sum() / y.square().sum()))
    assert info["rel_error_uncompensated"] == pytest.approx(
        float((y - design.sum(1)).square().sum() / y.square().sum()))


@pytest.mark.parametrize("family", ["gemma3", "olmo2", "phi3"])
def test_scores_equal_the_direct_computation(family):
    model = make_model(family, layers=3)
    windows = make_windows(6, 16)
    adapter = get_adapter(model)
    inputs, hooks = [], []
    for layer in adapter.layers:
        for group in (adapter.attn_in(layer), adapter.mlp_in(layer)):
            hooks.append(group[0].register_forward_pre_hook(lambda m, a, grp=group: inputs.append((grp, a[0].double()))))
    final = []
    hooks.append(model.model.norm.register_forward_hook(lambda m, a, y: final.append(y.double())))
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    minitron = sum(x.abs().mean(1).square().sum(0).sqrt() for _, x in inputs)
    output_error = sum(sum(lin.weight.double().square().sum(0) for lin in grp) * x.square().sum((0, 1))
                       for grp, x in inputs)
    output_error = output_error + model.lm_head.weight.double().square().sum(0) * final[0].square().sum((0, 1))
    torch.testing.assert_close(channel_scores(model, windows, "minitron", batch_size=4), minitron, rtol=1e-5, atol=0)
    torch.testing.assert_close(channel_scores(model, windows, "output_error", batch_size=4), output_error,
                               rtol=1e-5, atol=0)


def test_channels_to_keep_and_the_one_call():
    assert channels_to_keep([0.5, 0.1, 0.9, 0.1, 0.3], 3).tolist() == [0, 2, 4]
    assert channels_to_keep([0.2, 0.1, 0.1, 0.1], 2).tolist() == [0, 1]  # ties to the lower index
    model = make_model("qwen3", layers=2)
    windows = make_windows(8, 16)
    info = prune_hidden_size(model, windows, 48, score="output_error", compensation="ridge", multiple_of=16,
                             batch_size=4)
    assert model.config.hidden_size == 48 and len(info["kept"]) == 48
    assert all(n.weight.shape == (48,) for layer in model.model.layers for n in residual_norms(get_adapter(model), layer))


def test_bad_input_is_one_line():
    model = make_model("llama", layers=2)
    windows = make_windows(4, 8)
    cases = [
        (lambda: prune_hidden(model, []), "keep at least one"),
        (lambda: prune_hidden(model, [0, 64]), "must lie in 0..63"),
        (lambda: prune_hidden(model, [1, 1, 2]), "duplicates"),
        (lambda: prune_hidden(model, [0.5]), "integer indices"),
        (lambda: prune_hidden(model, [1, 2], compensation="ridge"), "needs calibration windows"),
        (lambda: prune_hidden(model, [1, 2], windows, compensation="rotation"), "unknown hidden-size compensation"),
        (lambda: channel_scores(model, windows, "taylor"), "unknown hidden-size score"),
        (lambda: channels_to_keep(torch.ones(64), 0), "cannot keep 0 of 64"),
        (lambda: channels_to_keep(torch.ones(64), 65), "cannot keep 65 of 64"),
        (lambda: channels_to_keep(torch.ones(64), 40, multiple_of=32), "not a multiple of 32"),
        (lambda: prune_hidden(model, torch.arange(44)), r"hidden size 44 does not make a loadable llama config "
                                                         r"\(The hidden size \(44\) is not a multiple of the number of "
                                                         r"attention heads \(8\)\)"),
    ]
    for call, message in cases:
        with pytest.raises(RcpuError, match=message) as exc:
            call()
        assert "\n" not in str(exc.value)
    assert model.config.hidden_size == 64 and model.model.embed_tokens.weight.shape[1] == 64  # nothing was cut
    odd = make_model("llama", layers=2)
    from rcpu.models.base import _slice_linear
    _slice_linear(odd.model.layers[1].mlp.down_proj, torch.arange(60), 0)
    with pytest.raises(RcpuError, match="layer 1 reads or writes residual widths"):
        prune_hidden(odd, torch.arange(32))


ACCEL = os.environ.get("RCPU_TEST_ACCELERATOR", "cuda")


@pytest.mark.skipif(ACCEL.startswith("cuda") and not torch.cuda.is_available(),
                    reason="needs CUDA (RCPU_TEST_ACCELERATOR=cpu runs it on the CPU)")
def test_on_the_accelerator_as_on_the_cpu():
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        model = make_model("gemma3", layers=2, tie_word_embeddings=False)
        windows = make_windows(8, 16)
        scores = channel_scores(model, windows, "minitron", batch_size=4)
        torch.testing.assert_close(channel_scores(model, windows, "minitron", batch_size=4, device=ACCEL), scores,
                                   rtol=1e-5, atol=0)
        kept = channels_to_keep(scores, 40)
        on_cpu, on_accel = copy.deepcopy(model), copy.deepcopy(model)
        prune_hidden(on_cpu, kept, windows, compensation="ridge_sequential", batch_size=4)
        prune_hidden(on_accel, kept, windows, compensation="ridge_sequential", batch_size=4, device=ACCEL)
        assert all(p.device.type == "cpu" for p in on_accel.parameters())  # the model stays where it was
        for (name, a), (_, b) in zip(on_cpu.named_parameters(), on_accel.named_parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
