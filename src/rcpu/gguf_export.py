"""Write a (pruned) model as a GGUF file for llama.cpp, Ollama and LM Studio.

The file is built with the ``gguf`` package (its writer, tensor-name map, quantisers and
vocabulary helpers); nothing here writes the binary format by hand. What pruning changes,
and how it is expressed in llama.cpp's metadata:

- fewer heads: ``{arch}.attention.head_count`` / ``head_count_kv`` are the pruned counts and
  ``attention.key_length`` / ``value_length`` are written explicitly, because after pruning
  ``embedding_length / head_count`` is no longer the head size;
- a narrower MLP: ``{arch}.feed_forward_length``;
- different widths per layer (global allocation): the three keys become per-layer arrays,
  llama.cpp's convention for models whose layers differ. llama.cpp (and so Ollama and
  LM Studio, which embed it) reads them; transformers' GGUF reader does not.

With the 4- and 5-bit types the embedding / output matrix is stored as q8_0, as llama.cpp's own
quantiser keeps it above the file's type. Quantised types (q8_0, q4_0, q4_1, q5_0, q5_1) store blocks
of 32 values along a row. A
pruned MLP width that is not a multiple of 32 (e.g. 1126 channels, so ``down_proj`` rows of 1126
values) is padded with zero channels up to the next multiple (``pad_to``): zero rows in
``gate``/``up`` and zero columns in ``down`` add exactly nothing to the output (SiLU(0) * 0 = 0),
so the file computes the same function and every weight matrix takes the requested type. Any
other row length that does not fit falls back to f16, and every padding and fallback is reported
(logged and returned). Prune with ``--round_to 32`` to need no padding at all.

Llama-architecture files (llama, mistral) store q/k rows in llama.cpp's interleaved RoPE
order; this is the permutation llama.cpp's own converter applies, done per layer with the
pruned head counts. Qwen2 files are not permuted.

The write is atomic: a temporary sibling is written, read back and checked, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from torch import nn

from .errors import RcpuError

logger = logging.getLogger(__name__)

__all__ = ["GGUF_QUANTS", "GGUFExportReport", "export_gguf", "llama_cpp_names", "match_tensor_types",
           "parse_tensor_types", "source_gguf_for", "load_provenance"]

_Q = gguf.GGMLQuantizationType
_F = gguf.LlamaFileType

#: --quant name -> (tensor type for 2-D weights, file type recorded in general.file_type)
GGUF_QUANTS: dict[str, tuple[gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "f32": (_Q.F32, _F.ALL_F32),
    "f16": (_Q.F16, _F.MOSTLY_F16),
    "bf16": (_Q.BF16, _F.MOSTLY_BF16),
    "q8_0": (_Q.Q8_0, _F.MOSTLY_Q8_0),
    "q4_0": (_Q.Q4_0, _F.MOSTLY_Q4_0),
    "q4_1": (_Q.Q4_1, _F.MOSTLY_Q4_1),
    "q5_0": (_Q.Q5_0, _F.MOSTLY_Q5_0),
    "q5_1": (_Q.Q5_1, _F.MOSTLY_Q5_1),
}

#: HF model_type (without an ``rcpu_`` prefix) -> (llama.cpp architecture, permute q/k rows).
#: Mistral is written as llama, as llama.cpp's converter does for these checkpoints.
_ARCHS: dict[str, tuple[gguf.MODEL_ARCH, bool]] = {
    "llama": (gguf.MODEL_ARCH.LLAMA, True),
    "mistral": (gguf.MODEL_ARCH.LLAMA, True),
    "qwen2": (gguf.MODEL_ARCH.QWEN2, False),
}

#: tokenizer.json pre-tokenizer patterns -> llama.cpp's ``tokenizer.ggml.pre`` name.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass
class GGUFExportReport:
    """What was written: the file, its types, and every tensor that could not take the requested type."""

    path: str
    quant: str
    arch: str
    tensors: int
    bytes: int
    tokenizer: str  #: where the vocabulary came from
    uniform: bool
    fallbacks: list[dict] = field(default_factory=list)  #: {"tensor", "shape", "type", "reason"}
    padded: list[dict] = field(default_factory=list)  #: {"layer", "from", "to"}: MLP widths padded with zeros
    overrides: list[dict] = field(default_factory=list)  #: {"tensor", "type", "pattern"}: set by ``tensor_types``

    def to_dict(self) -> dict:
        return dict(vars(self))

    def summary_lines(self) -> list[str]:
        lines = [f"wrote {self.path} ({self.arch}, {self.quant}, {self.tensors} tensors, "
                 f"{self.bytes / 1e6:.1f} MB; tokenizer {self.tokenizer})"]
        if self.fallbacks:
            lines.append(f"{len(self.fallbacks)} tensors stored as f16 instead of {self.quant} "
                         f"(row length not a multiple of 32, the {self.quant} block size; prune with --round_to 32 "
                         f"to avoid): "
                         + ", ".join(f"{f['tensor']} {f['shape']}" for f in self.fallbacks))
        if self.padded:
            lines.append(f"MLP widths of {len(self.padded)} layers padded with zero channels to whole "
                         f"{self.quant} blocks (same function): "
                         + ", ".join(f"layer {p['layer']} {p['from']} -> {p['to']}" for p in self.padded[:4])
                         + (", ..." if len(self.padded) > 4 else ""))
        if self.overrides:
            lines.append(f"{len(self.overrides)} weight matrices stored by --tensor_type: "
                         + ", ".join(f"{o['tensor']} {o['type']}" for o in self.overrides[:6])
                         + (", ..." if len(self.overrides) > 6 else ""))
        if not self.uniform:
            lines.append("per-layer widths are written as per-layer arrays: llama.cpp (and Ollama, LM Studio) "
                         "load this file, transformers' GGUF reader does not")
        return lines


# ----------------------------------------------------------------------------------- provenance


def load_provenance(model_dir: str | os.PathLike | None) -> dict | None:
    """The ``rcpu_provenance.json`` of a checkpoint rcpu wrote, or None."""
    if model_dir is None:
        return None
    path = Path(model_dir) / "rcpu_provenance.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        logger.warning("ignoring unreadable %s", path)
        return None


def source_gguf_for(source: str | None) -> Path | None:
    """The GGUF file a model originally came from (a built-in name or a .gguf path), if any.

    Its tokenizer metadata is copied as is, which keeps llama.cpp's pre-tokenizer and token types
    exactly as the original publisher wrote them.
    """
    if not source:
        return None
    from .loading import BUILTIN_MODELS

    key = source.strip().lower()
    if key in BUILTIN_MODELS:
        from .assets import wheel_member

        package, version, member = BUILTIN_MODELS[key]
        return Path(wheel_member(package, version, member))
    path = Path(os.path.expanduser(source))
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    return None


# --------------------------------------------------------------------------------------- tensors


def permute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k rows (or bias entries) of each head from HF's rotate-half layout to llama.cpp's
    interleaved RoPE layout: within a head, row ``i`` of the first half and row ``i`` of the
    second half become neighbours."""
    head_dim = weight.shape[0] // n_heads
    if head_dim * n_heads != weight.shape[0] or head_dim % 2:
        raise ValueError(f"{weight.shape[0]} rows are not {n_heads} heads of an even size")
    w = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])
    return w.swapaxes(1, 2).reshape(weight.shape)


