"""Running decoder layers on calibration batches (layer input/output).

Pruning, allocation and the streamed run all move calibration
hidden states through decoder layers the same way: capture the inputs of the first
decoder layer (:func:`capture_layer_inputs`), run a layer over every batch
(:func:`run_layer`, :func:`forward_layer`), or only as far as a given module, for hooks
on the way (:func:`run_until`); find the device a module lives on (:func:`module_device`); and
decide where the hidden states are kept (:func:`hidden_state_storage`). These helpers hold
no pruning maths, so they live here rather than in :mod:`rcpu.pipeline`, and every module
that runs layers (the pipeline included) imports them from one place without import cycles.

A batch is ``(hidden states, layer kwargs)``; a layer's outputs go back to where its inputs
were kept.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import DecoderAdapter
from .nested import map_tensors


class _StopForward(Exception):
    pass


#: kwargs keys under which a batch carries the kwargs of the other layer types (see _Catcher)
BY_TYPE = "_rcpu_kwargs_by_layer_type"
LAYER_TYPES = "_rcpu_layer_types"


class _Catcher(nn.Module):
    """Stands in for a decoder layer to record its inputs. Layer 0's catcher records the
    hidden states and kwargs; where layers differ in their kwargs (``config.layer_types``:
    sliding-window and global attention get different masks, Gemma 3 also different RoPE
    tables), the first layer of every other type records its kwargs too. The last catcher
    that is needed stops the forward pass, so no decoder layer runs."""

    def __init__(self, layer: nn.Module, sink: list, layer_type: str | None = None, last: bool = True):
        super().__init__()
        self.sink, self.layer_type, self.last = sink, layer_type, last
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        if args:
            raise RuntimeError("decoder layer called with unexpected positional arguments")
        kwargs = {k: v for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value", "cache")}
        kwargs["use_cache"] = False
        self.sink.append((self.layer_type, hidden_states, kwargs))
        if self.last:
            raise _StopForward
        return hidden_states


class PassThrough(nn.Module):
    """Stands in for a decoder layer and returns its input unchanged (layers skipped during capture;
    a layer left out, for :mod:`rcpu.depth`)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        if hasattr(layer, "attention_type"):
            self.attention_type = layer.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


def _layer_types(model: nn.Module, n_layers: int) -> list[str] | None:
    """``config.layer_types`` when the layers differ in kind (then their kwargs differ), else None."""
    types = getattr(getattr(model, "config", None), "layer_types", None)
    if not types or len(set(types[:n_layers])) <= 1:
        return None
    return list(types[:n_layers])


def layer_kwargs(kw: dict, layer: nn.Module) -> dict:
    """The kwargs for ``layer`` from a batch's kwargs (those of its layer type, if they differ)."""
    if BY_TYPE not in kw:
        return kw
    index = getattr(getattr(layer, "self_attn", None), "layer_idx", None)
    if index is None:
        raise RuntimeError("layers of different types need their attention's layer_idx")
    return kw[BY_TYPE][kw[LAYER_TYPES][index]]


def _to_device(obj, device):
    return map_tensors(obj, lambda t: t.to(device))


def module_device(module: nn.Module) -> torch.device:
    """The device of ``module``'s first parameter (the CPU for a module without any)."""
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, adapter: DecoderAdapter, windows: torch.Tensor, batch_size: int,
                         device: torch.device, storage: torch.device | None = None) -> list[tuple[torch.Tensor, dict]]:
    """(hidden states, layer kwargs) at the input of decoder layer 0, one entry per batch.

    Hidden states are kept on ``storage`` (default: ``device``); every later layer's outputs
    stay where its inputs were (see :func:`forward_layer`), so CPU storage bounds device memory.
    """
    layers = adapter.layers
    originals = list(layers)
    types = _layer_types(model, len(layers))
    # the first layer of each type records (layer 0 also the hidden states); the last of them stops
    firsts = [0] if types is None else sorted({types.index(t) for t in set(types)})
    sink: list = []
    moved = [(m, module_device(m)) for m in adapter.non_layer_modules()]
    for m, _ in moved:
        m.to(device)
    for i in firsts:
        layers[i] = _Catcher(originals[i], sink, None if types is None else types[i], last=i == firsts[-1])
    for i in range(1, firsts[-1]):  # layers between catchers pass the hidden states through untouched
        if i not in firsts:
            layers[i] = PassThrough(originals[i])
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _StopForward:
                pass
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        for m, home in moved:
            m.to(home)
    out = []
    for b in range(0, len(sink), len(firsts)):
        records = sink[b:b + len(firsts)]
        _, h, kw = records[0]
        kw = _to_device(kw, device)
        if types is not None:
            kw = {**kw, BY_TYPE: {t: _to_device(k, device) for t, _, k in records}, LAYER_TYPES: types}
        out.append((h.to(storage or device), kw))
    return out


def forward_layer(layer: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    """One decoder layer on one batch; the output goes back to where the input was kept."""
    out = layer(h.to(module_device(layer)), **layer_kwargs(kw, layer))
    if isinstance(out, tuple):
        out = out[0]
    return out.to(h.device)


def run_layer(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]], keep_outputs: bool
              ) -> list[tuple[torch.Tensor, dict]]:
    """``layer`` on every batch (for the hooks on it); with ``keep_outputs``, its outputs with
    each batch's kwargs, i.e. the next layer's batches, else an empty list."""
    outs = []
    for h, kw in batches:
        out = forward_layer(layer, h, kw)
        if keep_outputs:
            outs.append((out, kw))
    return outs


def hidden_state_storage(placement: str, device: torch.device, n_tokens: int, hidden_size: int,
                         dtype: torch.dtype, max_gib: float | None = None) -> tuple[torch.device, dict]:
    """Where the calibration hidden states live: on the compute device when they fit, else on
    the CPU. They take inputs + outputs of one layer at a time, ``2 * n_tokens * hidden`` values
    (``n_tokens`` counts held-out windows too). "auto" keeps them on a CUDA device when that
    is at most ``max_gib`` (default: a quarter of the free memory)."""
    size = 2 * n_tokens * hidden_size * torch.finfo(dtype).bits // 8
    info = {"hidden_states_mib": round(size / 2**20, 1)}
    if placement not in ("auto", "device", "cpu"):
        raise ValueError(placement)
    if device.type == "cpu" or placement == "device":
        where = device
    elif placement == "cpu":
        where = torch.device("cpu")
    else:
        limit = max_gib * 2**30 if max_gib is not None else (
            torch.cuda.mem_get_info(device)[0] / 4 if device.type == "cuda" else float("inf"))
        where = device if size <= limit else torch.device("cpu")
    info["hidden_states_on"] = str(where)
    return where, info


class _Stop(Exception):
    """Raised by a hook to end a forward pass whose remaining work is not needed."""


def _raise_stop(*_args) -> None:
    raise _Stop


def run_until(layer: nn.Module, batches: list[tuple[torch.Tensor, dict]], module: nn.Module) -> None:
    """Run every batch through ``layer`` only as far as ``module`` (for hooks on the way)."""
    stop = module.register_forward_hook(_raise_stop)
    try:
        for h, kw in batches:
            try:
                forward_layer(layer, h, kw)
            except _Stop:
                pass
    finally:
        stop.remove()
