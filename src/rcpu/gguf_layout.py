"""Which llama.cpp graph runs a (pruned) model, and the tensors and keys that graph reads.

llama.cpp has one compute graph per architecture (``general.architecture``), and each reads a
fixed set of tensors in fixed shapes. :data:`GRAPHS` describes, for every graph an export can
target, what it can express: per-layer widths, output biases, RoPE scalings, partial rotary,
sliding windows, its norm convention. A model family's adapter names its own graph
(``DecoderAdapter.gguf_arch``); :func:`choose_layout` takes that graph when it runs the model as
pruned, else llama.cpp's ``llama`` graph (``deci`` for per-layer widths) for families with
Llama's layout, else pads the attention with zero heads for graphs that size it as hidden x
hidden, else refuses with one line that names the reason and the fix.

The tensors are read through the adapter's module names (fused projections, norms by role), so
a family needs no code here beyond its graph's row in :data:`GRAPHS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import gguf
import numpy as np
import torch
from torch import nn

from .errors import RcpuError

_A = gguf.MODEL_ARCH
_T = gguf.MODEL_TENSOR


@dataclass(frozen=True)
class Graph:
    """What one llama.cpp graph reads, as far as an export has to know (from the graph's
    ``src/models/<arch>.cpp``: the tensor shapes it loads and its forward pass)."""

    arch: gguf.MODEL_ARCH
    #: RoPE rotates neighbouring pairs (llama.cpp's "normal" RoPE): q/k rows go into that order
    interleaved_rope: bool = False
    #: q and o are loaded as hidden x hidden, so fewer query heads than hidden / head_dim do not fit
    hidden_attention: bool = False
    #: reads per-layer head counts and MLP widths (arrays); the others use layer 0's for every layer
    per_layer_widths: bool = False
    #: has o_proj and MLP biases (q/k/v biases every graph reads)
    output_biases: bool = False
    #: RoPE scalings it expresses besides none
    rope_scalings: tuple[str, ...] = ("linear",)
    #: rotates only part of each head (rope.dimension_count < key_length)
    partial_rotary: bool = False
    #: the MLP's input is one [gate; up] matrix (ffn_up, twice the width)
    fused_gate_up: bool = False
    #: the MLP's activation, as transformers names it
    activation: str = "silu"
    #: RMSNorm weights are stored as 1 + w (Gemma's norms compute x * (1 + w))
    norm_offset: float = 0.0
    #: reads a sliding window, the per-layer pattern of sliding layers and their RoPE base
    sliding_window: bool = False
    #: layers without RoPE, fixed by llama.cpp: those with (i + 1) % nope_step == 0 (0: none)
    nope_step: int = 0
    #: reads final_logit_softcapping
    final_softcap: bool = False
    #: output.weight is required (a tied embedding is written twice)
    needs_output: bool = False
    #: models of this family run in llama.cpp's llama graph (and deci, for per-layer widths) too
    llama_layout: bool = False
    #: the attention scale llama.cpp applies: (layers, hidden, query heads, head_dim) -> scale
    query_scale: Callable[[int, int, int, int], float] = lambda layers, hidden, heads, head_dim: head_dim ** -0.5

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]


def _gemma3_query_scale(layers: int, hidden: int, heads: int, head_dim: int) -> float:
    # llama.cpp takes a Gemma 3 file of 62 layers for the 27B model and scales queries by
    # (hidden / heads)^-0.5 there, in integer division, head_dim^-0.5 otherwise;
    # query_pre_attn_scalar is not read
    return (hidden // heads) ** -0.5 if layers == 62 else head_dim ** -0.5


_LLAMA_ROPE = ("linear", "llama3", "longrope")

#: llama.cpp graph name -> what it reads (see :class:`Graph`)
GRAPHS: dict[str, Graph] = {g.name: g for g in (
    Graph(_A.LLAMA, interleaved_rope=True, output_biases=True, rope_scalings=_LLAMA_ROPE, llama_layout=True),
    Graph(_A.DECI, interleaved_rope=True, output_biases=True, rope_scalings=_LLAMA_ROPE, per_layer_widths=True,
          llama_layout=True),
    Graph(_A.QWEN2, hidden_attention=True, llama_layout=True),
    Graph(_A.QWEN3),
    Graph(_A.GEMMA3, activation="gelu_pytorch_tanh", norm_offset=1.0, sliding_window=True, final_softcap=True,
          query_scale=_gemma3_query_scale),
    Graph(_A.PHI3, hidden_attention=True, rope_scalings=("linear", "longrope"), partial_rotary=True,
          fused_gate_up=True, llama_layout=True),
    Graph(_A.OLMO2, hidden_attention=True, needs_output=True),
    Graph(_A.SMOLLM3, interleaved_rope=True, nope_step=4),
)}


# ------------------------------------------------------------------------------------- RoPE


@dataclass(frozen=True)
class Rope:
    """A config's RoPE, as llama.cpp's metadata needs it."""

    theta: float
    kind: str  #: "none", "linear", "llama3", "longrope", or another transformers rope_type
    params: dict  #: the full-attention layers' rope parameters
    sliding_theta: float | None = None  #: the RoPE base of sliding-window layers, when it differs
    sliding_kind: str = "none"

    @property
    def label(self) -> str:
        """The scaling as a problem message names it."""
        if self.sliding_kind != "none":
            return f"{self.sliding_kind} (on sliding-window layers)"
        return self.kind


def _kind(params: dict) -> str:
    kind = params.get("rope_type", params.get("type"))
    return "none" if kind in (None, "default") else str(kind)


def rope_of(config) -> Rope:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if not isinstance(params, dict):
        params = {}
    sliding = params.get("sliding_attention") if isinstance(params.get("sliding_attention"), dict) else None
    full = params.get("full_attention", params) if isinstance(params.get("full_attention"), dict) else params
    theta = full.get("rope_theta", getattr(config, "rope_theta", None))
    theta = float(theta if theta is not None else 10000.0)
    if sliding is None:
        return Rope(theta, _kind(full), full)
    local = sliding.get("rope_theta", getattr(config, "rope_local_base_freq", None))
    return Rope(theta, _kind(full), full, float(local) if local is not None else None, _kind(sliding))


def head_dim_of(config) -> int:
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim if head_dim else config.hidden_size // config.num_attention_heads)


def rotary_dims_of(config, head_dim: int) -> int:
    """The dimensions of each head RoPE rotates (transformers: head_dim x partial_rotary_factor)."""
    factor = getattr(config, "partial_rotary_factor", None)
    if factor is None:
        factor = rope_of(config).params.get("partial_rotary_factor", 1.0)
    return int(head_dim * float(factor))


def llama3_rope_factors(params: dict, theta: float, rotary_dims: int) -> np.ndarray:
    """Llama 3's RoPE scaling as one factor per frequency (llama.cpp's ``rope_freqs`` tensor, which
    divides each frequency): 1 for wavelengths below original_context / high_freq_factor, ``factor``
    above original_context / low_freq_factor, and a smooth blend of the two in between."""
    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    context = float(params.get("original_max_position_embeddings", 8192))
    freqs = theta ** -(np.arange(0, rotary_dims, 2, dtype=np.float64) / rotary_dims)
    wavelen = 2 * math.pi / freqs
    smooth = (context / wavelen - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    out = np.where(wavelen < context / high, 1.0, np.where(wavelen > context / low, factor, blended))
    return out.astype(np.float32)


@dataclass(frozen=True)
class LongRope:
    long: np.ndarray
    short: np.ndarray
    attn_factor: float
    original_context: int


def longrope_of(config, rope: Rope, rotary_dims: int) -> LongRope:
    """LongRoPE (Phi-3.5, Phi-4-mini): per-frequency factors for long and short contexts, and the
    factor on cos/sin that transformers derives from the context extension."""
    p = rope.params
    original = p.get("original_max_position_embeddings", getattr(config, "original_max_position_embeddings", None))
    long, short = p.get("long_factor"), p.get("short_factor")
    if original is None or long is None or short is None:
        raise RcpuError("cannot export to GGUF: the longrope RoPE parameters lack long_factor, short_factor or "
                        "original_max_position_embeddings")
    if len(long) != rotary_dims // 2 or len(short) != rotary_dims // 2:
        raise RcpuError(f"cannot export to GGUF: longrope needs {rotary_dims // 2} long and short factors "
                        f"(half the rotary dimensions), the config has {len(long)} and {len(short)}")
    attn = p.get("attention_factor")
    if attn is None:
        factor = p.get("factor") or config.max_position_embeddings / original
        attn = math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0
    return LongRope(np.asarray(long, np.float32), np.asarray(short, np.float32), float(attn), int(original))


# ---------------------------------------------------------------------------- the model's facts


@dataclass(frozen=True)
class Facts:
    """What decides the graph: read from a model, or predicted from its config and a prune config."""

    model_type: str
    family: str  #: the adapter's graph (``gguf_arch``)
    uniform: bool  #: the same widths in every layer
    output_biases: bool  #: nonzero o_proj / MLP biases
    heads_fit: bool | None  #: query heads x head_dim == hidden in every layer (None: unknown before pruning)
    rope: Rope
    rotary_dims: int
    head_dim: int
    activation: str
    sliding: tuple[bool, ...]  #: per layer: a sliding-window layer
    nope_layers: tuple[int, ...]  #: layers without RoPE
    n_layers: int
    attn_softcap: bool
    final_softcap: bool


def _config_facts(config, uniform: bool, output_biases: bool, heads_fit: bool | None,
                  head_dim: int | None = None) -> Facts:
    from .models import ADAPTERS

    model_type = str(getattr(config, "model_type", ""))
    cls = next((c for c in ADAPTERS if model_type in c.model_types), None)
    if cls is None or cls.gguf_arch not in GRAPHS:
        families = sorted({c.gguf_arch for c in ADAPTERS})
        raise RcpuError(f"GGUF export supports the {', '.join(families)} families (llama.cpp architectures), "
                        f"not model type {model_type!r}")
    n_layers = int(config.num_hidden_layers)
    head_dim = head_dim or head_dim_of(config)
    layer_types = getattr(config, "layer_types", None) or []
    no_rope = getattr(config, "no_rope_layers", None)  # SmolLM3: 1 = RoPE, 0 = none
    return Facts(
        model_type=model_type.removeprefix("rcpu_"), family=cls.gguf_arch, uniform=uniform,
        output_biases=output_biases, heads_fit=heads_fit, rope=rope_of(config),
        rotary_dims=rotary_dims_of(config, head_dim), head_dim=head_dim,
        activation=str(getattr(config, "hidden_activation", None) or getattr(config, "hidden_act", "silu")),
        sliding=tuple(t == "sliding_attention" for t in layer_types[:n_layers]),
        nope_layers=tuple(i for i, use in enumerate((no_rope or [])[:n_layers]) if not use), n_layers=n_layers,
        attn_softcap=getattr(config, "attn_logit_softcapping", None) is not None,
        final_softcap=getattr(config, "final_logit_softcapping", None) is not None)


def facts_from_config(config, prune_config=None) -> Facts:
    """The facts of the model ``config`` describes, pruned as ``prune_config`` says (if given):
    a global allocation gives per-layer widths, bias compensation output biases."""
    widths = [getattr(config, k, None) for k in ("layer_num_attention_heads", "layer_num_key_value_heads",
                                                  "layer_intermediate_size")]
    uniform = all(not w or len(set(w)) <= 1 for w in widths)
    biases = any(bool(getattr(config, k, False)) for k in ("attention_bias", "mlp_bias", "o_proj_bias",
                                                            "down_proj_bias"))
    if prune_config is not None:
        from .compensations import COMPENSATIONS

        cfg = prune_config.resolve()
        uniform = uniform and cfg.allocation == "uniform"
        comp = COMPENSATIONS.get(cfg.compensation)
        biases = biases or bool(comp is not None and comp.adds_bias and (cfg.compensate_attn or cfg.compensate_mlp))
    return _config_facts(config, uniform, biases, None)


def _nonzero(t: torch.Tensor | None) -> bool:
    return t is not None and bool(t.detach().abs().max() > 0)


def facts_from_model(model: nn.Module, widths: list[dict]) -> Facts:
    from .models import get_adapter

    adapter = get_adapter(model)
    hidden = int(model.config.hidden_size)
    head_dim = adapter.geometry(adapter.layers[0]).head_dim
    biases = any(_nonzero(lin.bias) for layer in adapter.layers
                 for lin in (adapter.attn_out(layer), *adapter.mlp_in(layer), adapter.mlp_out(layer)))
    fit = all(w["num_attention_heads"] * head_dim == hidden for w in widths)
    uniform = len({tuple(w.values()) for w in widths}) <= 1
    return _config_facts(model.config, uniform, biases, fit, head_dim)


# ------------------------------------------------------------------------------------ the choice


def problems(graph: Graph, f: Facts) -> list[str]:
    """Why ``graph`` cannot run the model (empty: it can), each a sentence with its fix."""
    g = f"llama.cpp's {graph.name} graph"
    out = []
    if not f.uniform and not graph.per_layer_widths:
        out.append(f"{g} takes one width for all layers and this model's layers differ; prune with uniform "
                   f"widths (--allocation uniform)")
    if f.output_biases and not graph.output_biases:
        out.append(f"{g} has no o_proj / MLP biases and this model has them (bias compensation); prune with "
                   f"a compensation that adds none (e.g. --compensation rotation)")
    if f.rope.kind not in ("none", *graph.rope_scalings) or f.rope.sliding_kind != "none":
        out.append(f"{g} has no {f.rope.label} RoPE scaling (it reads: none, {', '.join(graph.rope_scalings)})")
    if f.rotary_dims != f.head_dim and not graph.partial_rotary:
        out.append(f"{g} rotates whole heads and this model {f.rotary_dims} of {f.head_dim} dimensions "
                   f"(partial_rotary_factor)")
    if f.activation != graph.activation:
        out.append(f"{g} uses {graph.activation} in the MLP and this model {f.activation}")
    if any(f.sliding) and not graph.sliding_window:
        out.append(f"{g} has no sliding-window attention and this model has sliding-window layers")
    nope = tuple(i for i in range(f.n_layers) if graph.nope_step and (i + 1) % graph.nope_step == 0)
    if f.nope_layers != nope:
        out.append(f"{g} leaves RoPE out of layers {list(nope)}"
                   + (f" (every {graph.nope_step}th)" if graph.nope_step else "")
                   + f" and this model out of layers {list(f.nope_layers)}")
    if f.attn_softcap:
        out.append(f"{g} has no attention logit soft-capping and this model uses it")
    if f.final_softcap and not graph.final_softcap:
        out.append(f"{g} has no final logit soft-capping and this model uses it")
    return out


def choose_graph(f: Facts) -> tuple[Graph, bool]:
    """The graph that runs the model, and whether its attention must be padded with zero heads.

    The family's own graph first; for families with Llama's layout then llama.cpp's llama and deci
    graphs (so that a pruned Qwen2 or Phi-3, whose own graphs size attention as hidden x hidden, keeps
    its smaller attention); else the family's graph with zero heads; else a one-line RcpuError."""
    family = GRAPHS[f.family]
    candidates = [family] + ([GRAPHS["llama"], GRAPHS["deci"]] if family.llama_layout else [])
    for graph in dict.fromkeys(candidates):
        if not problems(graph, f) and not (graph.hidden_attention and f.heads_fit is False):
            return graph, False
    first = problems(family, f)
    if not first:  # only the heads do not fit: pad
        return family, True
    raise RcpuError(f"cannot export this {f.model_type} model to GGUF: {'; '.join(first)}")


