"""Architecture adapters: where the layers and projections are, and how to cut them.

An adapter knows the module layout of one model family and nothing about scores
or compensation. The pipeline asks it for the decoder layers, the two compensated
projections (o_proj, down_proj), the geometry of a layer, and to slice a layer
to the kept heads / channels; at the end it writes the new widths into the config.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..shapes import AttentionGeometry, LayerShape
from .checkpoint import SavedFormat, saved_format


def _slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep ``index`` along the output (dim 0) or input (dim 1) features, in place."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(dim, index).contiguous(), requires_grad=False)
    if dim == 0:
        linear.out_features = len(index)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, index).contiguous(), requires_grad=False)
    else:
        linear.in_features = len(index)


def _ensure_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=False)


class DecoderAdapter:
    """Base for decoder-only models with Llama's module layout."""

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    #: whether the stock config can switch on output biases of o_proj / down_proj; without
    #: switches, FLAP-style bias compensation is saved with the rcpu modeling file
    output_bias_switches: ClassVar[bool] = False

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    # layout --------------------------------------------------------------------------
    @property
    def base(self) -> nn.Module:
        return self.model.model

    @property
    def layers(self) -> nn.ModuleList:
        return self.base.layers

    def attn(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def mlp(self, layer: nn.Module) -> nn.Module:
        return layer.mlp

    def attn_out(self, layer: nn.Module) -> nn.Linear:
        return layer.self_attn.o_proj

    def mlp_out(self, layer: nn.Module) -> nn.Linear:
        return layer.mlp.down_proj

    def final_norm(self) -> nn.Module:
        """The norm between the last decoder layer and the LM head."""
        return self.base.norm

    def attn_norm(self, layer: nn.Module) -> nn.Module:
        """The pre-attention norm; its input is the residual stream before attention."""
        return layer.input_layernorm

    def mlp_norm(self, layer: nn.Module) -> nn.Module:
        """The pre-MLP norm; its input is the residual stream before the MLP."""
        return layer.post_attention_layernorm

    def non_layer_modules(self) -> list[nn.Module]:
        """Modules run before the first decoder layer (moved to the compute device)."""
        mods = [self.base.embed_tokens]
        if getattr(self.base, "rotary_emb", None) is not None:
            mods.append(self.base.rotary_emb)
        return mods

    # geometry ------------------------------------------------------------------------
    def geometry(self, layer: nn.Module) -> AttentionGeometry:
        attn = self.attn(layer)
        head_dim = attn.head_dim
        return AttentionGeometry(
            num_heads=attn.q_proj.out_features // head_dim,
            num_kv_heads=attn.k_proj.out_features // head_dim,
            head_dim=head_dim,
            hidden_size=attn.o_proj.out_features,
        )

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        attn, mlp = self.attn(layer), self.mlp(layer)
        return LayerShape(
            attn=self.geometry(layer),
            intermediate_size=mlp.down_proj.in_features,
            qkv_bias=attn.q_proj.bias is not None,
            o_bias=attn.o_proj.bias is not None,
            mlp_bias=mlp.gate_proj.bias is not None,
        )

    # surgery -------------------------------------------------------------------------
    def prune_attention(self, layer: nn.Module, kept_heads: torch.Tensor, kept_kv_heads: torch.Tensor,
                        new_o_weight: torch.Tensor | None = None) -> None:
        """Keep query heads ``kept_heads`` and KV heads ``kept_kv_heads`` (ascending)."""
        attn = self.attn(layer)
        hd = attn.head_dim
        q_rows = (kept_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_rows = (kept_kv_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        _slice_linear(attn.q_proj, q_rows, 0)
        _slice_linear(attn.k_proj, kv_rows, 0)
        _slice_linear(attn.v_proj, kv_rows, 0)
        _slice_linear(attn.o_proj, q_rows, 1)
        if new_o_weight is not None:
            attn.o_proj.weight.data.copy_(new_o_weight)
        if len(kept_heads) % len(kept_kv_heads):
            raise AssertionError("unequal KV groups after pruning")
        attn.num_key_value_groups = len(kept_heads) // len(kept_kv_heads)
        for attr, value in (("num_heads", len(kept_heads)), ("num_key_value_heads", len(kept_kv_heads))):
            if hasattr(attn, attr):
                setattr(attn, attr, value)

    def prune_mlp(self, layer: nn.Module, kept: torch.Tensor, new_down_weight: torch.Tensor | None = None) -> None:
        mlp = self.mlp(layer)
        _slice_linear(mlp.gate_proj, kept, 0)
        _slice_linear(mlp.up_proj, kept, 0)
        _slice_linear(mlp.down_proj, kept, 1)
        if new_down_weight is not None:
            mlp.down_proj.weight.data.copy_(new_down_weight)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = len(kept)

    def add_output_bias(self, linear: nn.Linear, delta: torch.Tensor) -> None:
        _ensure_bias(linear)
        linear.bias.data += delta.to(linear.bias.dtype)

    def saved_format(self, shapes: list[LayerShape] | None = None, attn_bias: bool | None = None,
                     mlp_bias: bool | None = None) -> SavedFormat:
        """The config the model will be saved with: for the given (planned) layer shapes and
        output biases, or by default for the model as it is now. RcpuError if none can."""
        if shapes is None:
            shapes = [self.layer_shape(layer) for layer in self.layers]
        if attn_bias is None or mlp_bias is None:
            attn_bias, mlp_bias = self.output_biases()
        return saved_format(self.config, shapes, attn_bias, mlp_bias, self.output_bias_switches)

    def finalize_layer(self, layer: nn.Module, attn_bias: bool, mlp_bias: bool) -> None:
        """Give one layer the (zero) biases that the saved config will build: every
        projection of the sublayer with the config's bias switches, else o_proj / down_proj."""
        attn, mlp = self.attn(layer), self.mlp(layer)
        if not self.output_bias_switches:
            if attn_bias:
                _ensure_bias(attn.o_proj)
            if mlp_bias:
                _ensure_bias(mlp.down_proj)
            return
        if attn_bias:
            for lin in (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj):
                _ensure_bias(lin)
        if mlp_bias:
            for lin in (mlp.gate_proj, mlp.up_proj, mlp.down_proj):
                _ensure_bias(lin)

    def output_biases(self) -> tuple[bool, bool]:
        """Whether any o_proj / down_proj has a bias (compensation may have added them)."""
        layers = list(self.layers)
        return (any(self.attn_out(layer).bias is not None for layer in layers),
                any(self.mlp_out(layer).bias is not None for layer in layers))

    def finalize(self, biases: tuple[bool, bool] | None = None) -> None:
        """Write the new widths into the config so it loads as a stock model.

        Non-uniform widths (global allocation) cannot be described by a stock config:
        the config keeps the original widths and the exporter writes per-layer widths
        plus a small modeling file instead. Output biases added by compensation need
        the config's bias switches; those also create q/k/v (resp. gate/up) biases,
        which get explicit zeros here (:meth:`finalize_layer`). ``biases`` = (attention,
        MLP) overrides the detection, for layers that were written out already.
        """
        layers = list(self.layers)
        shapes = {(self.layer_shape(layer).attn, self.layer_shape(layer).intermediate_size) for layer in layers}
        cfg = self.config
        if len(shapes) == 1:
            (geom, d_ff), = shapes
            cfg.num_attention_heads = geom.num_heads
            cfg.num_key_value_heads = geom.num_kv_heads
            cfg.head_dim = geom.head_dim
            cfg.intermediate_size = d_ff
        if getattr(cfg, "layer_intermediate_size", None) is not None:  # rcpu_* config: keep its lists true
            layer_shapes = [self.layer_shape(layer) for layer in layers]
            cfg.layer_num_attention_heads = [s.attn.num_heads for s in layer_shapes]
            cfg.layer_num_key_value_heads = [s.attn.num_kv_heads for s in layer_shapes]
            cfg.layer_intermediate_size = [s.intermediate_size for s in layer_shapes]
        attn_bias, mlp_bias = biases or self.output_biases()
        if attn_bias or mlp_bias:
            for layer in layers:
                self.finalize_layer(layer, attn_bias, mlp_bias)
            if self.output_bias_switches:  # otherwise the saved rcpu config says so (nonuniform.py)
                cfg.attention_bias = cfg.attention_bias or attn_bias
                cfg.mlp_bias = getattr(cfg, "mlp_bias", False) or mlp_bias
