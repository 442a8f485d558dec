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


def relative_errors(out: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``|out - ref| / (|ref| + mean|ref|)`` elementwise, in float64 (NaN becomes inf): the
    measure every comparison with the reference uses. The ``mean|ref|`` floor keeps elements that
    cancel to ~0 from turning a tiny absolute error into a huge relative one; elsewhere this is
    the plain relative error."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    scale = ref64.abs().mean().clamp_min(torch.finfo(torch.float64).tiny)
    return ((out64 - ref64).abs() / (ref64.abs() + scale)).nan_to_num(nan=float("inf"))