def head_padding(widths: list[dict], head_dim: int, hidden: int, graph: Graph) -> tuple[int, int]:
    """(query heads, KV heads) per layer in a file whose graph sizes attention as hidden x hidden:
    the kept heads plus zero heads (zero q rows and o_proj columns), each KV group padded alike."""
    heads, kv = widths[0]["num_attention_heads"], widths[0]["num_key_value_heads"]
    total = hidden // head_dim
    group = heads // kv
    if total * head_dim == hidden:
        for kv_total in range(kv, total + 1):
            if total % kv_total == 0 and total // kv_total >= group:
                return total, kv_total
    raise RcpuError(f"cannot export to GGUF: llama.cpp's {graph.name} graph sizes attention as hidden x hidden "
                    f"({hidden}), and {heads} query heads over {kv} KV heads of {head_dim} do not pad to that "
                    f"with whole KV groups")


# ------------------------------------------------------------------------------------ the layout


@dataclass(frozen=True)
class Layout:
    """The graph a model is written for and the widths it is written with."""

    graph: Graph
    facts: Facts
    widths: list[dict]  #: per layer, as in the model: num_attention_heads, num_key_value_heads, intermediate_size (padded)
    head_dim: int
    hidden: int
    heads: tuple[int, int] | None = None  #: (query, KV) heads per layer in the file, when padded with zero heads
    zero_o_bias: bool = False  #: write a zero o_proj bias (q/k/v biases in the llama graph, for transformers' reader)
    padded: list[dict] = field(default_factory=list)  #: MLP widths padded with zero channels

    @property
    def arch(self) -> gguf.MODEL_ARCH:
        return self.graph.arch

    @property
    def name(self) -> str:
        return self.graph.name

    @property
    def uniform(self) -> bool:
        return self.facts.uniform

    def file_widths(self) -> list[dict]:
        if self.heads is None:
            return self.widths
        return [{**w, "num_attention_heads": self.heads[0], "num_key_value_heads": self.heads[1]}
                for w in self.widths]

    def per_layer(self, key: str) -> int | list[int]:
        """One value for a uniform model, llama.cpp's per-layer array otherwise."""
        widths = self.file_widths()
        return widths[0][key] if self.uniform else [w[key] for w in widths]


