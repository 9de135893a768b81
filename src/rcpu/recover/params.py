"""What recovery trains: LoRA adapters (peft), ALLoRA, or every weight; and folding adapters back in.

LoRA and ALLoRA add adapters with peft and merge them with peft's ``merge_and_unload``, so the
result has exactly the pruned model's modules and shapes and saves like it. ALLoRA (Huang and
Balestriero, 2024) is LoRA without dropout and without the ``alpha / r`` scale, whose gradients
are scaled row by row by ``1 / sqrt(|row|^2 + 1/eta^2)``: large while an adapter row is near zero
(B starts at zero), smaller as it grows. peft has no ALLoRA, so the scaling is a gradient hook here.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import RecoverConfig

__all__ = ["attach_trainable", "merge_trainable", "trainable_state", "unwrap"]


def _allora_hook(eta: float):
    floor = 1.0 / (eta * eta)

    def hook(grad: torch.Tensor, param: nn.Parameter) -> torch.Tensor:
        with torch.no_grad():
            norm2 = param.detach().float().pow(2).sum(dim=1, keepdim=True)
            scale = torch.rsqrt(norm2 + floor)
        return grad * scale.to(grad.dtype)

    return hook


def attach_trainable(model: nn.Module, cfg: RecoverConfig) -> nn.Module:
    """Make ``model`` trainable as ``cfg.parameters`` says; returns the module to train.

    Adapters are initialised from ``torch.manual_seed(cfg.seed)``, so a resumed run rebuilds
    the same starting point before loading its checkpoint.
    """
    for p in model.parameters():
        p.requires_grad_(cfg.parameters == "full")
    if cfg.parameters == "full":
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    allora = cfg.parameters == "allora"
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_rank if allora else cfg.lora_alpha,  # ALLoRA: scale 1
        lora_dropout=0.0,
        target_modules=list(cfg.lora_targets),
        bias="none",
    )
    peft_model = get_peft_model(model, lora)
    if allora:
        for name, p in peft_model.named_parameters():
            if p.requires_grad and ("lora_A" in name or "lora_B" in name):
                hook = _allora_hook(cfg.allora_eta)
                p.register_hook(lambda g, p=p, hook=hook: hook(g, p))
    return peft_model


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def merge_trainable(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into their base weights; the plain transformers model, frozen, in eval mode."""
    merge = getattr(model, "merge_and_unload", None)
    out = merge() if callable(merge) else model
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by name (what a checkpoint must hold to resume)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
