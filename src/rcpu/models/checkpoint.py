"""Which stock config a pruned model is saved with, decided (and validated) before pruning.

Pruning heads can give widths that the family's own config refuses. transformers 5's
``LlamaConfig`` requires ``hidden_size % num_attention_heads == 0`` even when ``head_dim``
is explicit, so LLaMA-7B at the paper's 20 % (32 -> 26 heads over hidden 4096) cannot be
saved as a Llama checkpoint, although the pruned model itself is fine. ``MistralConfig``
and ``Qwen2Config`` have no such rule.

``MistralForCausalLM`` computes exactly what ``LlamaForCausalLM`` computes when the Llama
model has no biases and Mistral's sliding window is off: the same RMSNorm, rotary
embedding (any ``rope_parameters``, shared RoPE functions), attention with explicit
``head_dim``, SwiGLU MLP, tied or untied head. So such a checkpoint is written as a
Mistral one, which stock transformers and vLLM load without remote code. A Llama whose
biases rule this out (``attention_bias`` / ``mlp_bias``, e.g. from bias compensation)
with an indivisible head count is refused before any layer is pruned.

Per-layer widths (global allocation) are saved with the ``rcpu_<family>`` config (see
:mod:`rcpu.nonuniform`), whose top-level widths are the unpruned ones; only its bias
switches change, and the check covers them. So are o_proj / down_proj biases on a family
whose config cannot switch them on (Mistral, Qwen2), even with uniform widths.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass

from torch import nn
from transformers import MistralConfig, MistralForCausalLM, PretrainedConfig

from ..errors import RcpuError
from ..shapes import LayerShape

#: Llama config keys with no Mistral counterpart. ``pretraining_tp`` is not read by the
#: transformers 5 Llama forward pass; the bias switches must be off for the remap.
_LLAMA_ONLY = ("attention_bias", "mlp_bias", "pretraining_tp")
_NOT_COPIED = ("model_type", "architectures", "transformers_version", "auto_map",
               "layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size")


@dataclass
class SavedFormat:
    """The config the checkpoint will carry and how it relates to the in-memory model."""

    config: PretrainedConfig
    kind: str  #: "stock" (the model's own class), "remapped" (an equivalent stock class), "per-layer"
    note: str | None = None

    def to_dict(self) -> dict:
        return {"kind": self.kind, "model_type": self.config.model_type,
                "architecture": (self.config.architectures or [None])[0], "note": self.note}


def _validate(config: PretrainedConfig, per_layer: bool = False) -> str | None:
    """The error save_pretrained / from_pretrained would raise for ``config``, or None.
    ``per_layer``: as the rcpu config of the family, which drops the stock rule
    ``hidden_size % num_attention_heads == 0`` (its head counts come with an explicit head_dim)."""
    try:
        if per_layer:
            for validator in getattr(type(config), "__class_validators__", ()):
                if validator.__name__ != "validate_architecture":
                    validator(config)
        elif str(config.model_type).startswith("rcpu_"):  # saved as the stock config: its rules apply
            stock_config(config)
        elif hasattr(config, "validate"):
            config.validate()
    except Exception as exc:  # strict-dataclass validation errors wrap a ValueError
        lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
        return lines[-1] if lines else type(exc).__name__
    return None


def stock_config(config: PretrainedConfig) -> PretrainedConfig:
    """The stock config of an ``rcpu_*`` config's family with the same values (as a checkpoint pruned
    again to equal widths is saved); the stock class's validation errors propagate."""
    from transformers import CONFIG_MAPPING

    family = str(config.model_type).removeprefix("rcpu_")
    values = {k: v for k, v in config.to_dict().items() if k not in _NOT_COPIED + ("o_proj_bias", "down_proj_bias")}
    return CONFIG_MAPPING[family].from_dict(values)


def mistral_equivalent(config: PretrainedConfig) -> MistralConfig:
    """The Mistral config whose model computes what this bias-free Llama config's model computes."""
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("a Llama model with biases has no Mistral equivalent")
    values = {k: v for k, v in config.to_dict().items() if k not in _LLAMA_ONLY + _NOT_COPIED}
    values["sliding_window"] = None
    mistral = MistralConfig(**values)
    mistral.architectures = ["MistralForCausalLM"]
    return mistral


def _with_biases(config: PretrainedConfig, attn_bias: bool, mlp_bias: bool) -> PretrainedConfig:
    cfg = copy.deepcopy(config)
    cfg.attention_bias = cfg.attention_bias or attn_bias
    cfg.mlp_bias = getattr(cfg, "mlp_bias", False) or mlp_bias
    return cfg