# ----------------------------------------------------------------------------------- the tensors


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows (or bias entries) of each head from HF's rotate-half layout to llama.cpp's
    interleaved RoPE layout: within a head, row ``i`` of the first half and row ``i`` of the
    second half become neighbours."""
    head_dim = weight.shape[0] // n_heads
    if head_dim * n_heads != weight.shape[0] or head_dim % 2:
        raise ValueError(f"{weight.shape[0]} rows are not {n_heads} heads of an even size")
    w = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _place_heads(data: np.ndarray, slots: list[int], total: int, head_dim: int, axis: int = 0) -> np.ndarray:
    """Head ``i`` of ``data`` (along ``axis``) at head slot ``slots[i]`` of ``total``; zeros elsewhere."""
    if total == len(slots) and slots == sorted(slots):
        return data
    shape = list(data.shape)
    shape[axis] = total * head_dim
    out = np.zeros(shape, dtype=data.dtype)
    for i, slot in enumerate(slots):
        src = [slice(None)] * data.ndim
        dst = [slice(None)] * data.ndim
        src[axis] = slice(i * head_dim, (i + 1) * head_dim)
        dst[axis] = slice(slot * head_dim, (slot + 1) * head_dim)
        out[tuple(dst)] = data[tuple(src)]
    return out


def _pad_axis(data: np.ndarray, size: int, axis: int) -> np.ndarray:
    extra = size - data.shape[axis]
    if extra <= 0:
        return data
    pad = [(0, 0)] * data.ndim
    pad[axis] = (0, extra)
    return np.pad(data, pad)


Thunk = Callable[[], np.ndarray]


def _name(kind: gguf.MODEL_TENSOR, il: int | None = None, suffix: str = "weight") -> str:
    base = gguf.TENSOR_NAMES[kind]
    return f"{base.format(bid=il) if il is not None else base}.{suffix}"


class _Reader:
    """The model's tensors by module, as float32 arrays; remembers what was read, so that a tensor
    the graph has no place for is an error instead of a silent omission."""

    def __init__(self, model: nn.Module):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.state = model.state_dict()
        self.used: set[str] = set()

    def key(self, module: nn.Module, attr: str = "weight") -> str | None:
        key = f"{self.names[id(module)]}.{attr}".lstrip(".")
        if key not in self.state:
            return None
        self.used.add(key)
        return key

    def array(self, key: str) -> np.ndarray:
        return self.state[key].detach().to("cpu", torch.float32).numpy()

    def leftover(self) -> list[str]:
        return [k for k in self.state if k not in self.used]


def tensor_plan(model: nn.Module, layout: Layout) -> list[tuple[str, int, Thunk]]:
    """(llama.cpp name, number of dimensions, function giving the float32 array) for every tensor of
    the file, in llama.cpp's naming and layout. Arrays are made when called (one at a time)."""
    from .models import get_adapter

    adapter = get_adapter(model)
    graph, config = layout.graph, model.config
    reader = _Reader(model)
    plan: list[tuple[str, int, Thunk]] = []
    embed = adapter.base.embed_tokens
    plan.append((_name(_T.TOKEN_EMBD), 2, partial(reader.array, reader.key(embed))))
    for il, layer in enumerate(adapter.layers):
        plan.extend(_LayerPlan(adapter, layer, il, layout, reader).tensors())
    plan.append((_name(_T.OUTPUT_NORM), 1, partial(_norm, reader, reader.key(adapter.final_norm()), graph, 1.0)))
    head = model.get_output_embeddings()
    if head is not None:
        tied = head.weight is embed.weight or head.weight.data_ptr() == embed.weight.data_ptr()
        key = reader.key(head) or reader.key(embed)  # a tied head may be in the state dict once
        if not tied or graph.needs_output:  # else llama.cpp reuses token_embd
            plan.append((_name(_T.OUTPUT), 2, partial(reader.array, key)))
    rope = layout.facts.rope
    if rope.kind == "llama3":
        factors = llama3_rope_factors(rope.params, rope.theta, layout.facts.rotary_dims)
        plan.append((_name(_T.ROPE_FREQS), 1, partial(np.asarray, factors)))
    elif rope.kind == "longrope":
        longrope = longrope_of(config, rope, layout.facts.rotary_dims)
        plan.append((_name(_T.ROPE_FACTORS_LONG), 1, partial(np.asarray, longrope.long)))
        plan.append((_name(_T.ROPE_FACTORS_SHORT), 1, partial(np.asarray, longrope.short)))
    left = reader.leftover()
    if left:
        raise RcpuError(f"cannot export tensor {left[0]!r} to GGUF: llama.cpp's {graph.name} graph has no place for it")
    return plan


