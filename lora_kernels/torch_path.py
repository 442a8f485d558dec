"""The plain-PyTorch path: CPU, and any tensor the Triton kernels don't take.

Same contract as the kernels: inputs are already validated and flattened to 2-D by
``function.py``; forward returns ``y`` and ``S = dropout(x) A``, the one activation (beyond ``x``
itself) that backward needs. Each function does the fewest passes PyTorch allows: the LoRA term
is accumulated into the base GEMM's output with ``addmm_`` instead of materialising a second
``(M, N)`` tensor, and the scaling is applied to the small ``(M, r)`` / ``(r, N)`` operands.
"""

from __future__ import annotations

import torch

from .dropout import keep_mask


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    dropout_p: float,
    seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, K) -> (y (M, N), S (M, r))`` with ``y = x W^T + b + scaling * S B``."""
    if dropout_p > 0.0:
        keep = keep_mask(x.shape, dropout_p, seed, x.device)
        # NOTE: the 1 / (1 - p) of the kept elements is applied to S (M x r), not to x (M x K).
        S = (torch.where(keep, x, 0) @ lora_A).mul_(1.0 / (1.0 - dropout_p))
    else:
        S = x @ lora_A
    y = torch.addmm(bias, x, weight.t()) if bias is not None else x @ weight.t()
    y.addmm_(S, lora_B, alpha=scaling)
    return y, S


def backward(
    dy: torch.Tensor,
    x: torch.Tensor | None,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    S: torch.Tensor | None,
    scaling: float,
    dropout_p: float,
    seed: int,
    needs: tuple[bool, bool, bool, bool, bool],
) -> tuple[torch.Tensor | None, ...]:
    """Gradients ``(dx, dW, db, dA, dB)`` of the 2-D forward; ``None`` where ``needs`` says no.

    ``needs`` is ``ctx.needs_input_grad`` for ``(x, weight, bias, lora_A, lora_B)``. ``x`` may be
    ``None`` when neither ``dA`` nor ``dW`` is needed, ``S`` when ``dB`` is not.
    """
    need_x, need_w, need_b, need_a, need_lb = needs
    dx = dw = db = da = dlb = None
    dropout = dropout_p > 0.0 and (need_x or need_a)
    if dropout:  # the forward's (M, K) mask, regenerated once for both dx and dA
        keep = keep_mask((dy.shape[0], weight.shape[1]), dropout_p, seed, dy.device)
    if need_x or need_a:
        # NOTE: scaling (and dropout's 1 / (1 - p)) folded into dS (M x r) once: dx and dA both
        # take it from there.
        factor = scaling / (1.0 - dropout_p) if dropout else scaling
        dS = (dy @ lora_B.t()).mul_(factor)
    if need_x:
        dx = dy @ weight
        if dropout:
            # NOTE: where, not a multiply by the bool mask: the multiply converts the mask to
            # floats first, a pass that costs ~4x the where on CPU.
            dx.add_(torch.where(keep, dS @ lora_A.t(), 0))
        else:
            dx.addmm_(dS, lora_A.t())
    if need_a:
        da = (torch.where(keep, x, 0) if dropout else x).t() @ dS
    if need_lb:
        dlb = (S.t() @ dy).mul_(scaling)
    if need_w:
        dw = dy.t() @ x
    if need_b:
        db = dy.sum(0)
    return dx, dw, db, da, dlb
