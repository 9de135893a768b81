"""One run driver for every way of pruning a model.

In memory (:func:`rcpu.api.prune`) or streamed from disk one layer at a time
(:func:`rcpu.streaming.prune_checkpoint`), a run is the same sequence: place the hidden
states, capture the inputs of layer 0, make the plans (or restore them), check that the
result can be saved before any layer changes, prune the layers in order, and report. Only
where layers come from and go to differs; that is the :class:`rcpu.pipeline.LayerStore`
the driver is given.
"""

from __future__ import annotations

import logging
import resource
import time
from dataclasses import dataclass

import torch
from torch import nn

from .allocation import make_plans
from .compensations import COMPENSATIONS
from .config import PruneConfig
from .layer_io import capture_layer_inputs, hidden_state_storage
from .models import DecoderAdapter, get_adapter
from .models.checkpoint import SavedFormat
from .pipeline import LayerResult, LayerStore, run_sequential
from .report import PeakMemory, PruneReport, count_params
from .select import LayerPlan, plan_uniform
from .shapes import AttentionGeometry, LayerShape

logger = logging.getLogger(__name__)


def planned_shape(shape: LayerShape, plan: LayerPlan) -> LayerShape:
    """The shape a layer of ``shape`` will have after ``plan``."""
    g = shape.attn
    attn = AttentionGeometry(g.num_heads - plan.heads_removed(g), g.num_kv_heads - plan.groups_removed,
                             g.head_dim, g.hidden_size)
    return LayerShape(attn, shape.intermediate_size - plan.channels_removed, shape.qkv_bias, shape.o_bias,
                      shape.mlp_bias)


def planned_biases(adapter: DecoderAdapter, cfg: PruneConfig, plans: list[LayerPlan]) -> tuple[bool, bool]:
    """Whether o_proj / down_proj will carry biases once pruned: the source's own, or a
    compensation that adds one (FLAP's bias) on a sublayer that loses units in some layer."""
    layers = adapter.layers
    bias = COMPENSATIONS[cfg.compensation].adds_bias
    heads_go = any(plan.heads_removed(adapter.geometry(layer)) > 0 for layer, plan in zip(layers, plans, strict=True))
    channels_go = any(plan.channels_removed > 0 for plan in plans)
    src_attn, src_mlp = adapter.output_biases()
    return (src_attn or (bias and cfg.compensate_attn and heads_go),
            src_mlp or (bias and cfg.compensate_mlp and channels_go))


def check_saveable(model: nn.Module, cfg: PruneConfig, plans: list[LayerPlan] | None = None,
                   adapter: DecoderAdapter | None = None) -> SavedFormat:
    """Build and validate the config the pruned model will be saved with, before any layer
    is pruned; RcpuError if no stock (or per-layer) config can carry it. Without ``plans``
    the uniform plan is used (global allocation is checked once its plans exist)."""
    cfg = cfg.resolve()
    adapter = adapter or get_adapter(model)
    layers = adapter.layers
    if plans is None:
        shape = adapter.layer_shape(layers[0])
        plans = [plan_uniform(shape, cfg.pruning_ratio, cfg.head_unit, cfg.rebalance, cfg.round_to)] * len(layers)
    shapes = [planned_shape(adapter.layer_shape(layer), plan) for layer, plan in zip(layers, plans, strict=True)]
    attn_bias, mlp_bias = planned_biases(adapter, cfg, plans)
    return adapter.saved_format(shapes, attn_bias=attn_bias, mlp_bias=mlp_bias)


def param_summary(adapter: DecoderAdapter, dense_shapes: list, params_before: int) -> dict:
    """Parameter counts and widths before and after pruning (for the report)."""
    layers = adapter.layers
    new_shapes = [adapter.layer_shape(layer) for layer in layers]
    shape, new_shape = dense_shapes[0], new_shapes[0]
    attn_mlp_before = sum(s.attn_params + s.mlp_params for s in dense_shapes)
    attn_mlp_after = sum(s.attn_params + s.mlp_params for s in new_shapes)
    params_after = count_params(adapter.model)
    params = {
        "total_before": params_before, "total_after": params_after,
        "attn_mlp_before": attn_mlp_before, "attn_mlp_after": attn_mlp_after,
        "ratio_total": 1 - params_after / params_before,
        "ratio_attn_mlp": 1 - attn_mlp_after / attn_mlp_before,
        "heads_before": shape.attn.num_heads, "heads_after": new_shape.attn.num_heads,
        "kv_heads_before": shape.attn.num_kv_heads, "kv_heads_after": new_shape.attn.num_kv_heads,
        "intermediate_before": shape.intermediate_size, "intermediate_after": new_shape.intermediate_size,
        "uniform": len({(s.attn, s.intermediate_size) for s in new_shapes}) == 1,
    }
    if not params["uniform"]:
        params["heads_after"] = [s.attn.num_heads for s in new_shapes]
        params["kv_heads_after"] = [s.attn.num_kv_heads for s in new_shapes]
        params["intermediate_after"] = [s.intermediate_size for s in new_shapes]
    return params


