"""Depth pruning: layer scores against a direct computation, removal against skipping, stock reload."""

import copy

import pytest
import torch
from conftest import make_model, make_windows
from transformers import AutoModelForCausalLM

from rcpu import RcpuError
from rcpu.depth import layer_scores, layers_to_remove, remove_layers
from rcpu.layer_io import PassThrough


@pytest.mark.parametrize("criterion", ["block_influence", "angular"])
def test_layer_scores_equal_the_direct_computation(criterion):
    model = make_model("gemma3", layers=3)  # sliding and global layers, scaled embedding
    windows = make_windows(6, 16)
    scores = layer_scores(model, windows, criterion, batch_size=4)
    # direct: each layer's input and output inside the model's own forward pass
    outs = []
    hooks = [layer.register_forward_hook(lambda m, a, k, out: outs.append((k.get("hidden_states", a[0] if a else None), out)),
                                         with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(windows)
    for h in hooks:
        h.remove()
    direct = []
    for h_in, h_out in outs:
        cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1).clamp(-1, 1)
        direct.append(float((1 - cos).mean()) if criterion == "block_influence"
                      else float((torch.arccos(cos) / torch.pi).mean()))
    assert scores == pytest.approx(direct, rel=1e-4, abs=1e-6)


def test_loss_criterion_is_the_loss_increase_without_the_layer():
    model = make_model("llama", layers=3)
    windows = make_windows(4, 16)
    scores = layer_scores(model, windows, "loss", batch_size=4)

    def loss(m):
        with torch.no_grad():
            return float(m(windows, labels=windows).loss)

    dense = loss(model)
    for i, score in enumerate(scores):
        skipped = copy.deepcopy(model)
        remove_layers(skipped, [i])
        assert score == pytest.approx(loss(skipped) - dense, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3", "smollm3", "phi3"])
def test_removing_layers_equals_skipping_them_and_reloads_stock(tmp_path, family):
    model = make_model(family, layers=4)
    skipped = copy.deepcopy(model)
    for i in (1, 2):
        skipped.model.layers[i] = PassThrough(skipped.model.layers[i])
    remove_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    for key in ("layer_types", "no_rope_layers"):
        if getattr(model.config, key, None) is not None:
            assert len(getattr(model.config, key)) == 2
    x = make_windows(2, 20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, skipped(x).logits, atol=0, rtol=0)
        generated = model.generate(x[:1, :5], max_new_tokens=4, do_sample=False)  # the cache indexes layers
    model.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(reloaded) is type(model)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, model(x).logits, atol=0, rtol=0)
        assert torch.equal(reloaded.generate(x[:1, :5], max_new_tokens=4, do_sample=False), generated)


def test_layers_to_remove_and_bad_input():
    assert layers_to_remove([0.3, 0.1, 0.2, 0.1], 2) == [1, 3]
    with pytest.raises(RcpuError, match="keep at least one"):
        layers_to_remove([0.1, 0.2], 2)
    with pytest.raises(RcpuError, match="unknown depth criterion"):
        layer_scores(make_model(), make_windows(2, 8), "entropy")
    with pytest.raises(RcpuError, match="cannot be removed"):
        remove_layers(make_model(layers=2), [5])
