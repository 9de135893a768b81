"""The record of a pruning run: what was asked, what was done, and on what data."""

from __future__ import annotations

import json
import os
import platform
import threading
from dataclasses import asdict, dataclass, field
from importlib import metadata

import torch
from torch import nn


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("rcpu", "torch", "transformers", "safetensors", "accelerate", "datasets", "lm_eval"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def count_params(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


#: kept widths that are multiples of this suit GPU matrix kernels (16-byte rows, whole tiles)
GPU_WIDTH_MULTIPLE = 64


@dataclass
class PruneReport:
    config: dict
    model: dict
    calibration: dict
    plan: dict
    params: dict
    checkpoint: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
    gguf: dict = field(default_factory=dict)  #: the GGUF export of this run, if any
    recovery: dict = field(default_factory=dict)  #: the recovery training after pruning, if any (rcpu.recover)
    versions: dict = field(default_factory=versions)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def summary_lines(self) -> list[str]:
        p = self.params
        return [
            f"method {self.config['method']} (score {self.config['score']}, compensation "
            f"{self.config['compensation']}), requested ratio {self.config['pruning_ratio']:g}",
            f"parameters: {p['total_before']:,} -> {p['total_after']:,} "
            f"(whole model -{p['ratio_total']:.1%}; attention+MLP -{p['ratio_attn_mlp']:.1%})",
            f"per layer: heads {p['heads_before']} -> {p['heads_after']} (kv {p['kv_heads_before']} -> "
            f"{p['kv_heads_after']}), MLP {p['intermediate_before']} -> {p['intermediate_after']}",
            f"pruning took {self.timings.get('prune_s', 0):.1f} s",
        ] + [f"note: {n}" for n in self.plan.get("notes", []) + [self.checkpoint.get("note"), self.width_note()] if n]

    def width_note(self) -> str | None:
        """A hint when kept MLP widths are unfriendly to GPU matrix kernels: on an H100 a
        7B-shaped model pruned to 8807 channels prefilled at 0.36x the dense model's speed, and
        at 1.17x with the width rounded to 8832."""
        widths = self.params.get("intermediate_after")
        widths = widths if isinstance(widths, list) else [widths]
        before = self.params.get("intermediate_before")  # a width the model came with is not ours to flag
        odd = sorted({w for w in widths if isinstance(w, int) and w % GPU_WIDTH_MULTIPLE and w != before})
        if not odd:
            return None
        return (f"kept MLP width{'s' if len(odd) > 1 else ''} {', '.join(map(str, odd[:3]))}"
                f"{' ...' if len(odd) > 3 else ''} not a multiple of {GPU_WIDTH_MULTIPLE}, the shapes GPU matrix kernels "
                f"are built for (on an H100, a 7B-shaped model pruned to width 8807 prefilled at 0.36x the dense "
                f"model's speed, rounded to 8832 at 1.17x); prune with --round_to {GPU_WIDTH_MULTIPLE} for a model "
                f"served on GPUs")


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps it otherwise, so the resident size
    creeps up layer after layer, and a large workspace allocated after a large buffer was
    freed (the SVD after the Gram matrix) lands on top of it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class _RssSampler:
    """Peak resident set size over a ``with`` block, sampled every 20 ms (Linux)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.result: dict = {}
        self._stop = threading.Event()
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self._peak = max(self._peak, _rss_bytes() or 0)

    def _start(self) -> None:
        self._rss0 = self._peak = _rss_bytes() or 0
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _finish(self) -> float:
        """Stop sampling; the peak in bytes."""
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes() or 0)
        return self._peak


class PeakMemory(_RssSampler):
    """Peak memory of a block: CUDA max allocated on a CUDA device, otherwise the peak
    resident set size sampled every 20 ms (Linux), reported as growth over the start."""

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda0 = torch.cuda.memory_allocated(self.device)
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        peak = self._finish()
        mib = 2**20
        self.result = {"peak_rss_mib": round(peak / mib, 1),
                       "peak_rss_growth_mib": round((peak - self._rss0) / mib, 1)}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            cuda_peak = torch.cuda.max_memory_allocated(self.device)
            self.result["peak_cuda_allocated_mib"] = round(cuda_peak / mib, 1)
            self.result["peak_cuda_growth_mib"] = round((cuda_peak - self._cuda0) / mib, 1)


class LayerMemory(_RssSampler):
    """Memory while one layer is processed: peak RSS sampled over the block (Linux) and, on
    CUDA, the allocation at the end and the run's peak so far (CUDA keeps one peak counter,
    which :class:`PeakMemory` owns for the whole run, so it is not reset per layer)."""

    def __enter__(self) -> LayerMemory:
        self._start()
        return self

    def __exit__(self, *exc) -> None:
        mib = 2**20
        self.result = {"peak_rss_mib": round(self._finish() / mib, 1)}
        if self.device.type == "cuda":
            self.result["cuda_allocated_mib"] = round(torch.cuda.memory_allocated(self.device) / mib, 1)
            self.result["cuda_peak_so_far_mib"] = round(torch.cuda.max_memory_allocated(self.device) / mib, 1)
