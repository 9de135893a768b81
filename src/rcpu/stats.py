"""Streaming statistics of a sublayer's input activations.

Pruning decisions and compensation need only first/second moments of the input
X (d_in x N) of o_proj / down_proj: per-channel sums, sums of squares and sums of
absolute values, and optionally the Gram matrix G = X X^T. They are accumulated
batch by batch so the calibration activations are never stored. Vectors are kept
in float64; per-batch partial sums and the per-batch Gram are computed in float32
(fast on every device) and added to float64 totals, so accumulation error does not
grow with the token count (the Gram total can be kept in float32 to halve its memory).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: rows of a running total per block in :func:`_accumulate`
_ROWS = 512


def _accumulate(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """total += A^T B (float32 product, added in the total's dtype), one block of rows at a
    time: the only temporary is a _ROWS x d float32 product (the in-place add converts
    element by element), not d x d (at 13B MLP widths the full float32 and float64
    products would add 2.3 GB to a 1.5 GB Gram matrix)."""
    for start in range(0, a.shape[1], _ROWS):
        total[start:start + _ROWS].add_(a[:, start:start + _ROWS].T @ b)


@dataclass
class InputStats:
    """Running moments of the input channels of one linear layer."""

    d_in: int
    n: int = 0
    sum: torch.Tensor | None = None
    sum_sq: torch.Tensor | None = None
    sum_abs: torch.Tensor | None = None
    m2: torch.Tensor | None = None  # sum of squared deviations from the running mean
    gram: torch.Tensor | None = None
    with_gram: bool = False
    #: float64 by default; float32 halves the largest buffer of a layer (d_in^2) at a small
    #: cost in accumulation precision (each batch's product is float32 either way)
    gram_dtype: torch.dtype = torch.float64

    def update(self, x: torch.Tensor) -> None:
        """Add a batch of inputs with shape (..., d_in)."""
        x32 = x.detach().reshape(-1, self.d_in).float()
        if self.sum is None:
            zeros = torch.zeros(self.d_in, dtype=torch.float64, device=x32.device)
            self.sum, self.sum_sq, self.sum_abs, self.m2 = (zeros.clone() for _ in range(4))
            if self.with_gram:
                self.gram = torch.zeros(self.d_in, self.d_in, dtype=self.gram_dtype, device=x32.device)
        n_a, n_b = self.n, x32.shape[0]
        # variance by Chan et al.'s pairwise update: batch moments are centred in fp32,
        # so channels with a large mean and small spread keep their precision
        batch_mean = x32.mean(0)
        batch_m2 = (x32 - batch_mean).square().sum(0).double()
        delta = batch_mean.double() - (self.sum / n_a if n_a else 0.0)
        self.m2 += batch_m2 + delta.square() * (n_a * n_b / (n_a + n_b))
        self.n = n_a + n_b
        # per-batch partial sums in fp32 (one batch is small), running totals in fp64
        self.sum += x32.sum(0).double()
        self.sum_sq += x32.square().sum(0).double()
        self.sum_abs += x32.abs().sum(0).double()
        if self.with_gram:
            _accumulate(self.gram, x32, x32)

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
        """Population variance E[(x - E x)^2] (RCPU)."""
        self._require()
        return (self.m2 / self.n).clamp_min(0)

    @property
    def var_sample(self) -> torch.Tensor:
        """Unbiased sample variance (FLAP's fluctuation)."""
        self._require()
        if self.n < 2:
            return torch.zeros_like(self.sum)
        return (self.var_population * (self.n / (self.n - 1))).clamp_min(0)

    def to(self, device: torch.device | str) -> InputStats:
        for name in ("sum", "sum_sq", "sum_abs", "m2", "gram"):
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

    def __init__(self, modules: dict[str, torch.nn.Linear], with_gram: dict[str, bool],
                 gram_dtype: torch.dtype = torch.float64):
        self.stats = {name: InputStats(m.in_features, with_gram=with_gram.get(name, False), gram_dtype=gram_dtype)
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
