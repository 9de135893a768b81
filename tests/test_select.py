import pytest
import torch

from rcpu.select import (
    AttentionGeometry,
    LayerShape,
    allocate_global,
    forced_unit_scores,
    head_unit_scores,
    plan_uniform,
    select_channels,
    select_heads,
    topk_stable,
)

SMOL = LayerShape(AttentionGeometry(num_heads=9, num_kv_heads=3, head_dim=64, hidden_size=576), 1536)
MHA = LayerShape(AttentionGeometry(num_heads=32, num_kv_heads=32, head_dim=128, hidden_size=4096), 11008)


def test_topk_stable_breaks_ties_by_index():
    s = torch.tensor([1.0, 3.0, 3.0, 2.0, 3.0, 0.0])
    assert topk_stable(s, 2).tolist() == [1, 2]
    assert topk_stable(s, 4).tolist() == [1, 2, 3, 4]
    assert select_channels(s, 5).tolist() == [1]


def test_mha_plan_is_paper_faithful():
    plan = plan_uniform(MHA, 0.2)
    assert plan.head_unit == "group"  # for MHA a KV group is one head
    assert plan.heads_removed(MHA.attn) == 6 == int(0.2 * 32)
    assert plan.channels_removed == int(0.2 * 11008)
    assert not plan.notes


def test_gqa_coarse_heads_rebalance_to_mlp():
    plan = plan_uniform(SMOL, 0.2)
    assert plan.heads_removed(SMOL.attn) == 0
    assert plan.notes and "MLP" in plan.notes[0]
    achieved = plan.params_removed(SMOL) / (SMOL.attn_params + SMOL.mlp_params)
    assert achieved == pytest.approx(0.2, abs=0.002)
    faithful = plan_uniform(SMOL, 0.2, rebalance=False)
    assert faithful.channels_removed == int(0.2 * 1536)
    assert faithful.notes  # says the heads could not be cut


def test_gqa_units():
    q = plan_uniform(SMOL, 0.4, head_unit="query")
    assert q.heads_removed_per_group == 1 and q.heads_removed(SMOL.attn) == 3 and q.groups_removed == 0
    g = plan_uniform(SMOL, 0.4, head_unit="group")
    assert g.groups_removed == 1 and g.heads_removed(SMOL.attn) == 3


def test_select_heads_keeps_groups_equal():
    geom = AttentionGeometry(num_heads=8, num_kv_heads=2, head_dim=4, hidden_size=32)
    scores = torch.tensor([5.0, 1.0, 7.0, 2.0, 0.5, 9.0, 0.1, 3.0])
    q_plan = plan_uniform(LayerShape(geom, 64), 0.5, head_unit="query")
    heads, kv = select_heads(scores, geom, q_plan)
    assert heads.tolist() == [0, 2, 5, 7] and kv.tolist() == [0, 1]
    g_plan = plan_uniform(LayerShape(geom, 64), 0.5, head_unit="group")
    heads, kv = select_heads(scores, geom, g_plan)
    assert kv.tolist() == [0] and heads.tolist() == [0, 1, 2, 3]  # group 0 sums to 15 > 12.6


def test_round_to_multiple():
    plan = plan_uniform(SMOL, 0.2, round_to=128)
    assert (1536 - plan.channels_removed) % 128 == 0
    assert any("rounded" in n for n in plan.notes)
    assert plan_uniform(SMOL, 0.2, round_to=1).channels_removed == plan_uniform(SMOL, 0.2).channels_removed


def test_global_mlp_allocation_keeps_uniform_heads_and_removes_the_weakest_channels_overall():
    """allocation="global_mlp": every layer loses the uniform plan's heads, and the MLP channels
    removed are exactly the lowest standardised scores over all layers, as many as the budget
    left by those heads needs (a direct computation)."""
    gen = torch.Generator().manual_seed(0)
    qwen = LayerShape(AttentionGeometry(num_heads=12, num_kv_heads=2, head_dim=128, hidden_size=1536), 8960)
    shapes = [qwen] * 4
    uniform = plan_uniform(qwen, 0.2, "query")
    assert uniform.heads_removed_per_group == 1  # 2 of 12 heads per layer
    heads = [head_unit_scores(torch.randn(12, generator=gen), qwen.attn, "query") for _ in shapes]
    mlp = [torch.randn(qwen.intermediate_size, generator=gen) + 0.3 * i for i in range(len(shapes))]
    forced = [(forced_unit_scores(h, uniform.heads_removed_per_group), m) for h, m in zip(heads, mlp, strict=True)]
    plans = allocate_global(forced, shapes, 0.2, "query")
    assert all(p.heads_removed_per_group == 1 for p in plans)
    assert len({p.channels_removed for p in plans}) > 1  # the widths differ by layer
    # direct: the budget left after the heads, filled with the globally weakest channels
    total = sum(s.attn_params + s.mlp_params for s in shapes)
    head_params = sum(p.heads_removed(s.attn) * s.params_per_query_head for p, s in zip(plans, shapes, strict=True))
    n_channels = sum(p.channels_removed for p in plans)
    removed = sum(p.params_removed(s) for p, s in zip(plans, shapes, strict=True))
    assert abs(removed - 0.2 * total) <= qwen.params_per_channel  # one channel of slack at the threshold
    assert head_params + n_channels * qwen.params_per_channel == removed
    flat = torch.cat(mlp)
    owner = torch.cat([torch.full((len(m),), i) for i, m in enumerate(mlp)])
    weakest = owner[torch.argsort(flat, stable=True)[:n_channels]]
    assert [int((weakest == i).sum()) for i in range(len(shapes))] == [p.channels_removed for p in plans]