def _norm(reader: _Reader, key: str, graph: Graph, scale: float) -> np.ndarray:
    return (reader.array(key) + graph.norm_offset) * scale


class _LayerPlan:
    """The tensors of one decoder layer, in the layout of ``layout``'s graph."""

    def __init__(self, adapter, layer: nn.Module, il: int, layout: Layout, reader: _Reader):
        self.adapter, self.layer, self.il, self.reader = adapter, layer, il, reader
        self.graph, self.hd = layout.graph, layout.head_dim
        w = layout.widths[il]
        self.heads, self.kv = w["num_attention_heads"], w["num_key_value_heads"]
        self.heads_f, self.kv_f = layout.heads or (self.heads, self.kv)
        group, group_f = self.heads // self.kv, self.heads_f // self.kv_f
        #: where each kept query head goes among the file's heads (its KV group's first slots)
        self.q_slots = [(h // group) * group_f + h % group for h in range(self.heads)]
        self.width_f = w["intermediate_size"]
        self.layout = layout
        self.plan: list[tuple[str, int, Thunk]] = []

    def add(self, kind: gguf.MODEL_TENSOR, fn: Thunk, ndim: int = 2, suffix: str = "weight") -> None:
        self.plan.append((_name(kind, self.il, suffix), ndim, fn))

    def tensors(self) -> list[tuple[str, int, Thunk]]:
        self.norms()
        self.attention()
        self.mlp()
        return self.plan

    # norms ----------------------------------------------------------------------------------
    def norms(self) -> None:
        a, layer = self.adapter, self.layer
        names = a.post_norm_names  # (after the attention, after the MLP)
        post = zip((_T.ATTN_POST_NORM, _T.FFN_POST_NORM)[:len(names)], (getattr(layer, n) for n in names), strict=True)
        for kind, module in ((_T.ATTN_NORM, a.attn_norm(layer)), (_T.FFN_NORM, a.mlp_norm(layer)), *post):
            if module is not None:
                self.add(kind, partial(_norm, self.reader, self.reader.key(module), self.graph, 1.0), 1)

    # attention ------------------------------------------------------------------------------
    def query_scale(self) -> float:
        """The model's attention scale over llama.cpp's for this graph (1 but for Gemma 3)."""
        config = self.adapter.config
        scalar = getattr(config, "query_pre_attn_scalar", None)
        want = scalar ** -0.5 if scalar else self.hd ** -0.5
        return want / self.graph.query_scale(len(self.layout.widths), self.layout.hidden, self.heads_f, self.hd)

    def q_part(self, a: np.ndarray, scale: float = 1.0) -> np.ndarray:
        a = _place_heads(a * scale, self.q_slots, self.heads_f, self.hd)
        return permute_qk(a, self.heads_f) if self.graph.interleaved_rope else a

    def k_part(self, a: np.ndarray) -> np.ndarray:
        a = _place_heads(a, list(range(self.kv)), self.kv_f, self.hd)
        return permute_qk(a, self.kv_f) if self.graph.interleaved_rope else a

    def v_part(self, a: np.ndarray) -> np.ndarray:
        return _place_heads(a, list(range(self.kv)), self.kv_f, self.hd)

    def qkv(self, key: str, q_scale: float) -> np.ndarray:
        sizes = np.cumsum([self.heads * self.hd, self.kv * self.hd])
        q, k, v = np.split(self.reader.array(key), sizes)
        return np.concatenate([self.q_part(q, q_scale), self.k_part(k), self.v_part(v)])

    def projection_norm(self, key: str, which: str, scale: float) -> np.ndarray:
        """A norm over the whole q (or k) projection, padded like its rows. Its RMS then runs over
        the zero heads too, sqrt(kept / written) of the RMS over the kept heads: the weights make up
        for it (exact but for the norm's epsilon, which acts as epsilon x written / kept)."""
        slots, n, total = (self.q_slots, self.heads, self.heads_f) if which == "q" else \
            (list(range(self.kv)), self.kv, self.kv_f)
        data = _norm(self.reader, key, self.graph, scale * math.sqrt(n / total))
        return _place_heads(data, slots, total, self.hd)

    def attention(self) -> None:
        a, reader, attn = self.adapter, self.reader, self.adapter.attn(self.layer)
        scale = self.query_scale()
        q_norm = False
        names = a.head_norm_names  # (q, k), each over one head's dimensions: as they are
        for name, kind in zip(names, (_T.ATTN_Q_NORM, _T.ATTN_K_NORM)[:len(names)], strict=True):
            q_norm = q_norm or kind == _T.ATTN_Q_NORM
            norm_scale = scale if kind == _T.ATTN_Q_NORM else 1.0
            self.add(kind, partial(_norm, reader, reader.key(getattr(attn, name)), self.graph, norm_scale), 1)
        for name, which in a.projection_norm_names.items():
            q_norm = q_norm or which == "q"
            kind = _T.ATTN_Q_NORM if which == "q" else _T.ATTN_K_NORM
            key = reader.key(getattr(attn, name))
            self.add(kind, partial(self.projection_norm, key, which, scale if which == "q" else 1.0), 1)
        q_scale = 1.0 if q_norm else scale  # without a q norm the scale goes into the q rows
        attn_in = a.attn_in(self.layer)
        qkv_bias = False
        for suffix, ndim in (("weight", 2), ("bias", 1)):
            keys = [reader.key(lin, suffix) for lin in attn_in]
            if None in keys:
                continue
            qkv_bias = qkv_bias or suffix == "bias"
            if a.fused_qkv:  # one [q; k; v] matrix: each part transformed, fused again
                self.add(_T.ATTN_QKV, partial(self.qkv, keys[0], q_scale), ndim, suffix)
                continue
            self.add(_T.ATTN_Q, lambda k=keys[0]: self.q_part(reader.array(k), q_scale), ndim, suffix)
            self.add(_T.ATTN_K, lambda k=keys[1]: self.k_part(reader.array(k)), ndim, suffix)
            self.add(_T.ATTN_V, lambda k=keys[2]: self.v_part(reader.array(k)), ndim, suffix)
        o_proj = a.attn_out(self.layer)
        o_key = reader.key(o_proj)
        self.add(_T.ATTN_OUT, lambda: _place_heads(reader.array(o_key), self.q_slots, self.heads_f, self.hd, axis=1))
        self.output_bias(_T.ATTN_OUT, o_proj)
        if self.layout.zero_o_bias and o_proj.bias is None and qkv_bias:
            self.add(_T.ATTN_OUT, partial(np.zeros, self.layout.hidden, np.float32), 1, "bias")

    # MLP ------------------------------------------------------------------------------------
    def gate_up(self, keys: list[str]) -> list[np.ndarray]:
        """gate and up (split from a fused [gate; up]), padded with zero channels."""
        arrays = [self.reader.array(k) for k in keys]
        if len(arrays) == 1:
            arrays = np.split(arrays[0], 2)
        return [_pad_axis(x, self.width_f, 0) for x in arrays]

    def mlp(self) -> None:
        a, reader = self.adapter, self.reader
        mlp_in = a.mlp_in(self.layer)
        for suffix, ndim in (("weight", 2), ("bias", 1)):
            keys = [reader.key(lin, suffix) for lin in mlp_in]
            if None in keys:
                continue
            if suffix == "bias" and not self.graph.output_biases:
                if any(_nonzero(lin.bias) for lin in mlp_in):
                    raise RcpuError(f"cannot export to GGUF: llama.cpp's {self.graph.name} graph has no MLP biases")
                continue  # zero biases (from a config's bias switch): nothing to write
            if self.graph.fused_gate_up:
                self.add(_T.FFN_UP, lambda k=keys: np.concatenate(self.gate_up(k)), ndim, suffix)
            else:
                self.add(_T.FFN_GATE, lambda k=keys: self.gate_up(k)[0], ndim, suffix)
                self.add(_T.FFN_UP, lambda k=keys: self.gate_up(k)[1], ndim, suffix)
        down = a.mlp_out(self.layer)
        down_key = reader.key(down)
        self.add(_T.FFN_DOWN, lambda: _pad_axis(reader.array(down_key), self.width_f, 1))
        self.output_bias(_T.FFN_DOWN, down)

    def output_bias(self, kind: gguf.MODEL_TENSOR, linear: nn.Linear) -> None:
        """An o_proj / down_proj bias: written if the graph reads it, left out if zero, else an error."""
        key = self.reader.key(linear, "bias")
        if key is None:
            return
        if self.graph.output_biases:
            self.add(kind, partial(self.reader.array, key), 1, "bias")
        elif _nonzero(linear.bias):
            raise RcpuError(f"cannot export to GGUF: llama.cpp's {self.graph.name} graph has no "
                            f"{gguf.TENSOR_NAMES[kind].split('.')[-1]} bias")


def choose_layout(model: nn.Module, widths: list[dict], padded: list[dict]) -> Layout:
    """The layout a model is written with: graph, zero-head padding, zero o_proj bias."""
    from .models import get_adapter

    facts = facts_from_model(model, widths)
    graph, pad = choose_graph(facts)
    adapter = get_adapter(model)
    hidden = int(model.config.hidden_size)
    head_dim = facts.head_dim
    heads = head_padding(widths, head_dim, hidden, graph) if pad else None
    qkv_bias = any(lin.bias is not None for layer in adapter.layers for lin in adapter.attn_in(layer))
    o_bias = any(adapter.attn_out(layer).bias is not None for layer in adapter.layers)
    zero_o_bias = graph.output_biases and qkv_bias and not o_bias and facts.family != graph.name
    return Layout(graph, facts, widths, head_dim, hidden, heads, zero_o_bias, padded)
