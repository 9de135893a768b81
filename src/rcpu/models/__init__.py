"""Adapter registry: one adapter class per architecture family, found by model_type."""

from __future__ import annotations

from torch import nn

from ..errors import RcpuError
from .base import DecoderAdapter
from .families import Gemma3TextAdapter, Olmo2Adapter, Phi3Adapter, Qwen3Adapter, SmolLM3Adapter
from .llama import LlamaAdapter, MistralAdapter, Qwen2Adapter

ADAPTERS: tuple[type[DecoderAdapter], ...] = (LlamaAdapter, MistralAdapter, Qwen2Adapter, Qwen3Adapter,
                                              Gemma3TextAdapter, Phi3Adapter, Olmo2Adapter, SmolLM3Adapter)


def supported_model_types() -> list[str]:
    """Every ``model_type`` an adapter handles (the stock ones and rcpu's own ``rcpu_*``)."""
    return sorted(t for a in ADAPTERS for t in a.model_types)


def is_supported(model_type: object) -> bool:
    """Whether an adapter handles configs of ``model_type`` (what :func:`get_adapter` decides by)."""
    return any(model_type in cls.model_types for cls in ADAPTERS)


def unsupported_message(model_type: object) -> str:
    """The one-line error for a model type without an adapter, naming the supported ones."""
    stock = [t for t in supported_model_types() if not t.startswith("rcpu_")]
    return (f"model type {model_type!r} is not supported by rcpu; supported: {', '.join(stock)} "
            f"(dense decoder-only models of these families, and the rcpu_* checkpoints rcpu saves from them)")


def get_adapter(model: nn.Module) -> DecoderAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise RcpuError(unsupported_message(model_type))


__all__ = ["ADAPTERS", "DecoderAdapter", "get_adapter", "is_supported", "supported_model_types",
           "unsupported_message"]
