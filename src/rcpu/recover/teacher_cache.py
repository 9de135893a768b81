"""``rcpu recover --teacher_cache DIR``: the teacher's work done once, read by later runs.

A recovery run spends a third or more of its time in the frozen teacher's forward passes, and
runs that differ only in the student's settings (learning rate, parameters, budget) recompute
the same ones. The cache holds, for every training window a run visits, the teacher's
``--teacher_topk`` largest logits and their token ids at each position (float32 and int32), and,
for the measured windows (held-out and evaluation), the teacher's final hidden states with its
LM head, so that held-out KL and the teacher's perplexity stay exact over the whole vocabulary.
With a cache the teacher is not loaded at all.

Training from the top k is an approximation: the teacher's distribution becomes the softmax
over its k largest logits (:func:`rcpu.recover.loss.distillation_loss`, ``teacher_topk``); the
measurements say what it costs (docs/recovery.md).

Layout of ``DIR``: ``topk.safetensors`` (``windows`` [n, seqlen] int32, ``values`` [n, seqlen-1,
k] float32, ``ids`` [n, seqlen-1, k] int32), ``measured.safetensors`` (``<set>.windows``,
``<set>.hidden`` per measured set, ``head.weight`` and ``head.bias``) and ``meta.json``, written
last: a directory without it is no cache. Windows are looked up by their tokens, so a cache
serves any later run whose windows it holds (the same text, ``--seqlen``, ``--seed`` and
``--heldout``, a budget no larger) with any ``--teacher_topk`` up to its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import RcpuError

logger = logging.getLogger(__name__)

__all__ = ["CachedTeacher", "build_cache", "check_cache_dir", "load_cache", "vocab_digest"]

FORMAT = 1
META = "meta.json"


def vocab_digest(tokenizer) -> str:
    """A hash of a tokenizer's vocabulary (token -> id), to match a cache to the student."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]


def _key(row: torch.Tensor) -> bytes:
    return row.to(torch.int64).cpu().numpy().tobytes()


def check_cache_dir(path: str) -> Path:
    """``--teacher_cache``: a cache rcpu wrote, or a folder (new or empty) it can write one into."""
    d = Path(path).expanduser().resolve()
    if d.exists() and not d.is_dir():
        raise RcpuError(f"--teacher_cache {path} is a file; name a directory")
    if d.is_dir() and not (d / META).is_file() and any(d.iterdir()):
        raise RcpuError(f"--teacher_cache {path} is a directory that holds no teacher cache (no {META}); name a new "
                        "or empty directory")
    parent = d if d.is_dir() else d.parent
    while not parent.exists():
        parent = parent.parent
    if not (d / META).is_file() and not os.access(parent, os.W_OK):
        raise RcpuError(f"--teacher_cache {path}: cannot write to {parent}")
    return d


