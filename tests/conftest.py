"""Tiny random models built in the tests (milliseconds, no downloads)."""

from __future__ import annotations

import os
import shutil

import pytest
import torch
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 128


def make_model(family: str = "llama", *, heads: int = 8, kv_heads: int = 2, hidden: int = 64, head_dim: int = 8,
               intermediate: int = 96, layers: int = 2, seed: int = 0, **extra) -> torch.nn.Module:
    torch.manual_seed(seed)
    common = dict(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim, vocab_size=VOCAB,
                  max_position_embeddings=256, **extra)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(sliding_window=None, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(tie_word_embeddings=False, use_sliding_window=False, **common))
        with torch.no_grad():  # random init leaves biases at zero; make them matter
            for layer in model.model.layers:
                for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    lin.bias.normal_(0, 0.5)
    else:
        raise ValueError(family)
    return model.eval()


def make_windows(n: int = 24, seqlen: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, seqlen), generator=g)


@pytest.fixture(params=["llama", "mistral", "qwen2"])
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
