"""The sequential layer loop (RCPU reference order).

h = inputs of the first decoder layer for the calibration windows. For each layer:
  1. run the unpruned layer on h with hooks on o_proj and down_proj, streaming the
     input statistics (and Gram matrices when the compensation needs them);
  2. each sublayer -- the MLP's channels (down_proj's inputs), then the attention's heads
     (o_proj's inputs) -- goes through one step: summarise -> select -> compensate ->
     slice -> bias -> record (:func:`prune_sublayer`). Both use the unpruned layer's
     statistics (as the reference code does), so neither choice depends on the other;
     the MLP goes first, which frees its larger Gram matrix before the attention's SVD;
  3. optionally, refine the whole layer towards its unpruned copy (rcpu.refine);
  4. h <- pruned layer(h), so layer l+1 sees all pruning so far (``statistics="dense"``,
     FLAP: h <- unpruned layer(h) instead).
Targets are the unpruned sublayer's outputs on already-pruned inputs.

Only one layer is on the compute device at a time; per-layer results are small,
explicit and JSON-serialisable. Layers run on the calibration batches through
:mod:`rcpu.layer_io`; where layers come from and go to is a :class:`LayerStore`.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import compensate as comp
from . import refine
from .compensations import COMPENSATIONS, Problem, compensate, needs_gram, starved
from .config import PruneConfig
from .layer_io import capture_layer_inputs, forward_layer, module_device, run_layer, run_until
from .models import DecoderAdapter
from .report import LayerMemory, release_free_memory
from .scores import channel_scores, group_scores
from .select import LayerPlan, head_channels, select_channels, select_heads
from .stats import InputStats, StatsCollector

logger = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, dict]


@dataclass
class LayerResult:
    index: int
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    attn: dict = field(default_factory=dict)
    mlp: dict = field(default_factory=dict)
    seconds: float = 0.0
    memory: dict = field(default_factory=dict)  #: peak RSS (and CUDA) while this layer was pruned
    refine: dict = field(default_factory=dict)  #: layer refinement log (rcpu.refine), if any

    def to_dict(self) -> dict:
        return asdict(self)


class LayerStore:
    """Where decoder layers come from and go to during the loop.

    This base class is the in-memory case: layers live in the model and stay there.
    :class:`rcpu.streaming.StreamingStore` reads each layer from the checkpoint on disk
    instead, and writes and frees it once pruned, so the loop never needs the whole model.
    """

    def __init__(self, adapter: DecoderAdapter):
        self.adapter = adapter

    def load(self, index: int) -> nn.Module:
        """Layer ``index`` with its (unpruned) weights, on its home device."""
        return self.adapter.layers[index]

    def unload(self, index: int, layer: nn.Module) -> None:
        """Done reading layer ``index`` without changing it (scoring pass)."""

    def finish(self, index: int, layer: nn.Module, result: LayerResult, batches: list[Batch],
               heldout: list[Batch] | None, warnings: list[str]) -> None:
        """Layer ``index`` is pruned; ``batches`` / ``heldout`` are the next layer's inputs."""

    # the run driver's hooks (rcpu.driver.run_pruning), in the order it calls them

    def open(self, model: nn.Module) -> None:
        """Before the inputs of layer 0 are captured (a streamed run reads the embeddings)."""

    def captured(self, model: nn.Module) -> None:
        """The inputs of layer 0 are captured."""

    def resume(self, batches: list[Batch], heldout: list[Batch] | None, storage: torch.device):
        """Where an interrupted run stopped (a :class:`rcpu.driver.Resumed`), or None: start at layer 0."""
        return None

    def planned(self, plans: list[LayerPlan], biases: tuple[bool, bool], done: list[LayerResult]) -> None:
        """The plans are made (or restored) and checked, and ``biases`` says whether o_proj /
        down_proj will carry biases; ``done`` are the results of layers already written."""

    def close(self) -> None:
        """Every layer is pruned."""


