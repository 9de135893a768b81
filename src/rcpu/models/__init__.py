"""Adapter registry: one adapter class per architecture family, found by model_type."""

from __future__ import annotations

from torch import nn

from ..errors import RcpuError
from .base import DecoderAdapter
from .llama import LlamaAdapter, MistralAdapter, Qwen2Adapter

ADAPTERS: tuple[type[DecoderAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter)


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> DecoderAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise RcpuError(
        f"unsupported architecture {model_type!r}; supported: {', '.join(supported_model_types())}"
    )


__all__ = ["ADAPTERS", "DecoderAdapter", "get_adapter", "supported_model_types"]
