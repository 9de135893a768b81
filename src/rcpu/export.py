"""Write a pruned model as an ordinary Hugging Face checkpoint, atomically.

Everything goes into a temporary sibling directory which is renamed into place
only when complete, so an interrupted save never leaves a half-written model at
the target. Uniform widths give a stock config; per-layer widths (global allocation)
give a config with per-layer lists and a modeling file, loaded with
``trust_remote_code=True`` (see :mod:`rcpu.nonuniform`). Next to the weights we write
``rcpu_provenance.json``: the full pruning report (method, ratios, calibration
source and hash, seed, per-layer kept indices, versions, timings).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from .errors import RcpuError
from .models import get_adapter
from .models.checkpoint import model_for_saving, saving_config
from .nonuniform import prepare_nonuniform_save, prepare_uniform_save

logger = logging.getLogger(__name__)

PROVENANCE = "rcpu_provenance.json"


def check_output_dir(path: str | os.PathLike, overwrite: bool, create: bool = True) -> Path:
    """Fail fast (before any work) on an existing target or an unwritable parent. ``create=False``
    creates no missing parent folder (the nearest existing one must be writable): the caller's
    writes create them later."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not overwrite:
        raise RcpuError(f"output directory {out} already exists; choose another --save_model or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise RcpuError(f"output path {out} exists and is not a directory")
    parent = out.parent
    if not create:
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise RcpuError(f"cannot create {out}: {parent} is not a directory")
    elif not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise RcpuError(f"cannot create {parent}: {exc.strerror}") from exc
    if not os.access(parent, os.W_OK):
        raise RcpuError(f"cannot write to {parent}; choose another --save_model")
    return out


def _readable(directory: Path) -> None:
    """Give the directory and its files the permissions the umask allows (the weight writer
    creates private temporary files, which a server running as another user cannot read)."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for f in directory.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~umask)


def _commit(tmp: Path, out: Path, provenance: dict) -> None:
    """Add the provenance and move the finished directory into place (replacing ``out``)."""
    (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str))
    _readable(tmp)
    if out.exists():
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old)
    else:
        tmp.rename(out)


def finish_checkpoint(model: nn.Module, work: Path, out: Path, provenance: dict, *, tokenizer, generation_config,
                      shards: list[str], dtype: torch.dtype, remove: list[str], overwrite: bool = False) -> Path:
    """Complete a checkpoint whose weight shards were written into ``work`` (streamed
    pruning): config for the saved format, shard index, tokenizer, provenance; then
    rename into place. ``model`` is the pruned model's skeleton (shapes, config)."""
    out = check_output_dir(out, overwrite)
    fmt = get_adapter(model).saved_format()
    config = fmt.config
    config.dtype = dtype
    if fmt.kind != "remapped":
        config.architectures = [type(model).__name__]
    config.save_pretrained(work)
    if fmt.kind == "per-layer":
        prepare_nonuniform_save(model, work)
    else:  # a per-layer source pruned to equal widths becomes a stock checkpoint
        prepare_uniform_save(model, work)
    if generation_config is not None:
        generation_config.save_pretrained(work)
    weight_map, total = {}, 0
    for shard in shards:
        with safe_open(str(work / shard), framework="pt") as fh:
            for name in fh.keys():
                weight_map[name] = shard
                sl = fh.get_slice(name)
                total += math.prod(sl.get_shape()) * _DTYPE_BYTES[sl.get_dtype()]
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (work / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(work)
    for name in remove:
        (work / name).unlink(missing_ok=True)
    _commit(work, out, provenance)
    logger.info("saved pruned model to %s", out)
    return out


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def save_pruned(model: nn.Module, tokenizer, path: str | os.PathLike, provenance: dict,
                overwrite: bool = False) -> Path:
    """Save ``model`` (+ tokenizer + provenance) to ``path`` and return the final path."""
    out = check_output_dir(path, overwrite)
    fmt = get_adapter(model).saved_format()  # RcpuError (before writing anything) if no config can carry it
    if fmt.note:
        logger.info("%s", fmt.note)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        with saving_config(model, fmt):
            model_for_saving(model, fmt).save_pretrained(tmp, safe_serialization=True)
        if fmt.kind == "per-layer":  # rcpu config + small modeling file
            prepare_nonuniform_save(model, tmp)
        else:  # a per-layer checkpoint pruned again to equal widths becomes a stock one
            prepare_uniform_save(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _commit(tmp, out, provenance)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved pruned model to %s", out)
    return out
