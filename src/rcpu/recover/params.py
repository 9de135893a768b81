"""What recovery trains: LoRA adapters (peft), ALLoRA, or every weight; and folding adapters back in.

LoRA and ALLoRA add adapters with peft and merge them with peft's ``merge_and_unload``, so the
result has exactly the pruned model's modules and shapes and saves like it. ALLoRA (Huang and
Balestriero, 2024, arXiv:2410.09692) is LoRA without dropout and without the ``alpha / r``
scale, with an adaptive learning rate per row of each adapter matrix: ``lr / sqrt(|row|^2 +
1/eta^2)``, large (``eta * lr``) while the row is near zero (B starts at zero) and smaller as it
grows. peft has no ALLoRA. Scaling the *gradient* by that coefficient, as the paper's SGD
formulation reads, does nothing under AdamW: Adam divides each coordinate by its own running
gradient magnitude, so a per-row factor cancels (up to epsilon and its drift over steps). So
:class:`AlloraRows` applies it where a learning rate acts, to the optimiser's update: before the
step it notes each adapter row, after it scales the row's change by the coefficient computed
from the row as it was. That is AdamW with a per-row learning rate (decoupled weight decay
included), and plain SGD with the paper's scaled gradient. It works on the parameters the
optimiser holds, so also on FSDP2's sharded ones (rows are whole on every shard: FSDP2 shards
dimension 0).

``--quant_aware TYPE`` registers a parametrization on every decoder weight that rounds it to the
GGUF type in the forward pass and passes gradients straight through (``rcpu.quantgrid``); the
embedding and output matrices, which the export stores at q8_0 or above, stay unrounded. Merging
removes the parametrizations and keeps the rounded values, which the export at ``TYPE`` then
reproduces exactly. ``--quant_aware_tensor_type PATTERN=TYPE`` gives the matrices that the
export's ``--tensor_type`` stores in another type that type's rounding (a float type: none), so
that training sees the file that will be written.
"""

from __future__ import annotations

import logging

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..quantgrid import BLOCK, GRID_TYPES, ste
from .config import RecoverConfig

__all__ = ["AlloraRows", "attach_trainable", "build_optimizer", "merge_trainable", "trainable_state", "unwrap"]

logger = logging.getLogger(__name__)


class AlloraRows:
    """ALLoRA's learning rate per row, ``lr / sqrt(|row|^2 + 1/eta^2)``, on the adapter matrices an
    optimiser updates: hooks before and after ``optimizer.step()`` (see the module docstring).

    ``params`` are the parameters as the optimiser holds them (plain tensors, or DTensors sharded
    along dimension 0 under FSDP2, whose row sums stay on their shard)."""

    def __init__(self, params: list[nn.Parameter], eta: float):
        self.params = list(params)
        self.floor = 1.0 / (eta * eta)
        self._before: list[torch.Tensor] | None = None

    @classmethod
    def attach(cls, optimizer: torch.optim.Optimizer, named: list[tuple[str, nn.Parameter]], eta: float) -> AlloraRows:
        rows = cls([p for name, p in named if p.requires_grad and ("lora_A" in name or "lora_B" in name)], eta)
        optimizer.register_step_pre_hook(rows._remember)
        optimizer.register_step_post_hook(rows._scale)
        return rows

    def coefficient(self, rows: torch.Tensor) -> torch.Tensor:
        """``1 / sqrt(|row|^2 + 1/eta^2)`` for every row of a 2-D weight, as a column."""
        return torch.rsqrt(rows.float().pow(2).sum(dim=1, keepdim=True) + self.floor).to(rows.dtype)

    @torch.no_grad()
    def _remember(self, optimizer, args, kwargs) -> None:
        self._before = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def _scale(self, optimizer, args, kwargs) -> None:
        for p, old in zip(self.params, self._before, strict=True):
            p.copy_(old + self.coefficient(old) * (p.detach() - old))
        self._before = None


