"""Architecture adapters: where the layers and projections are, and how to cut them.

An adapter knows the module layout of one model family and nothing about scores
or compensation. The pipeline asks it for the decoder layers, the two compensated
projections (o_proj, down_proj), the geometry of a layer, and to slice a layer
to the kept heads / channels; at the end it writes the new widths into the config.
"""

from __future__ import annotations

import copy
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


def _slice_norm(norm: nn.Module, index: torch.Tensor) -> None:
    """Keep ``index`` of a norm's per-channel weight (and bias), in place."""
    for name in ("weight", "bias"):
        param = getattr(norm, name, None)
        if isinstance(param, torch.Tensor):
            setattr(norm, name, nn.Parameter(param.data.index_select(0, index.to(param.device)).contiguous(),
                                             requires_grad=False))
    if hasattr(norm, "normalized_shape"):
        norm.normalized_shape = (len(index),)


def set_head_counts(attn: nn.Module, num_heads: int, num_kv_heads: int, private_config: bool = False) -> None:
    """Tell an attention module its new head counts: the attributes the HF attention classes
    read at run time, and with ``private_config`` (Phi-3, which reads ``config.num_attention_heads``
    in its forward pass) a copy of the config of its own."""
    attn.num_key_value_groups = num_heads // num_kv_heads
    for attr, value in (("num_heads", num_heads), ("num_key_value_heads", num_kv_heads)):
        if hasattr(attn, attr):
            setattr(attn, attr, value)
    if private_config and hasattr(attn, "config"):
        attn.config = copy.copy(attn.config)
        attn.config.num_attention_heads = num_heads
        attn.config.num_key_value_heads = num_kv_heads


def _ensure_bias(linear: nn.Linear) -> None:
    if linear.bias is None:
        linear.bias = nn.Parameter(torch.zeros(linear.out_features, dtype=linear.weight.dtype,
                                               device=linear.weight.device), requires_grad=False)


