"""Hidden-size pruning: remove residual-stream (embedding) channels from the whole model.

Removing residual channel j removes column j of the embedding and of the LM head, entry j of every
norm on the residual stream (pre-norms, Gemma 3 / OLMo 2 post-norms, the final norm), input
column j of every q/k/v/gate/up (fused ones too) and output row j of every o_proj/down_proj (and
their biases), as Minitron (Muralidharan et al. 2024) and ModelOpt's ``mcore_minitron`` prune the
embedding dimension. Per-head norms (Qwen3, Gemma 3) and OLMo 2's norms over the q/k projections
act on head dimensions and are untouched.

Scores, one per residual channel (higher = keep), streamed one layer at a time:

- ``minitron``: for every norm feeding a decoder sublayer (the inputs of q/k/v and of gate/up: the
  pre-norm outputs, or the residual stream itself where a family has no pre-norm), the mean of
  |x_j| over each window's tokens, its L2 norm over windows, summed over those inputs
  (ModelOpt's aggregation: mean over the sequence, L2 over the batch, sum over norms);
- ``output_error``: sum over every projection reading the residual stream (q/k/v, gate/up and the
  LM head) of ||W[:, j]||^2 * sum_t x_jt^2, the squared output error that zeroing input j alone
  would cause in that projection if the inputs were uncorrelated.

Surgery (:func:`prune_hidden`) keeps the model a stock checkpoint: ``hidden_size`` and an explicit
``head_dim`` are written into the config. RMSNorms then average over the kept channels only (each
token's kept activations are rescaled by rms_all / rms_kept); with ``compensation="none"`` the
result is exactly the dense model with the removed channels zeroed and every residual norm taken
over the kept channels (tests/test_hidden.py builds that model directly). Gemma 3 multiplies the
embeddings by sqrt(hidden_size), which a stock reload recomputes from the new config: the ratio
sqrt(d) / sqrt(d') is folded into the embedding weights, and with a tied LM head its inverse into
the final norm's (1 + w), so the pruned model computes what the sliced dense model computes.

Compensation of the readers (q/k/v and gate/up, fused or not, and an untied LM head; for a tied head,
which is the embedding, the final norm's weights get a diagonal fit instead): a ridge least
squares update of each projection's kept input columns, B = argmin ||W X - B X'||^2 +
lam ||B - W_K||^2 = (W C + lam W_K)(G' + lam I)^-1 with C = X X'^T, G' = X' X'^T (float64, Cholesky),
lam relative to tr(G') / d'. X are the dense model's projection inputs. X' are

- ``ridge``: X_K, the kept rows of the same dense inputs (all statistics from the dense model,
  the problem :func:`rcpu.compensate.ridge` solves for o_proj / down_proj);
- ``ridge_sequential``: the pruned model's own inputs at that projection (its kept-only norms,
  every earlier layer pruned and compensated), so the fit also absorbs the norm rescaling and the
  errors from below; targets stay the dense model's outputs.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from torch import nn

from .errors import RcpuError
from .layer_io import capture_layer_inputs, module_device, run_layer, run_until
from .models import DecoderAdapter, get_adapter
from .models.base import _slice_linear, _slice_norm
from .stats import _accumulate

__all__ = ["SCORES", "COMPENSATIONS", "channel_scores", "channels_to_keep", "prune_hidden", "prune_hidden_size",
           "residual_norms", "ridge_inputs", "ridge_diagonal"]

logger = logging.getLogger(__name__)

SCORES = ("minitron", "output_error")
COMPENSATIONS = ("none", "ridge", "ridge_sequential")

#: output rows of a projection solved at a time (bounds the float64 copies of an LM head)
_ROWS = 8192
#: diagonal jitters tried, relative to the mean diagonal of G', when G' + lam I is not positive definite
_JITTERS = (1e-10, 1e-8, 1e-6, 1e-4)


def residual_norms(adapter: DecoderAdapter, layer: nn.Module) -> list[nn.Module]:
    """The norms of one decoder layer whose channels are residual channels: the pre-norms and the
    norms on each sublayer's output (not the per-head or per-projection q/k norms)."""
    norms = [adapter.attn_norm(layer), adapter.mlp_norm(layer), *(getattr(layer, n) for n in adapter.post_norm_names)]
    return [n for n in norms if n is not None]


