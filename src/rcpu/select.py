"""Which units to remove: how many per layer, and which ones.

Units are attention heads (or whole KV groups under grouped-query attention) and
MLP intermediate channels. Every layer keeps equal-sized KV groups so the pruned
model is still a standard checkpoint. Exactly-k choices use a stable sort, so tied
scores (common in weights dequantised from 4-bit checkpoints) resolve to the lower
index, deterministically.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .shapes import AttentionGeometry, LayerShape

HEAD_UNITS = ("auto", "query", "group")


@dataclass
class LayerPlan:
    """How many units one layer loses. ``head_unit`` is "query" (the same number of
    query heads from every KV group; k/v kept) or "group" (whole KV groups)."""

    head_unit: str
    heads_removed_per_group: int = 0
    groups_removed: int = 0
    channels_removed: int = 0
    notes: list[str] = field(default_factory=list)

    def heads_removed(self, geom: AttentionGeometry) -> int:
        if self.head_unit == "group":
            return self.groups_removed * geom.n_rep
        return self.heads_removed_per_group * geom.num_kv_heads

    def params_removed(self, shape: LayerShape) -> int:
        removed = self.heads_removed(shape.attn) * shape.params_per_query_head
        removed += self.groups_removed * shape.params_per_kv_head
        return removed + self.channels_removed * shape.params_per_channel

    def to_dict(self) -> dict:
        return asdict(self)


def round_channels(plan: LayerPlan, d_ff: int, multiple: int) -> LayerPlan:
    """Round the kept MLP width to a multiple of ``multiple`` (kernel-friendly shapes)."""
    if multiple <= 1:
        return plan
    keep = d_ff - plan.channels_removed
    rounded = min(d_ff, max(multiple, round(keep / multiple) * multiple))
    if rounded != keep:
        plan.notes.append(f"MLP width rounded to a multiple of {multiple}: {keep} -> {rounded} channels")
        plan.channels_removed = d_ff - rounded
    return plan


def plan_uniform(shape: LayerShape, ratio: float, head_unit: str = "auto", rebalance: bool = True,
                 round_to: int = 1) -> LayerPlan:
    """Units to remove from every layer for a width ratio ``ratio``.

    Paper-faithful counts are floor(ratio*H) heads and floor(ratio*d_ff) channels.
    Under GQA heads must go in multiples that keep groups equal, which can be far
    coarser than ratio*H; with ``rebalance`` the attention+MLP parameter budget the
    heads could not absorb is taken from the MLP instead, and a note says so.
    """
    geom = shape.attn
    g, r = geom.num_kv_heads, geom.n_rep
    query_per_group = math.floor(ratio * r) if r > 1 else 0
    groups = math.floor(ratio * g)
    if head_unit == "auto":
        head_unit = "query" if query_per_group * g >= groups * r and r > 1 else "group"
    if head_unit == "query":
        plan = LayerPlan("query", heads_removed_per_group=query_per_group)
    elif head_unit == "group":
        plan = LayerPlan("group", groups_removed=groups)
    else:
        raise ValueError(f"unknown head unit {head_unit!r}; choose from {HEAD_UNITS}")

    d_ff = shape.intermediate_size
    plan.channels_removed = math.floor(ratio * d_ff)
    heads = plan.heads_removed(geom)
    faithful_heads = math.floor(ratio * geom.num_heads)  # what the paper removes without GQA
    if rebalance and heads < faithful_heads:
        target = ratio * (shape.attn_params + shape.mlp_params)
        attn_removed = plan.params_removed(shape) - plan.channels_removed * shape.params_per_channel
        channels = round((target - attn_removed) / shape.params_per_channel)
        channels = max(plan.channels_removed, min(d_ff - 1, channels))
        if channels != plan.channels_removed:
            plan.notes.append(
                f"heads are too coarse for ratio {ratio:g}: {heads} of {geom.num_heads} heads per layer "
                f"(unit: {plan.head_unit}, groups of {r}); the remaining budget is moved to the MLP: "
                f"{channels} of {d_ff} channels instead of {plan.channels_removed}"
            )
            plan.channels_removed = channels
    elif heads < faithful_heads:
        plan.notes.append(
            f"heads are too coarse for ratio {ratio:g}: only {heads} of {geom.num_heads} heads per layer "
            f"are removed (rebalancing to the MLP is off)"
        )
    return round_channels(plan, d_ff, round_to)


def topk_stable(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (ascending) of the k highest scores; ties go to the lower index."""
    if not 0 <= k <= scores.numel():
        raise ValueError(f"cannot keep {k} of {scores.numel()} units")
    order = torch.argsort(scores.detach().double().cpu(), descending=True, stable=True)
    return order[:k].sort().values


