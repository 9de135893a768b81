"""GGUF block quantisation as a differentiable rounding, for training that ends on the export's grid.

A recovered model re-quantised for llama.cpp loses quality that the dense file it came from did
not lose: the dense weights already sat on their quantisation grid, training moved them off it.
:func:`fake_quantize` rounds a weight matrix exactly as ``rcpu export`` will (the ``gguf``
package's block formats: rows cut into blocks of 32 values, zero-padded at the end of the row as
the export pads MLP widths, one float16 scale per block, plus a float16 minimum for the ``_1``
types) and returns the dequantised values. :func:`ste` passes gradients straight through the
rounding, so training sees the rounding in its loss while every weight keeps learning; what it
ends with is on the grid and exports without further loss.

The arithmetic mirrors ``gguf.quants`` operation for operation in float32, so the result equals
``dequantize(quantize(w))`` bit for bit (a test checks it against the package).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["GRID_TYPES", "BLOCK", "fake_quantize", "ste"]

#: GGUF block types the rounding reproduces
GRID_TYPES = ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
BLOCK = 32
#: symmetric types: (levels below zero, largest code); asymmetric: the largest code
_SYMMETRIC = {"q4_0": (8, 15), "q5_0": (16, 31)}
_ASYMMETRIC = {"q4_1": 15, "q5_1": 31}


def _half(x: torch.Tensor) -> torch.Tensor:
    """The float16 a GGUF block stores for a scale or minimum, back in float32."""
    return x.to(torch.float16).to(torch.float32)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.zeros_like(d), 1.0 / d)


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    """Rounding half away from zero (C's ``roundf``, which q8_0 uses)."""
    a = x.abs()
    floored = a.floor()
    return x.sign() * (floored + (2 * (a - floored)).floor())


def _blocks(q: torch.Tensor, quant: str) -> torch.Tensor:
    if quant == "q8_0":
        d = q.abs().amax(dim=-1, keepdim=True) / 127
        return _half(d) * _round_half_away(q * _inverse(d))
    if quant in _SYMMETRIC:
        below, top = _SYMMETRIC[quant]
        extreme = q.gather(-1, q.abs().argmax(dim=-1, keepdim=True))  # signed value of largest magnitude
        d = extreme / -below
        codes = torch.trunc(q * _inverse(d) + (below + 0.5)).clamp(0, top)
        return _half(d) * (codes - below)
    top = _ASYMMETRIC[quant]
    lo, hi = q.amin(dim=-1, keepdim=True), q.amax(dim=-1, keepdim=True)
    d = (hi - lo) / top
    codes = torch.trunc((q - lo) * _inverse(d) + 0.5).clamp(0, top)
    return _half(d) * codes + _half(lo)


def fake_quantize(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """``weight`` rounded to GGUF type ``quant`` along its last dimension and dequantised (same
    shape and dtype). Rows whose length is not a multiple of 32 are padded with zeros first."""
    if quant not in GRID_TYPES:
        raise ValueError(f"unknown GGUF block type {quant!r}; choose from {', '.join(GRID_TYPES)}")
    n = weight.shape[-1]
    w = weight.detach().to(torch.float32)
    pad = -n % BLOCK
    if pad:
        w = F.pad(w, (0, pad))
    q = w.reshape(*w.shape[:-1], -1, BLOCK)
    out = _blocks(q, quant).reshape(w.shape)
    return out[..., :n].to(weight.dtype)


def ste(weight: torch.Tensor, quant: str) -> torch.Tensor:
    """The rounded weight in the forward pass, the identity in the backward pass (straight-through).

    Written as ``rounded + (w - w.detach())`` rather than ``w + (rounded - w).detach()``: the added
    term is exactly zero, so the value is the rounded weight to the bit."""
    return fake_quantize(weight, quant) + (weight - weight.detach())
