"""Distillation loss over the LM head, chunked over positions, with its gradient computed in place.

Why our own: the loss needs the student's and the teacher's logits, ``tokens x vocab`` each. At a
150k vocabulary one batch of 8 x 2048 tokens is 10 GB of float32 logits per model, and autograd
would keep the student's for the backward pass. Chunking the positions (torchtune's chunked KL)
bounds the forward, but the graph still holds every chunk. TRL's generalised JSD and torch's
``kl_div`` take whole logits. Liger's fused linear losses do what is needed, but only as Triton
kernels on GPUs. So :class:`FusedHeadDistillation` does it in plain torch: for each chunk of
positions it computes both heads' logits, the loss and its gradient with respect to the student's
logits in closed form, and keeps only the gradients for the hidden states (``tokens x hidden``)
and, when the head is trained, for its weight. Peak memory is one chunk of logits, on any device.

The loss per position, with ``p`` the teacher's and ``q`` the student's softmax at temperature
``T`` and ``y`` the next token::

    alpha * T^2 * KL(p_T || q_T)  +  (1 - alpha) * CE(softmax(z), y)

averaged over positions (``normaliser``). Its gradient with respect to the student's logits z is
``alpha * T * (q_T - p_T) + (1 - alpha) * (softmax(z) - onehot(y))``. ``T^2`` keeps the gradient's
scale independent of the temperature (Hinton et al., 2015).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: logits per chunk (rows x vocab); 2^24 float32 elements is 64 MiB per model
DEFAULT_CHUNK_ELEMENTS = 1 << 24

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "distillation_loss", "loss_terms", "reference_distillation_loss"]


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return F.linear(hidden, weight, bias).float()


def _chunk_terms(z: torch.Tensor, zt: torch.Tensor | None, labels: torch.Tensor | None, alpha: float,
                 temperature: float, topk: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of one chunk and its gradient with respect to the student's logits ``z``.

    ``topk`` (the teacher's ``k`` largest logits and their token ids, per position) stands for
    ``zt``: the teacher's distribution is then the softmax over those ``k`` tokens (zero elsewhere),
    and the KL term is taken against it."""
    loss = z.new_zeros(())
    grad = torch.zeros_like(z)
    if alpha > 0 and topk is not None:
        values, ids = topk
        log_q = torch.log_softmax(z / temperature, dim=-1)
        log_p = torch.log_softmax(values.float() / temperature, dim=-1)
        p = log_p.exp()
        loss = loss + alpha * temperature**2 * (p * (log_p - log_q.gather(1, ids))).sum()
        grad += (alpha * temperature) * log_q.exp()
        grad.scatter_add_(1, ids, -(alpha * temperature) * p)
    elif alpha > 0:
        log_q = torch.log_softmax(z / temperature, dim=-1)
        log_p = torch.log_softmax(zt / temperature, dim=-1)
        p = log_p.exp()
        loss = loss + alpha * temperature**2 * (p * (log_p - log_q)).sum()
        grad += (alpha * temperature) * (log_q.exp() - p)
    if alpha < 1:
        log_s = torch.log_softmax(z, dim=-1)
        loss = loss - (1 - alpha) * log_s.gather(1, labels[:, None]).sum()
        grad += (1 - alpha) * log_s.exp()
        grad.scatter_add_(1, labels[:, None], torch.full((z.shape[0], 1), -(1 - alpha), device=z.device))
    return loss, grad


