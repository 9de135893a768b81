"""Saving models whose decoder layers have different widths (global allocation).

A stock Llama / Mistral / Qwen2 config has one number of query heads, KV heads and
MLP channels for all layers. When they differ per layer, the checkpoint gets an
``rcpu_<family>`` config with three per-layer lists and the small modeling file
``remote/modeling_rcpu.py`` (stock classes plus per-layer projection shapes), so it
loads with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``
without rcpu. Without ``trust_remote_code`` transformers refuses to load it. The same
format carries o_proj / down_proj biases that a Mistral or Qwen2 config cannot switch on
(``o_proj_bias`` / ``down_proj_bias``), with per-layer or uniform widths.

Usage: ``model.save_pretrained(d)`` then ``prepare_nonuniform_save(model, d)``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import nn

MODELING_FILE = Path(__file__).parent / "remote" / "modeling_rcpu.py"

#: base model_type -> (config class, model class) in modeling_rcpu.py
REMOTE_CLASSES = {
    "llama": ("RcpuLlamaConfig", "RcpuLlamaForCausalLM"),
    "mistral": ("RcpuMistralConfig", "RcpuMistralForCausalLM"),
    "qwen2": ("RcpuQwen2Config", "RcpuQwen2ForCausalLM"),
    "qwen3": ("RcpuQwen3Config", "RcpuQwen3ForCausalLM"),
    "gemma3_text": ("RcpuGemma3TextConfig", "RcpuGemma3TextForCausalLM"),
    "phi3": ("RcpuPhi3Config", "RcpuPhi3ForCausalLM"),
    "olmo2": ("RcpuOlmo2Config", "RcpuOlmo2ForCausalLM"),
    "smollm3": ("RcpuSmolLM3Config", "RcpuSmolLM3ForCausalLM"),
}


def _projections(model: nn.Module) -> tuple[str, ...]:
    """Names (inside a decoder layer) of the attention's and the MLP's linear layers."""
    from .models import get_adapter

    a = get_adapter(model)
    return (*(f"{a.attn_name}.{n}" for n in (*a.qkv_names, a.o_name)),
            *(f"{a.mlp_name}.{n}" for n in (*a.gate_up_names, a.down_name)))


def _base_model_type(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", None)
    base = model_type.removeprefix("rcpu_") if isinstance(model_type, str) else model_type
    if base not in REMOTE_CLASSES:
        raise ValueError(f"per-layer widths are not supported for model type {model_type!r}; "
                         f"supported: {', '.join(REMOTE_CLASSES)}")
    return base


def _head_dim(model: nn.Module) -> int:
    dims = {layer.self_attn.head_dim for layer in model.model.layers}
    if len(dims) != 1:
        raise ValueError(f"layers have different head_dim {sorted(dims)}")
    return dims.pop()


def layer_widths(model: nn.Module) -> list[dict]:
    """Per decoder layer: number of query heads, KV heads and MLP channels, from module shapes."""
    from .models import get_adapter

    adapter = get_adapter(model)
    widths = []
    for i, layer in enumerate(adapter.layers):
        geom = adapter.geometry(layer)
        hd = geom.head_dim
        q_rows = adapter.attn_out(layer).in_features
        kv_rows = None if adapter.fused_qkv else {lin.out_features for lin in adapter.attn_in(layer)[1:]}
        if q_rows % hd or (kv_rows is not None and (len(kv_rows) != 1 or kv_rows.pop() % hd)):
            raise ValueError(f"layer {i}: projection widths are not whole heads of head_dim {hd}")
        if not geom.num_kv_heads or geom.num_heads % geom.num_kv_heads:
            raise ValueError(f"layer {i}: {geom.num_heads} query heads cannot be split evenly over "
                             f"{geom.num_kv_heads} KV heads")
        widths.append({"num_attention_heads": geom.num_heads, "num_key_value_heads": geom.num_kv_heads,
                       "intermediate_size": adapter.mlp_out(layer).in_features})
    return widths


def is_uniform(model: nn.Module) -> bool:
    """True when every decoder layer has the same widths (a stock config can describe it)."""
    return len({tuple(w.values()) for w in layer_widths(model)}) <= 1


#: output projections the rcpu config can give a bias where the stock config cannot
OUTPUT_BIAS_KEYS = {"self_attn.o_proj": "o_proj_bias", "mlp.down_proj": "down_proj_bias"}


def _stock_biases(model: nn.Module) -> dict[str, bool]:
    """Which projections of a decoder layer built from ``model.config`` by the stock class have a bias."""
    with torch.device("meta"):
        ref = type(model.model.layers[0])(model.config, 0)
    return {name: ref.get_submodule(name).bias is not None for name in _projections(model)}


def extra_output_biases(model: nn.Module, stock: dict[str, bool] | None = None) -> dict[str, bool]:
    """``o_proj_bias`` / ``down_proj_bias`` for the rcpu config: True where some layer's
    o_proj / down_proj has a bias that the stock layer built from the config lacks
    (bias compensation on Mistral or Qwen2, whose configs have no switch for it)."""
    stock = stock or _stock_biases(model)
    return {key: not stock[name] and any(layer.get_submodule(name).bias is not None for layer in model.model.layers)
            for name, key in OUTPUT_BIAS_KEYS.items()}


def _check_bias_layout(model: nn.Module, stock: dict[str, bool], extra: dict[str, bool]) -> None:
    """The loaded model gets the biases the stock layer builds from the config (plus the
    ``extra`` output biases); refuse to write a checkpoint whose weights would not match
    them (dropped or random biases)."""
    layers = model.model.layers
    expected = dict(stock)
    for name, key in OUTPUT_BIAS_KEYS.items():
        expected[name] = expected[name] or extra.get(key, False)
    for i, layer in enumerate(layers):
        for name, want in expected.items():
            if (layer.get_submodule(name).bias is not None) != want:
                raise ValueError(
                    f"layer {i} {name} {'lacks' if want else 'has'} a bias, but the config "
                    f"({model.config.model_type}, attention_bias={getattr(model.config, 'attention_bias', None)}, "
                    f"mlp_bias={getattr(model.config, 'mlp_bias', None)}) builds "
                    f"{'one' if want else 'none'}; set the config's bias switches and give every layer "
                    "the matching (zero) biases before saving")


def prepare_nonuniform_save(model: nn.Module, save_dir: str | Path) -> None:
    """Turn ``save_dir`` (already written by ``model.save_pretrained``) into a checkpoint
    with per-layer widths: rewrite ``config.json`` into the rcpu config and copy the
    modeling file. All other config keys are kept as saved."""
    save_dir = Path(save_dir)
    base = _base_model_type(model)
    config_path = save_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found; call model.save_pretrained({str(save_dir)!r}) first")
    widths = layer_widths(model)
    head_dim = _head_dim(model)
    stock = _stock_biases(model)
    extra = extra_output_biases(model, stock)
    _check_bias_layout(model, stock, extra)

    cfg = json.loads(config_path.read_text())
    if cfg.get("num_hidden_layers") != len(widths):
        raise ValueError(f"{config_path} has num_hidden_layers={cfg.get('num_hidden_layers')}, "
                         f"the model has {len(widths)} layers")
    config_cls, model_cls = REMOTE_CLASSES[base]
    cfg.update({
        "model_type": f"rcpu_{base}",
        "architectures": [model_cls],
        "auto_map": {"AutoConfig": f"modeling_rcpu.{config_cls}",
                     "AutoModelForCausalLM": f"modeling_rcpu.{model_cls}"},
        "head_dim": head_dim,
        "layer_num_attention_heads": [w["num_attention_heads"] for w in widths],
        "layer_num_key_value_heads": [w["num_key_value_heads"] for w in widths],
        "layer_intermediate_size": [w["intermediate_size"] for w in widths],
        **{key: True for key, on in extra.items() if on},
    })
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(MODELING_FILE, save_dir / MODELING_FILE.name)


#: base model_type -> the stock transformers class a uniform checkpoint names
STOCK_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM", "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM",
                 "olmo2": "Olmo2ForCausalLM", "smollm3": "SmolLM3ForCausalLM"}


def prepare_uniform_save(model: nn.Module, save_dir: str | Path) -> None:
    """Turn a checkpoint saved from an ``rcpu_*`` model whose layers are now all equal (pruned
    again to uniform widths) back into a stock one: base model type, stock class, no per-layer
    lists, no modeling file. A no-op for stock models."""
    save_dir = Path(save_dir)
    config_path = save_dir / "config.json"
    cfg = json.loads(config_path.read_text())
    if not str(cfg.get("model_type", "")).startswith("rcpu_"):
        return
    base = _base_model_type(model)
    cfg["model_type"] = base
    cfg["architectures"] = [STOCK_CLASSES[base]]
    if any(extra_output_biases(model).values()):
        raise ValueError("o_proj / down_proj biases that the stock config cannot switch on need the rcpu config")
    for key in ("auto_map", "layer_num_attention_heads", "layer_num_key_value_heads", "layer_intermediate_size",
                *OUTPUT_BIAS_KEYS.values()):
        cfg.pop(key, None)
    config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (save_dir / MODELING_FILE.name).unlink(missing_ok=True)
