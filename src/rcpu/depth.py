"""Depth pruning: score whole decoder layers on calibration text and remove them.

Three measured criteria, each a number per layer where a *lower* value means the layer matters
less (so the layers with the lowest scores are the ones to remove):

- ``block_influence`` (ShortGPT, Men et al. 2024): 1 - mean over tokens of cos(h_in, h_out),
  how much the layer turns the residual stream;
- ``angular`` (Gromov et al. 2024, for a block of one layer): mean of arccos(cos(h_in, h_out)) / pi;
- ``loss``: the calibration loss of the model with the layer skipped, minus the dense loss.

The first two come from one pass over the calibration windows (one layer at a time, like the
pruning loop); ``loss`` runs the whole model once per layer. :func:`remove_layers` then cuts the
chosen layers out of the model in place and keeps the config true (``num_hidden_layers`` and every
per-layer list a config carries), so the result saves as a stock checkpoint with fewer layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .errors import RcpuError
from .layer_io import PassThrough, capture_layer_inputs, forward_layer, module_device
from .models import DecoderAdapter, get_adapter

__all__ = ["CRITERIA", "layer_scores", "remove_layers", "layers_to_remove"]

CRITERIA = ("block_influence", "angular", "loss")

#: config keys that hold one entry per decoder layer
_PER_LAYER_KEYS = ("layer_types", "no_rope_layers", "layer_num_attention_heads", "layer_num_key_value_heads",
                   "layer_intermediate_size")


def _cosines(h_in: torch.Tensor, h_out: torch.Tensor) -> torch.Tensor:
    """Per-token cosine similarity in float32 (the residual stream may be bf16)."""
    return F.cosine_similarity(h_in.float(), h_out.float(), dim=-1, eps=1e-8)


@torch.no_grad()
def _stream_scores(model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, criterion: str,
                   batch_size: int, device: torch.device) -> list[float]:
    batches = capture_layer_inputs(model, adapter, windows, batch_size, device, storage=torch.device("cpu"))
    scores = []
    for layer in adapter.layers:
        home = module_device(layer)
        layer.to(device)
        total, count, nxt = 0.0, 0, []
        for h, kw in batches:
            out = forward_layer(layer, h, kw)
            cos = _cosines(h, out).clamp(-1.0, 1.0)
            total += float((1.0 - cos).sum() if criterion == "block_influence" else (torch.arccos(cos) / math.pi).sum())
            count += cos.numel()
            nxt.append((out, kw))
        layer.to(home)
        batches = nxt
        scores.append(total / count)
    return scores


@torch.no_grad()
def _mean_loss(model: nn.Module, windows: torch.Tensor, batch_size: int, device: torch.device) -> float:
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size].to(device)
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                       reduction="sum"))
        count += batch[:, 1:].numel()
    return total / count


@torch.no_grad()
def _loss_scores(model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, batch_size: int,
                 device: torch.device) -> list[float]:
    if module_device(model) != device:
        raise RcpuError("the loss criterion runs the whole model: load it on the compute device")
    dense = _mean_loss(model, windows, batch_size, device)
    scores = []
    layers = adapter.layers
    for i, layer in enumerate(list(layers)):
        layers[i] = PassThrough(layer)
        try:
            scores.append(_mean_loss(model, windows, batch_size, device) - dense)
        finally:
            layers[i] = layer
    return scores


def layer_scores(model: nn.Module, windows: torch.Tensor, criterion: str = "block_influence", *,
                 batch_size: int = 8, device: str | torch.device = "cpu") -> list[float]:
    """One score per decoder layer on the calibration ``windows`` ([n, seqlen] token ids); the
    layers with the lowest scores matter least."""
    if criterion not in CRITERIA:
        raise RcpuError(f"unknown depth criterion {criterion!r}; choose from {', '.join(CRITERIA)}")
    adapter = get_adapter(model)
    device = torch.device(device)
    if criterion == "loss":
        return _loss_scores(model, adapter, windows, batch_size, device)
    return _stream_scores(model, adapter, windows, criterion, batch_size, device)


def layers_to_remove(scores: Sequence[float], n: int) -> list[int]:
    """The ``n`` layers with the lowest scores (ties to the later layer, which sees the least
    downstream correction), ascending."""
    if not 0 <= n < len(scores):
        raise RcpuError(f"cannot remove {n} of {len(scores)} layers; keep at least one")
    order = sorted(range(len(scores)), key=lambda i: (scores[i], -i))
    return sorted(order[:n])


def remove_layers(model: nn.Module, drop: Sequence[int]) -> None:
    """Remove decoder layers ``drop`` in place: the layer list, each kept attention's
    ``layer_idx`` (caches are indexed by it), and every per-layer list of the config."""
    adapter = get_adapter(model)
    n = len(adapter.layers)
    drop = sorted(set(int(i) for i in drop))
    if any(not 0 <= i < n for i in drop) or len(drop) >= n:
        raise RcpuError(f"layers {drop} cannot be removed from a model of {n} layers (keep at least one)")
    keep = [i for i in range(n) if i not in drop]
    kept_layers = [adapter.layers[i] for i in keep]
    adapter.base.layers = nn.ModuleList(kept_layers)
    for new_index, layer in enumerate(kept_layers):
        attn = adapter.attn(layer)
        if hasattr(attn, "layer_idx"):
            attn.layer_idx = new_index
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new_index
    cfg = model.config
    for key in _PER_LAYER_KEYS:
        values = getattr(cfg, key, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            setattr(cfg, key, [values[i] for i in keep])
    cfg.num_hidden_layers = len(keep)
