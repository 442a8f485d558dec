"""The plain-PyTorch path: CPU, and any tensor the Triton kernels don't take.

Same contract as the kernels: inputs are already validated and flattened to 2-D by
``function.py``; forward returns ``y`` and ``S = dropout(x) A``, the one activation (beyond ``x``
itself) that backward needs. Each function does the fewest passes PyTorch allows: the LoRA term
is accumulated into the base GEMM's output with ``addmm_`` instead of materialising a second
``(M, N)`` tensor, and the scaling is applied to the small ``(M, r)`` / ``(r, N)`` operands.
"""

from __future__ import annotations

import torch


def dropout_keep_mask(shape: torch.Size, p: float, seed: int, device: torch.device) -> torch.Tensor:
    """Boolean keep-mask of ``shape``: a pure function of ``(seed, element position)``.

    Backward calls this again with the same seed instead of saving an ``(M, K)`` tensor.
    """
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32) >= p


def _dropped(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    keep = dropout_keep_mask(x.shape, p, seed, x.device)
    return x.masked_fill(~keep, 0).mul_(1.0 / (1.0 - p))


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
    x_lora = _dropped(x, dropout_p, seed) if dropout_p > 0.0 else x
    S = x_lora @ lora_A
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
    if need_x or need_a:
        # NOTE: scaling folded into dS (M x r) once: both dx and dA take it from there.
        dS = (dy @ lora_B.t()).mul_(scaling)
    if need_x:
        dx = dy @ weight
        if dropout_p > 0.0:
            dx.add_(_dropped(dS @ lora_A.t(), dropout_p, seed))
        else:
            dx.addmm_(dS, lora_A.t())
    if need_a:
        x_lora = _dropped(x, dropout_p, seed) if dropout_p > 0.0 else x
        da = x_lora.t() @ dS
    if need_lb:
        dlb = (S.t() @ dy).mul_(scaling)
    if need_w:
        dw = dy.t() @ x
    if need_b:
        db = dy.sum(0)
    return dx, dw, db, da, dlb
