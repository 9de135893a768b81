"""Prune a checkpoint on disk one decoder layer at a time, for models larger than memory.

The model is built on the meta device (shapes only). The embeddings are read to capture the
calibration inputs of layer 0; then each decoder layer is read from the safetensors files
(tensor by tensor, no memory map), pruned exactly as the in-memory loop does, written to its
own output shard and freed. The final norm and the head are copied at the end. Host memory
is about one layer in the compute dtype, the embeddings, the calibration hidden states and
the statistics; it does not grow with depth.

Resume: the output is assembled in a work directory beside the target
(``.<name>.rcpu-partial``). From the start it holds ``rcpu_resume.json`` (the per-layer results
and a hash of the settings, the calibration windows and the model's content as sampled: each
weight file's size, header and 16 blocks of 64 KiB, :func:`rcpu.loading.content_fingerprint`;
not its path or modification time, so a model moved or copied resumes, and one with other
weights is refused), and after every layer the layer's shard and the next layer's input hidden
states. ``resume=True`` continues from the last finished layer and gives the same bytes as an
uninterrupted run; a finished run renames the directory into place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from .config import PruneConfig
from .errors import RcpuError
from .loading import SafetensorsCheckpoint, rcpu_class_for_type, rcpu_model_class
from .models import DecoderAdapter, get_adapter
from .pipeline import LayerResult, LayerStore
from .report import PruneReport, release_free_memory

logger = logging.getLogger(__name__)

RESUME_FILE = "rcpu_resume.json"
HIDDEN_FILE = "rcpu_hidden.safetensors"
LAYER_PREFIX = "model.layers."


class GGUFCheckpoint:
    """Tensors of a GGUF file under their Hugging Face names, dequantised one tensor at a time
    (with transformers' own GGUF name map and tensor processors, so they equal what
    ``from_pretrained(..., gguf_file=...)`` gives). The file is parsed once; tensor bytes are
    read with plain reads, so no mapping keeps the layers already read resident."""

    def __init__(self, path: str | os.PathLike, dtype: torch.dtype, model: nn.Module):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.path = Path(path)
        self.dtype = dtype
        self.parsed = load_gguf_checkpoint(str(self.path), return_tensors=False)
        reader = GGUFReader(str(self.path))
        arch = read_field(reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=self.parsed["config"])
        self.key_map = get_gguf_hf_weights_map(model, self.processor)
        #: HF name -> (GGUF name, byte offset, byte count, numpy dtype and shape of the raw data, GGML type)
        self.tensors = {self.key_map[t.name]: (t.name, int(t.data_offset), int(t.n_bytes), t.data.dtype,
                                               tuple(t.data.shape), t.tensor_type)
                        for t in reader.tensors if t.name in self.key_map}
        self.weight_map = {hf: info[0] for hf, info in self.tensors.items()}
        del reader

    def names(self, prefix: str = "") -> list[str]:
        return [n for n in self.weight_map if n.startswith(prefix)]

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import numpy as np
        from gguf import dequantize

        out: dict[str, torch.Tensor] = {}
        with open(self.path, "rb") as fh:
            for name in names:
                gguf_name, offset, n_bytes, np_dtype, shape, qtype = self.tensors[name]
                fh.seek(offset)
                raw = np.frombuffer(fh.read(n_bytes), dtype=np_dtype).reshape(shape)
                result = self.processor.process(weights=dequantize(raw, qtype), name=gguf_name,
                                                tensor_key_mapping=self.key_map, parsed_parameters=self.parsed)
                out[name] = torch.from_numpy(np.copy(result.weights)).to(self.dtype)
        return out

    def fingerprint(self) -> dict:
        """The file's content as sampled (:func:`rcpu.loading.content_fingerprint`), not its path."""
        from .loading import content_fingerprint

        return {"files": {"gguf": content_fingerprint(self.path)}}


def load_source_config(src: Path, trust_remote_code: bool = False):
    """(config, tokenizer, generation config or None) of a checkpoint directory or GGUF file."""
    if src.suffix.lower() == ".gguf":
        kw = {"gguf_file": src.name}
        where = str(src.parent)
    else:
        kw, where = {}, str(src)
    rcpu_class = None if kw else rcpu_model_class(src)
    config = (rcpu_class.config_class.from_pretrained(where) if rcpu_class is not None  # no remote code needed
              else AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code, **kw))
    tokenizer = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code, **kw)
    generation = (GenerationConfig.from_pretrained(where)
                  if not kw and (src / "generation_config.json").is_file() else None)
    return config, tokenizer, generation