def build_optimizer(model: nn.Module, cfg: RecoverConfig) -> tuple[list[nn.Parameter], torch.optim.Optimizer]:
    """AdamW over ``model``'s trainable parameters (as wrapped for DDP / FSDP), with ALLoRA's per-row
    learning rate for ``--parameters allora``; returns (parameters, optimiser)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False)
    if cfg.parameters == "allora":
        AlloraRows.attach(optimizer, named, cfg.allora_eta)
    return params, optimizer


def lora_modules(model: nn.Module, targets: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Where adapters go for ``--lora_targets``, in the model family's own layout (from its
    adapter): the names inside a decoder layer, and the full module names in every layer.
    ``q_proj`` names Phi-3's fused ``qkv_proj`` (one adapter then covers q, k and v), and
    ``qkv_proj`` names q/k/v_proj on an unfused family (likewise gate/up)."""
    from ..models import get_adapter
    from .config import FUSED_PROJECTIONS

    a = get_adapter(model)
    wanted = {part for t in targets for part in FUSED_PROJECTIONS.get(t, (t,))}
    chosen = [(parent, name) for parent, names in ((a.attn_name, (*a.qkv_names, a.o_name)),
                                                   (a.mlp_name, (*a.gate_up_names, a.down_name)))
              for name in names if wanted & set(FUSED_PROJECTIONS.get(name, (name,)))]
    full = {id(m): n for n, m in model.named_modules()}
    return ([f"{parent}.{name}" for parent, name in chosen],
            [full[id(getattr(getattr(layer, parent), name))] for layer in a.layers for parent, name in chosen])


def attach_trainable(model: nn.Module, cfg: RecoverConfig) -> nn.Module:
    """Make ``model`` trainable as ``cfg.parameters`` says; returns the module to train.

    Adapters are initialised from ``torch.manual_seed(cfg.seed)``, so a resumed run rebuilds
    the same starting point before loading its checkpoint.
    """
    for p in model.parameters():
        p.requires_grad_(cfg.parameters == "full")
    if cfg.parameters == "full":
        if cfg.quant_aware != "none":
            _round_decoder_weights(model, cfg.quant_aware, cfg.quant_aware_tensor_type)
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(cfg.seed)
    allora = cfg.parameters == "allora"
    projections, modules = lora_modules(model, cfg.lora_targets)
    if any(p.rsplit(".", 1)[-1] not in cfg.lora_targets for p in projections):
        logger.info("--lora_targets %s: adapters on %s", ",".join(cfg.lora_targets), ", ".join(projections))
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_rank if allora else cfg.lora_alpha,  # ALLoRA: scale 1
        lora_dropout=0.0,
        target_modules=modules,  # full names: these projections of the decoder layers, nothing else
        bias="none",
    )
    return get_peft_model(model, lora)  # ALLoRA's learning rate: build_optimizer


class _OnGrid(nn.Module):
    """Parametrization: the weight as the GGUF type ``quant`` stores it (straight-through gradient)."""

    def __init__(self, quant: str):
        super().__init__()
        self.quant = quant

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return ste(weight, self.quant)


def _round_decoder_weights(model: nn.Module, quant: str, tensor_types: tuple[str, ...] = ()) -> None:
    """Round what the export quantises: rows in whole blocks, and down_proj, whose MLP width the
    export pads with zero channels. Other rows of a length that is no multiple of the block the
    export stores as f16, so they train unrounded. ``tensor_types`` (PATTERN=TYPE, the export's
    ``--tensor_type``) set other types for the matrices whose llama.cpp names match."""
    from ..gguf_export import llama_cpp_names, match_tensor_types, parse_tensor_types

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}
    kinds = dict.fromkeys(linears, quant)
    if tensor_types:
        gguf_names = dict(zip(linears, llama_cpp_names([f"{m}.weight" for m in linears],
                                                       model.config.num_hidden_layers), strict=True))
        chosen = match_tensor_types(list(gguf_names.values()),
                                    parse_tensor_types(tensor_types, "--quant_aware_tensor_type"),
                                    "--quant_aware_tensor_type")
        kinds.update({m: chosen[g]["type"] for m, g in gguf_names.items() if g in chosen})
        logger.info("--quant_aware %s: %s", quant, ", ".join(f"{g} {c['type']}" for g, c in chosen.items()))
    skipped = []
    for name, module in linears.items():
        if kinds[name] not in GRID_TYPES:
            continue  # a float type: the export keeps the weight as it is
        if module.in_features % BLOCK and not name.endswith("down_proj"):
            skipped.append(name)
            continue
        parametrize.register_parametrization(module, "weight", _OnGrid(kinds[name]))
    if skipped:
        logger.warning("--quant_aware %s: %d matrices with rows of a length that is no multiple of %d train unrounded "
                       "(the export stores them as f16), e.g. %s", quant, len(skipped), BLOCK, skipped[0])


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def merge_trainable(model: nn.Module) -> nn.Module:
    """Fold LoRA adapters into their base weights; the plain transformers model, frozen, in eval mode."""
    merge = getattr(model, "merge_and_unload", None)
    out = merge() if callable(merge) else model
    for module in out.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
    out.eval()
    for p in out.parameters():
        p.requires_grad_(False)
    return out


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trained tensors by name (what a checkpoint must hold to resume)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
