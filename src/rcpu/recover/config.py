"""Settings of a recovery run, validated up front (before any model is loaded)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields

from ..errors import RcpuError
from ..quantgrid import GRID_TYPES

#: what is trained: LoRA adapters (merged at the end), ALLoRA, or every weight
PARAMETERS = ("lora", "allora", "full")
#: --quant_aware: train through one of these GGUF types' rounding, or not
QUANT_AWARE = ("none", *GRID_TYPES)
#: --quant_aware_tensor_type: a grid type, or a float type (trained unrounded)
QUANT_AWARE_OVERRIDES = (*GRID_TYPES, "f16", "bf16", "f32")
#: the seven projections of a Llama-family decoder layer
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: fused projections (Phi-3) -> the projections they hold; ``--lora_targets`` may name either
FUSED_PROJECTIONS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class RecoverConfig:
    """Hyper-parameters of distilling the dense teacher into a pruned student.

    The defaults are the setting the recovery benchmark chose (see the README's recovery
    section); every one is recorded in the provenance.
    """

    tokens: int = field(default=100_000, metadata={"help": "training budget in tokens (rounded up to whole global batches)"})
    seqlen: int = field(default=128, metadata={"help": "window length the training text is packed into"})
    batch_size: int = field(default=8, metadata={"help": "windows per optimiser step (the global batch under DDP)"})
    lr: float = field(default=3e-4, metadata={"help": "peak learning rate (cosine decay to zero after the warm-up)"})
    warmup: float = field(default=0.05, metadata={"help": "fraction of the steps spent warming the learning rate up linearly"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping (0 = off)"})
    alpha: float = field(default=0.5, metadata={"help": "weight of the KL term; 1 = distillation only, 0 = the plain LM loss, "
                                                         "between a mix (default 0.5)"})
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL term"})
    parameters: str = field(default="full", metadata={"help": "what is trained: lora (adapters merged at the end), allora, or full (every weight)"})
    lora_rank: int = field(default=8, metadata={"help": "rank of the LoRA / ALLoRA adapters"})
    lora_alpha: float = field(default=16.0, metadata={"help": "LoRA's scale is lora_alpha / lora_rank (ALLoRA: no scale)"})
    lora_targets: tuple[str, ...] = field(default=ALL_PROJECTIONS, metadata={"help": (
        "comma-separated projections that get adapters (default: all seven); on a family with fused "
        "projections (Phi-3) q/k/v_proj name its qkv_proj and gate/up_proj its gate_up_proj")})
    allora_eta: float = field(default=4.0, metadata={"help": "ALLoRA's per-row learning rate lr / sqrt(|row|^2 + 1/eta^2) is eta x lr at |row| = 0"})
    seed: int = field(default=0, metadata={"help": "order of the windows, held-out draw, adapter initialisation"})
    heldout: int = field(default=32, metadata={"help": "windows of the training text kept out of training, for held-out KL / loss"})
    eval_every: int = field(default=50, metadata={"help": "steps between held-out measurements (0 = only before and after)"})
    save_every: int = field(default=50, metadata={"help": "steps between checkpoints (0 = none)"})
    fsdp: bool = field(default=False, metadata={"help": "under torchrun: shard student and teacher with FSDP2 (each decoder layer a unit) instead of replicating them with DDP"})
    gradient_checkpointing: bool = field(default=False, metadata={"help": "recompute the student's layers in the backward pass (less memory, ~30 %% more time)"})
    quant_aware: str = field(default="none", metadata={"help": "train every decoder weight through the rounding of this GGUF type "
                             "(straight-through), so that `rcpu export --quant` at that type loses nothing more; needs --parameters full"})
    quant_aware_tensor_type: tuple[str, ...] = field(default=(), metadata={"help": "comma-separated PATTERN=TYPE: "
                             "weight matrices whose llama.cpp name matches PATTERN train through TYPE's rounding instead "
                             "(f16 = unrounded); pass the export's --tensor_type patterns here"})
    chunk_elements: int = field(default=1 << 24, metadata={"help": "logits held at once per model in the loss (positions x vocab)"})

    def validate(self) -> RecoverConfig:
        checks = [
            (self.tokens >= 1, f"--tokens is {self.tokens}; the training budget must be at least 1 token"),
            (self.seqlen >= 2, f"--seqlen is {self.seqlen}; use at least 2"),
            (self.batch_size >= 1, f"--batch_size is {self.batch_size}; use at least 1"),
            (self.lr > 0, f"--lr is {self.lr}; use a positive learning rate"),
            (0 <= self.warmup < 1, f"--warmup is {self.warmup}; give a fraction of the steps in [0, 1)"),
            (self.weight_decay >= 0, f"--weight_decay is {self.weight_decay}; use 0 or more"),
            (self.max_grad_norm >= 0, f"--max_grad_norm is {self.max_grad_norm}; use 0 (off) or more"),
            (0 <= self.alpha <= 1, f"--alpha is {self.alpha}; use a weight in [0, 1] (1 = KL only, 0 = LM loss only)"),
            (self.temperature > 0, f"--temperature is {self.temperature}; use a positive temperature"),
            (self.parameters in PARAMETERS, f"--parameters {self.parameters!r} is unknown; use one of {', '.join(PARAMETERS)}"),
            (self.lora_rank >= 1, f"--lora_rank is {self.lora_rank}; use at least 1"),
            (self.lora_alpha > 0, f"--lora_alpha is {self.lora_alpha}; use a positive value"),
            (len(self.lora_targets) > 0, "--lora_targets is empty; name at least one projection"),
            (self.allora_eta > 0, f"--allora_eta is {self.allora_eta}; use a positive value"),
            (self.heldout >= 1, f"--heldout is {self.heldout}; keep at least 1 window out of training"),
            (self.eval_every >= 0, f"--eval_every is {self.eval_every}; use 0 (off) or more"),
            (self.save_every >= 0, f"--save_every is {self.save_every}; use 0 (off) or more"),
            (self.quant_aware in QUANT_AWARE,
             f"--quant_aware {self.quant_aware!r} is unknown; use one of {', '.join(QUANT_AWARE)}"),
            (self.quant_aware == "none" or self.parameters == "full",
             f"--quant_aware {self.quant_aware} rounds the weights that train; adapters would be merged off the grid "
             "afterwards; use --parameters full"),
            (self.quant_aware == "none" or not self.fsdp,
             f"--quant_aware {self.quant_aware} is not supported with --fsdp (rounding needs whole rows); use DDP"),
            (self.chunk_elements >= 1, f"chunk_elements is {self.chunk_elements}; use at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise RcpuError(message)
        if self.quant_aware_tensor_type:
            if self.quant_aware == "none":
                raise RcpuError("--quant_aware_tensor_type needs --quant_aware TYPE (the type of the other matrices)")
            from ..gguf_export import parse_tensor_types

            parse_tensor_types(self.quant_aware_tensor_type, "--quant_aware_tensor_type", QUANT_AWARE_OVERRIDES)
        unknown = set(self.lora_targets) - set(ALL_PROJECTIONS) - set(FUSED_PROJECTIONS)
        if unknown:
            raise RcpuError(f"--lora_targets has unknown projections {sorted(unknown)}; use some of "
                            f"{', '.join((*ALL_PROJECTIONS, *FUSED_PROJECTIONS))}")
        return self

    def window_tokens(self) -> int:
        return self.batch_size * self.seqlen

    def steps(self) -> int:
        """Optimiser steps the budget buys (whole global batches, at least one)."""
        return max(1, -(-self.tokens // self.window_tokens()))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["lora_targets"] = list(self.lora_targets)
        out["quant_aware_tensor_type"] = list(self.quant_aware_tensor_type)
        return out

    def digest(self, *extra) -> str:
        """A hash of the settings that decide the weights (for refusing a resume with other ones)."""
        keep = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _NOT_IN_DIGEST}
        if self.quant_aware == "none":
            del keep["quant_aware"]  # added later: runs started before it keep their digest (and --resume)
        if not self.quant_aware_tensor_type:
            del keep["quant_aware_tensor_type"]  # likewise
        else:
            keep["quant_aware_tensor_type"] = list(self.quant_aware_tensor_type)
        keep["lora_targets"] = list(self.lora_targets)
        blob = json.dumps([keep, *extra], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: settings that change no weight (how often to measure, chunking is exact up to rounding)
_NOT_IN_DIGEST = frozenset({"eval_every", "save_every"})


@dataclass
class RecoverRecord:
    """What a recovery run did, for ``rcpu_provenance.json`` (its ``recovery`` key)."""

    config: dict
    teacher: dict
    data: dict
    evaluation: dict = field(default_factory=dict)
    curve: list = field(default_factory=list)
    heldout_curve: list = field(default_factory=list)
    timing: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    distributed: dict = field(default_factory=dict)
    versions: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)
