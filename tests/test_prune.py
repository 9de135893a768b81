"""End-to-end pruning on tiny random models: slicing, GQA, compensation, save/reload."""

import copy
import json
import subprocess
import sys

import pytest
import torch
from conftest import make_model, make_tokenizer, make_windows, same_threads_env

from rcpu import RcpuError
from rcpu.api import prune
from rcpu.config import PruneConfig
from rcpu.export import PROVENANCE, save_pruned
from rcpu.loading import load_model
from rcpu.models import get_adapter


class _KeptChannelsRMSNorm(torch.nn.Module):
    """An RMSNorm over a whole projection whose mean square runs over the kept channels only:
    what a pruned OLMo 2 q_norm / k_norm computes, written directly on the unpruned width."""

    def __init__(self, norm, kept: torch.Tensor):
        super().__init__()
        self.weight, self.eps, self.kept = norm.weight, norm.variance_epsilon, kept

    def forward(self, x):
        x32 = x.float()
        var = x32[..., self.kept].pow(2).mean(-1, keepdim=True)
        return (self.weight * (x32 * torch.rsqrt(var + self.eps))).to(x.dtype)


def _rows(heads, hd):
    return (torch.tensor(heads)[:, None] * hd + torch.arange(hd)).reshape(-1)


def _masked_dense(model, report):
    """The dense model with the removed heads / channels zeroed at o_proj / down_proj inputs
    (and a norm over a whole projection taken over the kept heads' channels only)."""
    dense = copy.deepcopy(model)
    adapter = get_adapter(dense)
    for layer, res in zip(adapter.layers, report.layers, strict=False):
        o, down = adapter.attn_out(layer), adapter.mlp_out(layer)
        hd = layer.self_attn.head_dim
        mask = torch.zeros(o.in_features, dtype=torch.bool)
        for h in res["kept_heads"]:
            mask[h * hd:(h + 1) * hd] = True
        o.weight.data[:, ~mask] = 0
        keep = torch.zeros(down.in_features, dtype=torch.bool)
        keep[res["kept_channels"]] = True
        down.weight.data[:, ~keep] = 0
        attn = adapter.attn(layer)
        for name, which in adapter.projection_norm_names.items():
            kept = _rows(res["kept_heads"] if which == "q" else res["kept_kv_heads"], hd)
            setattr(attn, name, _KeptChannelsRMSNorm(getattr(attn, name), kept))
    return dense


@pytest.mark.parametrize("head_unit", ["query", "group"])
def test_sliced_equals_masked_dense(family, head_unit):
    model = make_model(family)
    original = copy.deepcopy(model)
    windows = make_windows()
    cfg = PruneConfig(method="wanda-sp", pruning_ratio=0.5, head_unit=head_unit, batch_size=5)
    pruned, report = prune(model, cfg, windows=windows, device="cpu", progress=False)
    masked = _masked_dense(original, report)
    x = make_windows(3, 20, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(pruned(x).logits, masked(x).logits, atol=1e-5, rtol=1e-5)
    cfg_out = pruned.config
    assert cfg_out.num_attention_heads == 4
    assert cfg_out.num_key_value_heads == (2 if head_unit == "query" else 1)
    assert cfg_out.intermediate_size == 48
    adapter = get_adapter(pruned)
    for layer in adapter.layers:  # every layer has the same, equal-sized groups
        geom = adapter.geometry(layer)
        assert (geom.num_heads, geom.num_kv_heads) == (4, cfg_out.num_key_value_heads)
        assert sum(lin.out_features for lin in adapter.attn_in(layer)) == (4 + 2 * geom.num_kv_heads) * 8
        assert adapter.attn(layer).num_key_value_groups * cfg_out.num_key_value_heads == 4
        assert adapter.mlp_out(layer).in_features == 48
        assert sum(lin.out_features for lin in adapter.mlp_in(layer)) == 2 * 48


def test_compensation_lowers_layer_error_and_is_reproducible():
    windows = make_windows(32, 32)
    errs = {}
    for method in ("rcpu", "rcpu-scaled", "ridge"):
        _, rep = prune(make_model(), PruneConfig(method=method, pruning_ratio=0.3, batch_size=8), windows=windows,
                       device="cpu", progress=False)
        for layer in rep.layers:
            for part in ("attn", "mlp"):
                assert layer[part]["rel_error"] < layer[part]["rel_error_uncompensated"]
        errs[method] = rep.layers[0]["mlp"]["rel_error"]
    assert errs["ridge"] < errs["rcpu-scaled"] <= errs["rcpu"]
    a, _ = prune(make_model(), PruneConfig(pruning_ratio=0.3), windows=windows, device="cpu", progress=False)
    b, _ = prune(make_model(), PruneConfig(pruning_ratio=0.3), windows=windows, device="cpu", progress=False)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=False):
        assert na == nb and torch.equal(pa, pb)


