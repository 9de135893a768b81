"""Global allocation by measured loss sensitivity (``allocation="loss"``).

FLAP's allocation compares layers by standardised importance scores; the error left after
compensation (``rcpu.obs``) compares them by a local reconstruction error. Neither sees how
an error in layer l is amplified or damped by the layers above it. Here every layer's
attention and MLP are probed on the dense model: one unit of attention (a head per KV group,
or a KV group) or ``ratio`` of the MLP channels is removed from that layer alone, chosen and
compensated exactly as the real run will, and the increase of the next-token loss on the
held-out calibration windows is measured. With a quadratic model of the loss increase in
the number of removed units (Δ(k) = a k², the second-order behaviour around a minimum),
unit j of a module costs a (2j - 1) extra loss; units of all layers are then removed
cheapest per parameter first until the budget is met (:func:`rcpu.select.allocate_global`).

The probe forwards run the dense layers above l for every l: O(L²) layer passes over the
held-out windows, all on the model in memory (streamed runs do not support it yet).
"""

from __future__ import annotations

import copy
import logging
import math

import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from .config import PruneConfig
from .layer_io import module_device, run_layer
from .models import DecoderAdapter
from .scores import channel_scores, group_scores
from .select import (
    LayerPlan,
    allocate_global,
    head_channels,
    max_channels_removed,
    select_channels,
    select_heads,
)
from .stats import InputStats, StatsCollector

logger = logging.getLogger(__name__)


def _run_on(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]], device: torch.device
            ) -> list[tuple[torch.Tensor, dict]]:
    """``layer``'s outputs on ``batches``, computed on ``device`` (the layer goes back home)."""
    home = module_device(layer)
    layer.to(device)
    try:
        return run_layer(layer, batches, keep_outputs=True)
    finally:
        layer.to(home)


@torch.no_grad()
def tail_nll(model: nn.Module, adapter: DecoderAdapter, start: int, batches: list[tuple[torch.Tensor, dict]],
             ids: list[torch.Tensor], device: torch.device, layer: nn.Module | None = None) -> float:
    """Mean next-token loss of the model from decoder layer ``start`` on (``batches``: its
    inputs), with ``layer`` standing in for layer ``start`` when given."""
    for i in range(start, len(adapter.layers)):
        batches = _run_on(layer if (i == start and layer is not None) else adapter.layers[i], batches, device)
    norm, head = adapter.final_norm(), model.get_output_embeddings()
    homes = [(m, module_device(m)) for m in (norm, head)]
    for m, _ in homes:
        m.to(device)
    total, count = 0.0, 0
    for (x, _), y in zip(batches, ids, strict=True):
        logits = head(norm(x.to(device)))[:, :-1].float()
        labels = y[:, 1:].to(device)
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum"))
        count += labels.numel()
    for m, home in homes:
        m.to(home)
    return total / count


def _probe_attention(adapter: DecoderAdapter, layer: nn.Module, stats: InputStats, heldout: InputStats | None,
                     cfg: PruneConfig, head_unit: str, compensate) -> nn.Module:
    geom = adapter.geometry(layer)
    plan = LayerPlan(head_unit, heads_removed_per_group=1) if head_unit == "query" else LayerPlan(head_unit,
                                                                                                  groups_removed=1)
    o_proj = adapter.attn_out(layer)
    scores = channel_scores(cfg.allocation_score, o_proj.weight, stats)
    kept_heads, kept_kv = select_heads(group_scores(scores, geom.head_dim), geom, plan)
    kept_ch = head_channels(kept_heads, geom.head_dim)
    res = compensate(o_proj.weight, stats, kept_ch, heldout)
    probe = copy.deepcopy(layer)
    adapter.prune_attention(probe, kept_heads, kept_kv, res.weight)
    if res.bias is not None:
        adapter.add_output_bias(adapter.attn_out(probe), res.bias)
    return probe


def _probe_mlp(adapter: DecoderAdapter, layer: nn.Module, stats: InputStats, heldout: InputStats | None,
               cfg: PruneConfig, n_remove: int, compensate) -> nn.Module:
    down = adapter.mlp_out(layer)
    kept = select_channels(channel_scores(cfg.allocation_score, down.weight, stats), n_remove)
    res = compensate(down.weight, stats, kept, heldout)
    probe = copy.deepcopy(layer)
    adapter.prune_mlp(probe, kept, res.weight)
    if res.bias is not None:
        adapter.add_output_bias(adapter.mlp_out(probe), res.bias)
    return probe


