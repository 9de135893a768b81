"""Streaming statistics of a sublayer's input activations.

Pruning decisions and compensation need only first/second moments of the input
X (d_in x N) of o_proj / down_proj: per-channel sums, sums of squares and sums of
absolute values, and optionally the Gram matrix G = X X^T. They are accumulated
batch by batch so the calibration activations are never stored. Vectors are kept
in float64; the Gram is computed per batch in float32 (fast on every device) and
summed in float64, so accumulation error does not grow with the token count.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class InputStats:
    """Running moments of the input channels of one linear layer."""

    d_in: int
    n: int = 0
    sum: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    gram: torch.Tensor | None = None
    with_gram: bool = False

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs with shape (..., d_in)."""
        x = x.detach().reshape(-1, self.d_in)
        x32 = x.float()
        x64 = x32.double()
        if self.sum is None:
            zeros = torch.zeros(self.d_in, dtype=torch.float64, device=x.device)
            self.sum, self.sum_sq, self.sum_abs = zeros.clone(), zeros.clone(), zeros.clone()
            if self.with_gram:
                self.gram = torch.zeros(self.d_in, self.d_in, dtype=torch.float64, device=x.device)
        self.n += x.shape[0]
        self.sum += x64.sum(0)
        self.sum_sq += x64.square().sum(0)
        self.sum_abs += x64.abs().sum(0)
        if self.with_gram:
            self.gram += (x32.T @ x32).double()

    def _require(self) -> None:
        if self.n == 0:
            raise ValueError("no calibration tokens were seen by this sublayer")

    @property
    def mean(self) -> torch.Tensor:
        self._require()
        return self.sum / self.n

    @property
    def mean_abs(self) -> torch.Tensor:
        self._require()
        return self.sum_abs / self.n

    @property
    def l2(self) -> torch.Tensor:
        """||x_j||_2 over all calibration tokens."""
        self._require()
        return self.sum_sq.sqrt()

    @property
    def var_population(self) -> torch.Tensor:
        """E[x^2] - E[x]^2, clamped at 0 (RCPU)."""
        self._require()
        return (self.sum_sq / self.n - self.mean.square()).clamp_min(0)

    @property
    def var_sample(self) -> torch.Tensor:
        """Unbiased sample variance (FLAP's fluctuation)."""
        self._require()
        if self.n < 2:
            return torch.zeros_like(self.sum)
        return (self.var_population * (self.n / (self.n - 1))).clamp_min(0)

    def to(self, device: torch.device | str) -> InputStats:
        for name in ("sum", "sum_sq", "sum_abs", "gram"):
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        return self

    def summary(self) -> dict:
        """Small JSON-able digest for reports (no per-channel tensors)."""
        self._require()
        var = self.var_population
        return {
            "tokens": self.n,
            "mean_abs": float(self.mean_abs.mean()),
            "var_mean": float(var.mean()),
            "var_max": float(var.max()),
        }


class StatsCollector:
    """Forward pre-hooks that feed the inputs of named linear modules into InputStats."""

    def __init__(self, modules: dict[str, torch.nn.Linear], with_gram: dict[str, bool]):
        self.stats = {name: InputStats(m.in_features, with_gram=with_gram.get(name, False))
                      for name, m in modules.items()}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str):
        def hook(_module, args):
            self.stats[name].update(args[0])
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StatsCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
