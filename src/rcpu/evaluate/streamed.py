"""Perplexity of a checkpoint on disk, one decoder layer at a time (no whole model in memory).

The same protocol and the same number as :func:`rcpu.evaluate.perplexity` on the loaded
model: the same non-overlapping windows, the same batches, the same float32 loss. Only the
order of the work changes. The model is built on the meta device; the input embeddings are
read to compute the inputs of layer 0 for every batch (as pruning captures its calibration
inputs, :func:`rcpu.layer_io.capture_layer_inputs`, per-layer-type kwargs included) and freed;
then every decoder layer is read from disk, run on every batch and freed; finally the final
norm and the head are read and the loss is summed batch by batch, with the head applied in
chunks of tokens (the logits of a whole batch are never held).

Memory: one decoder layer (on the compute device), the hidden states of every window (one
copy plus one batch, on the device or the CPU: ``hidden_states``), then the final norm and the
head. Each batch goes through exactly the operations the in-memory forward applies to it, in
the same order and shapes, so on one device the result is the same float (the tests check it).

Models whose forward changes the logits after the head (logit soft-capping, ...) are detected
as the in-memory evaluation detects them, by comparing the head on the final hidden states of
a short prefix with what the model's own forward makes of the same hidden states; they are
then scored with the model's own logits for each batch, as in memory.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .perplexity import (
    _PROBE_TOKENS,
    DEFAULT_BATCH_TOKENS,
    PerplexityResult,
    _check_arguments,
    _chunked_nll_sum,
    _cut_windows,
    _dtype_name,
    _result,
)

logger = logging.getLogger(__name__)

__all__ = ["perplexity_streamed"]


class _Emit(nn.Module):
    """Stands in for a decoder layer and returns fixed hidden states, so that the model's own
    forward applies its final norm, head and whatever follows the head to them."""

    def __init__(self, layer: nn.Module, hidden: torch.Tensor):
        super().__init__()
        self.hidden = hidden
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return self.hidden


def _logits_from(model: nn.Module, layers: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
    """``model(...).logits`` for the output ``hidden`` of the last decoder layer: the model's own
    forward, with every decoder layer replaced by one that returns ``hidden``."""
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Emit(layer, hidden)
    try:
        return model(inputs_embeds=hidden, use_cache=False).logits
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer


def _final_hidden(base: nn.Module, layers: nn.ModuleList, hidden: torch.Tensor) -> torch.Tensor:
    """``base(...).last_hidden_state`` for the output ``hidden`` of the last decoder layer."""
    originals = list(layers)
    for i, layer in enumerate(originals):
        layers[i] = _Emit(layer, hidden)
    try:
        out = base(inputs_embeds=hidden, use_cache=False)
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
    last = getattr(out, "last_hidden_state", None)
    return out[0] if last is None else last


def _head_is_last(model: nn.Module, base: nn.Module, head: nn.Module, layers: nn.ModuleList,
                  probe: torch.Tensor) -> bool:
    """Whether ``head(base(x))`` reproduces ``model(x).logits`` on ``probe`` (final hidden states of
    a short prefix), with the tolerance of the in-memory check."""
    split = head(_final_hidden(base, layers, probe)).float()
    full = _logits_from(model, layers, probe).float()
    if split.shape != full.shape:
        return False
    tol = 1e-3 * full.abs().max().item() + 1e-5
    if not torch.isfinite(split).all() or (split - full.to(split.device)).abs().max().item() > tol:
        logger.info("model(x).logits differs from head(base(x)); scoring with full logits")
        return False
    return True


def _to_device(model: nn.Module, device: torch.device) -> None:
    """Move the parameters and buffers that hold data to ``device`` (tied ones stay tied)."""
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and not p.is_meta:
                p.data = p.data.to(device)
        for name, b in module._buffers.items():
            if b is not None and not b.is_meta:
                module._buffers[name] = b.to(device)


@torch.no_grad()
def perplexity_streamed(
    checkpoint: str | os.PathLike,
    ids: torch.Tensor,
    seqlen: int,
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    hidden_states: str = "auto",
    max_hidden_gib: float | None = None,
    trust_remote_code: bool = False,
    source: str = "",
    progress: bool = True,
    bos: int | None = None,
) -> PerplexityResult:
    """Perplexity of the checkpoint ``checkpoint`` on ``ids``, reading one decoder layer at a time.

    ``checkpoint`` is a safetensors checkpoint directory (a stock one, or one rcpu wrote with
    per-layer widths) or a GGUF file; its weights are read in ``dtype`` and run on ``device``.
    ``ids``, ``seqlen``, ``batch_size``, ``max_tokens``, ``source``, ``progress`` and ``bos`` are those of
    :func:`rcpu.evaluate.perplexity`, and so is the result. ``hidden_states`` / ``max_hidden_gib``:
    where the hidden states of all windows live between layers (see
    :func:`rcpu.layer_io.hidden_state_storage`; "auto" keeps them on a CUDA device when they fit).

    Raises:
        RcpuError: bad arguments, fewer than ``seqlen`` tokens, or a checkpoint rcpu cannot stream.
    """
    from ..layer_io import capture_layer_inputs, forward_layer, hidden_state_storage
    from ..models import get_adapter
    from ..report import release_free_memory
    from ..streaming import free_embeddings, open_checkpoint, read_embeddings, read_head, read_layer

    ids, seqlen = _check_arguments(ids, seqlen, batch_size, max_tokens)
    windows = _cut_windows(ids, seqlen, bos)
    n = windows.shape[0]
    bs = min(int(batch_size) if batch_size is not None else max(1, DEFAULT_BATCH_TOKENS // seqlen), n)
    device = torch.device(device)
    opened = open_checkpoint(checkpoint, dtype, trust_remote_code)
    model, reader = opened.model, opened.reader
    adapter = get_adapter(model)
    layers = adapter.layers
    storage, info = hidden_state_storage(hidden_states, device, windows.numel(), model.config.hidden_size, dtype,
                                         max_hidden_gib)
    logger.debug("streamed perplexity: %d windows of %d tokens, batch %d, device %s, %s, hidden states %s",
                 n, seqlen, bs, device, _dtype_name(dtype), info)

    read_embeddings(model, adapter, reader)
    batches = capture_layer_inputs(model, adapter, windows, bs, device, storage)
    free_embeddings(model, adapter)
    for i in tqdm(range(len(layers)), desc="perplexity (layers)", unit="layer", disable=not progress):
        layer = read_layer(adapter, reader, i)
        layer.to(device)
        for b, (h, kw) in enumerate(batches):  # in place: one batch's input and output at a time
            batches[b] = (forward_layer(layer, h, kw), kw)
            del h
        layer.to("meta")
        release_free_memory()

    read_head(model, reader)
    base, head = model.get_decoder(), model.get_output_embeddings()
    _to_device(model, device)  # the final norm, the head and the buffers; the rest is on meta
    probe = batches[0][0][:1, : min(seqlen, _PROBE_TOKENS)].to(device)
    split = _head_is_last(model, base, head, layers, probe)
    total_nll = 0.0
    for b, (h, _) in enumerate(batches):
        labels = windows[b * bs:(b + 1) * bs, 1:]
        h = h.to(device)
        if split:
            nll = _chunked_nll_sum(head, _final_hidden(base, layers, h)[:, :-1], labels)
        else:
            logits = _logits_from(model, layers, h)[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device),
                                  reduction="sum")
        total_nll += float(nll.item())
        batches[b] = None
    return _result(total_nll, n, seqlen, _dtype_name(dtype), source, bos is not None)
