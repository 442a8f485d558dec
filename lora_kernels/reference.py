"""The oracle: the seeds' LoRA math in plain PyTorch, autograd by PyTorch, no cleverness.

Every test compares against this function (usually with float64 inputs) and every benchmark uses
it as the "reference" provider. Keep it obviously correct rather than fast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float = 1.0,
    *,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """``y = x W^T + b + scaling * (dropout(x) A) B``, written the obvious way.

    Args:
        x: ``(..., K)`` input.
        weight: ``(N, K)`` frozen weight (``nn.Linear`` layout).
        bias: ``(N,)`` or ``None``.
        lora_A: ``(K, r)``.
        lora_B: ``(r, N)``.
        scaling: the LoRA scale ``s`` (already ``alpha / r`` or whatever the caller chose).
        dropout_mask: optional ``(..., K)`` 0/1 mask of the kept elements of ``x`` on the LoRA
            branch; kept elements are scaled by ``1 / (1 - dropout_p)``, as ``nn.Dropout`` does.
        dropout_p: the dropout probability that produced ``dropout_mask``.

    Returns:
        ``(..., N)`` output.
    """
    x_lora = x
    if dropout_mask is not None:
        x_lora = x * dropout_mask / (1.0 - dropout_p)
    return F.linear(x, weight, bias) + scaling * (x_lora @ lora_A @ lora_B)


def dora_weight_norm_reference(
    weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """``n_j = || W_j + s ((A B)^T)_j ||_2``: the row norms of the merged weight, computed by
    forming it (``(N, K)``), as peft does. Detached: DoRA treats the norm as a constant."""
    with torch.no_grad():
        return torch.linalg.norm(weight + scaling * (lora_A @ lora_B).T, dim=1)


def dora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    magnitude: torch.Tensor,
    scaling: float = 1.0,
    *,
    dropout_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """DoRA (Liu et al. 2024, peft's ``use_dora=True``), written the obvious way:

        y = x W^T + b + (c - 1) * (x_d W^T) + c * s * (x_d A) B,    c = m / n

    with ``x_d = dropout(x)`` (``x`` itself without a mask), ``magnitude`` ``m`` ``(N,)`` and
    ``n`` :func:`dora_weight_norm_reference` (a constant in backward). Without dropout this is
    ``c * (x W^T + s (x A) B) + b``."""
    x_d = x
    if dropout_mask is not None:
        x_d = x * dropout_mask / (1.0 - dropout_p)
    c = magnitude / dora_weight_norm_reference(weight, lora_A, lora_B, scaling)
    dora = (c - 1) * F.linear(x_d, weight) + c * scaling * (x_d @ lora_A @ lora_B)
    return F.linear(x, weight, bias) + dora


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``|out - ref| / (|ref| + mean|ref|)`` elementwise, in float64 (NaN becomes inf): the
    measure every comparison with the reference uses. The ``mean|ref|`` floor keeps elements that
    cancel to ~0 from turning a tiny absolute error into a huge relative one; elsewhere this is
    the plain relative error."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    scale = ref64.abs().mean().clamp_min(torch.finfo(torch.float64).tiny)
    return ((out64 - ref64).abs() / (ref64.abs() + scale)).nan_to_num(nan=float("inf"))