def _layer_widths(model: nn.Module) -> list[dict]:
    from .nonuniform import layer_widths

    try:
        return layer_widths(model)
    except ValueError as exc:
        raise RcpuError(f"cannot export this model to GGUF: {exc}") from exc


def _rope_theta(config) -> float:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return float(theta if theta is not None else 10000.0)


def _rope_scaling(config) -> dict | None:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if not isinstance(params, dict):
        return None
    kind = params.get("rope_type", params.get("type", "default"))
    return None if kind in (None, "default") else params


def _pad_mlp(name: str, data: np.ndarray, widths: list[dict]) -> np.ndarray:
    """Zero channels up to the layout's (padded) MLP width: rows of gate/up, columns of down."""
    down = ".ffn_down." in name
    if not (down or ".ffn_gate." in name or ".ffn_up." in name) or (down and data.ndim == 1):
        return data  # a down_proj bias lives in the hidden dimension
    width = widths[int(name.split(".")[1])]["intermediate_size"]
    axis = 1 if down else 0
    extra = width - data.shape[axis]
    if extra <= 0:
        return data
    pad = [(0, 0)] * data.ndim
    pad[axis] = (0, extra)
    return np.pad(data, pad)


def _gguf_name(names: gguf.TensorNameMap, hf_name: str) -> str:
    new_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if new_name is None:
        raise RcpuError(f"cannot export tensor {hf_name!r} to GGUF: llama.cpp has no name for it")
    return new_name


