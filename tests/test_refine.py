"""Layer refinement (rcpu.refine): it lowers the error it reports, the report equals a direct
computation, a refinement that does not help is undone, and runs are reproducible."""

import copy

import pytest
import torch
from conftest import make_model, make_windows

from rcpu.api import prune
from rcpu.config import PruneConfig
from rcpu.errors import RcpuError
from rcpu.layer_io import capture_layer_inputs, forward_layer
from rcpu.models import get_adapter
from rcpu.refine import refine_layer, relative_error


def _pruned_and_dense_layer(dtype=torch.float32):
    """Layer 0 of a tiny Llama before and after pruning with ridge (no refinement), and its
    calibration / held-out inputs."""
    dense = make_model("llama", layers=1).to(dtype)
    pruned = copy.deepcopy(dense)
    windows, heldout = make_windows(16, 32), make_windows(8, 32, seed=7)
    prune(pruned, PruneConfig(method="ridge", pruning_ratio=0.5), windows=windows, device="cpu", progress=False)
    adapter = get_adapter(dense)
    batches = capture_layer_inputs(dense, adapter, windows, 4, torch.device("cpu"))
    held = capture_layer_inputs(dense, adapter, heldout, 4, torch.device("cpu"))
    return get_adapter(pruned).layers[0], adapter.layers[0], batches, held


def _direct_error(layer, dense, batches) -> float:
    """The relative error from stored outputs, in float64."""
    err = ref = 0.0
    with torch.no_grad():
        for h, kw in batches:
            y = forward_layer(dense, h, kw).double()
            err += float((forward_layer(layer, h, kw).double() - y).square().sum())
            ref += float((y - h.double()).square().sum())
    return err / ref


def test_refinement_lowers_the_heldout_error_it_reports():
    layer, dense, batches, held = _pruned_and_dense_layer()
    before = _direct_error(layer, dense, held)
    log = refine_layer(layer, dense, batches, epochs=8, lr=1e-3, seed=0, forward=forward_layer, heldout=held)
    assert log["rel_error_before"] == pytest.approx(before, rel=1e-5)
    assert log["rel_error_after"] == pytest.approx(_direct_error(layer, dense, held), rel=1e-5)
    assert log["kept"] and log["rel_error_after"] < 0.95 * before
    assert log["measured_on"] == "heldout" and log["steps"] == 8 * len(batches)
    assert relative_error(layer, dense, held, forward_layer) == pytest.approx(log["rel_error_after"], rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_refinement_that_does_not_help_is_undone(dtype):
    layer, dense, batches, held = _pruned_and_dense_layer(dtype)
    weights = {k: v.clone() for k, v in layer.state_dict().items()}
    log = refine_layer(layer, dense, batches, epochs=2, lr=10.0, seed=0, forward=forward_layer, heldout=held)
    assert not log["kept"] and log["rel_error_after"] > log["rel_error_before"]
    for k, v in layer.state_dict().items():
        assert torch.equal(v, weights[k]), k


def test_bfloat16_layer_is_refined_in_float32_and_stays_bfloat16():
    layer, dense, batches, held = _pruned_and_dense_layer(torch.bfloat16)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    log = refine_layer(layer, dense, batches, epochs=8, lr=1e-3, seed=0, forward=forward_layer, heldout=held)
    assert all(p.dtype == torch.bfloat16 for p in layer.parameters())
    assert log["kept"] and log["rel_error_after"] < log["rel_error_before"]
    assert any(not torch.equal(v, before[k]) for k, v in layer.state_dict().items())


def test_prune_with_refinement_is_reproducible_and_recorded(family):
    windows, heldout = make_windows(16, 32), make_windows(8, 32, seed=7)
    cfg = PruneConfig(method="ridge", pruning_ratio=0.5, refine_epochs=8)
    runs = []
    for _ in range(2):
        model = make_model(family, layers=2)
        _, report = prune(model, cfg, windows=windows, heldout_windows=heldout, device="cpu", progress=False)
        runs.append((model, report))
    (a, ra), (b, rb) = runs
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(va, vb), k
    assert ra.config["refine_epochs"] == 8 and ra.config["refine_lr"] == cfg.refine_lr
    logs = [layer["refine"] for layer in ra.layers]
    assert all(log["epochs"] == 8 and log["measured_on"] == "heldout" for log in logs)
    assert all(log["kept"] == (log["rel_error_after"] < log["rel_error_before"]) for log in logs)


@pytest.mark.parametrize("kwargs,message", [({"refine_epochs": -1}, "--refine_epochs"),
                                            ({"refine_epochs": 1.5}, "--refine_epochs"),
                                            ({"refine_lr": 0}, "--refine_lr")])
def test_bad_refinement_settings_are_one_line_errors(kwargs, message):
    with pytest.raises(RcpuError, match=message):
        PruneConfig(**kwargs).validate()


def test_precomputed_windows_need_heldout_windows_for_refinement():
    with pytest.raises(RcpuError, match="heldout_windows"):
        prune(make_model(), PruneConfig(method="ridge", refine_epochs=1), windows=make_windows(), device="cpu",
              progress=False)
