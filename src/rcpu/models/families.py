"""Adapters for the families beyond Llama's exact layout: each is the module names, fused
projections and norms of one family, nothing else (the base class does the work).

- Qwen3: q_norm / k_norm over one head's dimensions (shared by all heads, nothing to cut).
- Gemma 3 (text): sandwich norms (a norm on each sublayer's output before the residual add,
  and a separate pre-MLP norm), GELU-tanh MLP, per-head q_norm / k_norm, the embedding
  scaled by sqrt(hidden) inside its module, sliding-window and global layers.
- Phi-3 / Phi-4-mini: one fused [q; k; v] matrix and one fused [gate; up] matrix, cut
  consistently; its attention reads the head count from the config at run time.
- OLMo 2: post-norms only, and q_norm / k_norm over the whole projection (all heads): their
  weights are cut with the kept rows and their RMS is then taken over the kept heads only.
- SmolLM3: Llama's layout; some layers use no RoPE (``no_rope_layers``), read by the
  stock attention from the config, so pruning needs nothing extra.

Bias switches: only Llama and SmolLM3 configs switch on both attention and MLP biases; the
others save compensation biases on o_proj / down_proj with the rcpu config.
"""

from __future__ import annotations

from .base import DecoderAdapter


class Qwen3Adapter(DecoderAdapter):
    name = "qwen3"
    model_types = ("qwen3", "rcpu_qwen3")
    gguf_arch = "qwen3"
    head_norm_names = ("q_norm", "k_norm")


class Gemma3TextAdapter(DecoderAdapter):
    name = "gemma3_text"
    model_types = ("gemma3_text", "rcpu_gemma3_text")
    gguf_arch = "gemma3"
    mlp_norm_name = "pre_feedforward_layernorm"
    post_norm_names = ("post_attention_layernorm", "post_feedforward_layernorm")
    head_norm_names = ("q_norm", "k_norm")
    embed_scale_from_hidden = True
    norm_weight_offset = 1.0


class Phi3Adapter(DecoderAdapter):
    name = "phi3"
    model_types = ("phi3", "rcpu_phi3")
    gguf_arch = "phi3"
    qkv_names = ("qkv_proj",)
    gate_up_names = ("gate_up_proj",)
    attention_reads_config = True


class Olmo2Adapter(DecoderAdapter):
    name = "olmo2"
    model_types = ("olmo2", "rcpu_olmo2")
    gguf_arch = "olmo2"
    attn_norm_name = None
    mlp_norm_name = None
    post_norm_names = ("post_attention_layernorm", "post_feedforward_layernorm")
    projection_norm_names = {"q_norm": "q", "k_norm": "kv"}


class SmolLM3Adapter(DecoderAdapter):
    name = "smollm3"
    model_types = ("smollm3", "rcpu_smollm3")
    gguf_arch = "smollm3"
    output_bias_switches = True  # config.attention_bias / config.mlp_bias
