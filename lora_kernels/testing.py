"""Helpers for the package's tests and the GPU check: reading back what a call drew.

Not part of the layer's path (nothing in it imports this module). ``dropped`` and ``drawn_mask``
read a dropout mask back through ``lora_linear`` itself, so no test needs a second
implementation of it; ``dequantize`` runs our Triton dequantization kernel on its own;
``peft_layer`` builds peft's layer with a ``LoRALayer``'s weights; ``check_dora_case`` is one
DoRA call against the float64 oracle.
"""

from __future__ import annotations

import copy
import math
import zlib

import torch
from torch import nn

from . import quant
from .function import dora_linear, lora_linear
from .reference import dora_linear_reference, relative_errors

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


def peft_layer(base: nn.Linear, layer, rank: int, dropout: float = 0.0):
    """peft's LoRA ``Linear`` (in a one-module peft model) over a copy of ``base`` with
    ``layer``'s adapters (and, for a DoRA ``layer``, its magnitudes: peft's ``use_dora``);
    ``None`` without peft."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        return None
    model = nn.Sequential()
    model.add_module("proj", copy.deepcopy(base))
    dora = getattr(layer, "use_dora", False)
    config = LoraConfig(
        r=rank, lora_alpha=layer.scaling * rank, lora_dropout=dropout, target_modules=["proj"],
        use_dora=dora,
    )  # fmt: skip
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    proj = peft_model.base_model.model.proj
    with torch.no_grad():
        proj.lora_A["default"].weight.copy_(layer.lora_A.t())
        proj.lora_B["default"].weight.copy_(layer.lora_B.t())
        if dora:
            proj.lora_magnitude_vector["default"].weight.copy_(layer.magnitude)
    return peft_model


def check_dora_case(device, dtype, tol, rank, p, lead, k, n, four_bit=False) -> dict:
    """One ``dora_linear`` call (``backend="auto"``) against the float64 DoRA oracle with the
    call's mask: the worst relative error of the output and of the gradients of x, lora_A,
    lora_B and the magnitude, against ``tol``. ``four_bit``: over a synthetic NF4 weight
    (``quant.synthetic_4bit``; the oracle on its dequantized values)."""
    gen = torch.Generator().manual_seed(zlib.crc32(repr((rank, p, lead, k, n)).encode()))

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(device, dtype)

    x, weight, bias = rand(*lead, k), rand(n, k, std=k**-0.5), rand(n)
    values = weight
    if four_bit:
        weight = quant.synthetic_4bit(n, k, device, dtype, gen)
        values = quant.dequantize(weight, dtype)
    lora_A, lora_B = rand(k, rank, std=k**-0.5), rand(rank, n, std=rank**-0.5)
    magnitude = (torch.rand(n, generator=gen, dtype=torch.float64) + 0.5).to(device, dtype)
    leaves = [x, lora_A, lora_B, magnitude]
    for t in leaves:
        t.requires_grad_(True)
    y = dora_linear(x, weight, bias, lora_A, lora_B, magnitude, 0.5, dropout_p=p, seed=3)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(device, dtype)
    y.backward(dy)
    rows = math.prod(lead)
    mask = drawn_mask(rows, k, p, 3, "auto", device).view(x.shape).double() if p else None
    refs = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = dora_linear_reference(
        refs[0], values.double(), bias.double(), refs[1], refs[2], refs[3], 0.5,
        dropout_mask=mask, dropout_p=p,
    )  # fmt: skip
    ref.backward(dy.double())
    errors = {"y": float(relative_errors(y, ref).max())}
    for name, t, r in zip(("dx", "dlora_A", "dlora_B", "dmagnitude"), leaves, refs):
        errors[name] = float(relative_errors(t.grad, r.grad).max())
    worst = max(errors.values())
    return {
        "dtype": str(dtype).removeprefix("torch."), "rank": rank, "dropout": p,
        "base": "nf4" if four_bit else "16bit",
        "shape": [*lead, k, n], "errors": errors, "worst": worst, "tolerance": tol,
        "passed": worst <= tol,
    }  # fmt: skip
