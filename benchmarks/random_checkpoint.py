"""Write a randomly initialised checkpoint with the shapes of a real 7B/8B/13B model.

The weights are generated and written one decoder layer at a time (one safetensors shard
per layer plus an index), so a checkpoint larger than RAM can be made on a small machine.
The tokenizer is the built-in SmolLM2 one unless ``--tokenizer`` names another (the vocabulary
is set to match), so the checkpoint runs with rcpu's built-in calibration and evaluation text.

    python benchmarks/random_checkpoint.py --shape mistral-7b --layers 12 --dtype bfloat16 --out /tmp/m7b
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger("random_checkpoint")

#: name -> (model_type, config overrides); widths of the published models
SHAPES: dict[str, tuple[str, dict]] = {
    "llama-7b": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32,
                               intermediate_size=11008, rms_norm_eps=1e-6)),
    "llama2-13b": ("llama", dict(hidden_size=5120, num_attention_heads=40, num_key_value_heads=40,
                                 intermediate_size=13824, rms_norm_eps=1e-5)),
    "llama3-8b": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                intermediate_size=14336, rms_norm_eps=1e-5,
                                rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 8192})),
    # Mistral-7B's widths written as a Llama checkpoint (the case transformers' LlamaConfig validates)
    "mistral-7b-as-llama": ("llama", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                          intermediate_size=14336, rms_norm_eps=1e-5)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                                   intermediate_size=14336, rms_norm_eps=1e-5, sliding_window=None)),
    "qwen2-7b": ("qwen2", dict(hidden_size=3584, num_attention_heads=28, num_key_value_heads=4,
                               intermediate_size=18944, rms_norm_eps=1e-6, use_sliding_window=False,
                               tie_word_embeddings=False)),
}


def make_config(shape: str, layers: int, vocab_size: int):
    model_type, overrides = SHAPES[shape]
    return AutoConfig.for_model(model_type, num_hidden_layers=layers, vocab_size=vocab_size,
                                max_position_embeddings=4096, **overrides)


def _init(name: str, shape: torch.Size, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    if name.endswith("norm.weight"):
        return torch.ones(shape, dtype=dtype)
    t = torch.empty(shape, dtype=torch.float32)
    t.normal_(0.0, 0.02, generator=gen)
    return t.to(dtype)


def write_checkpoint(config, out: Path, dtype: torch.dtype, tokenizer, seed: int = 0) -> Path:
    """Generate and write the weights shard by shard (at most one decoder layer in memory)."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    groups: dict[str, dict[str, torch.Size]] = {}
    for name, p in model.named_parameters():  # tied weights appear once
        parts = name.split(".")
        key = f"layer{int(parts[2]):03d}" if parts[:2] == ["model", "layers"] else "other"
        groups.setdefault(key, {})[name] = p.shape
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    names = sorted(groups)
    for i, key in enumerate(names):
        shard = f"model-{i + 1:05d}-of-{len(names):05d}.safetensors"
        tensors = {n: _init(n, s, dtype, gen) for n, s in groups[key].items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(tmp / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
        logger.info("wrote %s (%d/%d)", shard, i + 1, len(names))
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.dtype = dtype
    config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out.exists():
        shutil.rmtree(out)
    os.rename(tmp, out)
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", default=None,
                    help="directory holding the tokenizer to ship (default: the built-in SmolLM2's)")
    args = ap.parse_args()
    if args.tokenizer is None:
        from rcpu.loading import resolve_model_dir

        args.tokenizer = resolve_model_dir("smollm2-135m")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    config = make_config(args.shape, args.layers, len(tokenizer))
    out = write_checkpoint(config, Path(args.out), getattr(torch, args.dtype), tokenizer, args.seed)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