def test_rank_deficient_calibration_warns_and_falls_back():
    model = make_model(hidden=64, heads=8, kv_heads=8)  # MHA: |K| = 32 kept o_proj inputs at ratio 0.5
    windows = make_windows(2, 8)  # 16 tokens < 32
    _, report = prune(model, PruneConfig(method="rcpu", pruning_ratio=0.5), windows=windows, device="cpu",
                      progress=False)
    assert report.warnings and "rank-deficient" in report.warnings[0]
    assert report.layers[0]["attn"]["fallback"] == "none"


def test_starved_rotation_skips_the_gram_and_equals_plain_slicing(monkeypatch):
    """With fewer tokens than min(d_out, |K|) the rotation's fallback is known up front: no
    Gram matrix, products or SVD, and the same model as slicing without compensation."""
    windows = make_windows(1, 12)  # 12 tokens < |K| = 16 (o_proj) and 32 (down_proj), d_out 32
    plain, _ = prune(make_model(hidden=32, heads=4, kv_heads=2, intermediate=64),
                     PruneConfig(method="rcpu", compensation="none", pruning_ratio=0.5), windows=windows,
                     device="cpu", progress=False)
    import rcpu.compensate as comp
    import rcpu.stats as stats

    def forbidden(*_a, **_k):
        raise AssertionError("a starved rotation must not form the Gram matrix or its products")
    monkeypatch.setattr(comp, "rotation_products", forbidden)
    monkeypatch.setattr(stats, "_accumulate", forbidden)
    pruned, report = prune(make_model(hidden=32, heads=4, kv_heads=2, intermediate=64),
                           PruneConfig(method="rcpu", pruning_ratio=0.5), windows=windows, device="cpu",
                           progress=False)
    for layer in report.layers:
        for sub in ("attn", "mlp"):
            assert layer[sub]["fallback"] == "none" and "(12 calibration tokens <" in layer[sub]["reason"]
    assert len(report.warnings) == 2 * len(report.layers)
    for (na, pa), (nb, pb) in zip(plain.state_dict().items(), pruned.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("method", ["rcpu", "ridge-auto"])
def test_split_statistics_passes_change_nothing(monkeypatch, method):
    """The attention's statistics collected in their own pass (stopped at o_proj) after the MLP
    is pruned are those of the shared pass: the same weights, bit for bit."""
    import rcpu.pipeline as pipeline

    calls = []
    real = pipeline._split_passes
    monkeypatch.setattr(pipeline, "_split_passes", lambda *a: calls.append(real(*a)) or calls[-1])
    windows, heldout = make_windows(8, 16), make_windows(4, 16, seed=2)
    split, _ = prune(make_model(), PruneConfig(method=method, pruning_ratio=0.3), windows=windows,
                     heldout_windows=heldout, device="cpu", progress=False)
    assert calls and all(calls)
    monkeypatch.setattr(pipeline, "_split_passes", lambda *a: False)
    shared, _ = prune(make_model(), PruneConfig(method=method, pruning_ratio=0.3), windows=windows,
                      heldout_windows=heldout, device="cpu", progress=False)
    for (na, pa), (nb, pb) in zip(split.state_dict().items(), shared.state_dict().items(), strict=True):
        assert na == nb and torch.equal(pa, pb)


@pytest.mark.parametrize("method", ["rcpu", "rcpu-scaled"])
def test_direct_rotation_products_match_the_gram_route(method):
    """--rotation_products direct (a second pass, no MLP Gram matrix) prunes the same model
    as the Gram route up to float32 rounding, and says so in the per-layer record. (One layer:
    a tiny random model's next-layer SVDs can turn rounding-level input changes into 1e-4.)"""
    windows = make_windows(8, 16)
    models = {}
    for route in ("gram", "direct"):
        models[route], report = prune(make_model(layers=1), PruneConfig(method=method, pruning_ratio=0.3,
                                                                        rotation_products=route),
                                      windows=windows, device="cpu", progress=False)
        for layer in report.layers:
            assert (layer["mlp"].get("products") == "direct") == (route == "direct")
            assert "fallback" not in layer["mlp"] and "products" not in layer["attn"]
    for (na, pa), (nb, pb) in zip(models["gram"].state_dict().items(), models["direct"].state_dict().items(),
                                  strict=True):
        assert na == nb
        if "down_proj" in na:  # the attention's statistics and solve are the same in both routes
            torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)
            assert not torch.equal(pa, pb)  # (it really took the other route)
        else:
            assert torch.equal(pa, pb), na
    with pytest.raises(RcpuError, match="direct needs --compensation rotation"):
        PruneConfig(method="ridge-auto", rotation_products="direct").validate()