def llama_cpp_names(hf_names: Sequence[str], n_layers: int, arch: gguf.MODEL_ARCH = gguf.MODEL_ARCH.LLAMA) -> list[str]:
    """The names the export gives these HF tensors (``model.layers.11.mlp.down_proj.weight`` ->
    ``blk.11.ffn_down.weight``); the ``blk.*`` names are the same in every graph rcpu writes."""
    names = gguf.get_tensor_name_map(arch, n_layers)
    return [_gguf_name(names, n) for n in hf_names]


def parse_tensor_types(specs: Sequence[str], flag: str = "--tensor_type",
                       types: Sequence[str] | None = None) -> list[tuple[str, str]]:
    """``PATTERN=TYPE`` strings, llama-quantize's ``--tensor-type`` syntax, as (regex, type) pairs.

    The pattern is a regular expression searched in llama.cpp's tensor names (``blk.29.ffn_down.weight``,
    ``output.weight``); the first pair whose pattern matches a weight matrix gives its type.
    ``flag`` names the option in error messages; ``types`` restricts the types (default: all of GGUF_QUANTS)."""
    allowed = list(GGUF_QUANTS if types is None else types)
    pairs = []
    for spec in specs:
        pattern, sep, quant = spec.rpartition("=")
        if not sep or not pattern:
            raise RcpuError(f"{flag} {spec!r} is not PATTERN=TYPE (for example 'blk\\.29\\.ffn_down=q8_0')")
        quant = quant.strip().lower()
        if quant not in allowed:
            raise RcpuError(f"{flag} {spec!r}: unknown GGUF type {quant!r}; choose from {', '.join(allowed)}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise RcpuError(f"{flag} {spec!r}: {pattern!r} is not a regular expression ({exc})") from exc
        pairs.append((pattern, quant))
    return pairs


def _matrix_types(model: nn.Module, layout: _Layout, tensor_types: Sequence[tuple[str, str]]) -> dict[str, dict]:
    """GGUF name -> {"type", "pattern"} for every weight matrix a ``tensor_types`` pattern selects.

    Computed from the names alone, before anything is converted, so that a pattern which selects
    nothing (a typo, HF names instead of llama.cpp's) fails at once."""
    if not tensor_types:
        return {}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    matrices = [n for n, t in model.state_dict().items() if t.ndim >= 2 and not (n == "lm_head.weight" and tied)]
    return match_tensor_types(llama_cpp_names(matrices, len(layout.widths), layout.arch), tensor_types)


def match_tensor_types(names: Sequence[str], tensor_types: Sequence[tuple[str, str]],
                       flag: str = "--tensor_type") -> dict[str, dict]:
    """llama.cpp name -> {"tensor", "type", "pattern"} for the ``names`` a pattern selects (the first
    matching pair wins). A pattern that selects none of ``names`` is an error: a typo, or HF names
    given instead of llama.cpp's, would otherwise silently change nothing."""
    chosen, used = {}, set()
    for name in names:
        for pattern, quant in tensor_types:
            if re.search(pattern, name):
                chosen[name] = {"tensor": name, "type": quant, "pattern": pattern}
                used.add(pattern)
                break
    unused = [p for p, _ in tensor_types if p not in used]
    if unused:
        raise RcpuError(f"{flag} pattern {unused[0]!r} selects no weight matrix; patterns are searched in "
                        f"llama.cpp's names, e.g. {', '.join(list(names)[:3])}")
    return chosen


def _tensor_plan(model: nn.Module, arch: gguf.MODEL_ARCH, permute: bool, widths: list[dict],
                 zero_o_bias: bool = False):
    """Yield (gguf name, float32 array) for every tensor, in llama.cpp's naming, MLPs padded to ``widths``."""
    n_layers = len(widths)
    names = gguf.get_tensor_name_map(arch, n_layers)
    state = model.state_dict()
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for hf_name, tensor in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when output.weight is absent
        new_name = _gguf_name(names, hf_name)
        data = tensor.detach().to("cpu", torch.float32).numpy()
        if permute and (".attn_q." in new_name or ".attn_k." in new_name):
            layer = int(new_name.split(".")[1])
            key = "num_attention_heads" if ".attn_q." in new_name else "num_key_value_heads"
            data = permute_qk(data, widths[layer][key])
        yield new_name, _pad_mlp(new_name, data, widths)
        if zero_o_bias and new_name.endswith(".attn_output.weight"):
            # the q/k/v biases need attention_bias in a llama config, which also builds an o_proj bias
            yield new_name.replace(".weight", ".bias"), np.zeros(data.shape[0], dtype=np.float32)


def _quantise(name: str, data: np.ndarray, qtype: gguf.GGMLQuantizationType, fallbacks: list[dict],
              explicit: bool = False):
    """(array to write, its type). 1-D tensors (norms, biases) stay f32 as llama.cpp expects.
    ``explicit``: the type was asked for by name (``tensor_types``), so no default rule changes it."""
    if data.ndim <= 1 or qtype == _Q.F32:
        return data.astype(np.float32), _Q.F32
    if not explicit and qtype in _LOW_BIT_TYPES and name in ("token_embd.weight", "output.weight"):
        # llama.cpp's quantiser keeps the output matrix (and a tied embedding) above 4/5 bits: the
        # logits are the most sensitive product. q8_0 is the highest block type the gguf package writes.
        qtype = _Q.Q8_0
    if qtype in (_Q.F16, _Q.BF16):
        if qtype == _Q.F16:
            return data.astype(np.float16), _Q.F16
        return gguf.quants.quantize(data, qtype), qtype
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    if data.shape[-1] % block:
        fallbacks.append({"tensor": name, "shape": list(data.shape), "type": "f16",
                          "reason": f"row length {data.shape[-1]} is not a multiple of {block}"})
        return data.astype(np.float16), _Q.F16
    return gguf.quants.quantize(data, qtype), qtype


# ------------------------------------------------------------------------------------- tokenizer


def _copy_tokenizer(writer: gguf.GGUFWriter, source: Path, n_vocab: int) -> None:
    """Copy every ``tokenizer.*`` key of ``source`` unchanged."""
    reader = gguf.GGUFReader(source)
    copied = 0
    for key, fld in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = fld.types[0]
        sub = fld.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        value = fld.contents()
        if key == "tokenizer.ggml.tokens" and len(value) != n_vocab:
            raise RcpuError(f"the tokenizer of {source} has {len(value)} tokens, the model's embedding "
                            f"{n_vocab} rows; pass the GGUF the model was made from (or none)")
        writer.add_key_value(key, value, vtype, sub_type=sub)
        copied += 1
    if not copied:
        raise RcpuError(f"{source} has no tokenizer metadata to copy")


def _pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the pre-tokenizer of a byte-level BPE tokenizer.json, when known."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    splits = [(p.get("pattern") or {}).get("Regex") for p in parts if p.get("type") == "Split"]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if splits == [_LLAMA3_SPLIT]:
        return "llama-bpe"
    if splits == [_QWEN2_SPLIT]:
        return "qwen2"
    return None


def _build_tokenizer(writer: gguf.GGUFWriter, tokenizer, n_vocab: int) -> str:
    """Vocabulary from an HF tokenizer through the gguf package's helpers; returns a description."""
    if tokenizer is None:
        raise RcpuError("the model has no tokenizer to export; save one next to the weights")
    with tempfile.TemporaryDirectory(prefix="rcpu-tok-") as tmp:
        try:
            tokenizer.save_pretrained(tmp)
        except Exception as exc:  # noqa: BLE001 - any failure means we cannot read its files
            raise RcpuError(f"cannot save the tokenizer to read its vocabulary ({exc})") from exc
        tmp_path = Path(tmp)
        tj_path = tmp_path / "tokenizer.json"
        tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
        kind = (tj.get("model") or {}).get("type")
        byte_fallback = bool((tj.get("model") or {}).get("byte_fallback"))
        try:
            if kind == "BPE" and byte_fallback:
                vocab: Any = gguf.vocab.LlamaHfVocab(tmp_path)
                pre = None
            elif kind == "BPE":
                vocab = gguf.vocab.BpeVocab(tmp_path)
                pre = _pre_tokenizer(tj)
            else:
                raise RcpuError(
                    f"cannot express this tokenizer in GGUF ({kind or 'no tokenizer.json'}; supported: byte-level "
                    f"BPE and Llama-style BPE with byte fallback); export from the original .gguf file instead")
        except (FileNotFoundError, ValueError, KeyError) as exc:
            raise RcpuError(f"cannot express this tokenizer in GGUF ({exc})") from exc
        tokens, scores, types = [], [], []
        for text, score, toktype in vocab.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(toktype)
        for item in tj.get("added_tokens") or []:  # special tokens are control tokens to llama.cpp
            idx = item.get("id")
            if isinstance(idx, int) and 0 <= idx < len(types):
                types[idx] = gguf.TokenType.CONTROL if item.get("special") else gguf.TokenType.USER_DEFINED
        if len(tokens) < n_vocab:  # embedding rows beyond the vocabulary (padding), as llama.cpp's converter does
            for i in range(len(tokens), n_vocab):
                tokens.append(f"[PAD{i}]".encode())
                scores.append(-1000.0)
                types.append(gguf.TokenType.UNUSED)
        elif len(tokens) > n_vocab:
            raise RcpuError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
        writer.add_tokenizer_model(vocab.tokenizer_model)
        if vocab.tokenizer_model == "gpt2":
            if pre is None:
                logger.warning("unknown pre-tokenizer; llama.cpp will use its default, which may split text "
                               "differently from the original tokenizer")
            writer.add_tokenizer_pre(pre or "default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tmp_path, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=n_vocab)
        special.add_to_gguf(writer, quiet=True)
    return f"{vocab.tokenizer_model} vocabulary from the HF tokenizer" + (f" (pre {pre})" if pre else "")


# ---------------------------------------------------------------------------------------- export


def _check_target(path: Path, overwrite: bool) -> None:
    if path.exists() and not overwrite:
        raise RcpuError(f"output file {path} already exists; choose another name or pass --overwrite")
    if path.exists() and not path.is_file():
        raise RcpuError(f"output path {path} exists and is not a file")
    if path.suffix.lower() != ".gguf":
        raise RcpuError(f"GGUF output {path} must end in .gguf")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RcpuError(f"cannot create {path.parent}: {exc.strerror}") from exc
    if not os.access(path.parent, os.W_OK):
        raise RcpuError(f"cannot write to {path.parent}")


def check_gguf_target(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail fast (before any pruning) on a target that cannot be written."""
    out = Path(path).expanduser().resolve()
    _check_target(out, overwrite)
    return out


def _verify(path: Path, expected: dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]]) -> None:
    """Read the written file back: every tensor present with its shape and type, nothing extra."""
    reader = gguf.GGUFReader(path)
    found = {t.name: (tuple(int(x) for x in reversed(t.shape.tolist())), t.tensor_type) for t in reader.tensors}
    if found != expected:
        missing = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found.get(k))
        raise RcpuError(f"the GGUF file did not read back as written ({missing[:3]}); nothing was saved")


@dataclass(frozen=True)
class _Layout:
    """The llama.cpp graph a model is written for, and what that graph needs beyond the HF weights."""

    model_type: str  #: HF model_type without an ``rcpu_`` prefix
    arch: gguf.MODEL_ARCH
    permute: bool  #: q/k rows go into llama.cpp's interleaved RoPE order
    widths: list[dict]  #: per layer: num_attention_heads, num_key_value_heads, intermediate_size (padded)
    head_dim: int
    uniform: bool  #: every layer has the same widths
    zero_o_bias: bool  #: write a zero o_proj bias (a qwen2 model written as llama)

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def per_layer(self, key: str) -> int | list[int]:
        """One value for a uniform model, llama.cpp's per-layer array otherwise."""
        return self.widths[0][key] if self.uniform else [w[key] for w in self.widths]


def _padded_widths(widths: list[dict], pad_to: int) -> tuple[list[dict], list[dict]]:
    """MLP widths rounded up to multiples of ``pad_to``, and the list of layers that changed."""
    out, padded = [], []
    for i, w in enumerate(widths):
        width = w["intermediate_size"]
        target = -(-width // pad_to) * pad_to
        if target != width:
            padded.append({"layer": i, "from": width, "to": target})
        out.append({**w, "intermediate_size": target})
    return out, padded


def _default_pad_to(*quants: str) -> int:
    """The block length (32) if any of ``quants`` is a block type, 1 (no padding) for float types only."""
    blocks = [gguf.GGML_QUANT_SIZES[GGUF_QUANTS[q][0]][0] for q in quants if GGUF_QUANTS[q][0] in _BLOCK_TYPES]
    return max(blocks, default=1)


def _layout(model: nn.Module, pad_to: int = 1) -> tuple[_Layout, list[dict]]:
    """Pick the llama.cpp graph that can run ``model`` as pruned, with MLP widths padded to ``pad_to``."""
    config = model.config
    model_type = str(getattr(config, "model_type", "")).removeprefix("rcpu_")
    if model_type not in _ARCHS:
        raise RcpuError(f"GGUF export supports {', '.join(_ARCHS)} models, not {config.model_type!r}")
    arch, permute = _ARCHS[model_type]
    widths, padded = _padded_widths(_layer_widths(model), pad_to)
    head_dim = model.model.layers[0].self_attn.head_dim
    hidden_size = int(config.hidden_size)
    layers = model.model.layers
    o_bias = any(layer.self_attn.o_proj.bias is not None for layer in layers)
    down_bias = any(layer.mlp.down_proj.bias is not None for layer in layers)
    if arch == gguf.MODEL_ARCH.QWEN2 and (o_bias or down_bias
                                          or any(w["num_attention_heads"] * head_dim != hidden_size for w in widths)):
        # llama.cpp's qwen2 graph sizes q/o as hidden x hidden, so pruned heads do not fit it, and it has
        # no o_proj / down_proj biases (bias compensation); its llama graph takes the same weights (with
        # q/k biases, optional output biases) once q/k rows are in llama's RoPE order.
        arch, permute = gguf.MODEL_ARCH.LLAMA, True
    uniform = len({tuple(w.values()) for w in widths}) <= 1
    if not uniform:
        # llama.cpp's llama and qwen2 graphs take one width for all layers; its "deci" graph (the llama
        # layout with per-layer head counts and MLP widths, made for Nemotron-NAS models) takes arrays.
        arch, permute = gguf.MODEL_ARCH.DECI, True
    zero_o_bias = model_type == "qwen2" and arch != gguf.MODEL_ARCH.QWEN2 and not o_bias
    return _Layout(model_type, arch, permute, widths, head_dim, uniform, zero_o_bias), padded


def _exportable_rope_scaling(config) -> dict | None:
    """The model's RoPE scaling, if any; only the kinds llama.cpp's metadata can express here pass."""
    scaling = _rope_scaling(config)
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) != "linear":
        raise RcpuError(f"RoPE scaling {scaling.get('rope_type', scaling.get('type'))!r} cannot be exported "
                        f"to GGUF by rcpu yet (supported: none, linear)")
    return scaling


def _add_provenance(writer: gguf.GGUFWriter, prov: dict) -> None:
    """``general.*`` keys that say how the model was pruned (and recovered), so the file tells its origin."""
    pconf, pparams, pmodel = prov.get("config") or {}, prov.get("params") or {}, prov.get("model") or {}
    source = pmodel.get("source")
    if pmodel.get("source_kind") == "local":  # the provenance's absolute path: only its name goes into the file
        source = Path(str(source)).name
    writer.add_description(
        f"pruned with rcpu (method {pconf.get('method')}, ratio {pconf.get('pruning_ratio')}) "
        f"from {source}")
    writer.add_string("general.rcpu.source", str(source))
    writer.add_string("general.rcpu.method", str(pconf.get("method")))
    writer.add_float32("general.rcpu.pruning_ratio", float(pconf.get("pruning_ratio") or 0.0))
    if pparams.get("ratio_attn_mlp") is not None:
        writer.add_float32("general.rcpu.achieved_ratio_attn_mlp", float(pparams["ratio_attn_mlp"]))
    for key in ("score", "compensation", "allocation"):
        if pconf.get(key) is not None:
            writer.add_string(f"general.rcpu.{key}", str(pconf[key]))
    recovery = (prov.get("recovery") or {}).get("config") or {}
    if recovery:  # distilled after pruning (rcpu recover)
        writer.add_uint64("general.rcpu.recovery_tokens", int(recovery.get("tokens") or 0))
        writer.add_string("general.rcpu.recovery_parameters", str(recovery.get("parameters")))


def _add_general(writer: gguf.GGUFWriter, name: str, provenance: dict | None, quant: str) -> None:
    """File-level metadata: type, name, provenance, rcpu's version and the file's quantisation."""
    qtype, ftype = GGUF_QUANTS[quant]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    if provenance:
        _add_provenance(writer, provenance)
    from importlib import metadata

    try:
        writer.add_string("general.rcpu.version", metadata.version("rcpu"))
    except metadata.PackageNotFoundError:
        pass
    writer.add_file_type(int(ftype))
    if qtype not in (_Q.F32, _Q.F16, _Q.BF16):
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _add_hparams(writer: gguf.GGUFWriter, config, layout: _Layout, n_vocab: int, hidden: int,
                 scaling: dict | None) -> None:
    """The architecture keys, with head sizes written explicitly since pruning breaks hidden / heads."""
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(layout.widths))
    writer.add_feed_forward_length(layout.per_layer("intermediate_size"))
    writer.add_head_count(layout.per_layer("num_attention_heads"))
    writer.add_head_count_kv(layout.per_layer("num_key_value_heads"))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    writer.add_rope_freq_base(_rope_theta(config))
    if scaling is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _add_tensors(writer: gguf.GGUFWriter, model: nn.Module, layout: _Layout, quant: str, fallbacks: list[dict],
                 overrides: dict[str, dict]) -> dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]]:
    """Queue every tensor in its stored type; returns name -> (shape, type), what the read-back expects."""
    expected: dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]] = {}
    for tname, data in _tensor_plan(model, layout.arch, layout.permute, layout.widths, layout.zero_o_bias):
        chosen = overrides.get(tname)
        qtype = GGUF_QUANTS[chosen["type"] if chosen else quant][0]
        stored, stype = _quantise(tname, data, qtype, fallbacks, explicit=chosen is not None)
        writer.add_tensor(tname, stored, raw_dtype=stype if stype in (_Q.BF16, *_BLOCK_TYPES) else None)
        expected[tname] = (tuple(data.shape), stype)
    return expected


