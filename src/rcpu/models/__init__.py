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


#: model types rcpu knowingly cannot serve yet -> why (the first clause of the error line)
NOT_YET: dict[str, str] = {
    **{t: "a mixture-of-experts model (its MLP is routed experts, which rcpu does not prune yet)"
       for t in ("mixtral", "qwen2_moe", "qwen3_moe", "llama4", "llama4_text", "deepseek_v2", "deepseek_v3",
                 "olmoe", "phimoe", "granitemoe", "gpt_oss", "minimax", "dbrx", "jamba")},
    **{t: "a hybrid of linear-attention (or state-space) and attention layers, which rcpu does not prune yet"
       for t in ("qwen3_5", "qwen3_5_text", "qwen3_next", "falcon_h1", "mamba", "mamba2", "zamba2",
                 "bamba", "granitemoehybrid", "lfm2")},
    **{t: "a model whose layers share KV caches or take per-layer embeddings, which rcpu does not prune yet"
       for t in ("gemma4", "gemma4_text", "gemma3n", "gemma3n_text")},
    "gemma3": ("Gemma 3's multimodal checkpoint; rcpu prunes the text model (model type 'gemma3_text', "
               "e.g. the 270M and 1B checkpoints, or the language model saved on its own)"),
}


def unsupported_message(model_type: object) -> str:
    """The one-line error for a model type without an adapter, naming the supported ones."""
    stock = [t for t in supported_model_types() if not t.startswith("rcpu_")]
    why = f" is {NOT_YET[model_type]}" if isinstance(model_type, str) and model_type in NOT_YET else (
        " is not supported by rcpu")
    return (f"model type {model_type!r}{why}; supported: {', '.join(stock)} "
            f"(dense decoder-only models of these families, and the rcpu_* checkpoints rcpu saves from them)")


def get_adapter(model: nn.Module) -> DecoderAdapter:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for cls in ADAPTERS:
        if model_type in cls.model_types:
            return cls(model)
    raise RcpuError(unsupported_message(model_type))


__all__ = ["ADAPTERS", "DecoderAdapter", "get_adapter", "is_supported", "supported_model_types",
           "unsupported_message"]