class FusedHeadDistillation(torch.autograd.Function):
    """``loss(hidden, weight, bias)`` with the teacher's logits and the gradients made chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels, alpha,
                temperature, normaliser, chunk_rows, topk_values=None, topk_ids=None):
        want_w = weight.requires_grad
        want_b = bias is not None and bias.requires_grad
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk_rows):
            rows = slice(start, start + chunk_rows)
            z = _logits(hidden[rows], weight, bias)
            topk = None if topk_values is None else (topk_values[rows], topk_ids[rows])
            zt = _logits(teacher_hidden[rows], teacher_weight, teacher_bias) if alpha > 0 and topk is None else None
            part, g = _chunk_terms(z, zt, labels[rows] if alpha < 1 else None, alpha, temperature, topk)
            total += part
            g /= normaliser
            grad_h[rows] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if want_w:
                grad_w.addmm_(g.t(), hidden[rows].float())
            if want_b:
                grad_b += g.sum(0)
            del z, zt, g
        ctx.save_for_backward(grad_h, *(t for t in (grad_w, grad_b) if t is not None))
        ctx.has = (want_w, want_b)
        ctx.dtypes = (weight.dtype, None if bias is None else bias.dtype)
        return total / normaliser

    @staticmethod
    def backward(ctx, grad_out):
        saved = list(ctx.saved_tensors)
        want_w, want_b = ctx.has
        grad_h = saved.pop(0)
        grad_h = grad_h * grad_out.to(grad_h.dtype)
        grad_w = (saved.pop(0) * grad_out).to(ctx.dtypes[0]) if want_w else None
        grad_b = (saved.pop(0) * grad_out).to(ctx.dtypes[1]) if want_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None, None, None, None, None, None


def distillation_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    *,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    alpha: float = 1.0,
    temperature: float = 1.0,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Mean distillation loss over positions (see the module docstring).

    Args:
        hidden: the student's final hidden states at the scored positions, ``[N, H]`` (any leading
            shape is flattened).
        weight, bias: the student's LM head.
        labels: next-token ids, ``[N]``; used by the LM term (``alpha < 1``).
        teacher_hidden, teacher_weight, teacher_bias: the teacher's final hidden states and head
            (needed when ``alpha > 0``); no gradient flows into them.
        alpha: weight of the KL term; 1 is pure distillation, 0 the plain LM loss.
        temperature: softmax temperature of the KL term.
        chunk_elements: logits held at once per model (rows x vocab).
        teacher_topk: instead of the teacher's hidden states and head, its ``k`` largest logits and
            their token ids per position (``[N, k]`` each, e.g. read from a teacher cache): the KL
            term then takes the teacher's distribution as the softmax over those ``k`` tokens.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    hidden = hidden.reshape(-1, hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    topk_values = topk_ids = None
    if alpha > 0 and teacher_topk is not None:
        topk_values, topk_ids = (t.reshape(-1, t.shape[-1]).detach() for t in teacher_topk)
        topk_ids = topk_ids.long().to(hidden.device)
        topk_values = topk_values.to(hidden.device)
    elif alpha > 0:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("alpha > 0 needs the teacher's hidden states and head, or its top-k logits")
        teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
        teacher_weight = teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()
    rows = max(1, int(chunk_elements) // max(1, weight.shape[0]))
    return FusedHeadDistillation.apply(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, labels,
                                       float(alpha), float(temperature), float(hidden.shape[0]), rows,
                                       topk_values, topk_ids)


def reference_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor | None,
                                labels: torch.Tensor, alpha: float = 1.0, temperature: float = 1.0) -> torch.Tensor:
    """The same loss from whole logits with torch's own functions (for tests and small models)."""
    z = student_logits.reshape(-1, student_logits.shape[-1]).float()
    loss = z.new_zeros(())
    if alpha > 0:
        zt = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
        kl = F.kl_div(torch.log_softmax(z / temperature, -1), torch.log_softmax(zt / temperature, -1),
                      reduction="batchmean", log_target=True)
        loss = loss + alpha * temperature**2 * kl
    if alpha < 1:
        loss = loss + (1 - alpha) * F.cross_entropy(z, labels.reshape(-1).to(z.device))
    return loss


@torch.no_grad()
def loss_terms(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
               teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor, teacher_bias: torch.Tensor | None,
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> dict[str, float]:
    """Summed KL(teacher || student) at temperature 1 and both models' summed NLL, without gradients
    (held-out measurements)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    teacher_hidden = teacher_hidden.reshape(-1, teacher_hidden.shape[-1])
    labels = labels.reshape(-1).to(hidden.device)
    rows = max(1, int(chunk_elements) // max(1, weight.shape[0]))
    kl = nll = teacher_nll = 0.0
    for start in range(0, hidden.shape[0], rows):
        sl = slice(start, start + rows)
        log_q = torch.log_softmax(_logits(hidden[sl], weight, bias), dim=-1)
        log_p = torch.log_softmax(_logits(teacher_hidden[sl], teacher_weight, teacher_bias), dim=-1)
        kl += float((log_p.exp() * (log_p - log_q)).sum())
        nll -= float(log_q.gather(1, labels[sl, None]).sum())
        teacher_nll -= float(log_p.gather(1, labels[sl, None]).sum())
    return {"kl": kl, "nll": nll, "teacher_nll": teacher_nll, "tokens": hidden.shape[0]}
