"""The sequential layer loop (RCPU reference order).

h = inputs of the first decoder layer for the calibration windows. For each layer:
  1. run the unpruned layer on h with hooks on o_proj and down_proj, streaming the
     input statistics (and Gram matrices when the compensation needs them);
  2. attention: score o_proj's input channels -> choose heads -> compensate o_proj -> slice;
  3. MLP: the same on down_proj (statistics from step 1 by default, as the reference
     code does; ``mlp_stats="after_attention"`` re-captures them after step 2). With
     statistics from step 1 the two steps do not depend on each other and run MLP first,
     which frees the larger Gram matrix before the attention's SVD;
  4. optionally, refine the whole layer towards its unpruned copy (rcpu.refine);
  5. h <- pruned layer(h), so layer l+1 sees all pruning so far.
Targets are the unpruned sublayer's outputs on already-pruned inputs.

Only one layer is on the compute device at a time; per-layer results are small,
explicit and JSON-serialisable. Layers run on the calibration batches through
:mod:`rcpu.layer_io`.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import compensate as comp
from . import obs, refine
from .config import SCORE_CANDIDATES, PruneConfig
from .errors import RcpuError
from .layer_io import capture_layer_inputs, forward_layer, module_device, run_layer, run_until
from .layer_io import hidden_state_storage as hidden_state_storage  # re-exported, as before
from .models import DecoderAdapter
from .report import LayerMemory, release_free_memory
from .scores import channel_scores, group_scores
from .select import (
    LayerPlan,
    allocate_global,
    allocate_heads_split,
    forced_unit_scores,
    head_channels,
    head_unit_scores,
    max_channels_removed,
    plan_uniform,
    select_channels,
    select_heads,
    standardize,
)
from .stats import InputStats, StatsCollector

logger = logging.getLogger(__name__)


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

    def finish(self, index: int, layer: nn.Module, result: LayerResult, batches: list, heldout: list | None,
               warnings: list[str], dense: dict[str, list] | None = None) -> None:
        """Layer ``index`` is pruned; ``batches`` / ``heldout`` (and ``dense``'s lists) are the
        next layer's inputs."""


def _heldout_choice(weight: torch.Tensor, stats: InputStats, heldout: InputStats, kept: torch.Tensor,
                    cfg: PruneConfig, mean: torch.Tensor | None = None, rotations: bool = False
                    ) -> comp.Compensated:
    """The candidate with the lowest reconstruction error on held-out calibration windows
    (their own Gram matrix), never on evaluation text: ridge over ``cfg.ridge_grid``
    (ridge-auto), plus RCPU's rotation and rotation+scale with ``rotations`` (compensation
    auto; a rank-deficient rotation is no candidate). With ``mean`` (the calibration inputs'
    mean; ``stats`` then holds the centred Gram matrix) each candidate gets its intercept,
    and the held-out error counts it."""
    path = comp.ridge_path(weight, stats.gram, kept, list(cfg.ridge_grid), relative=cfg.ridge_lambda_relative,
                           target_cross=stats.target_cross)
    cands = [c for c in path if c is not None]  # a lambda whose system is not positive definite is skipped
    labels = [f"{lam:g}" for lam, c in zip(cfg.ridge_grid, path, strict=True) if c is not None]
    n_ridge = len(cands)
    if rotations:
        products = comp.rotation_products(weight, stats.gram, kept, dtype=getattr(torch, cfg.rotation_dtype),
                                          target_cross=stats.target_cross, target_sq=stats.target_sq)
        for kind in comp.ROTATIONS:
            rot = comp.rotation_solve(weight, kept, products, scale=kind == "rotation_scale",
                                      proper=cfg.rotation_proper, n_tokens=stats.n,
                                      proximal=cfg.rotation_proximal)
            if "fallback" not in rot.info:
                for key in ("rel_error", "rel_error_uncompensated"):  # restated below like the others'
                    rot.info.pop(key, None)
                cands.append(rot)
                labels.append(kind)
    if not cands:
        raise RcpuError(f"ridge: the kept Gram matrix is not positive definite for any lambda of "
                        f"{', '.join(f'{lam:g}' for lam in cfg.ridge_grid)}; use larger --ridge_grid values or more "
                        "calibration tokens")
    biases = None
    if mean is not None:
        for c in cands:
            c.bias = comp.intercept(weight, mean, kept, c.weight)
        biases = [c.bias for c in cands]
    rows, y2 = comp.row_errors(weight, heldout.gram, kept, [c.weight for c in cands], heldout.target_cross,
                               heldout.target_sq, biases=biases, mean=heldout.mean if biases else None, n=heldout.n)
    errs = [float(r.sum()) / y2 for r in rows]
    best = min(range(len(errs)), key=errs.__getitem__)
    if cfg.choice_per_row:
        result = _rows_of(cands, labels, torch.stack(rows), y2)
    else:
        result = cands[best]
    result.info.update({"lambda_auto": True, "heldout_tokens": heldout.n,
                        "heldout_errors": dict(zip(labels, errs, strict=True))})
    skipped = [f"{lam:g}" for lam, c in zip(cfg.ridge_grid, path, strict=True) if c is None]
    if skipped:
        result.info["lambdas_skipped"] = skipped
    if rotations and not cfg.choice_per_row:
        result.info["chosen"] = "ridge" if best < n_ridge else labels[best]
    return result


def _rows_of(cands: list[comp.Compensated], labels: list[str], errors: torch.Tensor, y2: float) -> comp.Compensated:
    """Each output row from the candidate with the lowest held-out error for that row
    (``errors``: candidates x rows). A least-squares fit is one regression per output, so
    rows from different candidates make a valid compensation whose held-out error is the
    sum of the row minima, never above the best single candidate's."""
    pick = errors.argmin(0).to(cands[0].weight.device)  # the first of equal minima: deterministic
    weight = cands[0].weight.clone()
    bias = cands[0].bias.clone() if cands[0].bias is not None else None
    for j, cand in enumerate(cands[1:], start=1):
        rows = pick == j
        weight[rows] = cand.weight[rows]
        if bias is not None:
            bias[rows] = cand.bias[rows]
    counts = torch.bincount(pick.cpu(), minlength=len(cands)).tolist()
    info = {"per_row": True, "rows_chosen": {lab: k for lab, k in zip(labels, counts, strict=True) if k},
            "heldout_error_per_row": float(errors.min(0).values.sum()) / y2}
    return comp.Compensated(weight, bias=bias, info=info)


def _compensate(kind: str, weight: torch.Tensor, stats: InputStats, kept: torch.Tensor, cfg: PruneConfig,
                heldout: InputStats | None = None, direct: comp.DirectProducts | None = None) -> comp.Compensated:
    # --intercept: fit B X_K + c, i.e. solve on the centred Gram matrix, then c = W mu - B mu_K
    centred = cfg.intercept and kind in comp.NEEDS_GRAM
    starved = kind in comp.ROTATIONS and stats.n < comp.rotation_tokens_needed(weight.shape[0], len(kept))
    fit = stats
    if centred and not starved:
        fit = replace(stats, gram=comp.centred_gram(stats.gram, stats.mean, stats.n))
    products = None
    if starved:  # the rotation would fall back anyway: no products, no SVD
        result = comp.starved_rotation(weight, kept, stats.n)
    elif kind == "none":
        result = comp.Compensated(weight[:, kept.to(weight.device)].clone())
    elif kind == "bias":
        result = comp.Compensated(weight[:, kept.to(weight.device)].clone(),
                                  bias=comp.bias_shift(weight, stats, kept))
    elif kind in ("ridge", "auto") and cfg.ridge_auto:
        result = _heldout_choice(weight, fit, heldout, kept, cfg, mean=stats.mean if centred else None,
                                 rotations=kind == "auto")
    elif kind == "ridge":
        try:
            result = comp.ridge(weight, fit.gram, kept, float(cfg.resolved_ridge_lambda),
                                relative=cfg.ridge_lambda_relative, target_cross=stats.target_cross)
        except ValueError as exc:
            raise RcpuError(str(exc)) from None
    elif kind in comp.ROTATIONS:
        if direct is not None:  # streamed in a pass of their own (no Gram matrix)
            products = direct.products()
        else:
            products = comp.rotation_products(weight, fit.gram, kept, dtype=getattr(torch, cfg.rotation_dtype),
                                              target_cross=stats.target_cross, target_sq=stats.target_sq)
        # the rotation reports its own errors and needs nothing more of the Gram matrix: free
        # it before the SVD (at 13B MLP widths it is the largest buffer of the layer)
        stats.gram = stats.target_cross = fit.gram = None
        release_free_memory()
        result = comp.rotation_solve(weight, kept, products, scale=kind == "rotation_scale",
                                     proper=cfg.rotation_proper, n_tokens=stats.n,
                                     proximal=cfg.rotation_proximal)
    else:  # validated earlier
        raise ValueError(kind)
    result.info["method"] = kind
    if centred:
        if result.bias is None:
            result.bias = comp.intercept(weight, stats.mean, kept, result.weight)
        result.info["intercept"] = True
    if stats.gram is not None and "rel_error" not in result.info:  # the rotation reports its own
        before, after = comp.reconstruction_errors(
            weight, stats.gram, kept, [weight[:, kept.to(weight.device)], result.weight], stats.target_cross,
            stats.target_sq, biases=[None, result.bias] if centred else None, mean=stats.mean, n=stats.n)
        result.info["rel_error_uncompensated"], result.info["rel_error"] = before, after
    elif centred and products is not None:
        # the rotation's products are of the centred Y and Z; the uncentred ones add n a a^T terms
        # (a = W mu, b = W_K mu_K), so both errors are restated against ||Y||^2 like every other
        # (with the fitted bias the error is the centred one; without, the plain W_K error)
        mu = stats.mean.to(weight.device)
        a, b = weight.double() @ mu, weight[:, kept.to(weight.device)].double() @ mu[kept.to(weight.device)]
        n = stats.n
        y2 = products.y2 + n * float(a.dot(a))
        tr_m, z2 = float(torch.trace(products.m)) + n * float(a.dot(b)), products.z2 + n * float(b.dot(b))
        result.info["rel_error"] *= products.y2 / y2
        result.info["rel_error_uncompensated"] = (y2 - 2 * tr_m + z2) / y2
    return result


def _direct_products(layer: nn.Module, module: nn.Linear, kept: torch.Tensor,
                     batches: list[tuple[torch.Tensor, dict]], cfg: PruneConfig) -> comp.DirectProducts:
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


def _sublayer(kind: str, enabled: bool, weight: torch.Tensor, stats: InputStats, kept: torch.Tensor,
              cfg: PruneConfig, layer_index: int, name: str, warnings: list[str],
              heldout: InputStats | None = None, products: comp.DirectProducts | None = None) -> comp.Compensated:
    t0 = time.perf_counter()
    result = _compensate(kind if enabled else "none", weight, stats, kept, cfg, heldout, products)
    if products is not None:
        result.info["products"] = "direct"
        result.info["products_pass_s"] = round(products.seconds, 4)
    result.info["compensate_s"] = round(time.perf_counter() - t0, 4)  # solve / SVD (+ error checks)
    release_free_memory()  # the solve's / SVD's workspace, before the next large buffer
    if "fallback" in result.info:
        msg = (f"layer {layer_index} {name}: {result.info['reason']}; kept the weights uncompensated. "
               f"Use more calibration tokens (--nsamples x --seqlen >= {weight.shape[0]}) or --compensation ridge")
        logger.warning(msg)
        warnings.append(msg)
    return result


def _heldout_error(res: comp.Compensated, weight: torch.Tensor, kept: torch.Tensor, heldout: InputStats) -> float:
    """The held-out error of a compensation: the one its held-out choice recorded, else
    (an uncompensated sublayer) the direct one."""
    if "heldout_error_per_row" in res.info:
        return res.info["heldout_error_per_row"]
    if "heldout_errors" in res.info:
        return min(res.info["heldout_errors"].values())
    return comp.reconstruction_errors(weight, heldout.gram, kept, [res.weight], heldout.target_cross,
                                      heldout.target_sq)[0]


def _best_score(choice: dict[str, tuple], kind: str, enabled: bool, weight: torch.Tensor, stats: InputStats,
                heldout: InputStats, cfg: PruneConfig, index: int, name: str, warnings: list[str]
                ) -> tuple[str, comp.Compensated, dict]:
    """--score auto: compensate the kept set of every candidate score (``choice``: score ->
    (kept input columns, ...)) and keep the one with the lowest held-out error. Candidates
    that keep the same columns are compensated once. The run's warnings get only the
    chosen candidate's."""
    errors: dict[str, float] = {}
    results: dict[str, tuple[comp.Compensated, list[str]]] = {}
    same: dict[str, str] = {}
    for score, (kept, *_) in choice.items():
        twin = next((s for s in results if torch.equal(choice[s][0], kept)), None)
        if twin is not None:
            same[score] = twin
            errors[score] = errors[twin]
            continue
        notes: list[str] = []
        res = _sublayer(kind, enabled, weight, stats, kept, cfg, index, name, notes, heldout)
        results[score] = (res, notes)
        errors[score] = _heldout_error(res, weight, kept, heldout)
    best = min(results, key=errors.__getitem__)  # the first of equal errors, in SCORE_CANDIDATES order
    res, notes = results[best]
    warnings.extend(notes)
    info = {"score_chosen": best, "score_heldout_errors": errors}
    if same:
        info["score_same_selection"] = same
    return best, res, info


def _collect(layer: nn.Module, modules: dict[str, nn.Linear], grams: dict[str, bool],
             batches: list[tuple[torch.Tensor, dict]], keep_outputs: bool,
             dense_layer: nn.Module | None = None, dense_batches: list[tuple[torch.Tensor, dict]] | None = None,
             dense_modules: dict[str, nn.Linear] | None = None,
             residuals: dict[str, tuple[nn.Module, nn.Module]] | None = None,
             token_weights: dict[str, nn.Module] | None = None, gram_dtype: torch.dtype = torch.float64,
             stop_after: nn.Module | None = None) -> tuple[dict[str, InputStats], list, list | None]:
    """Stream input statistics of ``modules`` over ``batches``. With a dense copy of the
    layer and its own inputs, every batch goes through the dense copy first and its
    sublayer outputs become the targets of this model's inputs (``residuals``: plus the
    residual-stream error before each sublayer); the dense copy's outputs are returned
    as the next layer's dense inputs. ``token_weights``: see :class:`StatsCollector`.
    ``stop_after``: end each forward pass once this module has run (statistics of the
    modules before it only; no outputs)."""
    paired = dense_layer is not None
    if stop_after is not None and (paired or keep_outputs):
        raise ValueError("a forward pass stopped early has no outputs to keep or pair")
    with StatsCollector(modules, grams, dense_modules if paired else None, residuals if paired else None,
                        token_weights, gram_dtype) as col:
        outs, dense_outs = [], [] if paired else None
        if stop_after is not None:
            run_until(layer, batches, stop_after)
            return col.stats, outs, dense_outs
        for i, (h, kw) in enumerate(batches):
            if paired:
                hd, kwd = dense_batches[i]
                dense_outs.append((forward_layer(dense_layer, hd, kwd), kwd))
            out = forward_layer(layer, h, kw)
            if keep_outputs:
                outs.append((out, kw))
    return col.stats, outs, dense_outs


def _split_passes(gram_attn: bool, big_mlp: bool, paired: bool, dense_stats: bool) -> bool:
    """Whether the attention's statistics get a pass of their own after the MLP is pruned.
    They are the same either way (the MLP comes after the attention in the layer), but one
    shared pass holds the attention's Gram matrix through the MLP's compensation (``big_mlp``:
    a Gram matrix or streamed rotation products and an SVD), where it is dead weight (200 MiB
    at 13B widths, beside down_proj's 1.46 GiB Gram matrix or a 1.2 GiB SVD workspace).
    The extra pass stops at o_proj. Not with a dense twin or dense statistics, whose
    single pass also yields the dense outputs."""
    return gram_attn and big_mlp and not paired and not dense_stats


def _greedy(weight: torch.Tensor, stats: InputStats, units: torch.Tensor, cfg: PruneConfig, **kw) -> obs.GreedyResult:
    try:
        # with other targets the run starts from W* = Y X^T G^-1 (see rcpu.obs)
        return obs.greedy_remove(weight, stats.gram, units, lam=cfg.selection_lambda,
                                 relative=cfg.ridge_lambda_relative, target_cross=stats.target_cross, **kw)
    except ValueError as exc:
        raise RcpuError(f"greedy selection: {exc} (fewer calibration tokens than input channels need "
                        "--selection_lambda > 0)") from None


def _greedy_heads(weight: torch.Tensor, stats: InputStats, geom, plan: LayerPlan, cfg: PruneConfig
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Heads (or whole KV groups) removed greedily by the error left after compensation;
    every KV group keeps the same number of query heads."""
    hd, r = geom.head_dim, geom.n_rep
    if plan.head_unit == "group":
        units = torch.arange(geom.num_heads * hd).reshape(geom.num_kv_heads, r * hd)
        res = _greedy(weight, stats, units, cfg, n_remove=plan.groups_removed)
        kept_groups = torch.tensor(sorted(set(range(geom.num_kv_heads)) - set(res.removed_units)), dtype=torch.long)
        kept_heads = (kept_groups[:, None] * r + torch.arange(r)).reshape(-1)
    else:
        units = torch.arange(geom.num_heads * hd).reshape(geom.num_heads, hd)
        res = _greedy(weight, stats, units, cfg, groups=torch.arange(geom.num_heads) // r,
                      per_group=plan.heads_removed_per_group)
        kept_heads = torch.tensor(sorted(set(range(geom.num_heads)) - set(res.removed_units)), dtype=torch.long)
        kept_groups = torch.arange(geom.num_kv_heads)
    return kept_heads, kept_groups, {"selection": "greedy", "selection_error": res.error}


@torch.no_grad()
def prune_layer(adapter: DecoderAdapter, layer: nn.Module, index: int,
                batches: list[tuple[torch.Tensor, dict]], plan: LayerPlan, cfg: PruneConfig,
                warnings: list[str], heldout: list[tuple[torch.Tensor, dict]] | None = None,
                dense: dict[str, list] | None = None
                ) -> tuple[LayerResult, list[tuple[torch.Tensor, dict]], list[tuple[torch.Tensor, dict]] | None]:
    """Prune one decoder layer in place; returns its result and its outputs on ``batches``
    (and on the held-out batches used to tune ridge's lambda, if any).

    ``dense`` (dense-model targets) holds the dense model's inputs of this layer for the
    calibration (and held-out) batches; it is replaced in place by their dense outputs.
    """
    t0 = time.perf_counter()
    kind = cfg.resolved_compensation
    greedy = cfg.resolved_selection == "greedy"
    geom = adapter.geometry(layer)
    o_proj, down_proj = adapter.attn_out(layer), adapter.mlp_out(layer)
    n_tokens = sum(h.shape[:-1].numel() for h, _ in batches)

    def needs_gram(enabled: bool, d_in: int, d_out: int, n_kept: int) -> bool:
        if n_kept == d_in:  # nothing removed, nothing to select or compensate
            return False
        if greedy:
            return True
        if kind not in comp.NEEDS_GRAM or not enabled:
            return False
        # a rotation with too few tokens falls back without touching the Gram matrix (--score
        # auto still compares its candidates through it)
        return not (kind in comp.ROTATIONS and n_tokens < comp.rotation_tokens_needed(d_out, n_kept)
                    and cfg.resolved_score != "auto")

    gram_attn = needs_gram(cfg.compensate_attn, o_proj.in_features, o_proj.out_features,
                           (geom.num_heads - plan.heads_removed(geom)) * geom.head_dim)
    n_kept_mlp = down_proj.in_features - plan.channels_removed
    # the MLP's rotation products streamed from a second pass instead of a d_ff^2 Gram matrix
    direct_mlp = (kind in comp.ROTATIONS and cfg.compensate_mlp and plan.channels_removed > 0
                  and n_tokens >= comp.rotation_tokens_needed(down_proj.out_features, n_kept_mlp)
                  and cfg.rotation_products != "gram" and cfg.direct_products_blocker is None
                  and (cfg.rotation_products == "direct" or comp.direct_products_cheaper(
                      n_tokens, sum(p.numel() for p in layer.parameters()), down_proj.in_features,
                      down_proj.out_features, n_kept_mlp, getattr(torch, cfg.rotation_dtype))))
    gram_mlp = (needs_gram(cfg.compensate_mlp, down_proj.in_features, down_proj.out_features, n_kept_mlp)
                and not direct_mlp)
    dense_stats = cfg.resolved_statistics == "dense"
    gram_dtype = getattr(torch, cfg.gram_dtype)
    # MLP statistics re-captured after attention pruning need no first-pass MLP statistics
    recapture = cfg.resolved_mlp_stats == "after_attention"
    split = not recapture and _split_passes(gram_attn, gram_mlp or direct_mlp, dense is not None, dense_stats)
    mods = {"attn": o_proj} if recapture else {"mlp": down_proj} if split else {"attn": o_proj, "mlp": down_proj}
    twin = twin_mods = resid = None
    if dense is not None:  # an unpruned copy of this layer runs the dense model alongside
        twin = copy.deepcopy(layer)
        twin_mods = {"attn": adapter.attn_out(twin)} if recapture else {"attn": adapter.attn_out(twin),
                                                                        "mlp": adapter.mlp_out(twin)}
        if cfg.resolved_targets == "residual":  # the pre-norms' inputs are the residual stream
            resid = {"attn": (adapter.attn_norm(layer), adapter.attn_norm(twin)),
                     "mlp": (adapter.mlp_norm(layer), adapter.mlp_norm(twin))}
    resid_first = resid and {k: v for k, v in resid.items() if k in mods}
    # layer refinement pulls the pruned layer towards an unpruned copy of itself
    reference = (twin if twin is not None else copy.deepcopy(layer)) if cfg.refine_epochs > 0 else None
    weights = None
    if cfg.resolved_token_weights == "inverse_rms":  # pre-norm inputs: the residual stream written into
        weights = {"attn": adapter.attn_norm(layer), "mlp": adapter.mlp_norm(layer)}
    weights_first = weights and {k: v for k, v in weights.items() if k in mods}
    stats, dense_outputs, dense_next = _collect(layer, mods, {"attn": gram_attn, "mlp": gram_mlp}, batches,
                                                dense_stats, twin, dense and dense["calib"], twin_mods, resid_first,
                                                weights_first, gram_dtype)
    st_attn, st_mlp = stats.get("attn"), stats.get("mlp")
    ho_attn = ho_mlp = heldout_dense = dense_next_ho = None
    if heldout is not None and (cfg.ridge_auto or dense_stats):  # dense statistics: the dense held-out outputs
        held_mods = {"attn": o_proj} if recapture else {"attn": o_proj, "mlp": down_proj}
        stats_ho, heldout_dense, dense_next_ho = _collect(layer, held_mods, {"attn": True, "mlp": True}, heldout,
                                                          dense_stats, twin, dense and dense["heldout"], twin_mods,
                                                          resid_first, weights_first, gram_dtype)
        ho_attn, ho_mlp = stats_ho["attn"], stats_ho.get("mlp")

    def prune_heads() -> tuple[torch.Tensor, torch.Tensor, dict]:
        info: dict = {"stats": st_attn.summary()}
        res = None
        if greedy and plan.heads_removed(geom) > 0:
            heads, kv, sel_info = _greedy_heads(o_proj.weight, st_attn, geom, plan, cfg)
            info.update(sel_info)
        elif cfg.resolved_score == "auto" and plan.heads_removed(geom) > 0:
            choice = {}
            for score in SCORE_CANDIDATES:
                sel = select_heads(group_scores(channel_scores(score, o_proj.weight, st_attn), geom.head_dim), geom,
                                   plan)
                choice[score] = (head_channels(sel[0], geom.head_dim), sel)
            label, res, auto_info = _best_score(choice, kind, cfg.compensate_attn, o_proj.weight, st_attn, ho_attn,
                                                cfg, index, "o_proj", warnings)
            heads, kv = choice[label][1]
            info.update(auto_info)
        else:  # (--score auto with nothing to remove: any score keeps everything)
            scores = channel_scores(cfg.allocation_score, o_proj.weight, st_attn)
            heads, kv = select_heads(group_scores(scores, geom.head_dim), geom, plan)
        if len(heads) < geom.num_heads:
            if res is None:
                res = _sublayer(kind, cfg.compensate_attn, o_proj.weight, st_attn,
                                head_channels(heads, geom.head_dim), cfg, index, "o_proj", warnings, ho_attn)
            adapter.prune_attention(layer, heads, kv, res.weight)
            if res.bias is not None:
                adapter.add_output_bias(o_proj, res.bias)
            info.update(res.info)
        return heads, kv, info

    def prune_channels(st_mlp: InputStats, ho_mlp: InputStats | None) -> tuple[torch.Tensor, dict]:
        info: dict = {"stats": st_mlp.summary()}
        res = None
        if greedy and plan.channels_removed > 0:
            res_sel = _greedy(down_proj.weight, st_mlp, torch.arange(down_proj.in_features)[:, None], cfg,
                              n_remove=plan.channels_removed, block=cfg.selection_block)
            channels = res_sel.kept
            info.update({"selection": "greedy", "selection_error": res_sel.error})
        elif cfg.resolved_score == "auto" and plan.channels_removed > 0:
            choice = {score: (select_channels(channel_scores(score, down_proj.weight, st_mlp), plan.channels_removed),)
                      for score in SCORE_CANDIDATES}
            label, res, auto_info = _best_score(choice, kind, cfg.compensate_mlp, down_proj.weight, st_mlp, ho_mlp,
                                                cfg, index, "down_proj", warnings)
            channels = choice[label][0]
            info.update(auto_info)
        else:
            scores = channel_scores(cfg.allocation_score, down_proj.weight, st_mlp)
            channels = select_channels(scores, plan.channels_removed)
        if len(channels) < down_proj.in_features:
            if res is None:
                products = _direct_products(layer, down_proj, channels, batches, cfg) if direct_mlp else None
                res = _sublayer(kind, cfg.compensate_mlp, down_proj.weight, st_mlp, channels, cfg, index,
                                "down_proj", warnings, ho_mlp, products=products)
            adapter.prune_mlp(layer, channels, res.weight)
            if res.bias is not None:
                adapter.add_output_bias(down_proj, res.bias)
            info.update(res.info)
        return channels, info

    if recapture:  # attention first, then the MLP's statistics again on the pruned attention
        kept_heads, kept_kv, attn_info = prune_heads()
        twin_mlp = twin and {"mlp": adapter.mlp_out(twin)}
        resid_mlp = resid and {"mlp": resid["mlp"]}
        weights_mlp = weights and {"mlp": weights["mlp"]}
        stats, _, _ = _collect(layer, {"mlp": down_proj}, {"mlp": gram_mlp}, batches, False, twin,
                               dense and dense["calib"], twin_mlp, resid_mlp, weights_mlp, gram_dtype)
        st_mlp = stats["mlp"]
        if heldout is not None and cfg.ridge_auto:
            stats, _, _ = _collect(layer, {"mlp": down_proj}, {"mlp": True}, heldout, False, twin,
                                   dense and dense["heldout"], twin_mlp, resid_mlp, weights_mlp, gram_dtype)
            ho_mlp = stats["mlp"]
        kept_channels, mlp_info = prune_channels(st_mlp, ho_mlp)
    else:
        # Both sublayers' statistics are those of the unpruned layer, so neither choice
        # depends on the other: the MLP goes first, and a rotation frees its Gram matrix (at
        # MLP widths the largest buffer of the layer) before the attention's SVD needs its
        # workspace. Split passes: the attention's statistics are collected only now.
        kept_channels, mlp_info = prune_channels(st_mlp, ho_mlp)
        if split:
            stats = st_mlp = None  # (a ridge's MLP Gram matrix is freed only here)
            stats, _, _ = _collect(layer, {"attn": o_proj}, {"attn": gram_attn}, batches, False,
                                   token_weights=weights and {"attn": weights["attn"]}, gram_dtype=gram_dtype,
                                   stop_after=o_proj)
            st_attn = stats["attn"]
        kept_heads, kept_kv, attn_info = prune_heads()
    del st_mlp, twin
    refine_info: dict = {}
    if reference is not None and (len(kept_heads) < geom.num_heads or plan.channels_removed > 0):
        refine_info = refine.refine_layer(layer, reference, batches, epochs=cfg.refine_epochs, lr=cfg.refine_lr,
                                          seed=cfg.seed + index, forward=forward_layer, heldout=heldout)
    del reference

    # dense statistics: the next layer sees the dense model's hidden states (FLAP)
    outputs = dense_outputs if dense_stats else run_layer(layer, batches, keep_outputs=True)
    heldout_out = None
    if heldout is not None:
        heldout_out = heldout_dense if dense_stats else run_layer(layer, heldout, keep_outputs=True)
    if dense is not None:
        dense["calib"], dense["heldout"] = dense_next, dense_next_ho
    result = LayerResult(index, kept_heads.tolist(), kept_kv.tolist(), kept_channels.tolist(),
                         attn_info, mlp_info, time.perf_counter() - t0, refine=refine_info)
    return result, outputs, heldout_out


def _error_unit_scores(adapter: DecoderAdapter, layer: nn.Module, stats: dict[str, InputStats], head_unit: str,
                       cfg: PruneConfig, norm: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Importance of the removable units of one layer for ``allocation="error"``: the
    post-compensation error per parameter that greedy removal measures (rcpu.obs),
    relative to the residual-stream energy ``norm``; +inf for units never to be removed."""
    o_proj, down_proj = adapter.attn_out(layer), adapter.mlp_out(layer)
    shape = adapter.layer_shape(layer)
    g = shape.attn
    hd, r = g.head_dim, g.n_rep
    lam = cfg.selection_lambda
    unit_params = shape.params_per_head_unit(head_unit)
    if head_unit == "group":
        units = torch.arange(g.num_heads * hd).reshape(g.num_kv_heads, r * hd)
        attn = obs.allocation_scores(o_proj.weight, stats["attn"].gram, units, unit_params,
                                     n_remove=g.num_kv_heads - 1, lam=lam, norm=norm)
    else:
        units = torch.arange(g.num_heads * hd).reshape(g.num_heads, hd)
        attn = obs.allocation_scores(o_proj.weight, stats["attn"].gram, units, unit_params, n_remove=r - 1,
                                     lam=lam, groups=torch.arange(g.num_heads) // r, norm=norm)
    d_ff = down_proj.in_features
    mlp = obs.allocation_scores(down_proj.weight, stats["mlp"].gram, torch.arange(d_ff)[:, None],
                                shape.params_per_channel, n_remove=max_channels_removed(d_ff, cfg.pruning_ratio),
                                lam=lam, block=cfg.selection_block, norm=norm)
    return attn, mlp  # the costs are the importances: expensive units are kept


@torch.no_grad()
def global_plans(model: nn.Module, adapter: DecoderAdapter, batches: list[tuple[torch.Tensor, dict]],
                 cfg: PruneConfig, uniform: LayerPlan, device: torch.device, progress: bool = True,
                 store: LayerStore | None = None) -> list[LayerPlan]:
    """Global allocation: one pass over the dense model scores every unit of every layer,
    then :func:`allocate_global` decides how many units each layer keeps. Only per-layer
    score vectors are kept. ``uniform`` is the uniform plan: its head unit, and its head
    counts for "global_mlp".

    "global" is FLAP's: the importance score, standardised per layer and module.
    "global_mlp" removes as many heads from every layer as the ``uniform`` plan does and
    allocates only the MLP channels by FLAP's standardised score. "global_split" ranks heads
    among heads and channels among channels, each losing ``ratio`` of its own parameters
    (:func:`allocate_heads_split`; the channels absorb the rounding to whole heads);
    "global_even" also spreads the heads as evenly as whole units allow. "error"
    is ours: the error left after least-squares compensation when units are removed
    greedily, per parameter and relative to the residual stream's energy at that layer,
    so layers and modules are compared on one scale that knows the compensation.
    """
    by_error = cfg.resolved_allocation == "error"
    head_unit = uniform.head_unit
    unit_scores, shapes = [], []
    bar = tqdm(range(len(adapter.layers)), desc="scoring (allocation)", unit="layer", disable=not progress)
    store = store or LayerStore(adapter)
    for i in bar:
        layer = store.load(i)
        home = module_device(layer)
        layer.to(device)
        o_proj, down_proj = adapter.attn_out(layer), adapter.mlp_out(layer)
        norm = sum(float(h.double().square().sum()) for h, _ in batches) if by_error else 1.0
        with StatsCollector({"attn": o_proj, "mlp": down_proj}, {"attn": by_error, "mlp": by_error}) as col:
            batches = run_layer(layer, batches, keep_outputs=True)
        geom = adapter.geometry(layer)
        if by_error:
            unit_scores.append(tuple(s.cpu() for s in _error_unit_scores(adapter, layer, col.stats, head_unit,
                                                                          cfg, norm)))
        else:
            attn = standardize(channel_scores(cfg.allocation_score, o_proj.weight, col.stats["attn"]))
            heads = attn.reshape(geom.num_heads, geom.head_dim).mean(1)
            mlp = standardize(channel_scores(cfg.allocation_score, down_proj.weight, col.stats["mlp"]))
            unit_scores.append((head_unit_scores(heads, geom, head_unit).cpu(), mlp.cpu()))
        del col
        shapes.append(adapter.layer_shape(layer))
        layer.to(home)
        store.unload(i, layer)
    removed = None  # head units to remove per layer, where the allocation fixes them
    if cfg.resolved_allocation == "global_mlp":
        fixed = uniform.groups_removed if head_unit == "group" else uniform.heads_removed_per_group
        removed = [fixed] * len(unit_scores)
    elif cfg.resolved_allocation in ("global_split", "global_even"):
        removed = allocate_heads_split([attn for attn, _ in unit_scores], shapes, cfg.pruning_ratio, head_unit,
                                       even=cfg.resolved_allocation == "global_even")
    if removed is not None:
        unit_scores = [(forced_unit_scores(attn, n), mlp) for (attn, mlp), n in zip(unit_scores, removed, strict=True)]
    return allocate_global(unit_scores, shapes, cfg.pruning_ratio, head_unit, cfg.round_to)


def make_plans(model: nn.Module, adapter: DecoderAdapter, batches: list[tuple[torch.Tensor, dict]],
               cfg: PruneConfig, device: torch.device, progress: bool = True,
               store: LayerStore | None = None, heldout: list[tuple[torch.Tensor, dict]] | None = None,
               heldout_ids: torch.Tensor | None = None) -> list[LayerPlan]:
    """How many units each layer loses: the same everywhere (uniform) or allocated globally
    (``heldout`` / ``heldout_ids``: layer-0 inputs and token ids of the held-out windows,
    for ``allocation="loss"``)."""
    shape = adapter.layer_shape(adapter.layers[0])
    uniform = plan_uniform(shape, cfg.pruning_ratio, cfg.head_unit, cfg.rebalance, cfg.round_to)
    if cfg.resolved_allocation == "uniform":
        return [uniform] * len(adapter.layers)
    if cfg.resolved_allocation == "loss":
        if heldout is None or heldout_ids is None:
            raise RcpuError("allocation='loss' needs held-out calibration windows")
        if store is not None and type(store) is not LayerStore:
            raise RcpuError("--allocation loss needs the model in memory; use --no-stream")
        from .sensitivity import loss_plans

        def compensate(weight, stats, kept, heldout_stats):
            kind = cfg.resolved_compensation
            return _compensate(kind, weight, stats, kept, cfg, heldout_stats)

        return loss_plans(model, adapter, batches, heldout, heldout_ids, cfg, uniform.head_unit, device,
                          compensate, progress)
    return global_plans(model, adapter, batches, cfg, uniform, device, progress, store)


def run_sequential(model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, plans: list[LayerPlan],
                   cfg: PruneConfig, device: torch.device, progress: bool = True,
                   batches: list[tuple[torch.Tensor, dict]] | None = None,
                   heldout_windows: torch.Tensor | None = None, store: LayerStore | None = None,
                   start: int = 0, heldout: list[tuple[torch.Tensor, dict]] | None = None,
                   results: list[LayerResult] | None = None, warnings: list[str] | None = None,
                   dense: dict[str, list] | None = None) -> tuple[list[LayerResult], list[str]]:
    """Prune every decoder layer of ``model`` in order; returns per-layer results and warnings.

    ``start`` > 0 resumes an interrupted run: ``batches`` / ``heldout`` (and ``dense``, the
    dense model's hidden states for dense targets) are then the inputs of layer ``start``, and
    ``results`` / ``warnings`` those of the layers before it.
    """
    warnings = [] if warnings is None else warnings
    results = [] if results is None else results
    store = store or LayerStore(adapter)
    if batches is None:
        batches = capture_layer_inputs(model, adapter, windows, cfg.batch_size, device)
    if heldout is None and heldout_windows is not None:
        heldout = capture_layer_inputs(model, adapter, heldout_windows, cfg.batch_size, device)
    n = len(adapter.layers)
    # dense-model targets: the dense hidden states travel alongside the pruned ones
    # (twice the hidden-state memory; still no stored sublayer activations)
    if dense is None and cfg.resolved_targets in ("dense", "residual"):
        dense = {"calib": list(batches), "heldout": heldout and list(heldout)}
    bar = tqdm(range(start, n), desc="pruning layers", unit="layer", disable=not progress, initial=start, total=n)
    for i in bar:
        layer = store.load(i)
        home = module_device(layer)
        layer.to(device)
        with LayerMemory(device) as mem:
            result, batches, heldout = prune_layer(adapter, layer, i, batches, plans[i], cfg, warnings, heldout,
                                                   dense)
        result.memory = mem.result
        layer.to(home)
        results.append(result)
        store.finish(i, layer, result, batches, heldout, warnings, dense)
        bar.set_postfix_str(f"{result.seconds:.1f}s")
        logger.debug("layer %d: %.1f s, %s", i, result.seconds, mem.result)
    return results, warnings