def test_params_reported():
    model = make_model()
    n0 = sum(p.numel() for p in model.parameters())
    pruned, report = prune(model, PruneConfig(pruning_ratio=0.5), windows=make_windows(), device="cpu",
                           progress=False)
    p = report.params
    assert p["total_before"] == n0 - model.lm_head.weight.numel() * int(model.config.tie_word_embeddings)
    assert p["total_after"] == sum(x.numel() for x in {id(x): x for x in pruned.parameters()}.values())
    assert 0.45 < p["ratio_attn_mlp"] < 0.55 and 0 < p["ratio_total"] < p["ratio_attn_mlp"]


_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32, trust_remote_code=sys.argv[4] == "1").eval()
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    torch.save(m(x).logits, sys.argv[3])
assert "rcpu" not in sys.modules
print(sum(p.numel() for p in m.parameters()))
"""


@pytest.mark.parametrize("family,method", [("llama", "rcpu"), ("qwen2", "ridge"), ("mistral", "rcpu-scaled"),
                                           ("llama", "bias"), ("llama", "flap"), ("qwen2", "global"),
                                           ("mistral", "global_mlp"), ("qwen2", "error")])
def test_save_reload_identical_logits(tmp_path, family, method):
    cfg = {"bias": PruneConfig(method="wanda-sp", compensation="bias", pruning_ratio=0.5),
           "global": PruneConfig(method="rcpu", allocation="global", pruning_ratio=0.5),
           "global_mlp": PruneConfig(method="flap-ridge", allocation="global_mlp", pruning_ratio=0.5),
           "error": PruneConfig(method="flap-ridge", allocation="error", pruning_ratio=0.5)}.get(
        method, PruneConfig(method=method, pruning_ratio=0.5))
    heldout = make_windows(8, 32, seed=7) if cfg.needs_heldout else None
    pruned, report = prune(make_model(family), cfg, windows=make_windows(), heldout_windows=heldout, device="cpu",
                           progress=False)
    nonuniform = method in ("flap", "global", "global_mlp", "error")
    assert report.params["uniform"] != nonuniform  # per-layer widths differ under global allocation
    out = save_pruned(pruned, None, tmp_path / "out", report.to_dict())
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dir left behind
    x = make_windows(2, 16, seed=5)
    torch.save(x, tmp_path / "x.pt")
    proc = subprocess.run([sys.executable, "-c", _RELOAD, str(out), str(tmp_path / "x.pt"), str(tmp_path / "y.pt"),
                           str(int(nonuniform))], capture_output=True, text=True, check=True,
                          env=same_threads_env(HF_MODULES_CACHE=str(tmp_path / "modules")))
    with torch.no_grad():
        torch.testing.assert_close(torch.load(tmp_path / "y.pt"), pruned(x).logits, atol=0, rtol=0)
    assert int(proc.stdout.split()[-1]) == sum(p.numel() for p in pruned.parameters())
    saved = json.loads((out / "config.json").read_text())
    assert saved["head_dim"] == 8
    if nonuniform:
        assert (out / "modeling_rcpu.py").exists() and "auto_map" in saved
        assert saved["layer_intermediate_size"] == report.params["intermediate_after"]
    else:
        assert saved["intermediate_size"] == 48 and "auto_map" not in saved
    if method == "bias":
        assert saved["attention_bias"] and saved["mlp_bias"]
    prov = json.loads((out / PROVENANCE).read_text())
    assert prov["config"]["method"] == cfg.method
    assert len(prov["layers"]) == 2 and "kept_channels" in prov["layers"][0]


def test_existing_output_is_refused(tmp_path):
    pruned, report = prune(make_model(), PruneConfig(method="wanda-sp"), windows=make_windows(), device="cpu",
                           progress=False)
    (tmp_path / "out").mkdir()
    with pytest.raises(RcpuError, match="already exists"):
        save_pruned(pruned, None, tmp_path / "out", {})
    out = save_pruned(pruned, None, tmp_path / "out", {}, overwrite=True)
    assert (out / "config.json").exists()


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_bad_ratio(ratio):
    with pytest.raises(RcpuError, match="pruning_ratio"):
        prune(make_model(), PruneConfig(pruning_ratio=ratio), windows=make_windows())


def test_bad_method_and_names():
    with pytest.raises(RcpuError, match="unknown method"):
        PruneConfig(method="sparsegpt").validate()
    with pytest.raises(RcpuError, match="unknown compensation"):
        PruneConfig(compensation="magic").validate()
    with pytest.raises(RcpuError, match="unknown score"):
        PruneConfig(score="magic").validate()


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50))
    with pytest.raises(RcpuError, match=r"model type 'gpt2' is not supported by rcpu; supported: gemma3_text, llama, "
                                        r"mistral, olmo2, phi3, qwen2, qwen3, smollm3 \(dense decoder-only"):
        prune(gpt2, PruneConfig(), windows=make_windows())


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_bias_compensation_without_config_switches_uses_the_rcpu_config(family, tmp_path):
    """Qwen2 / Mistral configs cannot switch on o_proj / down_proj biases: uniform widths with
    FLAP's bias go to the rcpu config (two bias keys) and reload with the same logits."""
    model, report = prune(make_model(family), PruneConfig(method="wanda-sp", compensation="bias", pruning_ratio=0.5),
                          windows=make_windows(), device="cpu", progress=False)
    assert report.params["uniform"] and report.checkpoint["kind"] == "per-layer"
    assert "o_proj / down_proj biases" in report.checkpoint["note"]
    for layer in model.model.layers:
        assert layer.self_attn.o_proj.bias is not None and layer.mlp.down_proj.bias is not None
        assert layer.mlp.gate_proj.bias is None and (layer.self_attn.q_proj.bias is not None) == (family == "qwen2")
    out = save_pruned(model, make_tokenizer(), tmp_path / "out", report.to_dict())
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"] == f"rcpu_{family}" and cfg["o_proj_bias"] and cfg["down_proj_bias"]
    x = make_windows(2, 16, seed=5)
    with torch.no_grad():
        assert torch.equal(load_model(str(out)).model(x).logits, model(x).logits)


