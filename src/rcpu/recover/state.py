"""Recovery checkpoints: trained tensors and optimiser state in safetensors, the rest in JSON.

A checkpoint is a directory written under a temporary name and renamed over the previous one,
so a run killed at any moment (SIGKILL, Ctrl-C, a full disk) leaves the last complete
checkpoint. Nothing is pickled: the optimiser's tensors go to safetensors under flat names and
its hyper-parameters to JSON.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import RcpuError

__all__ = ["CHECKPOINT", "STATE_FILE", "has_checkpoint", "load_checkpoint", "save_checkpoint"]

CHECKPOINT = "checkpoint"
STATE_FILE = "state.json"
OLD = f".{CHECKPOINT}.old"


def _complete(work: Path) -> Path | None:
    """The checkpoint to resume from: ``checkpoint``, else ``.checkpoint.old`` (a run killed between
    the two renames of :func:`save_checkpoint` leaves only that one), else None."""
    for ckpt in (work / CHECKPOINT, work / OLD):
        if (ckpt / STATE_FILE).is_file():
            return ckpt
    return None


def has_checkpoint(work: Path | None) -> bool:
    """Whether ``work`` holds a complete checkpoint to resume from."""
    return work is not None and _complete(work) is not None


def save_checkpoint(work: Path, params: dict[str, torch.Tensor], opt_tensors: dict[str, torch.Tensor], groups: list,
                    meta: dict) -> None:
    """Write ``work/checkpoint`` atomically (replacing the previous one): trained tensors, the
    optimiser's tensors under flat names and its parameter groups, and ``meta``."""
    final = work / CHECKPOINT
    tmp = work / f".{CHECKPOINT}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in params.items()}, str(tmp / "params.safetensors"))
    save_file({k: v.contiguous().cpu() for k, v in opt_tensors.items()}, str(tmp / "optimizer.safetensors"))
    (tmp / "optimizer.json").write_text(json.dumps(groups))
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=1, default=str))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = work / OLD
    if final.exists():
        if old.exists():
            shutil.rmtree(old)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(work: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, sharding) -> dict:
    """Load ``work/checkpoint`` into ``model``'s trained tensors and ``optimizer`` (through
    ``sharding``, which knows where the tensors live); return its meta."""
    ckpt = _complete(work)
    if ckpt is None:
        raise RcpuError(f"{work} holds no complete recovery checkpoint; remove it and start again without --resume")
    try:
        params = load_file(str(ckpt / "params.safetensors"))
        opt_tensors = load_file(str(ckpt / "optimizer.safetensors"))
        groups = json.loads((ckpt / "optimizer.json").read_text())
        meta = json.loads((ckpt / STATE_FILE).read_text())
    except Exception as exc:  # safetensors raises its own error type for truncated files
        raise RcpuError(f"the recovery checkpoint in {ckpt} is unreadable ({exc}); remove {work} and start again") from exc
    named = dict(getattr(model, "module", model).named_parameters())
    missing = [k for k in params if k not in named]
    if missing:
        raise RcpuError(f"the recovery checkpoint in {ckpt} does not fit this model (e.g. {missing[0]}); "
                        f"remove {work} and start again")
    sharding.load_trained_state(model, optimizer, params, opt_tensors, groups)
    return meta
