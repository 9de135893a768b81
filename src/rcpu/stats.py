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
    # dense-model targets: the target outputs Y of the same tokens (the dense sublayer's
    # W X_d, plus the residual-stream error for "residual" targets) enter only through
    # target_cross = Y X^T (d_out x d_in, streamed like the Gram) and target_sq = ||Y||_F^2
    target_cross: torch.Tensor | None = None
    target_sq: float | None = None

    def update(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add a batch of inputs with shape (..., d_in). ``weight`` (one per token) weighs
        the tokens in the Gram matrix only; the per-channel moments (scores) stay unweighted."""
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
            xw = x32 if weight is None else x32 * weight.reshape(-1, 1).to(x32)
            _accumulate(self.gram, xw, x32)

    def update_target(self, y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Add one batch of target outputs ``y`` (..., d_out) for this model's inputs ``x``
        (..., d_in) of the same tokens: Y X^T and ||Y||^2 (tokens weighted like the Gram)."""
        y32 = y.detach().reshape(-1, y.shape[-1]).float()
        x32 = x.detach().reshape(-1, self.d_in).float()
        if y32.shape[0] != x32.shape[0]:
            raise ValueError("target outputs and inputs of a sublayer must cover the same tokens")
        yw = y32 if weight is None else y32 * weight.reshape(-1, 1).to(y32)
        if self.target_cross is None:
            self.target_cross = torch.zeros(y32.shape[1], self.d_in, dtype=self.gram_dtype, device=x32.device)
        _accumulate(self.target_cross, yw, x32)
        self.target_sq = (self.target_sq or 0.0) + float((yw.double() * y32.double()).sum())

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
        for name in ("sum", "sum_sq", "sum_abs", "m2", "gram", "target_cross"):
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
    """Forward pre-hooks that feed the inputs of named linear modules into InputStats.

    With ``dense_modules`` (the same sublayers of an unpruned copy of the layer), each
    batch must be run through the dense copy first: its sublayer outputs (bias removed)
    are held for that one batch and become the targets of this model's inputs (dense-model
    targets). With ``residuals`` (name -> (this layer's module, the dense copy's module)
    whose inputs are the residual stream before that sublayer, i.e. its pre-norm), the
    residual-stream error dense - pruned is added to the targets, so the sublayer also
    undoes the error accumulated below it. With ``token_weights`` (name -> the pre-norm whose
    input is the residual stream that sublayer writes into), each token t enters the Gram and
    target products with weight 1 / rms(h_t)^2: the next norm divides the residual stream by
    its RMS, so an output error matters relative to it, and a few tokens with huge residual
    norms (attention sinks, massive activations) stop dominating the least-squares fit.
    """

    def __init__(self, modules: dict[str, torch.nn.Linear], with_gram: dict[str, bool],
                 dense_modules: dict[str, torch.nn.Linear] | None = None,
                 residuals: dict[str, tuple[torch.nn.Module, torch.nn.Module]] | None = None,
                 token_weights: dict[str, torch.nn.Module] | None = None, gram_dtype: torch.dtype = torch.float64):
        self.stats = {name: InputStats(m.in_features, with_gram=with_gram.get(name, False), gram_dtype=gram_dtype)
                      for name, m in modules.items()}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_res: dict[str, torch.Tensor] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(name)) for name, m in modules.items()]
        for name, m in (dense_modules or {}).items():
            self._handles.append(m.register_forward_hook(self._dense_hook(name)))
        self._residual = set()
        for name, (mine, dense) in (residuals or {}).items():
            if name not in (dense_modules or {}):
                raise ValueError("residual-stream targets need the dense copy's sublayer too")
            self._residual.add(name)
            self._handles.append(dense.register_forward_pre_hook(self._stash(f"dense_res:{name}")))
            self._handles.append(mine.register_forward_pre_hook(self._residual_hook(name)))
        self._paired = set(dense_modules or ())
        self._weights: dict[str, torch.Tensor] = {}
        for name, norm in (token_weights or {}).items():
            self._handles.append(norm.register_forward_pre_hook(self._weight_hook(name)))
        self._weighted = set(token_weights or ())

    def _weight_hook(self, name: str):
        def hook(_module, args):
            h = args[0].detach().float()
            self._weights[name] = 1.0 / (h.square().mean(-1) + 1e-6)
        return hook

    def _hook(self, name: str):
        def hook(_module, args):
            weight = None
            if name in self._weighted:
                weight = self._weights.pop(name, None)
                if weight is None:
                    raise RuntimeError(f"no token weights for {name}: its norm did not run before it")
            self.stats[name].update(args[0], weight)
            if name in self._paired:
                if name not in self._pending:
                    raise RuntimeError("run the dense copy of the layer on a batch before the pruned one")
                y = self._pending.pop(name)
                if name in self._residual:
                    y = y + self._pending_res.pop(name)
                self.stats[name].update_target(y, args[0], weight)
        return hook

    def _stash(self, key: str):
        def hook(_module, args):
            self._pending[key] = args[0].detach()
        return hook

    def _residual_hook(self, name: str):
        def hook(_module, args):
            dense = self._pending.pop(f"dense_res:{name}", None)
            if dense is None:
                raise RuntimeError("run the dense copy of the layer on a batch before the pruned one")
            self._pending_res[name] = (dense.float() - args[0].detach().float()).to(args[0].device)
        return hook

    def _dense_hook(self, name: str):
        def hook(module, args, output):
            y = output if module.bias is None else output - module.bias
            self._pending[name] = y.detach().float()
        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StatsCollector:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()
