"""Checkpoints with per-layer widths: saved with the rcpu modeling file, reloaded without rcpu."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import VOCAB, make_model

from rcpu.models import get_adapter
from rcpu.nonuniform import MODELING_FILE, is_uniform, layer_widths, prepare_nonuniform_save

# layer 0: 6 heads / 2 KV heads (3 per group), layer 1: 4 heads / 1 KV head, layer 2: untouched
WIDTHS = [
    {"num_attention_heads": 6, "num_key_value_heads": 2, "intermediate_size": 96},
    {"num_attention_heads": 4, "num_key_value_heads": 1, "intermediate_size": 40},
    {"num_attention_heads": 8, "num_key_value_heads": 2, "intermediate_size": 72},
]

# Runs in ONE fresh interpreter that never imports rcpu (importing transformers is the slow
# part): for each checkpoint, load it, run it, save it again and reload the copy.
LOADER = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForCausalLM
    x = torch.load(sys.argv[1])
    for ckpt in sys.argv[2:]:
        model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
        eager = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True, attn_implementation="eager")
        model.save_pretrained(ckpt + "-resaved")
        resaved = AutoModelForCausalLM.from_pretrained(ckpt + "-resaved", trust_remote_code=True).eval()
        with torch.no_grad():
            res = {"logits": model(x).logits, "eager": eager.eval()(x).logits, "resaved": resaved(x).logits,
                   "generated": model.generate(x[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)}
        torch.save(res, ckpt + "-out.pt")
        layers = model.model.layers
        json.dump({
            "class": type(model).__name__,
            "dtype": str(next(model.parameters()).dtype),
            "tied": model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr(),
            "shapes": [{n: list(p.shape) for n, p in layer.named_parameters()} for layer in layers],
            "groups": [layer.self_attn.num_key_value_groups for layer in layers],
        }, open(ckpt + "-out.json", "w"))
    assert not [m for m in sys.modules if m == "rcpu" or m.startswith("rcpu.")], "rcpu was imported"
""")
CLASS = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
CASES = ["llama", "mistral", "qwen2", "llama_biases", "mistral_biases", "qwen2_biases"]
X = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(5))


def _make_nonuniform(family: str, seed: int = 0, **extra) -> torch.nn.Module:
    model = make_model(family, layers=3, seed=seed, **extra)
    adapter = get_adapter(model)
    layers = adapter.layers
    adapter.prune_attention(layers[0], torch.tensor([0, 1, 2, 4, 5, 6]), torch.tensor([0, 1]))
    adapter.prune_attention(layers[1], torch.tensor([4, 5, 6, 7]), torch.tensor([1]))
    g = torch.Generator().manual_seed(seed + 1)
    adapter.prune_mlp(layers[1], torch.randperm(96, generator=g)[:40].sort().values)
    adapter.prune_mlp(layers[2], torch.randperm(96, generator=g)[:72].sort().values)
    return model


def _make_llama_with_biases() -> torch.nn.Module:
    """FLAP-style compensation: o_proj / down_proj biases (the config switches also give
    q/k/v and gate/up biases, randomised here too); tied embeddings."""
    model = make_model("llama", layers=3, seed=3, attention_bias=True, mlp_bias=True, tie_word_embeddings=True)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    adapter = get_adapter(model)
    layers = adapter.layers
    adapter.prune_attention(layers[0], torch.tensor([0, 1, 2, 4, 5, 6]), torch.tensor([0, 1]))
    adapter.prune_attention(layers[1], torch.tensor([4, 5, 6, 7]), torch.tensor([1]))
    adapter.prune_mlp(layers[1], torch.arange(0, 80, 2))
    adapter.prune_mlp(layers[2], torch.arange(24, 96))
    for layer in layers:
        adapter.add_output_bias(adapter.attn_out(layer), torch.randn(64, generator=g))
        adapter.add_output_bias(adapter.mlp_out(layer), torch.randn(64, generator=g))
    return model


def _make_with_output_biases(family: str) -> torch.nn.Module:
    """FLAP-style compensation on a family whose config has no bias switches: only o_proj /
    down_proj get biases, in every layer (as the adapter's finalize gives them)."""
    model = _make_nonuniform(family, seed=5)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(6)
    for layer in adapter.layers:
        adapter.add_output_bias(adapter.attn_out(layer), torch.randn(64, generator=g))
        adapter.add_output_bias(adapter.mlp_out(layer), torch.randn(64, generator=g))
    return model


def _make_case(case: str) -> torch.nn.Module:
    if case == "llama_biases":
        return _make_llama_with_biases()
    if case.endswith("_biases"):
        return _make_with_output_biases(case.split("_")[0])
    return _make_nonuniform(case)


def _save(model, path):
    model.save_pretrained(path)
    prepare_nonuniform_save(model, path)
    return path


