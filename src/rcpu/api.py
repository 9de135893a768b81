"""Python entry point: ``prune(model, config) -> (model, report)``.

Example::

    from rcpu import PruneConfig, prune
    model, report = prune("smollm2-135m", PruneConfig(method="rcpu", pruning_ratio=0.2))
    print("\\n".join(report.summary_lines()))
"""

from __future__ import annotations

import logging
import resource
import time

import torch
from torch import nn

from .config import PruneConfig
from .errors import RcpuError
from .layer_io import capture_layer_inputs, hidden_state_storage
from .models import DecoderAdapter, get_adapter
from .models.checkpoint import SavedFormat
from .pipeline import make_plans, run_sequential
from .report import PeakMemory, PruneReport, count_params
from .select import LayerPlan, plan_uniform
from .shapes import AttentionGeometry, LayerShape

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The compute device for ``name`` (default: CUDA if available), checked to be usable here."""
    if name is None:
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise RcpuError(f"unknown device {str(name)!r}; use cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise RcpuError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
                            f"{build}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RcpuError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as exc:
            raise RcpuError(f"--device {name} is not usable here ({str(exc).splitlines()[0]}); use cpu or cuda") from None
    return device


def check_seqlen(config, seqlen: int, flag: str = "--seqlen") -> None:
    """Refuse windows longer than the model's context window (positions beyond it are garbage)."""
    limit = getattr(config, "max_position_embeddings", None)
    if limit and seqlen > limit:
        raise RcpuError(f"{flag} {seqlen} is longer than the model's context window ({limit} positions); "
                        f"use {flag} {limit} or less")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def calibration_windows_for(tokenizer, cfg: PruneConfig, calib: str
                            ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Tokenise the calibration source once and draw ``nsamples`` windows from ``seed``
    (plus non-overlapping held-out windows when ridge's lambda is tuned)."""
    from . import data

    text = data.load_text(calib, "calib")
    ids = data.tokenize(tokenizer, text)
    windows = data.calibration_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed)
    info = {"source": calib, **data.describe_source(calib, "calib"), "source_tokens": int(ids.numel()),
            "windows_sha256": data.token_hash(windows), "nsamples": cfg.nsamples, "seqlen": cfg.seqlen,
            "seed": cfg.seed}
    heldout = None
    if cfg.needs_heldout:
        heldout = data.heldout_windows(ids, cfg.nholdout, cfg.nsamples, cfg.seqlen, cfg.seed)
        info["heldout_windows"] = {"n": cfg.nholdout, "sha256": data.token_hash(heldout),
                                   "rule": f"non-overlapping with the calibration windows, seed + "
                                           f"{data.HELDOUT_SEED_OFFSET}"}
    return windows, heldout, info


def planned_shape(shape: LayerShape, plan: LayerPlan) -> LayerShape:
    """The shape a layer of ``shape`` will have after ``plan``."""
    g = shape.attn
    attn = AttentionGeometry(g.num_heads - plan.heads_removed(g), g.num_kv_heads - plan.groups_removed,
                             g.head_dim, g.hidden_size)
    return LayerShape(attn, shape.intermediate_size - plan.channels_removed, shape.qkv_bias, shape.o_bias,
                      shape.mlp_bias)


def check_saveable(model: nn.Module, cfg: PruneConfig, plans: list[LayerPlan] | None = None,
                   adapter: DecoderAdapter | None = None) -> SavedFormat:
    """Build and validate the config the pruned model will be saved with, before any layer
    is pruned; RcpuError if no stock (or per-layer) config can carry it. Without ``plans``
    the uniform plan is used (global allocation is checked once its plans exist)."""
    adapter = adapter or get_adapter(model)
    layers = adapter.layers
    if plans is None:
        shape = adapter.layer_shape(layers[0])
        plans = [plan_uniform(shape, cfg.pruning_ratio, cfg.head_unit, cfg.rebalance, cfg.round_to)] * len(layers)
    shapes = [planned_shape(adapter.layer_shape(layer), plan) for layer, plan in zip(layers, plans, strict=True)]
    attn_bias, mlp_bias = planned_biases(adapter, cfg, plans)
    return adapter.saved_format(shapes, attn_bias=attn_bias, mlp_bias=mlp_bias)


def planned_biases(adapter: DecoderAdapter, cfg: PruneConfig, plans: list[LayerPlan]) -> tuple[bool, bool]:
    """Whether o_proj / down_proj will carry biases once pruned: the source's own, or bias
    compensation (or a fitted intercept) of a sublayer that loses units in some layer."""
    layers = adapter.layers
    bias = cfg.resolved_compensation == "bias" or cfg.intercept
    heads_go = any(plan.heads_removed(adapter.geometry(layer)) > 0 for layer, plan in zip(layers, plans, strict=True))
    channels_go = any(plan.channels_removed > 0 for plan in plans)
    src_attn, src_mlp = adapter.output_biases()
    return (src_attn or (bias and cfg.compensate_attn and heads_go),
            src_mlp or (bias and cfg.compensate_mlp and channels_go))


def resolve_windows(cfg: PruneConfig, tokenizer, calib: str, windows: torch.Tensor | None,
                    heldout_windows: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Calibration (and held-out) windows: the given ones, or drawn from ``calib``; plus their record."""
    if windows is None:
        if tokenizer is None:
            raise RcpuError("prune() needs a tokenizer or precomputed calibration windows")
        return calibration_windows_for(tokenizer, cfg, calib)
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise RcpuError("calibration windows must be a [nsamples, seqlen] tensor of token ids")
    from .data import token_hash

    calib_info = {"source": "windows", "windows_sha256": token_hash(windows),
                  "nsamples": int(windows.shape[0]), "seqlen": int(windows.shape[1]), "seed": cfg.seed}
    if cfg.needs_heldout and heldout_windows is None:
        raise RcpuError("ridge_lambda='auto', allocation='loss' and refine_epochs > 0 with precomputed windows "
                        "need heldout_windows too")
    if heldout_windows is not None:
        calib_info["heldout_windows"] = {"n": int(heldout_windows.shape[0]), "sha256": token_hash(heldout_windows)}
    return windows, heldout_windows, calib_info


def param_summary(adapter: DecoderAdapter, dense_shapes: list, params_before: int) -> dict:
    """Parameter counts and widths before and after pruning (for the report)."""
    layers = adapter.layers
    new_shapes = [adapter.layer_shape(layer) for layer in layers]
    shape, new_shape = dense_shapes[0], new_shapes[0]
    attn_mlp_before = sum(s.attn_params + s.mlp_params for s in dense_shapes)
    attn_mlp_after = sum(s.attn_params + s.mlp_params for s in new_shapes)
    params_after = count_params(adapter.model)
    params = {
        "total_before": params_before, "total_after": params_after,
        "attn_mlp_before": attn_mlp_before, "attn_mlp_after": attn_mlp_after,
        "ratio_total": 1 - params_after / params_before,
        "ratio_attn_mlp": 1 - attn_mlp_after / attn_mlp_before,
        "heads_before": shape.attn.num_heads, "heads_after": new_shape.attn.num_heads,
        "kv_heads_before": shape.attn.num_kv_heads, "kv_heads_after": new_shape.attn.num_kv_heads,
        "intermediate_before": shape.intermediate_size, "intermediate_after": new_shape.intermediate_size,
        "uniform": len({(s.attn, s.intermediate_size) for s in new_shapes}) == 1,
    }
    if not params["uniform"]:
        params["heads_after"] = [s.attn.num_heads for s in new_shapes]
        params["kv_heads_after"] = [s.attn.num_kv_heads for s in new_shapes]
        params["intermediate_after"] = [s.intermediate_size for s in new_shapes]
    return params


def prune(model: nn.Module | str, config: PruneConfig | None = None, *, tokenizer=None,
          calib: str = "builtin", windows: torch.Tensor | None = None,
          heldout_windows: torch.Tensor | None = None, device: str | torch.device | None = None,
          progress: bool = True, hidden_states: str = "auto", max_hidden_gib: float | None = None
          ) -> tuple[nn.Module, PruneReport]:
    """Prune ``model`` in place (heads and MLP channels of every layer) and compensate.

    ``model`` is a loaded Hugging Face causal LM or a model source understood by
    :func:`rcpu.loading.load_model`. Calibration comes from ``windows`` (a
    ``[nsamples, seqlen]`` id tensor) or is drawn from the text source ``calib``
    with ``tokenizer``; ``heldout_windows`` (drawn automatically from ``calib``) tune
    ridge's lambda when ``ridge_lambda="auto"``. ``device`` is where each layer is processed (default: CUDA if
    available); the model stays where it is, one layer visiting the device at a time.
    ``hidden_states`` ("auto", "device", "cpu") places the calibration hidden states
    (:func:`rcpu.layer_io.hidden_state_storage`; ``max_hidden_gib`` bounds them on the device).
    """
    cfg = (config or PruneConfig()).validate()
    source = None
    if isinstance(model, str):
        from .loading import check_supported_architecture, load_model

        source = model
        check_supported_architecture(model)  # from the config, before the weights load
        loaded = load_model(model)
        model, tokenizer = loaded.model, loaded.tokenizer
    adapter = get_adapter(model)
    if cfg.resolved_allocation == "uniform":
        check_saveable(model, cfg, adapter=adapter)  # before calibration: fail fast
    device = resolve_device(device)

    windows, heldout_windows, calib_info = resolve_windows(cfg, tokenizer, calib, windows, heldout_windows)
    check_seqlen(model.config, int(windows.shape[1]))
    dense_shapes = [adapter.layer_shape(layer) for layer in adapter.layers]
    params_before = count_params(model)
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    heldout_windows = heldout_windows if cfg.needs_heldout else None
    storage, hidden_info = hidden_state_storage(
        hidden_states, device, windows.numel() + (heldout_windows.numel() if heldout_windows is not None else 0),
        model.config.hidden_size, next(model.parameters()).dtype, max_hidden_gib)
    with PeakMemory(device) as peak:
        batches = capture_layer_inputs(model, adapter, windows, cfg.batch_size, device, storage)
        heldout = (capture_layer_inputs(model, adapter, heldout_windows, cfg.batch_size, device, storage)
                   if heldout_windows is not None else None)
        plans = make_plans(model, adapter, batches, cfg, device, progress=progress, heldout=heldout,
                           heldout_ids=heldout_windows)
        saved = check_saveable(model, cfg, plans, adapter)  # before the first layer is pruned
        if saved.note:
            logger.warning(saved.note)
        for note in dict.fromkeys(n for p in plans for n in p.notes):
            logger.warning(note)
        results, warnings = run_sequential(model, adapter, windows, plans, cfg, device, progress=progress,
                                           batches=batches, heldout=heldout if cfg.heldout_in_loop else None)
        del batches, heldout
    model.train(was_training)
    adapter.finalize()
    prune_s = time.perf_counter() - t0
    params = param_summary(adapter, dense_shapes, params_before)
    memory = {**peak.result, "process_peak_rss_mib": round(_peak_rss_mib(), 1), **hidden_info}
    report = PruneReport(
        config=cfg.to_dict(),
        model={"source": source or getattr(model.config, "_name_or_path", ""), "model_type": model.config.model_type,
               "adapter": adapter.name, "num_layers": len(adapter.layers), "device": str(device),
               "dtype": str(next(model.parameters()).dtype).replace("torch.", "")},
        calibration=calib_info,
        checkpoint=saved.to_dict(),
        plan={"allocation": cfg.resolved_allocation, "head_unit": plans[0].head_unit,
              "notes": list(dict.fromkeys(n for p in plans for n in p.notes)),
              "layers": [p.to_dict() for p in plans] if cfg.resolved_allocation != "uniform" else plans[0].to_dict()},
        params=params,
        layers=[r.to_dict() for r in results],
        timings={"prune_s": round(prune_s, 3)},
        memory=memory,
        warnings=warnings,
    )
    return model, report