def _layer_names(reader: SafetensorsCheckpoint | GGUFCheckpoint, index: int) -> list[str]:
    return reader.names(f"{LAYER_PREFIX}{index}.")


def _assign(module: nn.Module, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, assign=True, strict=True)


@dataclass
class MetaCheckpoint:
    """A checkpoint opened for streaming: the model built on the meta device (shapes only; its
    non-persistent buffers computed on the CPU) and a reader for its tensors."""

    config: object
    tokenizer: object
    generation: GenerationConfig | None
    model: nn.Module
    reader: SafetensorsCheckpoint | GGUFCheckpoint


def _materialize_buffers(model: nn.Module) -> None:
    """Compute the non-persistent buffers a checkpoint does not hold (RoPE frequencies, Gemma 3's
    embedding scale) on the CPU, with the model's own initialisation; parameters stay on meta."""
    for module in model.modules():
        missing = [name for name, buf in module._buffers.items()
                   if buf is not None and buf.is_meta and name in module._non_persistent_buffers_set]
        if not missing:
            continue
        for name in missing:
            module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
        model._init_weights(module)


def open_checkpoint(source: str | os.PathLike, dtype: torch.dtype, trust_remote_code: bool = False
                    ) -> MetaCheckpoint:
    """The safetensors checkpoint directory (or GGUF file) ``source`` on the meta device, with its
    config, tokenizer, generation config and tensor reader; no weight is read yet."""
    src = Path(source)
    config, tokenizer, generation = load_source_config(src, trust_remote_code)
    rcpu_class = rcpu_class_for_type(config.model_type, src)  # the config is already rcpu's own class then
    with torch.device("meta"):
        model = (rcpu_class._from_config(config, dtype=dtype) if rcpu_class is not None
                 else AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code))
    model.eval()
    _materialize_buffers(model)
    reader = (GGUFCheckpoint(src, dtype, model) if src.suffix.lower() == ".gguf"
              else SafetensorsCheckpoint(src, dtype))
    return MetaCheckpoint(config, tokenizer, generation, model, reader)


def read_embeddings(model: nn.Module, adapter: DecoderAdapter, reader: SafetensorsCheckpoint | GGUFCheckpoint) -> None:
    """The input embeddings from disk, and RoPE frequencies on the CPU: the only non-layer
    modules that run before the first decoder layer."""
    base = adapter.base
    _assign(base.embed_tokens, reader.read(["model.embed_tokens.weight"]), "model.embed_tokens.")
    rotary = getattr(base, "rotary_emb", None)
    if rotary is not None:
        with torch.device("cpu"):
            base.rotary_emb = type(rotary)(model.config)


def free_embeddings(model: nn.Module, adapter: DecoderAdapter) -> None:
    """Back to meta once the inputs of layer 0 are captured."""
    adapter.base.embed_tokens.to("meta")
    if model.config.tie_word_embeddings:
        model.tie_weights()  # assign and .to("meta") replaced the shared parameter


def read_layer(adapter: DecoderAdapter, reader: SafetensorsCheckpoint | GGUFCheckpoint, index: int) -> nn.Module:
    """Decoder layer ``index`` with its weights from disk, on the CPU (``layer.to("meta")`` frees it)."""
    layer = adapter.layers[index]
    _assign(layer, reader.read(_layer_names(reader, index)), f"{LAYER_PREFIX}{index}.")
    return layer


def read_head(model: nn.Module, reader: SafetensorsCheckpoint | GGUFCheckpoint) -> None:
    """Every weight outside the decoder layers except the input embeddings (the final norm and
    the head), from disk; with tied embeddings the head is the embedding matrix, read for it."""
    tied = bool(model.config.tie_word_embeddings)
    names = [k for k in reader.names() if not k.startswith(LAYER_PREFIX)
             and (k != "model.embed_tokens.weight" or tied) and not (k == "lm_head.weight" and tied)]
    result = model.load_state_dict(reader.read(names), assign=True, strict=False)
    if result.unexpected_keys:
        raise RcpuError(f"{reader.path}: tensors the model does not hold: {', '.join(result.unexpected_keys)}")
    if tied:
        model.tie_weights()


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def _atomic_json(obj: dict, path: Path) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def shard_name(k: int, n: int) -> str:
    return f"model-{k + 1:05d}-of-{n:05d}.safetensors"


