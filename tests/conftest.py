"""Tiny random models built in the tests (milliseconds, no downloads)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    SmolLM3Config,
    SmolLM3ForCausalLM,
)

VOCAB = 128

# Llama 3's RoPE scaling, with the original context shrunk to the tests' 256 positions
LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 128}

#: The family test table: name -> (config class, model class, config keys beyond the widths).
#: One row per supported family; the ``family`` fixture runs a test on every row.
FAMILIES: dict[str, tuple[type, type, dict]] = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "llama3": (LlamaConfig, LlamaForCausalLM, {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {"sliding_window": None}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False, "use_sliding_window": False}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {"tie_word_embeddings": False}),
    # sliding window 8 over the tests' 32-token windows, so local and global layers differ
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, {"sliding_window": 8, "layer_types":
                                                      ["sliding_attention", "full_attention"],
                                                      "query_pre_attn_scalar": 16, "hidden_activation":
                                                      "gelu_pytorch_tanh"}),
    "phi3": (Phi3Config, Phi3ForCausalLM, {"tie_word_embeddings": False, "partial_rotary_factor": 0.75}),
    "olmo2": (Olmo2Config, Olmo2ForCausalLM, {"tie_word_embeddings": False}),
    # layer 0 uses no RoPE, layer 1 does
    "smollm3": (SmolLM3Config, SmolLM3ForCausalLM, {"no_rope_layers": [0, 1], "tie_word_embeddings": True}),
}


def make_model(family: str = "llama", *, heads: int = 8, kv_heads: int = 2, hidden: int = 64, head_dim: int = 8,
               intermediate: int = 96, layers: int = 2, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=VOCAB,
                  max_position_embeddings=256, **extra)
    if family not in FAMILIES:
        raise ValueError(family)
    config_cls, model_cls, keys = FAMILIES[family]
    ids = {} if family in ("llama", "mistral", "qwen2") else {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    # per-layer lists of the table (two entries) repeat over the layers; the configs check their length
    keys = {k: [v[i % len(v)] for i in range(layers)] if k in ("layer_types", "no_rope_layers") else v
            for k, v in keys.items()}
    config = config_cls(**{**ids, **keys, **common})
    model = model_cls(config)
    if family == "qwen2":
        with torch.no_grad():  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    if family not in ("llama", "mistral", "qwen2"):  # (those three keep the models older tests were tuned on)
        with torch.no_grad():  # norms start at one (zero for Gemma's 1 + w); make per-channel weights matter
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.normal_(1.0 if family != "gemma3" else 0.0, 0.2)
    return model.eval()


def make_windows(n: int = 24, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


def same_threads_env(threads: int | None = None, **extra: str) -> dict[str, str]:
    """The environment for a subprocess whose tensors are compared bit for bit with another
    process's: the same torch thread count (this process's unless ``threads`` is given), since
    BLAS kernels split their sums differently over another number of threads."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads or torch.get_num_threads()), **extra}


WORDS = [f"w{i}" for i in range(VOCAB - 3)]


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_text(n_words: int = 6000, seed: int = 0) -> str:
    """Synthetic text with some structure (a random walk over the vocabulary)."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.randint(-3, 4, (n_words,), generator=g).cumsum(0) % len(WORDS)
    words = [WORDS[int(i)] for i in steps]
    return "\n\n".join(" ".join(words[i:i + 50]) for i in range(0, n_words, 50))


@pytest.fixture
def scratch_dir(tmp_path):
    """A folder under ``tmp_path`` for large files (saved checkpoints at real widths), deleted when
    the test ends, passed or failed: pytest keeps the temp folders of the last three runs."""
    path = tmp_path / "scratch"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A tiny GQA Llama checkpoint with a tokenizer, plus a calibration/eval text file."""
    root = tmp_path_factory.mktemp("tiny")
    model = make_model("llama", layers=2)
    model.save_pretrained(root / "model")
    make_tokenizer().save_pretrained(root / "model")
    (root / "text.txt").write_text(make_text())
    return root