class DecoderAdapter:
    """Base for decoder-only models with Llama's module layout.

    A family is described by data, not code: the module names inside a decoder layer, which
    projections are fused, where its norms sit and how they relate to heads. Everything that
    reads or cuts a layer goes through these names, so a new family is a short subclass
    (see docs/development.md, "Adding a model family").
    """

    name: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()
    #: whether the stock config can switch on output biases of o_proj / down_proj; without
    #: switches, FLAP-style bias compensation is saved with the rcpu modeling file
    output_bias_switches: ClassVar[bool] = False
    #: llama.cpp's name for the architecture (``general.architecture`` of an exported GGUF)
    gguf_arch: ClassVar[str] = "llama"

    # layout: module names inside one decoder layer -----------------------------------
    attn_name: ClassVar[str] = "self_attn"
    mlp_name: ClassVar[str] = "mlp"
    #: the attention's input projections; a single name is one fused [q; k; v] matrix (Phi-3)
    qkv_names: ClassVar[tuple[str, ...]] = ("q_proj", "k_proj", "v_proj")
    o_name: ClassVar[str] = "o_proj"
    #: the MLP's input projections; a single name is one fused [gate; up] matrix (Phi-3)
    gate_up_names: ClassVar[tuple[str, ...]] = ("gate_proj", "up_proj")
    down_name: ClassVar[str] = "down_proj"
    #: the norm the residual stream passes before the attention / the MLP (None: no pre-norm, OLMo 2)
    attn_norm_name: ClassVar[str | None] = "input_layernorm"
    mlp_norm_name: ClassVar[str | None] = "post_attention_layernorm"
    #: norms applied to a sublayer's output before it joins the residual stream (Gemma 3, OLMo 2)
    post_norm_names: ClassVar[tuple[str, ...]] = ()
    #: norms in the attention over one head's dimensions (weights shared by all heads, Qwen3 and
    #: Gemma 3's q_norm / k_norm): pruning heads leaves them as they are
    head_norm_names: ClassVar[tuple[str, ...]] = ()
    #: norms in the attention over a whole projection (OLMo 2's q_norm / k_norm): name -> "q" or
    #: "kv", the projection whose kept rows they keep. Their RMS is then taken over the kept heads
    #: only, as the pruned stock model computes it (docs/methods.md, "Norms over all heads").
    projection_norm_names: ClassVar[dict[str, str]] = {}
    #: the attention reads its head counts from the model config at run time (Phi-3): each
    #: pruned attention gets a private copy of the config with its own counts
    attention_reads_config: ClassVar[bool] = False
    #: the embedding module multiplies by sqrt(config.hidden_size) (Gemma 3): a stock reload
    #: recomputes it from the config, so hidden-size pruning folds the change into the weights
    embed_scale_from_hidden: ClassVar[bool] = False
    #: an RMSNorm multiplies by (offset + weight) (Gemma 3: 1 + w)
    norm_weight_offset: ClassVar[float] = 0.0

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
        return getattr(layer, self.attn_name)

    def mlp(self, layer: nn.Module) -> nn.Module:
        return getattr(layer, self.mlp_name)

    def attn_in(self, layer: nn.Module) -> list[nn.Linear]:
        """q, k, v (or the one fused qkv projection)."""
        attn = self.attn(layer)
        return [getattr(attn, n) for n in self.qkv_names]

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        """gate, up (or the one fused gate_up projection)."""
        mlp = self.mlp(layer)
        return [getattr(mlp, n) for n in self.gate_up_names]

    def attn_out(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.attn(layer), self.o_name)

    def mlp_out(self, layer: nn.Module) -> nn.Linear:
        return getattr(self.mlp(layer), self.down_name)

    def final_norm(self) -> nn.Module:
        """The norm between the last decoder layer and the LM head."""
        return self.base.norm

    def attn_norm(self, layer: nn.Module) -> nn.Module | None:
        """The pre-attention norm; its input is the residual stream before attention."""
        return getattr(layer, self.attn_norm_name) if self.attn_norm_name else None

    def mlp_norm(self, layer: nn.Module) -> nn.Module | None:
        """The pre-MLP norm; its input is the residual stream before the MLP."""
        return getattr(layer, self.mlp_norm_name) if self.mlp_norm_name else None

    def non_layer_modules(self) -> list[nn.Module]:
        """Modules run before the first decoder layer (moved to the compute device)."""
        mods = [self.base.embed_tokens]
        for name in ("rotary_emb", "rotary_emb_local"):
            if getattr(self.base, name, None) is not None:
                mods.append(getattr(self.base, name))
        return mods

    @property
    def fused_qkv(self) -> bool:
        return len(self.qkv_names) == 1

    @property
    def fused_gate_up(self) -> bool:
        return len(self.gate_up_names) == 1

    # geometry ------------------------------------------------------------------------
    def geometry(self, layer: nn.Module) -> AttentionGeometry:
        attn = self.attn(layer)
        head_dim = attn.head_dim
        o_proj = self.attn_out(layer)
        num_heads = o_proj.in_features // head_dim
        if self.fused_qkv:
            num_kv_heads = (self.attn_in(layer)[0].out_features - num_heads * head_dim) // (2 * head_dim)
        else:
            num_kv_heads = self.attn_in(layer)[1].out_features // head_dim
        return AttentionGeometry(num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                 hidden_size=o_proj.out_features)

    def layer_shape(self, layer: nn.Module) -> LayerShape:
        return LayerShape(
            attn=self.geometry(layer),
            intermediate_size=self.mlp_out(layer).in_features,
            qkv_bias=self.attn_in(layer)[0].bias is not None,
            o_bias=self.attn_out(layer).bias is not None,
            mlp_bias=self.mlp_in(layer)[0].bias is not None,
        )

    # surgery -------------------------------------------------------------------------
    def prune_attention(self, layer: nn.Module, kept_heads: torch.Tensor, kept_kv_heads: torch.Tensor,
                        new_o_weight: torch.Tensor | None = None) -> None:
        """Keep query heads ``kept_heads`` and KV heads ``kept_kv_heads`` (ascending)."""
        attn = self.attn(layer)
        geom = self.geometry(layer)
        hd = geom.head_dim
        q_rows = (kept_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        kv_rows = (kept_kv_heads[:, None] * hd + torch.arange(hd)).reshape(-1)
        if self.fused_qkv:  # [q; k; v] rows of one matrix
            q_size, kv_size = geom.num_heads * hd, geom.num_kv_heads * hd
            _slice_linear(self.attn_in(layer)[0], torch.cat([q_rows, q_size + kv_rows, q_size + kv_size + kv_rows]), 0)
        else:
            q_proj, k_proj, v_proj = self.attn_in(layer)
            _slice_linear(q_proj, q_rows, 0)
            _slice_linear(k_proj, kv_rows, 0)
            _slice_linear(v_proj, kv_rows, 0)
        for norm_name, which in self.projection_norm_names.items():
            _slice_norm(getattr(attn, norm_name), q_rows if which == "q" else kv_rows)
        o_proj = self.attn_out(layer)
        _slice_linear(o_proj, q_rows, 1)
        if new_o_weight is not None:
            o_proj.weight.data.copy_(new_o_weight)
        if len(kept_heads) % len(kept_kv_heads):
            raise AssertionError("unequal KV groups after pruning")
        set_head_counts(attn, len(kept_heads), len(kept_kv_heads), self.attention_reads_config)

    def prune_mlp(self, layer: nn.Module, kept: torch.Tensor, new_down_weight: torch.Tensor | None = None) -> None:
        mlp = self.mlp(layer)
        if self.fused_gate_up:  # [gate; up] rows of one matrix
            width = self.mlp_out(layer).in_features
            _slice_linear(self.mlp_in(layer)[0], torch.cat([kept, width + kept]), 0)
        else:
            for lin in self.mlp_in(layer):
                _slice_linear(lin, kept, 0)
        down = self.mlp_out(layer)
        _slice_linear(down, kept, 1)
        if new_down_weight is not None:
            down.weight.data.copy_(new_down_weight)
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
        if not self.output_bias_switches:
            if attn_bias:
                _ensure_bias(self.attn_out(layer))
            if mlp_bias:
                _ensure_bias(self.mlp_out(layer))
            return
        if attn_bias:
            for lin in (*self.attn_in(layer), self.attn_out(layer)):
                _ensure_bias(lin)
        if mlp_bias:
            for lin in (*self.mlp_in(layer), self.mlp_out(layer)):
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
            if self.attention_reads_config:  # the layers' private configs are the model's again
                for layer in layers:
                    self.attn(layer).config = cfg
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