def quadratic_unit_scores(delta: float, probe_units: int, n_units: int, unit_params: float, floor: float,
                          max_remove: int) -> torch.Tensor:
    """Importance of the units of one module for :func:`allocate_global` (higher = kept
    longer): the marginal loss per parameter of removing the j-th unit, a (2j - 1) /
    unit_params with a = max(delta, floor) / probe_units². Units beyond ``max_remove`` get
    +inf (never removed)."""
    a = max(delta, floor) / probe_units**2
    j = torch.arange(1, n_units + 1, dtype=torch.float64)
    scores = a * (2 * j - 1) / unit_params
    scores[max_remove:] = math.inf
    return scores


@torch.no_grad()
def loss_plans(model: nn.Module, adapter: DecoderAdapter, batches: list[tuple[torch.Tensor, dict]],
               heldout: list[tuple[torch.Tensor, dict]], heldout_ids: torch.Tensor, cfg: PruneConfig,
               head_unit: str, device: torch.device, compensate, progress: bool = True) -> list[LayerPlan]:
    """Per-layer widths from probed loss sensitivities (see the module docstring).

    ``batches`` / ``heldout``: layer-0 inputs of the calibration and held-out windows;
    ``heldout_ids``: the held-out token ids (labels); ``compensate(weight, stats, kept,
    heldout_stats)``: the run's own compensation.
    """
    layers = adapter.layers
    bs = heldout[0][0].shape[0]
    ids = [heldout_ids[i:i + bs] for i in range(0, len(heldout_ids), bs)]
    base = tail_nll(model, adapter, 0, heldout, ids, device)
    shapes, unit_scores, record = [], [], []
    floor = 1e-7 * abs(base)  # keeps every a > 0: a probe that lowered the loss is (almost) free
    bar = tqdm(range(len(layers)), desc="probing (allocation)", unit="layer", disable=not progress)
    for i in bar:
        layer = layers[i]
        shape = adapter.layer_shape(layer)
        mods = {"attn": adapter.attn_out(layer), "mlp": adapter.mlp_out(layer)}
        with StatsCollector(mods, {"attn": True, "mlp": True}) as col:
            next_cal = _run_on(layer, batches, device)
        # held-out statistics only where the compensation tunes lambda on them (ridge-auto)
        with StatsCollector(mods if cfg.ridge_auto else {}, {"attn": True, "mlp": True}) as col_ho:
            next_ho = _run_on(layer, heldout, device)
        st, st_ho = col.stats, col_ho.stats
        geom = shape.attn
        n_attn = geom.n_rep if head_unit == "query" else geom.num_kv_heads
        d_ff = shape.intermediate_size
        k_mlp = max(1, round(cfg.pruning_ratio * d_ff))
        probe = _probe_attention(adapter, layer, st["attn"], st_ho.get("attn"), cfg, head_unit, compensate)
        d_attn = tail_nll(model, adapter, i, heldout, ids, device, probe) - base
        probe = _probe_mlp(adapter, layer, st["mlp"], st_ho.get("mlp"), cfg, k_mlp, compensate)
        d_mlp = tail_nll(model, adapter, i, heldout, ids, device, probe) - base
        del probe, st, st_ho
        unit_scores.append((quadratic_unit_scores(d_attn, 1, n_attn, shape.params_per_head_unit(head_unit), floor,
                                                  n_attn - 1),
                            quadratic_unit_scores(d_mlp, k_mlp, d_ff, shape.params_per_channel, floor,
                                                  max_channels_removed(d_ff, cfg.pruning_ratio))))
        shapes.append(shape)
        record.append({"base": base, "attn": d_attn, "mlp": d_mlp, "mlp_channels": k_mlp})
        bar.set_postfix_str(f"attn {d_attn:+.4f} mlp {d_mlp:+.4f}")
        batches, heldout = next_cal, next_ho
    logger.info("loss sensitivities (base %.4f): %s", base, record)
    plans = allocate_global(unit_scores, shapes, cfg.pruning_ratio, head_unit, cfg.round_to)
    for plan, rec in zip(plans, record, strict=True):
        plan.probe_loss = rec
    return plans