@pytest.fixture(scope="module")
def reloaded(tmp_path_factory):
    """case -> (in-memory model, checkpoint dir, tensors from the subprocess, info from it)."""
    tmp = tmp_path_factory.mktemp("nonuniform")
    models = {case: _make_case(case) for case in CASES}
    ckpts = {case: _save(model, tmp / case) for case, model in models.items()}
    torch.save(X, tmp / "inputs.pt")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "hf_modules")}
    proc = subprocess.run([sys.executable, "-c", LOADER, str(tmp / "inputs.pt"), *map(str, ckpts.values())],
                          capture_output=True, text=True, env=env, cwd=tmp, stdin=subprocess.DEVNULL, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {case: (models[case], ckpts[case], torch.load(f"{ckpts[case]}-out.pt"),
                   json.loads(Path(f"{ckpts[case]}-out.json").read_text())) for case in CASES}


@pytest.mark.parametrize("case", CASES)
def test_nonuniform_checkpoint_reloads_without_rcpu(case, reloaded):
    model, ckpt, got, info = reloaded[case]
    family = case.split("_")[0]
    assert layer_widths(model) == WIDTHS
    assert not is_uniform(model)
    with torch.no_grad():
        ref_logits = model(X).logits
        ref_gen = model.generate(X[:1, :6], max_new_tokens=8, do_sample=False, pad_token_id=0)
    torch.testing.assert_close(got["logits"], ref_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["resaved"], ref_logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(got["eager"], ref_logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(got["generated"], ref_gen)  # KV cache with per-layer KV widths
    assert info["class"] == f"Rcpu{CLASS[family]}ForCausalLM"
    assert info["dtype"] == "torch.float32"
    assert info["tied"] == bool(model.config.tie_word_embeddings)
    assert info["shapes"] == [{n: list(p.shape) for n, p in layer.named_parameters()}
                              for layer in model.model.layers]
    assert info["groups"] == [3, 4, 4]

    cfg = json.loads((ckpt / "config.json").read_text())
    cls = CLASS[family]
    assert cfg["model_type"] == f"rcpu_{family}"
    assert cfg["architectures"] == [f"Rcpu{cls}ForCausalLM"]
    assert cfg["auto_map"] == {"AutoConfig": f"modeling_rcpu.Rcpu{cls}Config",
                               "AutoModelForCausalLM": f"modeling_rcpu.Rcpu{cls}ForCausalLM"}
    assert cfg["layer_num_attention_heads"] == [6, 4, 8]
    assert cfg["layer_num_key_value_heads"] == [2, 1, 2]
    assert cfg["layer_intermediate_size"] == [96, 40, 72]
    # the rest of the original config is kept
    assert (cfg["hidden_size"], cfg["num_attention_heads"], cfg["head_dim"], cfg["vocab_size"]) == (64, 8, 8, VOCAB)
    assert cfg["tie_word_embeddings"] == model.config.tie_word_embeddings
    if case == "llama_biases":
        assert cfg["attention_bias"] is True and cfg["mlp_bias"] is True
    if case in ("mistral_biases", "qwen2_biases"):
        assert cfg["o_proj_bias"] is True and cfg["down_proj_bias"] is True
        assert all("self_attn.o_proj.bias" in s and "mlp.down_proj.bias" in s for s in info["shapes"])
        assert not any("gate_proj.bias" in s for s in info["shapes"])
    else:
        assert "o_proj_bias" not in cfg and "down_proj_bias" not in cfg
    modeling = (ckpt / "modeling_rcpu.py").read_text()
    assert modeling == MODELING_FILE.read_text()
    assert modeling.startswith("# Generated by rcpu")
    assert "import rcpu" not in modeling and "from rcpu" not in modeling


def test_loading_needs_trust_remote_code(tmp_path):
    """Nobody silently gets a wrong model: transformers' own errors."""
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    ckpt = _save(_make_nonuniform("llama"), tmp_path / "ckpt")
    for loader in (AutoModelForCausalLM, AutoConfig):
        with pytest.raises(ValueError, match="trust_remote_code"):
            loader.from_pretrained(ckpt, trust_remote_code=False)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # the stock class: shape mismatch
        LlamaForCausalLM.from_pretrained(ckpt)


def test_uniform_model_widths():
    model = make_model("qwen2", layers=3)
    assert is_uniform(model)
    assert layer_widths(model) == [{"num_attention_heads": 8, "num_key_value_heads": 2,
                                    "intermediate_size": 96}] * 3
    adapter = get_adapter(model)  # same cut in every layer: still uniform
    for layer in adapter.layers:
        adapter.prune_attention(layer, torch.tensor([0, 1, 4, 5]), torch.tensor([0, 1]))
        adapter.prune_mlp(layer, torch.arange(48))
    assert is_uniform(model)
    assert layer_widths(model)[0] == {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 48}


def test_rejects_unsupported_and_inconsistent_models(tmp_path):
    fake = SimpleNamespace(config=SimpleNamespace(model_type="gpt2"))
    with pytest.raises(ValueError, match="gpt2"):
        prepare_nonuniform_save(fake, tmp_path)

    # o_proj biases in some layers only: the config builds them in every layer or in none;
    # refuse instead of writing weights the loader would fill with random biases
    model = _make_nonuniform("mistral")
    adapter = get_adapter(model)
    adapter.add_output_bias(adapter.attn_out(adapter.layers[0]), torch.ones(64))
    model.save_pretrained(tmp_path / "bad")
    with pytest.raises(ValueError, match="layer 1 self_attn.o_proj lacks a bias"):
        prepare_nonuniform_save(model, tmp_path / "bad")
    with pytest.raises(FileNotFoundError):
        prepare_nonuniform_save(_make_nonuniform("llama"), tmp_path / "missing")
