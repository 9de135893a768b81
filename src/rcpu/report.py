"""The record of a pruning run: what was asked, what was done, and on what data."""

from __future__ import annotations

import json
import platform
from dataclasses import asdict, dataclass, field
from importlib import metadata

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


@dataclass
class PruneReport:
    config: dict
    model: dict
    calibration: dict
    plan: dict
    params: dict
    layers: list[dict] = field(default_factory=list)
    timings: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    evaluation: dict = field(default_factory=dict)
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
        ] + [f"note: {n}" for n in self.plan.get("notes", [])]
