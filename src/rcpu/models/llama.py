"""Adapters for the Llama family layout (Llama, Mistral, Qwen2).

They share module names; they differ in which biases exist and which the config
can switch on. Qwen2 has q/k/v biases (sliced with their rows, handled by the base)
and no switch for o_proj/down_proj biases; Mistral has no bias switches at all. Their
output biases (bias compensation) are saved with the rcpu config (``o_proj_bias`` /
``down_proj_bias``, see :mod:`rcpu.nonuniform`).
"""

from __future__ import annotations

from .base import DecoderAdapter


class LlamaAdapter(DecoderAdapter):
    name = "llama"
    model_types = ("llama", "rcpu_llama")  # rcpu_*: checkpoints with per-layer widths
    output_bias_switches = True  # config.attention_bias / config.mlp_bias
    # Llama 3.x (rope_type "llama3", 128k vocabularies, tied or untied heads) is this adapter too


class MistralAdapter(DecoderAdapter):
    name = "mistral"
    model_types = ("mistral", "rcpu_mistral")


class Qwen2Adapter(DecoderAdapter):
    name = "qwen2"
    model_types = ("qwen2", "rcpu_qwen2")
    gguf_arch = "qwen2"
