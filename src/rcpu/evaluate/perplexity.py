"""Perplexity over non-overlapping windows (the RCPU / FLAP / Wanda protocol).

The evaluation text is tokenised once into a 1-D tensor of ids, cut into
``len(ids) // seqlen`` non-overlapping windows of exactly ``seqlen`` tokens (the
remainder is dropped), and every window is scored on its own: no context is
carried over from the previous window, and there is no padding or attention
mask. For a tokenizer that starts every encoding with a BOS token (Gemma; pass
``bos=rcpu.data.bos_token_id(tokenizer)``) each window is that BOS followed by
``seqlen - 1`` text tokens (``len(ids) // (seqlen - 1)`` windows), and the BOS is
only ever an input, never a predicted token; for the others (SmolLM2, Qwen2) no
BOS is added. Each window contributes its ``seqlen - 1`` next-token predictions,
and

    perplexity = exp(sum of token NLLs / number of predicted tokens).

Since every window has the same length this equals ``exp`` of the mean of the
per-window losses, which is what the reference implementations report.

Memory: the loss is computed in float32 one batch at a time, so logits are never
held for more than one batch. When the model has the usual ``base model +
output embedding`` structure (``model.get_decoder()`` and
``model.get_output_embeddings()``), the head is applied to the hidden states in
chunks, so even the logits of one batch are never materialised in full. Models
whose forward does something after the head (logit soft-capping, logit scaling,
...) are detected by a one-off comparison on a short prefix and scored through
the plain ``model(input_ids).logits`` path instead.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..data import consecutive_windows, window_span
from ..errors import RcpuError

logger = logging.getLogger(__name__)

__all__ = ["PerplexityResult", "perplexity"]

# Default number of tokens per forward batch (batch_size * seqlen ~ this).
DEFAULT_BATCH_TOKENS = 4096
# Upper bound on the number of float32 logit elements materialised at once by the
# chunked head (64 Mi elements = 256 MiB).
_LOGIT_CHUNK_ELEMENTS = 1 << 26
# Length of the prefix used to check that head(base(x)) reproduces model(x).logits.
_PROBE_TOKENS = 16


@dataclass(frozen=True)
class PerplexityResult:
    """Outcome of :func:`perplexity`."""

    ppl: float
    nll: float  # mean negative log-likelihood per predicted token (nats)
    n_tokens: int  # predicted tokens counted (n_windows * (seqlen - 1))
    n_windows: int
    seqlen: int
    dtype: str  # the model's parameter dtype, e.g. "float32"
    source: str = ""  # free label, e.g. "builtin:eval"
    bos: bool = False  # every window started with a BOS token (never scored)

    def to_dict(self) -> dict:
        return asdict(self)

    def format(self) -> str:
        """One line, e.g. ``ppl 21.43  (seqlen 128, 4,096 windows, 520,192 tokens, float32, builtin:eval)``."""
        parts = [
            f"seqlen {self.seqlen}",
            f"{self.n_windows:,} window{'s' if self.n_windows != 1 else ''}",
            f"{self.n_tokens:,} tokens",
            self.dtype,
        ]
        if self.bos:
            parts.append("BOS first")
        if self.source:
            parts.append(self.source)
        return f"ppl {self.ppl:.2f}  ({', '.join(parts)})"


def _model_dtype(model: torch.nn.Module) -> torch.dtype:
    first = None
    for p in model.parameters():
        if first is None:
            first = p.dtype
        if p.dtype.is_floating_point:
            return p.dtype
    return first if first is not None else torch.float32


def _model_device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _full_logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids, use_cache=False).logits


def _hidden_states(base, input_ids: torch.Tensor) -> torch.Tensor:
    out = base(input_ids=input_ids, use_cache=False)
    hidden = getattr(out, "last_hidden_state", None)
    if hidden is None:
        hidden = out[0]
    return hidden


def _split_model(model, probe: torch.Tensor):
    """Return ``(base, head)`` if ``head(base(x))`` reproduces ``model(x).logits``, else ``None``."""
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    if not callable(get_decoder) or not callable(get_head):
        return None
    try:
        base = get_decoder()
        head = get_head()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if base is None or head is None or base is model or not isinstance(head, torch.nn.Module):
        return None
    try:
        split = head(_hidden_states(base, probe))
    except (TypeError, AttributeError, ValueError, IndexError, KeyError):
        return None
    full = _full_logits(model, probe)
    if not isinstance(split, torch.Tensor) or split.shape != full.shape:
        return None
    split = split.float()
    full = full.float()
    tol = 1e-3 * full.abs().max().item() + 1e-5
    if not torch.isfinite(split).all() or (split - full.to(split.device)).abs().max().item() > tol:
        logger.info("model(x).logits differs from head(base(x)); scoring with full logits")
        return None
    return base, head


def _chunked_nll_sum(head, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of float32 cross-entropies of ``head(hidden)`` against ``labels``, chunked over tokens."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1)
    vocab = getattr(head, "out_features", None) or getattr(getattr(head, "weight", None), "shape", [0])[0]
    rows = max(1, _LOGIT_CHUNK_ELEMENTS // max(1, int(vocab)))
    total = None
    for start in range(0, hidden.shape[0], rows):
        logits = head(hidden[start : start + rows]).float()
        part = F.cross_entropy(logits, labels[start : start + rows].to(logits.device), reduction="sum")
        total = part if total is None else total + part.to(total.device)
    return total


def _check_arguments(ids, seqlen: int, batch_size: int | None,
                     max_tokens: int | None) -> tuple[torch.Tensor, int]:
    """``(ids as a 1-D tensor cut to max_tokens, seqlen as an int)``; bad arguments fail before any forward."""
    if not isinstance(ids, torch.Tensor):
        raise RcpuError(f"perplexity: ids must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise RcpuError(f"perplexity: ids must be a 1-D tensor of token ids, got shape {tuple(ids.shape)}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise RcpuError(f"perplexity: ids must be an integer tensor, got {ids.dtype}")
    seqlen = int(seqlen)
    if seqlen < 2:
        raise RcpuError(f"perplexity: seqlen must be at least 2, got {seqlen}")
    if batch_size is not None and int(batch_size) < 1:
        raise RcpuError(f"perplexity: batch_size must be at least 1, got {batch_size}")
    if max_tokens is not None:
        if int(max_tokens) < 0:
            raise RcpuError(f"perplexity: max_tokens must be non-negative, got {max_tokens}")
        ids = ids[: int(max_tokens)]
    return ids, seqlen


def _cut_windows(ids: torch.Tensor, seqlen: int, bos: int | None = None) -> torch.Tensor:
    """``(n, seqlen)`` long ids: the non-overlapping full windows of ``ids`` (each after ``bos`` when
    given), the remainder dropped."""
    windows = consecutive_windows(ids, seqlen, bos)
    if windows.shape[0] == 0:
        raise RcpuError(
            f"perplexity: only {ids.numel():,} tokens to evaluate, fewer than one window of "
            f"{window_span(seqlen, bos)} text tokens (seqlen {seqlen}{', after BOS' if bos is not None else ''}); "
            "use more text, a larger --max-tokens or a smaller seqlen"
        )
    return windows


def _batch_nll(model, split, batch: torch.Tensor) -> torch.Tensor:
    """Summed float32 NLL of the next-token predictions in ``batch`` (windows already on the input device).

    With ``split = (base, head)`` the head is applied in chunks so the batch's logits are never held
    in full; otherwise (``None``) the model's own logits are used.
    """
    labels = batch[:, 1:]
    if split is not None:
        base, head = split
        hidden = _hidden_states(base, batch)[:, :-1]
        return _chunked_nll_sum(head, hidden, labels)
    logits = _full_logits(model, batch)[:, :-1].float()
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        labels.reshape(-1).to(logits.device),
        reduction="sum",
    )
    return nll


def _total_nll(model, windows: torch.Tensor, bs: int, device: torch.device, progress: bool) -> float:
    """Sum of the NLLs of all windows, ``bs`` windows per forward, with the model in eval mode.

    The model's training flag is restored afterwards, even when a forward fails.
    """
    n, seqlen = windows.shape
    was_training = model.training
    model.eval()
    try:
        probe = windows[:1, : min(seqlen, _PROBE_TOKENS)].to(device)
        split = _split_model(model, probe)
        total_nll = 0.0
        with tqdm(total=n, desc="perplexity", unit="win", disable=not progress) as bar:
            for start in range(0, n, bs):
                batch = windows[start : start + bs].to(device)
                nll = _batch_nll(model, split, batch)
                total_nll += float(nll.item())
                bar.update(batch.shape[0])
    finally:
        model.train(was_training)
    return total_nll


def _result(total_nll: float, n: int, seqlen: int, dtype_name: str, source: str, bos: bool = False) -> PerplexityResult:
    """Perplexity from the summed NLL; warns when it is not finite, a sign of a broken model."""
    n_tokens = n * (seqlen - 1)
    mean_nll = total_nll / n_tokens
    try:
        ppl = math.exp(mean_nll)
    except OverflowError:
        ppl = math.inf
    if not math.isfinite(ppl):
        logger.warning("perplexity is not finite (mean NLL %s); the model may be broken", mean_nll)
    return PerplexityResult(
        ppl=ppl,
        nll=mean_nll,
        n_tokens=n_tokens,
        n_windows=n,
        seqlen=seqlen,
        dtype=dtype_name,
        source=source,
        bos=bos,
    )


@torch.no_grad()
def perplexity(
    model,
    ids: torch.Tensor,
    seqlen: int,
    *,
    batch_size: int | None = None,
    max_tokens: int | None = None,
    device=None,
    source: str = "",
    progress: bool = True,
    bos: int | None = None,
) -> PerplexityResult:
    """Perplexity of ``model`` on ``ids`` over non-overlapping ``seqlen``-token windows.

    Args:
        model: a causal LM (``model(input_ids=..., use_cache=False).logits``). It is put in
            eval mode for the evaluation and its previous training flag is restored afterwards.
        ids: 1-D LongTensor with the whole evaluation text tokenised once (a ``(1, N)``
            tensor is accepted too).
        seqlen: window length; each window yields ``seqlen - 1`` predictions.
        batch_size: windows per forward pass; default ``max(1, 4096 // seqlen)``.
        max_tokens: if given, only the first ``max_tokens`` ids are used.
        device: where inputs go; defaults to the device of the model's first parameter.
        source: free label copied into the result (e.g. ``"builtin:eval"``).
        progress: show a tqdm progress bar.
        bos: start every window with this token id (``rcpu.data.bos_token_id(tokenizer)``: the
            BOS of a tokenizer that adds one, else None). The window then holds ``seqlen - 1`` text
            tokens, all of them predicted; the BOS is never a predicted token.

    Raises:
        RcpuError: bad arguments, or fewer than ``seqlen`` tokens to evaluate.
    """
    ids, seqlen = _check_arguments(ids, seqlen, batch_size, max_tokens)
    windows = _cut_windows(ids, seqlen, bos)
    n = windows.shape[0]
    bs = int(batch_size) if batch_size is not None else max(1, DEFAULT_BATCH_TOKENS // seqlen)
    bs = min(bs, n)
    device = torch.device(device) if device is not None else _model_device(model)
    dtype_name = _dtype_name(_model_dtype(model))
    logger.debug(
        "perplexity: %d windows of %d tokens%s (%d dropped), batch %d, device %s, %s",
        n,
        seqlen,
        "" if bos is None else " after BOS",
        ids.numel() - n * window_span(seqlen, bos),
        bs,
        device,
        dtype_name,
    )
    total_nll = _total_nll(model, windows, bs, device, progress)
    return _result(total_nll, n, seqlen, dtype_name, source, bos is not None)