class _Head(nn.Module):
    """Holds the teacher's LM head where the loss looks for it (``get_output_embeddings``)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.head = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            self.head.weight.copy_(weight)
            if bias is not None:
                self.head.bias.copy_(bias)
        self.head.requires_grad_(False)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


class CachedTeacher(nn.Module):
    """The teacher as the training loop sees it, read from a cache: ``forward(ids)`` gives the final
    hidden states of measured windows, :meth:`topk` the top logits of training windows."""

    def __init__(self, meta: dict, train: dict[str, torch.Tensor], measured: dict[str, torch.Tensor], topk: int):
        super().__init__()
        self.meta = meta
        self.k = topk
        self.model = _Head(measured["head.weight"], measured.get("head.bias"))
        self._values, self._ids = train["values"], train["ids"]
        self._train = {_key(w): i for i, w in enumerate(train["windows"])}
        self._hidden = {}
        for name in {k.rsplit(".", 1)[0] for k in measured if k.endswith(".windows")}:
            for w, h in zip(measured[f"{name}.windows"], measured[f"{name}.hidden"], strict=True):
                self._hidden[_key(w)] = h

    def missing(self, train: torch.Tensor, measured: list[torch.Tensor]) -> tuple[int, int]:
        """How many of these training windows and measured windows the cache does not hold."""
        return (sum(_key(w) not in self._train for w in train),
                sum(_key(w) not in self._hidden for m in measured for w in m))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.stack([self._hidden[_key(w)] for w in ids]).to(ids.device)

    def topk(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.tensor([self._train[_key(w)] for w in ids])
        return (self._values[rows, :, :self.k].to(ids.device), self._ids[rows, :, :self.k].to(ids.device))


@torch.no_grad()
def build_cache(path: Path, teacher: nn.Module, teacher_info: dict, vocab: str, train: torch.Tensor,
                measured: dict[str, torch.Tensor], topk: int, *, device: torch.device, batch_size: int,
                autocast: torch.dtype | None, progress: bool = True) -> None:
    """Run ``teacher`` once over ``train`` (top ``topk`` logits) and the ``measured`` sets (hidden
    states), and write the cache to ``path`` (files under temporary names, ``meta.json`` last)."""
    from tqdm.auto import tqdm

    from .params import unwrap
    from .train import TeacherHidden, _autocast

    teacher.eval().to(device)
    hidden_of = TeacherHidden(teacher)
    head = unwrap(teacher).get_output_embeddings()
    if topk > head.weight.shape[0]:
        raise RcpuError(f"--teacher_topk {topk} is more than the teacher's {head.weight.shape[0]:,} tokens")

    def hidden(ids: torch.Tensor) -> torch.Tensor:
        with _autocast(device, autocast):
            return hidden_of(ids.to(device)).float()

    values, ids = [], []
    bar = tqdm(total=train.shape[0], desc="teacher cache", unit="window", disable=not progress, dynamic_ncols=True)
    for start in range(0, train.shape[0], batch_size):
        h = hidden(train[start:start + batch_size])
        logits = torch.nn.functional.linear(h, head.weight.float(), None if head.bias is None else head.bias.float())
        top = torch.topk(logits, topk, dim=-1)
        values.append(top.values.cpu())
        ids.append(top.indices.to(torch.int32).cpu())
        bar.update(h.shape[0])
    bar.close()
    tensors = {}
    for name, windows in measured.items():
        tensors[f"{name}.windows"] = windows.to(torch.int32).contiguous()
        tensors[f"{name}.hidden"] = torch.cat([hidden(windows[s:s + batch_size]).cpu()
                                               for s in range(0, windows.shape[0], batch_size)]).contiguous()
    tensors["head.weight"] = head.weight.detach().float().cpu().contiguous()
    if head.bias is not None:
        tensors["head.bias"] = head.bias.detach().float().cpu().contiguous()
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / f".{META}.partial"
    save_file({"windows": train.to(torch.int32).contiguous(), "values": torch.cat(values).contiguous(),
               "ids": torch.cat(ids).contiguous()}, str(path / "topk.safetensors"))
    save_file(tensors, str(path / "measured.safetensors"))
    tmp.write_text(json.dumps({"format": FORMAT, "teacher": teacher_info, "vocab": vocab, "topk": topk,
                               "train_windows": int(train.shape[0]), "seqlen": int(train.shape[1]),
                               "measured": {n: list(w.shape) for n, w in measured.items()}}, indent=1))
    tmp.replace(path / META)


def load_cache(path: Path, topk: int) -> CachedTeacher | None:
    """The cache in ``path`` served at ``topk`` (None when ``path`` holds none yet)."""
    if not (path / META).is_file():
        return None
    try:
        meta = json.loads((path / META).read_text())
        train = load_file(str(path / "topk.safetensors"))
        measured = load_file(str(path / "measured.safetensors"))
    except Exception as exc:  # truncated or foreign files
        raise RcpuError(f"the teacher cache in {path} is unreadable ({exc}); remove it and run again") from exc
    if meta.get("format") != FORMAT:
        raise RcpuError(f"the teacher cache in {path} has format {meta.get('format')}, not {FORMAT}; remove it")
    if topk > meta["topk"]:
        raise RcpuError(f"--teacher_topk {topk} is more than the {meta['topk']} logits per position the teacher cache "
                        f"in {path} holds; use at most {meta['topk']} or another --teacher_cache")
    return CachedTeacher(meta, train, measured, topk)


def remove_partial(path: Path, existed: bool) -> None:
    """Remove what a failed :func:`build_cache` left (all of ``path`` when this run created it)."""
    if (path / META).is_file():
        return
    if not existed:
        shutil.rmtree(path, ignore_errors=True)
    else:
        for name in ("topk.safetensors", "measured.safetensors", f".{META}.partial"):
            (path / name).unlink(missing_ok=True)