def _direct_products(layer: nn.Module, module: nn.Linear, kept: torch.Tensor,
                     batches: list[Batch], cfg: PruneConfig) -> comp.DirectProducts:
    """The rotation's products of ``module`` streamed from its inputs in one more pass of the
    (not yet pruned) layer, stopped at ``module``."""
    t0 = time.perf_counter()
    acc = comp.DirectProducts(module.weight, kept, dtype=getattr(torch, cfg.rotation_dtype))
    handle = module.register_forward_pre_hook(lambda _m, args: acc.update(args[0]))
    try:
        run_until(layer, batches, module)
    finally:
        handle.remove()
    acc.seconds = time.perf_counter() - t0
    return acc



@dataclass
class Sublayer:
    """One prunable sublayer, seen through the linear layer whose input columns go: the
    attention's heads (o_proj) or the MLP's channels (down_proj)."""

    label: str  #: "o_proj" or "down_proj" (warnings)
    module: nn.Linear  #: o_proj / down_proj
    n_kept: int  #: input columns the plan keeps
    enabled: bool  #: compensate (else kept columns are sliced as they are)
    #: importance per input column -> (kept input columns, what ``slice`` needs)
    select: Callable[[torch.Tensor], tuple[torch.Tensor, tuple]]
    #: (what ``select`` returned, new kept columns of the module) -> the layer sliced
    slice: Callable[[tuple, torch.Tensor], None]