def _write_file(writer: gguf.GGUFWriter) -> None:
    """Header, metadata, then the queued tensors: the order the gguf writer requires."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(
    model: nn.Module,
    tokenizer,
    path: str | os.PathLike,
    *,
    quant: str = "f16",
    tokenizer_gguf: str | os.PathLike | None = None,
    provenance: dict | None = None,
    name: str | None = None,
    overwrite: bool = False,
    pad_to: int | None = None,
    tensor_types: Sequence[str] = (),
) -> GGUFExportReport:
    """Write ``model`` (Llama, Mistral or Qwen2 layout, pruned or not) as a GGUF file at ``path``.

    ``tokenizer_gguf``: a GGUF file whose ``tokenizer.*`` metadata is copied unchanged (use the file
    the model came from); otherwise the vocabulary is built from ``tokenizer``. ``provenance`` is
    rcpu's report of the pruning run; its source, method and ratios go into ``general.*`` keys.
    ``pad_to``: MLP widths are padded with zero channels to a multiple of it (default: the block
    length of a block-quantised ``quant``, 32, so that ``down_proj`` quantises; 1 = never pad).
    ``tensor_types``: ``PATTERN=TYPE`` strings, like llama-quantize's ``--tensor-type``: a weight
    matrix whose llama.cpp name the pattern matches (first match wins) is stored in that type
    instead of ``quant``, e.g. ``blk\\.29\\.ffn_down=q8_0``.
    """
    if quant not in GGUF_QUANTS:
        raise RcpuError(f"unknown GGUF type {quant!r}; choose from {', '.join(GGUF_QUANTS)}")
    if pad_to is not None and pad_to < 1:
        raise RcpuError(f"pad_to is {pad_to}; use a positive channel multiple (1 = no padding)")
    pairs = parse_tensor_types(tensor_types)
    out = check_gguf_target(path, overwrite)
    layout, padded = _layout(model, _default_pad_to(quant, *(q for _, q in pairs)) if pad_to is None else pad_to)
    overrides = _matrix_types(model, layout, pairs)
    scaling = _exportable_rope_scaling(model.config)
    embed = model.get_input_embeddings().weight
    n_vocab, hidden = int(embed.shape[0]), int(embed.shape[1])

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, layout.name)
        _add_general(writer, name or out.stem, provenance, quant)
        _add_hparams(writer, model.config, layout, n_vocab, hidden, scaling)
        if tokenizer_gguf is not None:
            _copy_tokenizer(writer, Path(tokenizer_gguf), n_vocab)
            tok_desc = f"copied from {Path(tokenizer_gguf).name}"
        else:
            tok_desc = _build_tokenizer(writer, tokenizer, n_vocab)
        fallbacks: list[dict] = []
        expected = _add_tensors(writer, model, layout, quant, fallbacks, overrides)
        _write_file(writer)
        _verify(tmp, expected)
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    for fb in fallbacks:
        logger.warning("%s %s stored as f16: %s", fb["tensor"], fb["shape"], fb["reason"])
    if padded:
        logger.info("MLP widths padded with zero channels: %s",
                    ", ".join(f"layer {p['layer']} {p['from']} -> {p['to']}" for p in padded))
    report = GGUFExportReport(path=str(out), quant=quant, arch=layout.name, tensors=len(expected),
                              bytes=out.stat().st_size, tokenizer=tok_desc, uniform=layout.uniform,
                              fallbacks=fallbacks, padded=padded, overrides=list(overrides.values()))
    logger.info("wrote %s", out)
    return report


_LOW_BIT_TYPES = (_Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1)
_BLOCK_TYPES = (_Q.Q8_0, *_LOW_BIT_TYPES)