class StreamingStore(LayerStore):
    """Reads each decoder layer from disk; writes pruned layers as output shards, and after
    every layer the next layer's inputs and the resume record, so a killed run continues."""

    def __init__(self, adapter: DecoderAdapter, reader: SafetensorsCheckpoint | GGUFCheckpoint, work: Path,
                 state: dict):
        super().__init__(adapter)
        self.reader, self.work, self.state = reader, work, state
        self.biases = (False, False)
        self.n_shards = len(adapter.layers) + 1

    def load(self, index: int) -> nn.Module:
        return read_layer(self.adapter, self.reader, index)

    def unload(self, index: int, layer: nn.Module) -> None:
        layer.to("meta")

    def open(self, model: nn.Module) -> None:
        read_embeddings(model, self.adapter, self.reader)

    def captured(self, model: nn.Module) -> None:
        free_embeddings(model, self.adapter)

    def resume(self, batches, heldout, storage):
        from .driver import Resumed
        from .select import LayerPlan

        start = self.state["next_layer"]
        if not start:
            return None
        with safe_open(str(self.work / HIDDEN_FILE), framework="pt", device="cpu") as fh:
            saved = {k: fh.get_tensor(k) for k in fh.keys()}

        def restored(prefix: str, like: list | None) -> list | None:
            return None if like is None else [(saved[f"{prefix}.{i}"].to(storage), kw)
                                              for i, (_, kw) in enumerate(like)]

        return Resumed(start, [LayerPlan(**p) for p in self.state["plans"]], restored("calib", batches),
                       restored("heldout", heldout), [LayerResult(**r) for r in self.state["layers"]],
                       list(self.state["warnings"]))

    def planned(self, plans, biases, done) -> None:
        self.state["plans"] = [p.to_dict() for p in plans]
        self.biases = biases
        for i, res in enumerate(done):  # layers written before the interruption get their pruned shapes
            _restore_layer(self.adapter, self.adapter.layers[i], res.to_dict())

    def finish(self, index, layer, result, batches, heldout, warnings) -> None:
        self.adapter.finalize_layer(layer, *self.biases)
        prefix = f"{LAYER_PREFIX}{index}."
        tensors = {prefix + k: v.detach().to("cpu").contiguous() for k, v in layer.state_dict().items()}
        _atomic_save(tensors, self.work / shard_name(index, self.n_shards))
        del tensors
        layer.to("meta")
        release_free_memory()
        hidden = {f"calib.{i}": h.to("cpu").contiguous() for i, (h, _) in enumerate(batches)}
        if heldout is not None:
            hidden.update({f"heldout.{i}": h.to("cpu").contiguous() for i, (h, _) in enumerate(heldout)})
        _atomic_save(hidden, self.work / HIDDEN_FILE)
        self.state["next_layer"] = index + 1
        self.state["layers"].append(result.to_dict())
        self.state["warnings"] = list(warnings)
        _atomic_json(self.state, self.work / RESUME_FILE)
        logger.info("layer %d written (%.1f s, peak RSS %.0f MiB)", index, result.seconds,
                    result.memory.get("peak_rss_mib", 0))

    def close(self) -> None:
        """The rest of the weights (final norm, head), as they are."""
        n = len(self.adapter.layers)
        tied = self.adapter.config.tie_word_embeddings
        rest = [k for k in self.reader.names()
                if not k.startswith(LAYER_PREFIX) and not (k == "lm_head.weight" and tied)]
        _atomic_save(self.reader.read(rest), self.work / shard_name(n, n + 1))


@dataclass
class StreamResult:
    path: Path
    report: PruneReport


