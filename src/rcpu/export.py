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
import os
import shutil
from pathlib import Path

from torch import nn

from .errors import RcpuError
from .nonuniform import is_uniform, prepare_nonuniform_save, prepare_uniform_save

logger = logging.getLogger(__name__)

PROVENANCE = "rcpu_provenance.json"


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Fail fast (before any work) on an existing target or an unwritable parent."""
    out = Path(path).expanduser().resolve()
    if out.exists() and not overwrite:
        raise RcpuError(f"output directory {out} already exists; choose another --save_model or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise RcpuError(f"output path {out} exists and is not a directory")
    parent = out.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as exc:
            raise RcpuError(f"cannot create {parent}: {exc.strerror}") from exc
    if not os.access(parent, os.W_OK):
        raise RcpuError(f"cannot write to {parent}; choose another --save_model")
    return out


def save_pruned(model: nn.Module, tokenizer, path: str | os.PathLike, provenance: dict,
                overwrite: bool = False) -> Path:
    """Save ``model`` (+ tokenizer + provenance) to ``path`` and return the final path."""
    out = check_output_dir(path, overwrite)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        if not is_uniform(model):  # per-layer widths: rcpu config + small modeling file
            prepare_nonuniform_save(model, tmp)
        else:  # a per-layer checkpoint pruned again to equal widths becomes a stock one
            prepare_uniform_save(model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / PROVENANCE).write_text(json.dumps(provenance, indent=2, default=str))
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("saved pruned model to %s", out)
    return out
