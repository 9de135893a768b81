"""How many heads and channels each layer loses, behind one registry.

``uniform`` (RCPU, Wanda-sp) takes the same share from every layer. The others score every
removable unit of every layer in one pass over the dense model and let
:func:`rcpu.select.allocate_global` keep the strongest units across layers and modules:

- ``global`` is FLAP's: the importance score, standardised per layer and module;
- ``global_mlp`` allocates only the MLP channels that way; every layer loses the uniform
  plan's heads (FLAP's score sends too many heads to a few layers of Qwen2 models);
- ``error`` is ours: the error left after least-squares compensation when units are
  removed greedily (:func:`rcpu.obs.allocation_scores`), per parameter and relative to the
  residual stream's energy at that layer, so layers and modules are compared on one scale
  that knows the compensation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn
from tqdm.auto import tqdm

from . import obs
from .layer_io import module_device, run_layer
from .models import DecoderAdapter
from .scores import channel_scores
from .select import (
    LayerPlan,
    allocate_global,
    forced_unit_scores,
    head_unit_scores,
    max_channels_removed,
    plan_uniform,
    standardize,
)
from .stats import InputStats, StatsCollector

if TYPE_CHECKING:
    from .config import PruneConfig
    from .pipeline import LayerStore

Batch = tuple[torch.Tensor, dict]
#: (adapter, layer, its input statistics {"attn", "mlp"}, head unit, config, residual energy)
#: -> (one score per removable attention unit, one per MLP channel); higher = keep
UnitScorer = Callable[[DecoderAdapter, nn.Module, dict[str, InputStats], str, "PruneConfig", float],
                      tuple[torch.Tensor, torch.Tensor]]


def flap_unit_scores(adapter: DecoderAdapter, layer: nn.Module, stats: dict[str, InputStats], head_unit: str,
                     cfg: PruneConfig, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """FLAP: the importance score, standardised per layer and module; a head's is its channels' mean."""
    geom = adapter.geometry(layer)
    attn = standardize(channel_scores(cfg.score, adapter.attn_out(layer).weight, stats["attn"]))
    heads = attn.reshape(geom.num_heads, geom.head_dim).mean(1)
    mlp = standardize(channel_scores(cfg.score, adapter.mlp_out(layer).weight, stats["mlp"]))
    return head_unit_scores(heads, geom, head_unit), mlp


def error_unit_scores(adapter: DecoderAdapter, layer: nn.Module, stats: dict[str, InputStats], head_unit: str,
                      cfg: PruneConfig, energy: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The post-compensation error per parameter that greedy removal measures (rcpu.obs),
    relative to the residual-stream ``energy``; +inf for units never to be removed. The
    costs are the importances: expensive units are kept."""
    o_proj, down_proj = adapter.attn_out(layer), adapter.mlp_out(layer)
    shape = adapter.layer_shape(layer)
    g = shape.attn
    hd, r = g.head_dim, g.n_rep
    lam = cfg.selection_lambda
    unit_params = shape.params_per_head_unit(head_unit)
    if head_unit == "group":
        units = torch.arange(g.num_heads * hd).reshape(g.num_kv_heads, r * hd)
        attn = obs.allocation_scores(o_proj.weight, stats["attn"].gram, units, unit_params,
                                     n_remove=g.num_kv_heads - 1, lam=lam, norm=energy)
    else:
        units = torch.arange(g.num_heads * hd).reshape(g.num_heads, hd)
        attn = obs.allocation_scores(o_proj.weight, stats["attn"].gram, units, unit_params, n_remove=r - 1,
                                     lam=lam, groups=torch.arange(g.num_heads) // r, norm=energy)
    d_ff = down_proj.in_features
    mlp = obs.allocation_scores(down_proj.weight, stats["mlp"].gram, torch.arange(d_ff)[:, None],
                                shape.params_per_channel, n_remove=max_channels_removed(d_ff, cfg.pruning_ratio),
                                lam=lam, block=cfg.selection_block, norm=energy)
    return attn, mlp


@dataclass(frozen=True)
class Allocation:
    """A named allocation: how it scores units (None: uniform) and what the scoring needs."""

    name: str
    unit_scores: UnitScorer | None = None
    needs_gram: bool = False  #: the scorer reads the Gram matrices
    needs_energy: bool = False  #: the scorer reads the energy of the layer's inputs
    uniform_heads: bool = False  #: every layer loses the uniform plan's heads; only channels are allocated


#: name -> allocation; ``PruneConfig.allocation`` chooses one
ALLOCATIONS: dict[str, Allocation] = {a.name: a for a in (
    Allocation("uniform"),
    Allocation("global", flap_unit_scores),
    Allocation("global_mlp", flap_unit_scores, uniform_heads=True),
    Allocation("error", error_unit_scores, needs_gram=True, needs_energy=True),
)}


@torch.no_grad()
def global_plans(adapter: DecoderAdapter, batches: list[Batch], cfg: PruneConfig, uniform: LayerPlan,
                 device: torch.device, store: LayerStore, progress: bool = True) -> list[LayerPlan]:
    """One pass over the dense model scores every unit of every layer (only per-layer score
    vectors are kept), then :func:`allocate_global` decides how many units each layer keeps.
    ``uniform`` is the uniform plan: its head unit, and its head counts for ``uniform_heads``."""
    allocation = ALLOCATIONS[cfg.allocation]
    head_unit = uniform.head_unit
    unit_scores, shapes = [], []
    for i in tqdm(range(len(adapter.layers)), desc="scoring (allocation)", unit="layer", disable=not progress):
        layer = store.load(i)
        home = module_device(layer)
        layer.to(device)
        energy = sum(float(h.double().square().sum()) for h, _ in batches) if allocation.needs_energy else 1.0
        grams = {"attn": allocation.needs_gram, "mlp": allocation.needs_gram}
        with StatsCollector({"attn": adapter.attn_out(layer), "mlp": adapter.mlp_out(layer)}, grams) as col:
            batches = run_layer(layer, batches, keep_outputs=True)
        attn, mlp = allocation.unit_scores(adapter, layer, col.stats, head_unit, cfg, energy)
        unit_scores.append((attn.cpu(), mlp.cpu()))
        del col
        shapes.append(adapter.layer_shape(layer))
        layer.to(home)
        store.unload(i, layer)
    if allocation.uniform_heads:
        fixed = uniform.groups_removed if head_unit == "group" else uniform.heads_removed_per_group
        unit_scores = [(forced_unit_scores(attn, fixed), mlp) for attn, mlp in unit_scores]
    return allocate_global(unit_scores, shapes, cfg.pruning_ratio, head_unit, cfg.round_to)


def make_plans(adapter: DecoderAdapter, batches: list[Batch], cfg: PruneConfig, device: torch.device,
               store: LayerStore, progress: bool = True) -> list[LayerPlan]:
    """How many units each layer loses under ``cfg.allocation``."""
    uniform = plan_uniform(adapter.layer_shape(adapter.layers[0]), cfg.pruning_ratio, cfg.head_unit, cfg.rebalance,
                           cfg.round_to)
    if ALLOCATIONS[cfg.allocation].unit_scores is None:
        return [uniform] * len(adapter.layers)
    return global_plans(adapter, batches, cfg, uniform, device, store, progress)