def _hidden_size(model: nn.Module, adapter: DecoderAdapter) -> int:
    return adapter.base.embed_tokens.weight.shape[1]


def _check_layout(model: nn.Module, adapter: DecoderAdapter) -> int:
    """The residual width, checked to be the same at every place that reads or writes it."""
    d = _hidden_size(model, adapter)
    for i, layer in enumerate(adapter.layers):
        widths = {lin.in_features for lin in (*adapter.attn_in(layer), *adapter.mlp_in(layer))}
        widths |= {adapter.attn_out(layer).out_features, adapter.mlp_out(layer).out_features}
        widths |= {n.weight.shape[0] for n in residual_norms(adapter, layer) if getattr(n, "weight", None) is not None}
        if widths != {d}:
            raise RcpuError(f"layer {i} reads or writes residual widths {sorted(widths)}, not the embedding's {d}; "
                            "hidden-size pruning needs one residual width")
    return d


# ------------------------------------------------------------------------------------------ scores


class _ChannelStats:
    """Per residual channel, streamed in float64: sum over windows of (mean over the window's
    tokens of |x_j|)^2, and sum over tokens of x_j^2."""

    def __init__(self, d: int, device: torch.device):
        self.window_sq = torch.zeros(d, dtype=torch.float64, device=device)
        self.sq = torch.zeros(d, dtype=torch.float64, device=device)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        x = x.reshape(-1, *x.shape[-2:]) if x.dim() > 2 else x[None]  # [windows, tokens, d]
        self.window_sq += x.abs().mean(1).square().sum(0).to(self.window_sq.device, torch.float64)
        self.sq += x.square().sum((0, 1)).to(self.sq.device, torch.float64)


def _column_energy(weight: torch.Tensor) -> torch.Tensor:
    """||W[:, j]||^2 per input column, float64, one block of rows at a time."""
    total = torch.zeros(weight.shape[1], dtype=torch.float64, device=weight.device)
    for start in range(0, weight.shape[0], _ROWS):
        total += weight[start:start + _ROWS].double().square().sum(0)
    return total


@torch.no_grad()
def channel_scores(model: nn.Module, windows: torch.Tensor, score: str = "minitron", *, batch_size: int = 8,
                   device: str | torch.device = "cpu") -> torch.Tensor:
    """One importance per residual channel (float64, on the CPU; higher = keep) from the
    calibration ``windows`` ([n, seqlen] token ids), the dense model run one layer at a time."""
    if score not in SCORES:
        raise RcpuError(f"unknown hidden-size score {score!r}; choose from {', '.join(SCORES)}")
    adapter = get_adapter(model)
    d = _check_layout(model, adapter)
    device = torch.device(device)
    total = torch.zeros(d, dtype=torch.float64, device=device)
    batches = capture_layer_inputs(model, adapter, windows, batch_size, device)
    for layer in adapter.layers:
        home = module_device(layer)
        layer.to(device)
        groups = [adapter.attn_in(layer), adapter.mlp_in(layer)]
        stats = [_ChannelStats(d, device) for _ in groups]
        hooks = [group[0].register_forward_pre_hook(lambda _m, args, s=s: s.update(args[0]))
                 for group, s in zip(groups, stats, strict=True)]
        try:
            batches = run_layer(layer, batches, keep_outputs=True)
        finally:
            for h in hooks:
                h.remove()
        for group, s in zip(groups, stats, strict=True):
            if score == "minitron":
                total += s.window_sq.sqrt()
            else:
                total += sum(_column_energy(lin.weight.to(device)) for lin in group) * s.sq
        layer.to(home)
    if score == "output_error":
        norm, head = adapter.final_norm(), model.get_output_embeddings()
        home = module_device(norm)
        norm.to(device)
        s = _ChannelStats(d, device)
        for h, _ in batches:
            s.update(norm(h.to(device)))
        norm.to(home)
        if head is not None:
            total += _column_energy(head.weight.to(device)) * s.sq
    return total.cpu()