def saved_format(config: PretrainedConfig, shapes: list[LayerShape], attn_bias: bool, mlp_bias: bool,
                 bias_switches: bool = True) -> SavedFormat:
    """The config a model with layer shapes ``shapes`` will be saved with; RcpuError when
    no stock config can carry it. ``attn_bias`` / ``mlp_bias``: whether o_proj / down_proj
    will have biases (compensation adds them). With ``bias_switches`` the config's switches
    carry them; without (Mistral, Qwen2) only the rcpu modeling file can."""
    cfg = copy.deepcopy(config)
    if bias_switches and attn_bias:
        cfg.attention_bias = True
    if bias_switches and mlp_bias:
        cfg.mlp_bias = True
    uniform = len({(s.attn, s.intermediate_size) for s in shapes}) == 1
    extra_biases = (attn_bias or mlp_bias) and not bias_switches
    if not uniform or extra_biases:
        error = _validate(cfg, per_layer=True)
        if error:
            raise RcpuError(f"the pruned {cfg.model_type} config would be refused by transformers ({error})")
        what = "per-layer widths" if not uniform else (
            f"o_proj / down_proj biases, which a stock {cfg.model_type.removeprefix('rcpu_')} config cannot "
            "switch on")
        return SavedFormat(as_rcpu_config(cfg), "per-layer",
                           f"{what}: saved with the rcpu modeling file (trust_remote_code=True)")
    geom, d_ff = shapes[0].attn, shapes[0].intermediate_size
    cfg.num_attention_heads = geom.num_heads
    cfg.num_key_value_heads = geom.num_kv_heads
    cfg.head_dim = geom.head_dim
    cfg.intermediate_size = d_ff
    error = _validate(cfg)
    if error is None:
        return SavedFormat(cfg, "stock")
    family = cfg.model_type.removeprefix("rcpu_")  # a per-layer checkpoint pruned again to equal widths
    if family == "llama" and not (getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False)):
        mistral = mistral_equivalent(cfg)
        if _validate(mistral) is None:
            return SavedFormat(mistral, "remapped", (
                f"{geom.num_heads} heads do not divide hidden size {cfg.hidden_size}, which transformers' "
                f"LlamaConfig refuses; saved as the equivalent MistralForCausalLM (no biases, no sliding window)"))
    from ..nonuniform import REMOTE_CLASSES

    if family != "llama" and family in REMOTE_CLASSES:  # e.g. Gemma 3: hidden_size % heads != 0
        return SavedFormat(as_rcpu_config(config if not bias_switches else _with_biases(config, attn_bias, mlp_bias)),
                           "per-layer", f"{geom.num_heads} heads over hidden size {cfg.hidden_size}: {error.split(': ', 1)[-1].rstrip('.')} "
                           f"in a stock {family} config, so it is saved with the rcpu modeling file "
                           "(trust_remote_code=True), whose config has no such rule")
    why = ("; its biases (attention_bias / mlp_bias) rule out the equivalent Mistral config: use a --compensation "
           "other than bias, or a --pruning_ratio whose head count divides the hidden size"
           if family == "llama" else "")
    raise RcpuError(f"the pruned model cannot be saved as a stock {family} checkpoint: "
                    f"{error.rstrip('.')}{why}")


def as_rcpu_config(config: PretrainedConfig) -> PretrainedConfig:
    """``config`` as an instance of its family's rcpu config class (same values), which
    ``save_pretrained`` accepts where the stock class would refuse the pruned head counts."""
    from ..nonuniform import REMOTE_CLASSES
    from ..remote import modeling_rcpu

    family = str(config.model_type).removeprefix("rcpu_")
    if family not in REMOTE_CLASSES:
        return copy.deepcopy(config)
    cls = getattr(modeling_rcpu, REMOTE_CLASSES[family][0])
    if isinstance(config, cls):
        return copy.deepcopy(config)
    values = {k: v for k, v in config.to_dict().items() if k not in ("model_type", "transformers_version")}
    return cls.from_dict(values)


@contextmanager
def saving_config(model: nn.Module, fmt: SavedFormat):
    """While saving a per-layer checkpoint, the model carries the rcpu config (``fmt.config``)."""
    if fmt.kind != "per-layer":
        yield
        return
    original = model.config
    model.config = fmt.config
    try:
        yield
    finally:
        model.config = original


def model_for_saving(model: nn.Module, fmt: SavedFormat) -> nn.Module:
    """``model`` itself, or a twin of the remapped class that shares its tensors (no copy)."""
    if fmt.kind != "remapped":
        return model
    import torch

    with torch.device("meta"):
        twin = MistralForCausalLM(fmt.config)
    twin.load_state_dict(model.state_dict(), assign=True, strict=True)
    # non-persistent buffers (RoPE frequencies) were built on the meta device
    device = model.get_input_embeddings().weight.device
    with torch.device(device):
        twin.model.rotary_emb = type(twin.model.rotary_emb)(fmt.config)
    if fmt.config.tie_word_embeddings:
        twin.tie_weights()
    twin.generation_config = copy.deepcopy(model.generation_config)
    return twin.eval()
