"""Shapes shared by the adapters (which read them off modules) and the planner (which counts with them).

Kept apart from :mod:`rcpu.select` so that the model adapters depend on plain data types only,
not on the selection maths.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AttentionGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class LayerShape:
    """Everything the planner needs to count parameters of one decoder layer."""

    attn: AttentionGeometry
    intermediate_size: int
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False

    @property
    def params_per_query_head(self) -> int:
        a = self.attn
        return 2 * a.hidden_size * a.head_dim + (a.head_dim if self.qkv_bias else 0)

    @property
    def params_per_kv_head(self) -> int:  # k and v rows
        a = self.attn
        return 2 * (a.hidden_size * a.head_dim + (a.head_dim if self.qkv_bias else 0))

    @property
    def params_per_channel(self) -> int:  # gate row, up row, down column
        return 3 * self.attn.hidden_size + (2 if self.mlp_bias else 0)

    def params_per_head_unit(self, head_unit: str) -> int:
        """Parameters one removable attention unit frees: a query head from every KV group
        ("query"; k/v stay) or one whole KV group with its k/v rows ("group")."""
        a = self.attn
        if head_unit == "group":
            return a.n_rep * self.params_per_query_head + self.params_per_kv_head
        return a.num_kv_heads * self.params_per_query_head

    @property
    def attn_params(self) -> int:
        a = self.attn
        return (a.num_heads * self.params_per_query_head + a.num_kv_heads * self.params_per_kv_head
                + (a.hidden_size if self.o_bias else 0))

    @property
    def mlp_params(self) -> int:
        return self.intermediate_size * self.params_per_channel + (self.attn.hidden_size if self.mlp_bias else 0)