def channels_to_keep(scores: torch.Tensor | Sequence[float], n: int, multiple_of: int = 1) -> torch.Tensor:
    """The ``n`` channels with the highest scores (ties to the lower index), ascending.

    ``multiple_of``: refuse an ``n`` that is not a multiple of it (GGUF block quantisation needs
    input widths that are multiples of 32, k-quants of 256; GPU kernels prefer multiples of 64)."""
    scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
    d = len(scores)
    if not 1 <= n <= d:
        raise RcpuError(f"cannot keep {n} of {d} hidden channels; keep between 1 and {d}")
    if multiple_of < 1 or n % multiple_of:
        raise RcpuError(f"hidden size {n} is not a multiple of {multiple_of}; choose a multiple of it")
    order = torch.sort(-scores, stable=True).indices
    return order[:n].sort().values


# ----------------------------------------------------------------------------------------- surgery


def _check_kept(kept: torch.Tensor | Sequence[int], d: int) -> torch.Tensor:
    kept = torch.as_tensor(kept).reshape(-1)
    if kept.numel() == 0:
        raise RcpuError("no hidden channels to keep; keep at least one")
    if kept.is_floating_point() or kept.dtype == torch.bool:
        raise RcpuError("kept hidden channels must be integer indices")
    kept = kept.long().cpu()
    if int(kept.min()) < 0 or int(kept.max()) >= d:
        raise RcpuError(f"kept hidden channels must lie in 0..{d - 1}")
    if len(kept.unique()) != len(kept):
        raise RcpuError("kept hidden channels contain duplicates")
    return kept.sort().values


def _set_hidden_attrs(modules: Sequence[nn.Module], old: int, new: int) -> None:
    for mod in modules:
        if getattr(mod, "hidden_size", None) == old:
            mod.hidden_size = new


def _slice_layer(adapter: DecoderAdapter, layer: nn.Module, kept: torch.Tensor, d: int) -> None:
    """Keep residual channels ``kept`` in one decoder layer, in place."""
    for norm in residual_norms(adapter, layer):
        _slice_norm(norm, kept)
    for lin in (*adapter.attn_in(layer), *adapter.mlp_in(layer)):
        _slice_linear(lin, kept, 1)
    for lin in (adapter.attn_out(layer), adapter.mlp_out(layer)):
        _slice_linear(lin, kept, 0)
    attn = adapter.attn(layer)
    _set_hidden_attrs([layer, attn, adapter.mlp(layer)], d, len(kept))
    private = getattr(attn, "config", None)  # Phi-3 layers pruned by heads carry a config of their own
    if private is not None and private is not adapter.config and getattr(private, "hidden_size", None) == d:
        private.hidden_size = len(kept)