def _run_key(reader: SafetensorsCheckpoint | GGUFCheckpoint, config_json: str, cfg: PruneConfig, windows: torch.Tensor,
             heldout: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> str:
    from .data import token_hash

    ident = {"model": reader.fingerprint(), "config": config_json, "prune": cfg.to_dict(),
             "windows": token_hash(windows), "heldout": heldout is not None and token_hash(heldout),
             "dtype": str(dtype), "device": device.type}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()


def work_dir_for(out: Path) -> Path:
    return out.with_name(f".{out.name}.rcpu-partial")


def _restore_layer(adapter: DecoderAdapter, layer: nn.Module, res: dict) -> None:
    """Give a finished (written) meta layer its pruned shapes again, from its recorded units."""
    geom = adapter.geometry(layer)
    if len(res["kept_heads"]) < geom.num_heads:
        adapter.prune_attention(layer, torch.tensor(res["kept_heads"]), torch.tensor(res["kept_kv_heads"]))
    if len(res["kept_channels"]) < adapter.mlp_out(layer).in_features:
        adapter.prune_mlp(layer, torch.tensor(res["kept_channels"]))


@torch.no_grad()
def prune_checkpoint(source: str | os.PathLike, cfg: PruneConfig, out: str | os.PathLike, *,
                     windows: torch.Tensor, heldout_windows: torch.Tensor | None = None,
                     calib_info: dict | None = None, dtype: torch.dtype = torch.float32,
                     device: str | torch.device = "cpu", resume: bool = False, overwrite: bool = False,
                     trust_remote_code: bool = False, progress: bool = True, hidden_states: str = "auto",
                     max_hidden_gib: float | None = None, announce: Callable[[str], None] | None = None,
                     source_name: str | None = None) -> StreamResult:
    """Prune the safetensors checkpoint directory (or GGUF file) ``source`` layer by layer into ``out``.

    The weights written are those :func:`rcpu.api.prune` followed by
    :func:`rcpu.export.save_pruned` gives on the same inputs; only one layer is in memory.
    ``announce`` receives the "resuming at layer N of M" line (default: the log). ``source_name``
    is what the provenance records as the source (default: the path; a local path absolute), e.g. the
    built-in name the user gave, so that later steps (a GGUF export's tokenizer, recovery's teacher)
    find the original.
    """
    from .driver import check_saveable, run_pruning
    from .export import check_output_dir, finish_checkpoint

    cfg = cfg.validate()
    src = Path(source)
    out = check_output_dir(out, overwrite)
    device = torch.device(device)
    opened = open_checkpoint(src, dtype, trust_remote_code)
    config, tokenizer, generation, model, reader = (opened.config, opened.tokenizer, opened.generation,
                                                    opened.model, opened.reader)
    config_json = config.to_json_string()
    adapter = get_adapter(model)
    if cfg.allocation == "uniform":
        check_saveable(model, cfg, adapter=adapter)  # fail fast

    work = work_dir_for(out)
    key = _run_key(reader, config_json, cfg, windows, heldout_windows, dtype, device)
    state = {"key": key, "next_layer": 0, "layers": [], "warnings": [], "num_layers": len(adapter.layers)}
    previous = json.loads((work / RESUME_FILE).read_text()) if (work / RESUME_FILE).is_file() else None
    if previous is not None:
        if not resume:
            raise RcpuError(f"an interrupted run left {work}; pass --resume to continue it or delete it")
        if previous.get("key") != key:
            raise RcpuError(f"{work} belongs to a run with other settings or another model; "
                            "use the same command to resume, or delete it to start over")
        state = previous
    elif resume:  # (a work directory without a record was left before the run had started: nothing to keep)
        logger.info("nothing to resume at %s; starting from the first layer", work)
    work.mkdir(parents=True, exist_ok=True)
    if previous is None:  # the record says whose work directory this is, also before the first layer is written
        _atomic_json(state, work / RESUME_FILE)
    n_layers = len(adapter.layers)
    if state["next_layer"]:
        (announce or logger.info)(f"resuming at layer {state['next_layer']} of {n_layers}")

    store = StreamingStore(adapter, reader, work, state)
    run = run_pruning(model, adapter, cfg, windows, heldout_windows, device, store, progress=progress,
                      hidden_states=hidden_states, max_hidden_gib=max_hidden_gib)
    adapter.finalize(store.biases)
    from .loading import source_record

    report = run.report(cfg, adapter, {**source_record(source_name or src), "device": str(device),
                                       "dtype": str(dtype).replace("torch.", ""), "streamed": True}, calib_info or {})
    final = finish_checkpoint(model, work, out, report.to_dict(), tokenizer=tokenizer, generation_config=generation,
                              shards=[shard_name(k, n_layers + 1) for k in range(n_layers + 1)], dtype=dtype,
                              remove=[RESUME_FILE, HIDDEN_FILE], overwrite=overwrite)
    return StreamResult(final, report)