def sublayers(adapter: DecoderAdapter, layer: nn.Module, plan: LayerPlan, cfg: PruneConfig
              ) -> tuple[Sublayer, Sublayer]:
    """(attention, MLP) of ``layer`` under ``plan``."""
    geom = adapter.geometry(layer)
    o_proj, down_proj = adapter.attn_out(layer), adapter.mlp_out(layer)

    def heads(scores: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        kept, kv = select_heads(group_scores(scores, geom.head_dim), geom, plan)
        return head_channels(kept, geom.head_dim), (kept, kv)

    def channels(scores: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        kept = select_channels(scores, plan.channels_removed)
        return kept, (kept,)

    attn = Sublayer("o_proj", o_proj, (geom.num_heads - plan.heads_removed(geom)) * geom.head_dim, cfg.compensate_attn,
                    heads, lambda sel, w: adapter.prune_attention(layer, *sel, w))
    mlp = Sublayer("down_proj", down_proj, down_proj.in_features - plan.channels_removed, cfg.compensate_mlp,
                   channels, lambda sel, w: adapter.prune_mlp(layer, *sel, w))
    return attn, mlp


def prune_sublayer(adapter: DecoderAdapter, sub: Sublayer, stats: InputStats, cfg: PruneConfig, index: int,
                   warnings: list[str], heldout: InputStats | None = None,
                   products: Callable[[torch.Tensor], comp.DirectProducts] | None = None) -> tuple[tuple, dict]:
    """Summarise -> select -> compensate -> slice -> bias -> record, for one sublayer.
    Returns what the selection kept and the sublayer's report. ``products``: streams a
    rotation's products for the kept columns (instead of a Gram matrix)."""
    info: dict = {"stats": stats.summary()}
    weight = sub.module.weight
    kept, selection = sub.select(channel_scores(cfg.score, weight, stats))
    if len(kept) == sub.module.in_features:
        return selection, info
    direct = products(kept) if products is not None else None
    t0 = time.perf_counter()
    result = compensate(cfg.compensation if sub.enabled else "none",
                        Problem(weight, stats, kept, cfg, heldout, direct))
    if direct is not None:
        result.info["products"] = "direct"
        result.info["products_pass_s"] = round(direct.seconds, 4)
    result.info["compensate_s"] = round(time.perf_counter() - t0, 4)  # solve / SVD (+ error checks)
    release_free_memory()  # the solve's / SVD's workspace, before the next large buffer
    if "fallback" in result.info:
        msg = (f"layer {index} {sub.label}: "
               f"{result.info['reason']}; kept the weights uncompensated. Use more calibration tokens "
               f"(--nsamples x --seqlen >= {weight.shape[0]}) or --compensation ridge")
        logger.warning(msg)
        warnings.append(msg)
    sub.slice(selection, result.weight)
    if result.bias is not None:
        adapter.add_output_bias(sub.module, result.bias)
    info.update(result.info)
    return selection, info


def _collect(layer: nn.Module, modules: dict[str, nn.Linear], grams: dict[str, bool], batches: list[Batch],
             keep_outputs: bool, gram_dtype: torch.dtype = torch.float64, stop_after: nn.Module | None = None
             ) -> tuple[dict[str, InputStats], list[Batch]]:
    """Stream input statistics of ``modules`` over ``batches`` (and keep the layer's outputs).
    ``stop_after``: end each forward pass once this module has run (statistics of the
    modules before it only; no outputs)."""
    if stop_after is not None and keep_outputs:
        raise ValueError("a forward pass stopped early has no outputs to keep")
    with StatsCollector(modules, grams, gram_dtype=gram_dtype) as col:
        if stop_after is not None:
            run_until(layer, batches, stop_after)
            return col.stats, []
        outs = run_layer(layer, batches, keep_outputs=keep_outputs)
    return col.stats, outs


def _split_passes(gram_attn: bool, big_mlp: bool, dense_stats: bool) -> bool:
    """Whether the attention's statistics get a pass of their own after the MLP is pruned.
    They are the same either way (the MLP comes after the attention in the layer), but one
    shared pass holds the attention's Gram matrix through the MLP's compensation (``big_mlp``:
    a Gram matrix or streamed rotation products and an SVD), where it is dead weight (200 MiB
    at 13B widths, beside down_proj's 1.46 GiB Gram matrix or a 1.2 GiB SVD workspace).
    The extra pass stops at o_proj. Not with dense statistics, whose single pass also
    yields the dense outputs."""
    return gram_attn and big_mlp and not dense_stats


def _direct_mlp(cfg: PruneConfig, layer: nn.Module, mlp: Sublayer, n_tokens: int) -> bool:
    """Whether the MLP's rotation products are streamed from a second pass instead of
    formed from a d_ff^2 Gram matrix (``rotation_products``; auto: whichever is cheaper)."""
    down = mlp.module
    if (not COMPENSATIONS[cfg.compensation].rotation or not mlp.enabled or mlp.n_kept == down.in_features
            or starved(cfg.compensation, down.out_features, mlp.n_kept, n_tokens)
            or cfg.rotation_products == "gram" or cfg.direct_products_blocker is not None):
        return False
    return cfg.rotation_products == "direct" or comp.direct_products_cheaper(
        n_tokens, sum(p.numel() for p in layer.parameters()), down.in_features, down.out_features, mlp.n_kept,
        getattr(torch, cfg.rotation_dtype))


def _needs_gram(cfg: PruneConfig, sub: Sublayer, n_tokens: int) -> bool:
    if sub.n_kept == sub.module.in_features or not sub.enabled:  # nothing to compensate
        return False
    return needs_gram(cfg.compensation, sub.module.out_features, sub.n_kept, n_tokens)


@torch.no_grad()
def prune_layer(adapter: DecoderAdapter, layer: nn.Module, index: int, batches: list[Batch], plan: LayerPlan,
                cfg: PruneConfig, warnings: list[str], heldout: list[Batch] | None = None
                ) -> tuple[LayerResult, list[Batch], list[Batch] | None]:
    """Prune one decoder layer in place; returns its result and its outputs on ``batches``
    (and on the held-out batches, if any)."""
    t0 = time.perf_counter()
    attn, mlp = sublayers(adapter, layer, plan, cfg)
    n_tokens = sum(h.shape[:-1].numel() for h, _ in batches)
    direct_mlp = _direct_mlp(cfg, layer, mlp, n_tokens)
    grams = {"attn": _needs_gram(cfg, attn, n_tokens), "mlp": _needs_gram(cfg, mlp, n_tokens) and not direct_mlp}
    dense_stats = cfg.statistics == "dense"  # the next layer sees the dense model's hidden states (FLAP)
    split = _split_passes(grams["attn"], grams["mlp"] or direct_mlp, dense_stats)
    gram_dtype = getattr(torch, cfg.gram_dtype)
    both = {"attn": attn.module, "mlp": mlp.module}
    reference = copy.deepcopy(layer) if cfg.refine_epochs > 0 else None  # what refinement pulls towards
    stats, dense_out = _collect(layer, {"mlp": mlp.module} if split else both, grams, batches, dense_stats, gram_dtype)
    held: dict[str, InputStats] = {}
    heldout_dense = None
    if heldout is not None and (cfg.ridge_auto or dense_stats):
        held, heldout_dense = _collect(layer, both, {"attn": True, "mlp": True}, heldout, dense_stats, gram_dtype)

    def products(kept: torch.Tensor) -> comp.DirectProducts:
        return _direct_products(layer, mlp.module, kept, batches, cfg)

    (kept_channels,), mlp_info = prune_sublayer(adapter, mlp, stats.pop("mlp"), cfg, index, warnings,
                                                held.get("mlp"), products if direct_mlp else None)
    if split:  # (a ridge's MLP Gram matrix is freed only now)
        stats, _ = _collect(layer, {"attn": attn.module}, grams, batches, False, gram_dtype, stop_after=attn.module)
    (kept_heads, kept_kv), attn_info = prune_sublayer(adapter, attn, stats.pop("attn"), cfg, index, warnings,
                                                      held.get("attn"))
    del stats, held
    refine_info: dict = {}
    if reference is not None and (len(kept_heads) < adapter.geometry(reference).num_heads
                                  or plan.channels_removed > 0):
        refine_info = refine.refine_layer(layer, reference, batches, epochs=cfg.refine_epochs, lr=cfg.refine_lr,
                                          seed=cfg.seed + index, forward=forward_layer, heldout=heldout)
    del reference
    outputs = dense_out if dense_stats else run_layer(layer, batches, keep_outputs=True)
    heldout_out = None
    if heldout is not None:
        heldout_out = heldout_dense if dense_stats else run_layer(layer, heldout, keep_outputs=True)
    result = LayerResult(index, kept_heads.tolist(), kept_kv.tolist(), kept_channels.tolist(),
                         attn_info, mlp_info, time.perf_counter() - t0, refine=refine_info)
    return result, outputs, heldout_out


def run_sequential(model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, plans: list[LayerPlan],
                   cfg: PruneConfig, device: torch.device, progress: bool = True,
                   batches: list[Batch] | None = None, store: LayerStore | None = None, start: int = 0,
                   heldout: list[Batch] | None = None, results: list[LayerResult] | None = None,
                   warnings: list[str] | None = None) -> tuple[list[LayerResult], list[str]]:
    """Prune every decoder layer of ``model`` in order; returns per-layer results and warnings.

    ``start`` > 0 resumes an interrupted run: ``batches`` / ``heldout`` are then the inputs
    of layer ``start``, and ``results`` / ``warnings`` those of the layers before it.
    """
    warnings = [] if warnings is None else warnings
    results = [] if results is None else results
    store = store or LayerStore(adapter)
    if batches is None:
        batches = capture_layer_inputs(model, adapter, windows, cfg.batch_size, device)
    n = len(adapter.layers)
    bar = tqdm(range(start, n), desc="pruning layers", unit="layer", disable=not progress, initial=start, total=n)
    for i in bar:
        layer = store.load(i)
        home = module_device(layer)
        layer.to(device)
        with LayerMemory(device) as mem:
            result, batches, heldout = prune_layer(adapter, layer, i, batches, plans[i], cfg, warnings, heldout)
        result.memory = mem.result
        layer.to(home)
        results.append(result)
        store.finish(i, layer, result, batches, heldout, warnings)
        bar.set_postfix_str(f"{result.seconds:.1f}s")
        logger.debug("layer %d: %.1f s, %s", i, result.seconds, mem.result)
    return results, warnings