def _slice_ends(model: nn.Module, adapter: DecoderAdapter, kept: torch.Tensor, d: int) -> dict:
    """The embedding, the final norm and the LM head; Gemma 3's embedding scale folded."""
    embed = adapter.base.embed_tokens
    head = model.get_output_embeddings()
    tied = head is not None and head.weight is embed.weight
    weight = embed.weight.data.index_select(1, kept.to(embed.weight.device))
    info: dict = {"tied_head": tied}
    ratio = 1.0
    if adapter.embed_scale_from_hidden and isinstance(getattr(embed, "embed_scale", None), torch.Tensor):
        old, new = float(embed.embed_scale), len(kept) ** 0.5
        ratio = old / new
        weight = (weight.double() * ratio).to(embed.weight.dtype)
        embed.embed_scale = torch.tensor(new, dtype=embed.embed_scale.dtype, device=embed.embed_scale.device)
        if hasattr(embed, "scalar_embed_scale"):
            embed.scalar_embed_scale = new
        info["embed_scale"] = [old, new]
    embed.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    embed.embedding_dim = len(kept)
    norm = adapter.final_norm()
    _slice_norm(norm, kept)
    if tied:
        head.weight = embed.weight
        head.in_features = len(kept)
        if ratio != 1.0:  # the head reads the scaled weights: undo it on the final norm's output
            if getattr(norm, "weight", None) is None:
                raise RcpuError("the embedding scale cannot be folded: the LM head is tied and the final norm "
                                "has no weight")
            off = adapter.norm_weight_offset
            norm.weight.data.copy_(((norm.weight.data.double() + off) / ratio - off).to(norm.weight.dtype))
    elif head is not None:
        _slice_linear(head, kept, 1)
    _set_hidden_attrs([adapter.base], d, len(kept))
    return info


def _write_config(cfg, adapter: DecoderAdapter, new: int) -> None:
    head_dims = {adapter.attn(layer).head_dim for layer in adapter.layers}
    if len(head_dims) == 1:
        cfg.head_dim = head_dims.pop()
    cfg.hidden_size = new


