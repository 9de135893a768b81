"""Apply a function to every tensor in a nested structure (a batch's forward kwargs:
attention masks, rotary tables, caches in tuples, lists and dicts)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def map_tensors(obj, fn: Callable[[torch.Tensor], torch.Tensor]):
    """``obj`` with every tensor ``t`` in it replaced by ``fn(t)``; everything else kept."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, (tuple, list)):
        return type(obj)(map_tensors(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_tensors(v, fn) for k, v in obj.items()}
    return obj