def test_ridge_auto_picks_lambda_on_heldout_windows():
    cfg = PruneConfig(method="ridge-auto", pruning_ratio=0.5)
    with pytest.raises(RcpuError, match="heldout_windows"):
        prune(make_model(), cfg, windows=make_windows(32, 32))
    _, report = prune(make_model(), cfg, windows=make_windows(32, 32), heldout_windows=make_windows(8, 32, seed=7),
                      device="cpu", progress=False)
    for layer in report.layers:
        for part in ("attn", "mlp"):
            info = layer[part]
            errors = info["heldout_errors"]
            assert set(errors) == {f"{x:g}" for x in cfg.ridge_grid}
            assert f"{info['lambda']:g}" == min(errors, key=errors.get)
            assert info["heldout_tokens"] == 8 * 32
    assert report.config["ridge_lambda"] == "auto" and report.calibration["heldout_windows"]["n"] == 8


@pytest.mark.parametrize("method", ["rcpu", "ridge-auto"])
def test_float32_gram_matrices_give_nearly_the_float64_result(method):
    """--gram_dtype float32 halves the Gram matrices' memory; the pruned model must choose the
    same units and stay within float32 rounding of the float64 run."""
    windows, heldout = make_windows(), make_windows(8, 32, seed=7)
    runs = {}
    for dtype in ("float64", "float32"):
        model = make_model("qwen2")
        cfg = PruneConfig(method=method, pruning_ratio=0.5, gram_dtype=dtype)
        _, report = prune(model, cfg, windows=windows, heldout_windows=heldout, device="cpu", progress=False)
        runs[dtype] = (model, report)
    (m64, r64), (m32, r32) = runs["float64"], runs["float32"]
    for a, b in zip(r64.layers, r32.layers, strict=True):
        assert a["kept_heads"] == b["kept_heads"] and a["kept_channels"] == b["kept_channels"]
    x = make_windows(2, 16, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(m32(x).logits, m64(x).logits, rtol=1e-3, atol=1e-3)



def test_default_method_is_pinned():
    """What `rcpu prune` runs without --method. Changing the default is a decision with its own
    measurements (docs/results.md), not a side effect: this test changes with it."""
    from rcpu.cli import build_parser

    cfg = PruneConfig().validate()
    assert cfg.method == "rcpu"
    assert (cfg.score, cfg.compensation, cfg.allocation, cfg.statistics) == ("rcpu", "rotation", "uniform", "sequential")
    assert build_parser().parse_args(["prune"]).method == "rcpu"


def test_registries_name_every_choice():
    """Compensations and allocations come from their registries; the config offers exactly those."""
    from rcpu.allocation import ALLOCATIONS
    from rcpu.compensations import COMPENSATIONS
    from rcpu.config import PRESETS

    assert set(COMPENSATIONS) == {"none", "bias", "ridge", "rotation", "rotation_scale"}
    assert set(ALLOCATIONS) == {"uniform", "global", "global_mlp", "error"}
    for preset in PRESETS.values():
        assert preset.get("compensation", "rotation") in COMPENSATIONS
        assert preset.get("allocation", "uniform") in ALLOCATIONS
    for bad in ({"compensation": "auto"}, {"allocation": "loss"}, {"score": "auto"}):
        with pytest.raises(RcpuError):
            PruneConfig(**bad).validate()