def _check_config(model: nn.Module, adapter: DecoderAdapter, new: int) -> None:
    """Refuse a hidden size the config class rejects (Llama's and Gemma 3's configs want it to be a
    multiple of the attention head count, head_dim notwithstanding), before anything is cut."""
    cfg = copy.deepcopy(model.config)
    _write_config(cfg, adapter, new)
    validate = getattr(cfg, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as exc:  # the hub's strict-dataclass error wraps the validator's ValueError
        cause = exc.__cause__ or exc
        reason = str(cause).strip().splitlines()[-1].strip().rstrip(".")
        raise RcpuError(f"hidden size {new} does not make a loadable {cfg.model_type} config ({reason}); "
                        "choose another size") from None


# ------------------------------------------------------------------------------------ compensation


class _PairStats:
    """Streamed float64 products of a projection's dense inputs X (d) and the inputs X' (d') the
    pruned projection sees: G = X X^T, and with separate X' also C = X X'^T and G' = X' X'^T
    (else X' = X_K and both are blocks of G)."""

    def __init__(self, d: int, kept: torch.Tensor, device: torch.device, separate: bool):
        self.kept = kept.to(device)
        self.gram = torch.zeros(d, d, dtype=torch.float64, device=device)
        self.cross = torch.zeros(d, len(kept), dtype=torch.float64, device=device) if separate else None
        self.gram_kept = torch.zeros(len(kept), len(kept), dtype=torch.float64, device=device) if separate else None
        self.n = 0

    def update(self, x: torch.Tensor, x_pruned: torch.Tensor | None) -> None:
        x32 = x.detach().reshape(-1, x.shape[-1]).to(self.gram.device, torch.float32)
        _accumulate(self.gram, x32, x32)
        if self.cross is not None:
            p32 = x_pruned.detach().reshape(-1, x_pruned.shape[-1]).to(self.gram.device, torch.float32)
            _accumulate(self.cross, x32, p32)
            _accumulate(self.gram_kept, p32, p32)
        self.n += x32.shape[0]

    def products(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.cross is not None:
            return self.gram, self.cross, self.gram_kept
        k = self.kept
        return self.gram, self.gram[:, k], self.gram[k[:, None], k[None, :]]


def _factor(gram_kept: torch.Tensor, lam_abs: float) -> tuple[torch.Tensor, float]:
    mean_diag = max(float(torch.diagonal(gram_kept).mean()), 1e-30)
    for jitter in (0.0, *(j * mean_diag for j in _JITTERS)):
        a = gram_kept.clone()
        a.diagonal().add_(lam_abs + jitter)
        chol, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            if jitter:
                logger.warning("hidden ridge: the kept Gram matrix is not numerically positive definite; "
                               "added jitter %.3g", jitter)
            return chol, jitter
    raise RcpuError(f"the kept inputs' Gram matrix is singular even with jitter; use a larger ridge_lambda "
                    f"than {lam_abs:g} (absolute)")


def ridge_inputs(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, gram_kept: torch.Tensor,
                 kept: torch.Tensor, lam: float, relative: bool = True) -> tuple[torch.Tensor, dict]:
    """argmin_B ||W X - B X'||^2 + lam ||B - W_K||^2 = (W C + lam W_K)(G' + lam I)^-1 for one
    projection W (d_out x d) from G = X X^T, C = X X'^T and G' = X' X'^T (float64, Cholesky; lam
    relative to tr(G') / d' unless not ``relative``). Returns the new kept columns (W's dtype and
    device) and the relative output errors ||W X - B X'||^2 / ||W X||^2 before (B = W_K) and after."""
    dev = gram.device
    kept = kept.to(dev)
    scale = float(torch.trace(gram_kept)) / gram_kept.shape[0] if relative else 1.0
    lam_abs = lam * scale
    chol, jitter = _factor(gram_kept, lam_abs)
    new = torch.empty(weight.shape[0], len(kept), dtype=weight.dtype, device=weight.device)
    y2 = before = after = 0.0
    for start in range(0, weight.shape[0], _ROWS):
        w = weight[start:start + _ROWS].to(dev, torch.float64)
        w_k = w[:, kept]
        wc = w @ cross
        b = torch.cholesky_solve((wc + lam_abs * w_k).T, chol).T
        y2 += float(((w @ gram) * w).sum())
        before += float(-2 * (wc * w_k).sum() + ((w_k @ gram_kept) * w_k).sum())
        after += float(-2 * (wc * b).sum() + ((b @ gram_kept) * b).sum())
        new[start:start + _ROWS] = b.to(weight.device, weight.dtype)
    y2 = max(y2, torch.finfo(torch.float64).tiny)
    return new, {"rel_error_uncompensated": (y2 + before) / y2, "rel_error": (y2 + after) / y2,
                 "output_energy": y2, "lambda": lam, "lambda_abs": lam_abs, "jitter": jitter}


def ridge_diagonal(weight: torch.Tensor, gram: torch.Tensor, cross: torch.Tensor, gram_kept: torch.Tensor,
                   kept: torch.Tensor, lam: float, relative: bool = True) -> tuple[torch.Tensor, dict]:
    """argmin_s ||W X - W_K diag(s) X'||^2 + lam ||s - 1||^2: one scale per kept input of W, for a
    projection whose weights cannot change (a tied LM head is the embedding) but whose input is a
    norm's output (the scales go into the norm's weight). With A = W_K^T W_K the objective is
    s^T (A o G') s - 2 b^T s + ||W X||^2, b_j = sum_i (W C)_ij (W_K)_ij, so
    s = (A o G' + lam I)^-1 (b + lam 1) (float64; lam relative to the mean diagonal of A o G').
    Returns s (float64) and the relative output errors before (s = 1) and after."""
    dev = gram.device
    kept = kept.to(dev)
    n = len(kept)
    m = torch.zeros(weight.shape[1], weight.shape[1], dtype=torch.float64, device=dev)  # W^T W, all of it
    for start in range(0, weight.shape[0], _ROWS):
        w = weight[start:start + _ROWS].to(dev, torch.float64)
        m += w.T @ w
    y2 = float((m * gram).sum())  # ||W X||^2 = tr(W^T W G)
    b = (m[kept] * cross.T).sum(1)  # b_j = (W^T W C)_{K_j, j}
    q = m[kept[:, None], kept[None, :]] * gram_kept
    lam_abs = lam * (float(torch.trace(q)) / n if relative else 1.0)
    chol, jitter = _factor(q, lam_abs)
    scales = torch.cholesky_solve((b + lam_abs)[:, None], chol)[:, 0]
    ones = torch.ones_like(b)
    y2 = max(y2, torch.finfo(torch.float64).tiny)
    before = y2 - 2 * float(b.sum()) + float(ones @ q @ ones)
    after = y2 - 2 * float(b @ scales) + float(scales @ q @ scales)
    return scales, {"rel_error_uncompensated": before / y2, "rel_error": after / y2, "lambda": lam,
                    "lambda_abs": lam_abs, "jitter": jitter}


def _input_of(layer: nn.Module, module: nn.Module, h: torch.Tensor, kw: dict) -> torch.Tensor:
    """The input of ``module`` inside ``layer`` for one batch (the layer runs only that far)."""
    box: list[torch.Tensor] = []
    handle = module.register_forward_pre_hook(lambda _m, args: box.append(args[0].detach()))
    try:
        run_until(layer, [(h, kw)], module)
    finally:
        handle.remove()
    return box[0]


def _compensate_group(dense_in: list[nn.Linear], pruned_in: list[nn.Linear], pairs: _PairStats, kept: torch.Tensor,
                      lam: float) -> dict:
    gram, cross, gram_kept = pairs.products()
    errors = {"rel_error_uncompensated": 0.0, "rel_error": 0.0}
    total = 0.0
    for dense, pruned in zip(dense_in, pruned_in, strict=True):
        new, info = ridge_inputs(dense.weight, gram, cross, gram_kept, kept, lam)
        pruned.weight.data.copy_(new)
        total += info["output_energy"]
        for key in errors:
            errors[key] += info[key] * info["output_energy"]
    return {key: value / max(total, torch.finfo(torch.float64).tiny) for key, value in errors.items()}


@torch.no_grad()
def prune_hidden(model: nn.Module, kept: torch.Tensor | Sequence[int], windows: torch.Tensor | None = None, *,
                 compensation: str = "none", ridge_lambda: float = 1e-2, batch_size: int = 8,
                 device: str | torch.device = "cpu") -> dict:
    """Keep residual channels ``kept`` everywhere, in place, and write the new ``hidden_size`` (and
    an explicit ``head_dim``) into the config. With a ``compensation`` other than "none", the
    readers' kept input columns are refitted on the calibration ``windows`` (see the module
    docstring). Returns a log: per layer and sublayer, the relative reconstruction errors of the
    compensated projections on the calibration data before and after compensation."""
    if compensation not in COMPENSATIONS:
        raise RcpuError(f"unknown hidden-size compensation {compensation!r}; choose from {', '.join(COMPENSATIONS)}")
    if compensation != "none" and windows is None:
        raise RcpuError(f"compensation {compensation!r} needs calibration windows")
    if ridge_lambda < 0:
        raise RcpuError(f"ridge_lambda must be at least 0, got {ridge_lambda}")
    adapter = get_adapter(model)
    d = _check_layout(model, adapter)
    kept = _check_kept(kept, d)
    _check_config(model, adapter, len(kept))
    info: dict = {"hidden_size": [d, len(kept)], "compensation": compensation, "layers": []}
    if compensation == "none":
        for layer in adapter.layers:
            _slice_layer(adapter, layer, kept, d)
        head_weight = None
    else:
        head_weight = _compensated_layers(model, adapter, kept, d, windows, compensation, ridge_lambda, batch_size,
                                          torch.device(device), info)
    info.update(_slice_ends(model, adapter, kept, d))
    if head_weight is not None:
        model.get_output_embeddings().weight.data.copy_(head_weight)
    _write_config(model.config, adapter, len(kept))
    return info


def _compensated_layers(model: nn.Module, adapter: DecoderAdapter, kept: torch.Tensor, d: int, windows: torch.Tensor,
                        compensation: str, lam: float, batch_size: int, device: torch.device,
                        info: dict) -> torch.Tensor | None:
    """Slice and compensate every decoder layer; returns the untied LM head's new kept columns.
    A tied head is the embedding and stays; the final norm's kept weights are rescaled for it
    instead (:func:`ridge_diagonal`; the norm is sliced afterwards)."""
    sequential = compensation == "ridge_sequential"
    kept_dev = kept.to(device)
    dense_batches = capture_layer_inputs(model, adapter, windows, batch_size, device)
    pruned_batches = [(h.index_select(-1, kept_dev.to(h.device)), kw) for h, kw in dense_batches] if sequential else None
    for layer in adapter.layers:
        home = module_device(layer)
        layer.to(device)
        dense = copy.deepcopy(layer)
        _slice_layer(adapter, layer, kept, d)
        record = {}
        for part, dense_in, pruned_in in (("attn", adapter.attn_in(dense), adapter.attn_in(layer)),
                                          ("mlp", adapter.mlp_in(dense), adapter.mlp_in(layer))):
            pairs = _PairStats(d, kept, device, sequential)
            for i, (h, kw) in enumerate(dense_batches):
                x = _input_of(dense, dense_in[0], h, kw)
                pairs.update(x, _input_of(layer, pruned_in[0], pruned_batches[i][0], kw) if sequential else None)
            record[part] = _compensate_group(dense_in, pruned_in, pairs, kept, lam)
        info["layers"].append(record)
        dense_batches = run_layer(dense, dense_batches, keep_outputs=True)
        if sequential:
            pruned_batches = run_layer(layer, pruned_batches, keep_outputs=True)
        del dense
        layer.to(home)
    head = model.get_output_embeddings()
    if head is None:
        return None
    tied = head.weight is adapter.base.embed_tokens.weight
    norm = adapter.final_norm()
    if tied and getattr(norm, "weight", None) is None:
        info["final_norm"] = "not compensated: the LM head is tied and the final norm has no weight"
        return None
    dense_norm = copy.deepcopy(norm).to(device)
    pruned_norm = copy.deepcopy(norm).to(device)
    _slice_norm(pruned_norm, kept)
    pairs = _PairStats(d, kept, device, sequential)
    for i, (h, _) in enumerate(dense_batches):
        pairs.update(dense_norm(h.to(device)), pruned_norm(pruned_batches[i][0].to(device)) if sequential else None)
    gram, cross, gram_kept = pairs.products()
    if tied:  # the head is the embedding: scale the final norm's kept outputs instead
        scales, fit = ridge_diagonal(head.weight, gram, cross, gram_kept, kept, lam)
        off = adapter.norm_weight_offset
        w = norm.weight.data
        k = kept.to(w.device)
        w[k] = ((w[k].double() + off) * scales.to(w.device) - off).to(w.dtype)
        info["final_norm"] = {key: fit[key] for key in ("rel_error_uncompensated", "rel_error")}
        return None
    new, head_info = ridge_inputs(head.weight, gram, cross, gram_kept, kept, lam)
    info["lm_head"] = {k: head_info[k] for k in ("rel_error_uncompensated", "rel_error")}
    return new


def prune_hidden_size(model: nn.Module, windows: torch.Tensor, hidden_size: int, *, score: str = "minitron",
                      compensation: str = "none", ridge_lambda: float = 1e-2, multiple_of: int = 1,
                      batch_size: int = 8, device: str | torch.device = "cpu") -> dict:
    """Score the residual channels on ``windows``, keep the best ``hidden_size`` and prune them
    (:func:`channel_scores`, :func:`channels_to_keep`, :func:`prune_hidden`)."""
    scores = channel_scores(model, windows, score, batch_size=batch_size, device=device)
    kept = channels_to_keep(scores, hidden_size, multiple_of)
    info = prune_hidden(model, kept, windows, compensation=compensation, ridge_lambda=ridge_lambda,
                        batch_size=batch_size, device=device)
    info["score"] = score
    info["kept"] = kept.tolist()
    return info
