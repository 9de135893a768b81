"""Python entry point: ``prune(model, config) -> (model, report)``.

Example::

    from rcpu import PruneConfig, prune
    model, report = prune("smollm2-135m", PruneConfig(method="rcpu", pruning_ratio=0.2))
    print("\\n".join(report.summary_lines()))
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .config import PruneConfig
from .driver import check_saveable, run_pruning
from .errors import RcpuError
from .models import get_adapter
from .report import PruneReport

__all__ = ["prune", "check_saveable", "resolve_device", "default_device", "check_seqlen", "calibration_windows_for",
           "resolve_windows"]

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


def calibration_windows_for(tokenizer, cfg: PruneConfig, calib: str
                            ) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """Tokenise the calibration source once and draw ``nsamples`` windows from ``seed``
    (plus non-overlapping held-out windows when ridge's lambda is tuned); each window starts
    with BOS when the tokenizer adds one (:func:`rcpu.data.bos_token_id`)."""
    from . import data

    text = data.load_text(calib, "calib")
    ids = data.tokenize(tokenizer, text)
    bos = data.bos_token_id(tokenizer)  # Gemma: every window starts with BOS
    windows = data.calibration_windows(ids, cfg.nsamples, cfg.seqlen, cfg.seed, bos)
    info = {"source": calib, **data.describe_source(calib, "calib"), "source_tokens": int(ids.numel()),
            "windows_sha256": data.token_hash(windows), "nsamples": cfg.nsamples, "seqlen": cfg.seqlen,
            "seed": cfg.seed}
    if bos is not None:
        info["bos"] = bos
    heldout = None
    if cfg.needs_heldout:
        heldout = data.heldout_windows(ids, cfg.nholdout, cfg.nsamples, cfg.seqlen, cfg.seed, bos)
        info["heldout_windows"] = {"n": cfg.nholdout, "sha256": data.token_hash(heldout),
                                   "rule": f"non-overlapping with the calibration windows, seed + "
                                           f"{data.HELDOUT_SEED_OFFSET}"}
    return windows, heldout, info


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
        raise RcpuError("ridge_lambda='auto' and refine_epochs > 0 with precomputed windows need heldout_windows too")
    if heldout_windows is not None:
        calib_info["heldout_windows"] = {"n": int(heldout_windows.shape[0]), "sha256": token_hash(heldout_windows)}
    return windows, heldout_windows, calib_info


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
    if cfg.allocation == "uniform":
        check_saveable(model, cfg, adapter=adapter)  # before calibration: fail fast
    device = resolve_device(device)

    windows, heldout_windows, calib_info = resolve_windows(cfg, tokenizer, calib, windows, heldout_windows)
    check_seqlen(model.config, int(windows.shape[1]))
    was_training = model.training
    model.eval()
    run = run_pruning(model, adapter, cfg, windows, heldout_windows, device, progress=progress,
                      hidden_states=hidden_states, max_hidden_gib=max_hidden_gib)
    model.train(was_training)
    adapter.finalize()
    dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    from .loading import source_record

    named = source or getattr(model.config, "_name_or_path", "")
    report = run.report(cfg, adapter, {**(source_record(named) if named else {"source": ""}),
                                       "device": str(device), "dtype": dtype}, calib_info)
    return model, report
