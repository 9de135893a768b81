"""Layer refinement: a few optimiser steps that pull a pruned decoder layer's outputs
back towards the unpruned layer's (regional optimisation, as in Wanda++, Yang et al. 2025).

Compensation (ridge, rotation) refits only the output projections, where the fit is
linear and closed-form. The query/key/value and gate/up projections feed nonlinearities
(softmax, SiLU) and have no closed form; a short run of Adam on

    sum_t ||f_pruned(h_t) - f_dense(h_t)||^2 / sum_t ||f_dense(h_t) - h_t||^2

over the calibration batches adjusts every kept weight of the layer at once. The targets
f_dense(h) are recomputed batch by batch from an unpruned copy of the layer, so no
activations are stored. The optimisation runs on a float32 copy of the pruned layer whatever
the model dtype (Adam on bfloat16 weights loses most small updates) and the result is
cast back; the unpruned copy runs in the model's dtype. The error is measured before and after, on held-out calibration windows when
there are any, and the refinement is undone if it did not lower it, so it never makes
a layer worse by the measure it reports.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from .nested import map_tensors

Batch = tuple[torch.Tensor, dict]


def _float32(obj):
    """Floating tensors (hidden states, rotary tables) in a batch's kwargs -> float32."""
    return map_tensors(obj, lambda t: t.float() if t.is_floating_point() else t)


def _as_float32(layer: nn.Module) -> nn.Module:
    return layer if all(p.dtype == torch.float32 for p in layer.parameters()) else copy.deepcopy(layer).float()


@torch.no_grad()
def relative_error(layer: nn.Module, dense: nn.Module, batches: list[Batch],
                   forward: Callable[[nn.Module, torch.Tensor, dict], torch.Tensor]) -> float:
    """sum ||f(h) - f_dense(h)||^2 / sum ||f_dense(h) - h||^2 over ``batches`` (float64 sums)."""
    err = ref = 0.0
    for h, kw in batches:
        target = forward(dense, h, kw).float()
        h, kw = _float32(h), _float32(kw)
        err += float((forward(layer, h, kw) - target).double().square().sum())
        ref += float((target - h).double().square().sum())
    return err / max(ref, torch.finfo(torch.float64).tiny)


def refine_layer(layer: nn.Module, dense: nn.Module, batches: list[Batch], *, epochs: int, lr: float,
                 seed: int, forward: Callable[[nn.Module, torch.Tensor, dict], torch.Tensor],
                 heldout: list[Batch] | None = None) -> dict:
    """Refine the pruned ``layer`` in place towards the unpruned ``dense`` copy of it.

    ``epochs`` passes over ``batches`` in a seeded order, one Adam step per batch, the
    learning rate decaying to zero on a cosine. Returns a JSON-serialisable log: the
    relative errors before and after (on ``heldout`` if given), whether the update was
    kept, the step count and the time.
    """
    t0 = time.perf_counter()
    check = heldout if heldout else batches
    work = _as_float32(layer)
    ref = dense  # runs in the model's dtype, as it would at inference; its outputs are cast
    before = relative_error(work, ref, check, forward)
    original = {k: v.detach().clone() for k, v in work.state_dict().items()} if work is layer else None
    params = [p for p in work.parameters()]
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    total = epochs * len(batches)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.5 * (1 + math.cos(math.pi * k / total)))
    gen = torch.Generator().manual_seed(seed)
    with torch.enable_grad():
        for _ in range(epochs):
            for j in torch.randperm(len(batches), generator=gen).tolist():
                with torch.no_grad():
                    target = forward(ref, *batches[j]).float()
                h, kw = _float32(batches[j][0]), _float32(batches[j][1])
                with torch.no_grad():
                    scale = (target - h).square().sum().clamp_min(torch.finfo(torch.float32).tiny)
                loss = (forward(work, h, kw) - target).square().sum() / scale
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    for p, flag in zip(params, flags, strict=True):
        p.requires_grad_(flag)
        p.grad = None
    del opt
    after = relative_error(work, ref, check, forward)
    kept = after < before
    with torch.no_grad():
        if work is layer and not kept:
            layer.load_state_dict(original)
        elif work is not layer and kept:  # cast the float32 copy back into the layer
            refined = work.state_dict()
            for name, p in layer.state_dict().items():
                p.copy_(refined[name])
    return {"epochs": epochs, "lr": lr, "steps": total, "rel_error_before": before, "rel_error_after": after,
            "measured_on": "heldout" if heldout else "calibration", "kept": kept,
            "seconds": round(time.perf_counter() - t0, 3)}