@dataclass
class Resumed:
    """Where an interrupted run stopped: the inputs of layer ``start`` and what came before."""

    start: int
    plans: list[LayerPlan]
    batches: list
    heldout: list | None
    results: list[LayerResult]
    warnings: list[str]


@dataclass
class Run:
    """What the driver did: the plans, per-layer results and warnings, the saved format,
    seconds and memory, and the dense model's shapes and parameter count (for the report)."""

    plans: list[LayerPlan]
    results: list[LayerResult]
    warnings: list[str]
    saved: SavedFormat
    seconds: float
    memory: dict
    dense_shapes: list[LayerShape]
    params_before: int

    def report(self, cfg: PruneConfig, adapter: DecoderAdapter, model_info: dict, calibration: dict) -> PruneReport:
        plans = self.plans
        return PruneReport(
            config=cfg.to_dict(),
            model={"model_type": adapter.config.model_type, "adapter": adapter.name,
                   "num_layers": len(adapter.layers), **model_info},
            calibration=calibration,
            checkpoint=self.saved.to_dict(),
            plan={"allocation": cfg.allocation, "head_unit": plans[0].head_unit,
                  "notes": list(dict.fromkeys(n for p in plans for n in p.notes)),
                  "layers": [p.to_dict() for p in plans] if cfg.allocation != "uniform" else plans[0].to_dict()},
            params=param_summary(adapter, self.dense_shapes, self.params_before),
            layers=[r.to_dict() for r in self.results],
            timings={"prune_s": round(self.seconds, 3)},
            memory=self.memory,
            warnings=self.warnings,
        )


@torch.no_grad()
def run_pruning(model: nn.Module, adapter: DecoderAdapter, cfg: PruneConfig, windows: torch.Tensor,
                heldout_windows: torch.Tensor | None, device: torch.device, store: LayerStore | None = None, *,
                progress: bool = True, hidden_states: str = "auto", max_hidden_gib: float | None = None) -> Run:
    """Prune every layer of ``model`` (a validated ``cfg``); layers come from ``store``
    (default: the model in memory). ``hidden_states`` / ``max_hidden_gib``: see
    :func:`rcpu.layer_io.hidden_state_storage`."""
    store = store or LayerStore(adapter)
    dense_shapes = [adapter.layer_shape(layer) for layer in adapter.layers]
    params_before = count_params(model)
    heldout_windows = heldout_windows if cfg.needs_heldout else None
    storage, hidden_info = hidden_state_storage(
        hidden_states, device, windows.numel() + (heldout_windows.numel() if heldout_windows is not None else 0),
        model.config.hidden_size, next(model.parameters()).dtype, max_hidden_gib)
    t0 = time.perf_counter()
    with PeakMemory(device) as peak:
        store.open(model)
        batches = capture_layer_inputs(model, adapter, windows, cfg.batch_size, device, storage)
        heldout = (capture_layer_inputs(model, adapter, heldout_windows, cfg.batch_size, device, storage)
                   if heldout_windows is not None else None)
        store.captured(model)
        resumed = store.resume(batches, heldout, storage)
        if resumed is None:
            resumed = Resumed(0, make_plans(adapter, batches, cfg, device, store, progress), batches, heldout, [], [])
        plans, batches, heldout = resumed.plans, resumed.batches, resumed.heldout
        resumed.batches = resumed.heldout = None
        saved = check_saveable(model, cfg, plans, adapter)  # on the dense shapes, before the first layer changes
        for note in dict.fromkeys([saved.note, *(n for p in plans for n in p.notes)]):
            if note:
                logger.warning(note)
        biases = planned_biases(adapter, cfg, plans)
        store.planned(plans, biases, resumed.results)
        results, warnings = run_sequential(model, adapter, windows, plans, cfg, device, progress=progress,
                                           batches=batches, store=store, start=resumed.start, heldout=heldout,
                                           results=resumed.results, warnings=resumed.warnings)
        del batches, heldout
        store.close()
    seconds = time.perf_counter() - t0
    memory = {**peak.result, "process_peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              **hidden_info}
    return Run(plans, results, warnings, saved, seconds, memory, dense_shapes, params_before)