def select_heads(head_scores: torch.Tensor, geom: AttentionGeometry, plan: LayerPlan
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Kept query heads and kept KV heads (ascending) given one score per query head.

    Query heads are laid out group-major (head h belongs to KV group h // n_rep), as in
    every Hugging Face GQA implementation.
    """
    g, r = geom.num_kv_heads, geom.n_rep
    per_group = head_scores.detach().double().cpu().reshape(g, r)
    if plan.head_unit == "group":
        kept_groups = topk_stable(per_group.sum(1), g - plan.groups_removed)
        kept_heads = (kept_groups[:, None] * r + torch.arange(r)).reshape(-1)
        return kept_heads, kept_groups
    keep = r - plan.heads_removed_per_group
    kept_heads = torch.cat([topk_stable(per_group[i], keep) + i * r for i in range(g)])
    return kept_heads, torch.arange(g)


def select_channels(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Kept MLP channels (ascending)."""
    return topk_stable(scores, scores.numel() - n_remove)


def head_channels(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj input channels of the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


# --- global allocation (FLAP's AL-AM) -------------------------------------------------

def standardize(x: torch.Tensor) -> torch.Tensor:
    """(x - mean) / std within one layer and module, as FLAP does before comparing layers."""
    x = x.double()
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


def head_unit_scores(head_scores: torch.Tensor, geom: AttentionGeometry, head_unit: str) -> torch.Tensor:
    """Scores of the removable attention units of one layer, weakest removable first.

    "group": one unit per KV group (mean of its heads). "query": unit j is the j-th
    weakest head of every group (mean over groups), so removing units in score order
    always removes the same number of heads from each group. Scores are sorted
    ascending so that a prefix of units is what a threshold removes.
    """
    per_group = head_scores.double().reshape(geom.num_kv_heads, geom.n_rep)
    if head_unit == "group":
        return per_group.mean(1).sort().values
    return per_group.sort(dim=1).values.mean(0)


def forced_unit_scores(unit_scores: torch.Tensor, n_removed: int) -> torch.Tensor:
    """Scores that make :func:`allocate_global` remove exactly ``n_removed`` of these units
    (the weakest: :func:`head_unit_scores` sorts them ascending) and keep the others,
    whatever the global threshold (``global_mlp`` fixes head counts this way)."""
    forced = torch.full_like(unit_scores, math.inf)
    forced[:n_removed] = -math.inf
    return forced


def max_channels_removed(d_ff: int, ratio: float) -> int:
    """The most MLP channels the error allocation may take from one layer:
    3x the global ratio, and never the last channel."""
    return min(d_ff - 1, math.ceil(min(1.0, 3 * ratio) * d_ff))


def allocate_global(unit_scores: list[tuple[torch.Tensor, torch.Tensor]], shapes: list[LayerShape], ratio: float,
                    head_unit: str, round_to: int = 1) -> list[LayerPlan]:
    """FLAP's global adaptive allocation across layers and modules.

    ``unit_scores[i]`` = (standardised attention-unit scores from :func:`head_unit_scores`,
    standardised MLP channel scores) of layer i. All units of all layers are sorted by
    score; each weighs its parameter count relative to one MLP channel; units are kept
    from the top until the removed weight reaches ``ratio`` of all attention+MLP
    parameters (FLAP's (1 - ratio) of the total when every parameter belongs to a
    removable unit; under GQA k/v stay when query heads go, and are counted). Every layer
    keeps at least one attention unit and one channel, so no layer is emptied.
    """
    scores, weights, owner = [], [], []
    total = sum((sh.attn_params + sh.mlp_params) / sh.params_per_channel for sh in shapes)
    for i, ((attn_s, mlp_s), shape) in enumerate(zip(unit_scores, shapes, strict=True)):
        unit_w = shape.params_per_head_unit(head_unit)
        scores += [attn_s.double(), mlp_s.double()]
        weights += [torch.full((len(attn_s),), unit_w / shape.params_per_channel, dtype=torch.float64),
                    torch.ones(len(mlp_s), dtype=torch.float64)]
        owner += [torch.full((len(attn_s),), 2 * i), torch.full((len(mlp_s),), 2 * i + 1)]
    s, w, o = torch.cat(scores), torch.cat(weights), torch.cat(owner)
    order = torch.argsort(s, descending=True, stable=True)
    cum = torch.cumsum(w[order], 0)
    keep_weight = float(cum[-1]) - ratio * total
    n_keep = int(torch.searchsorted(cum, max(keep_weight, 0.0)).clamp(max=len(s) - 1)) + 1
    kept_owner = o[order[:n_keep]]
    plans = []
    for i in range(len(shapes)):
        n_attn, n_mlp = len(unit_scores[i][0]), len(unit_scores[i][1])
        keep_attn = max(1, int((kept_owner == 2 * i).sum()))
        keep_mlp = max(1, int((kept_owner == 2 * i + 1).sum()))
        plan = LayerPlan(head_unit, channels_removed=n_mlp - keep_mlp)
        if head_unit == "group":
            plan.groups_removed = n_attn - keep_attn
        else:
            plan.heads_removed_per_group = n_attn - keep_attn
        plans.append(round_channels(plan, n_mlp, round_to))
    return plans
