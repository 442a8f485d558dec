"""Helpers for the package's tests and the GPU check: reading back what a call drew.

Not part of the layer's path (nothing in it imports this module). ``dropped`` and ``drawn_mask``
read a dropout mask back through ``lora_linear`` itself, so no test needs a second
implementation of it; ``dequantize`` runs our Triton dequantization kernel on its own.
"""

from __future__ import annotations

import torch

from .function import lora_linear

# dropped() reads this many columns of the mask a call: its adapters have this rank, so the
# kernels run a small-rank config whatever K is (rank K adapters would not fit a GPU's registers).
READ_COLUMNS = 64


def dropped(x: torch.Tensor, p: float, seed: int, backend: str) -> torch.Tensor:
    """``dropout(x)`` as ``lora_linear``'s LoRA branch sees it on ``backend``, read through
    ``lora_linear`` itself: how tests and the GPU check learn the mask a call drew, without a
    second implementation of it. With a zero base weight and ``A`` the identity's columns
    ``j .. j + 64``, ``B`` the identity, the output is those columns of ``dropout(x)``: the mask
    depends on the element's position only, not on the adapters."""
    k = x.shape[-1]
    columns = []
    for j in range(0, k, READ_COLUMNS):
        width = min(READ_COLUMNS, k - j)
        eye = torch.eye(width, dtype=x.dtype, device=x.device)
        lora_A = torch.zeros(k, width, dtype=x.dtype, device=x.device)
        lora_A[j : j + width] = eye
        zeros = torch.zeros(width, k, dtype=x.dtype, device=x.device)
        columns.append(
            lora_linear(x, zeros, None, lora_A, eye, 1.0, dropout_p=p, seed=seed, backend=backend)
        )
    return torch.cat(columns, dim=-1)


def drawn_mask(m: int, k: int, p: float, seed: int, backend: str, device) -> torch.Tensor:
    """The boolean ``(m, k)`` keep-mask a call with ``seed`` draws on ``backend`` (it depends on
    the element's position only, so any call of ``m`` rows and ``k`` columns draws this one)."""
    return dropped(torch.ones(m, k, device=device), p, seed, backend) != 0


def dequantize(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``W (N, K)`` in ``dtype`` from a bitsandbytes 4-bit ``weight`` by our Triton kernel
    (``kernels/dequant.py``): the buffer strategy's launch on its own, which must equal
    ``quant.dequantize`` (the torch path's) bit for bit."""
    from . import triton_path

    return triton_path.base_weight(weight, dtype, "buffer")
