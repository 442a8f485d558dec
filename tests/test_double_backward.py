"""Double backward (``create_graph=True``: gradient penalties, Hessian-vector products).

Backward then computes the gradients as plain differentiable PyTorch ops of the inputs, which
autograd differentiates again; ``gradgradcheck`` holds them to finite differences in float64.
The cases whose second derivatives can't be right are refused with a ``RuntimeError``.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import BACKEND_DEVICE as DEVICE
from helpers import GRAD_NAMES as NAMES
from helpers import KERNEL_DEVICE, assert_close

from lora_kernels import LoRALinearFunction, lora_linear
from lora_kernels.kernels import common
from lora_kernels.reference import lora_linear_reference


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def tensors(device, dtype=torch.float64, lead=(2, 3)):
    gen = torch.Generator().manual_seed(8)
    shapes = {"x": (*lead, 7), "weight": (5, 7), "bias": (5,), "lora_A": (7, 3), "lora_B": (3, 5)}
    return {n: torch.randn(s, generator=gen, dtype=dtype).to(device) for n, s in shapes.items()}


def refused(requires):
    """x and lora_B differentiated with lora_A frozen: forward keeps S, not x (LoRA-FA)."""
    return "x" in requires and "lora_B" in requires and "lora_A" not in requires


COMBOS = [c for n in range(1, 6) for c in itertools.combinations(NAMES, n) if not refused(c)]


@pytest.mark.parametrize("requires", COMBOS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("p", [0.0, 0.3])
def test_torch_path_gradgradcheck(requires, p):
    t = tensors("cpu")
    for name in requires:
        t[name].requires_grad_(True)

    def fn(*args):
        return lora_linear(*args, 0.5, dropout_p=p, seed=11, backend="torch")

    assert torch.autograd.gradgradcheck(fn, tuple(t.values()))


@pytest.mark.parametrize("requires", [NAMES, ("x", "lora_A", "lora_B"), ("lora_B",)])
def test_triton_path_gradgradcheck(requires):
    t = tensors(KERNEL_DEVICE)
    for name in requires:
        t[name].requires_grad_(True)

    def fn(*args):
        return lora_linear(*args, 0.5, backend="triton")

    assert torch.autograd.gradgradcheck(fn, tuple(t.values()))


def hessian_vector(fn, t, v_of):
    """``d/d(inputs) <grad of sum(y^2) w.r.t. lora_A, v>``: one Hessian-vector product."""
    y = fn(*t.values())
    (g,) = torch.autograd.grad(y.square().sum(), t["lora_A"], create_graph=True)
    return torch.autograd.grad((g * v_of).sum(), [t["x"], t["lora_A"], t["lora_B"]])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_autocast_double_backward_matches_reference(backend):
    """Under autocast the casts are recorded outside the Function, so second derivatives reach
    the float32 leaves; compared with the reference run under the same autocast."""
    dev = DEVICE[backend]
    results = []
    for fn in (
        lambda *a: lora_linear(*a, 0.5, backend=backend),
        lambda *a: lora_linear_reference(*a, 0.5),
    ):
        t = {n: v.float().requires_grad_(n != "weight") for n, v in tensors(dev).items()}
        v = torch.ones_like(t["lora_A"])
        with torch.autocast(torch.device(dev).type, dtype=torch.bfloat16):
            results.append(hessian_vector(fn, t, v))
    for name, got, want in zip(("x", "lora_A", "lora_B"), *results):
        assert got.dtype == torch.float32
        assert_close(f"d2/d{name}", got, want.double(), 5e-2)


def test_triton_dropout_double_backward_is_refused():
    t = {n: v.requires_grad_(True) for n, v in tensors(KERNEL_DEVICE).items()}
    y = lora_linear(*t.values(), 0.5, dropout_p=0.2, seed=1, backend="triton")
    with pytest.raises(RuntimeError, match="backend='torch' only"):
        torch.autograd.grad(y.sum(), t["lora_A"], create_graph=True)
    # a plain backward of the same call is fine
    y = lora_linear(*t.values(), 0.5, dropout_p=0.2, seed=1, backend="triton")
    y.sum().backward()


def test_frozen_lora_A_double_backward_is_refused():
    t = tensors("cpu")
    for name in ("x", "lora_B"):
        t[name].requires_grad_(True)
    y = lora_linear(*t.values(), 0.5)
    with pytest.raises(RuntimeError, match="lora_A frozen"):
        torch.autograd.grad(y.sum(), t["lora_B"], create_graph=True)


def test_direct_apply_under_autocast_double_backward_is_refused():
    t = {n: v.float().requires_grad_(True) for n, v in tensors("cpu").items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = LoRALinearFunction.apply(*t.values(), 0.5, 0.0, None, "torch")
    with pytest.raises(RuntimeError, match="call lora_linear"):
        torch.autograd.grad(y.float().sum(), t["lora_A"], create_graph=True)
