"""The torch path (``backend="torch"`` and the CPU default) against the float64 reference."""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import (
    GRAD_NAMES,
    TORCH_PATH_TOL,
    assert_close,
    make_params,
    make_x,
    reference_with_grads,
    run_with_grads,
    seed_for,
)

from lora_kernels import LoRALinearFunction, lora_linear, torch_path
from lora_kernels.reference import lora_linear_reference

SHAPES = [
    # (leading dims of x, K, N)
    ((8,), 64, 10),
    # odd shapes
    ((1,), 17, 1),
    ((17,), 127, 17),
    ((127,), 17, 300),
    ((3, 7), 33, 5),  # 3-D input
    ((2, 3, 5), 7, 9),  # 4-D input
]
RANKS = [1, 3, 4, 7, 16, 64]


@pytest.mark.parametrize("lead, k, n", SHAPES)
@pytest.mark.parametrize("rank", RANKS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
def test_matches_float64_reference(lead, k, n, rank, dtype, bias, layout):
    gen = torch.Generator().manual_seed(seed_for(lead, k, n, rank, bias, layout))
    x = make_x(lead, k, dtype, layout, gen)
    params = make_params(k, n, rank, dtype, bias, gen)
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype)
    scaling = 0.75

    y, grads = run_with_grads(lora_linear, x, params, dy, scaling=scaling, backend="torch")
    y_ref, grads_ref = reference_with_grads(x, params, dy, scaling)

    tol = TORCH_PATH_TOL[dtype]
    assert y.dtype == dtype
    assert_close("y", y, y_ref, tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close(f"d{name}", grads[name], grads_ref[name], tol)


@pytest.mark.parametrize("scaling", [0.0, 1.0, -2.5, 1 / 3])
def test_scalings(scaling):
    gen = torch.Generator().manual_seed(0)
    x = make_x((5, 3), 16, torch.float32, "contiguous", gen)
    params = make_params(16, 12, 4, torch.float32, True, gen)
    dy = torch.randn(5, 3, 12, generator=gen)
    y, grads = run_with_grads(lora_linear, x, params, dy, scaling=scaling)
    y_ref, grads_ref = reference_with_grads(x, params, dy, scaling)
    assert_close("y", y, y_ref, 1e-5)
    for name in grads:
        assert_close(f"d{name}", grads[name], grads_ref[name], 1e-5)


@pytest.mark.parametrize(
    "requires",
    [c for c in itertools.product([False, True], repeat=5) if any(c)],
    ids=lambda c: "+".join(n for n, r in zip(GRAD_NAMES, c) if r),
)
@pytest.mark.parametrize(
    "dropout_p, block_elems",
    [(0.0, None), (0.3, None), (0.3, 10)],
    ids=["p0", "p0.3", "p0.3-blocks-of-2-rows"],
)
def test_gradcheck_every_combination(monkeypatch, requires, dropout_p, block_elems):
    if block_elems is not None:  # eager CPU dropout in blocks of rows (uneven: 6 = 2 + 2 + 2)
        monkeypatch.setattr(torch_path, "BLOCK_ELEMS", block_elems)
    gen = torch.Generator().manual_seed(1)
    x = make_x((2, 3), 5, torch.float64, "contiguous", gen)
    params = make_params(5, 4, 2, torch.float64, True, gen)
    inputs = [x, params["weight"], params["bias"], params["lora_A"], params["lora_B"]]
    inputs = [t.detach().clone().requires_grad_(r) for t, r in zip(inputs, requires)]

    def fn(*tensors):
        return LoRALinearFunction.apply(*tensors, 0.7, dropout_p, 1234, "torch")

    assert torch.autograd.gradcheck(fn, inputs)


def test_only_requested_gradients_are_computed():
    gen = torch.Generator().manual_seed(2)
    x = make_x((6,), 8, torch.float32, "contiguous", gen)
    p = make_params(8, 5, 2, torch.float32, True, gen)
    y, S = torch_path.forward(x, p["weight"], p["bias"], p["lora_A"], p["lora_B"], 1.0, 0.0, 0)
    dy = torch.ones_like(y)
    for needs in itertools.product([False, True], repeat=5):
        grads = torch_path.backward(
            dy, x, p["weight"], p["lora_A"], p["lora_B"], S, 1.0, 0.0, 0, needs
        )
        assert [g is not None for g in grads] == list(needs)


def test_saves_only_x_weights_and_S():
    """Nothing of size M x K beyond x itself is kept for backward (x by reference)."""
    gen = torch.Generator().manual_seed(3)
    m, k, n, r = 64, 32, 48, 4
    x = make_x((m,), k, torch.float32, "contiguous", gen).requires_grad_(True)
    p = make_params(k, n, r, torch.float32, True, gen)
    lora_A = p["lora_A"].requires_grad_(True)
    lora_B = p["lora_B"].requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x, p["weight"], p["bias"], lora_A, lora_B, 2.0)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(m, k), (n, k), (k, r), (r, n), (m, r)])
    assert any(t.data_ptr() == x.data_ptr() for t in saved)  # x itself, not a copy


def test_nan_and_inf_propagate():
    gen = torch.Generator().manual_seed(4)
    x = make_x((4,), 8, torch.float32, "contiguous", gen)
    p = make_params(8, 3, 2, torch.float32, False, gen)
    x[1, 2] = float("nan")
    x[2, 5] = float("inf")
    y = lora_linear(x, p["weight"], None, p["lora_A"], p["lora_B"])
    assert torch.isnan(y[1]).all()
    assert not torch.isfinite(y[2]).any()
    assert torch.isfinite(y[[0, 3]]).all()


@pytest.mark.parametrize("lead", [(0,), (2, 0)])
def test_empty_batch(lead):
    gen = torch.Generator().manual_seed(5)
    x = torch.empty(*lead, 8, requires_grad=True)
    p = make_params(8, 3, 2, torch.float32, True, gen)
    A = p["lora_A"].requires_grad_(True)
    B = p["lora_B"].requires_grad_(True)
    y = lora_linear(x, p["weight"], p["bias"], A, B)
    assert y.shape == (*lead, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(A.grad, torch.zeros_like(A))
    assert torch.equal(B.grad, torch.zeros_like(B))


def test_one_dimensional_input():
    gen = torch.Generator().manual_seed(6)
    x = make_x((), 8, torch.float64, "contiguous", gen)
    p = make_params(8, 3, 2, torch.float64, True, gen)
    y = lora_linear(x, **p)
    ref = lora_linear_reference(x, **p)
    assert y.shape == (3,)
    assert_close("y", y, ref, 1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_dtypes_kept(dtype):
    gen = torch.Generator().manual_seed(7)
    x = make_x((9,), 16, dtype, "contiguous", gen)
    p = make_params(16, 8, 4, dtype, True, gen)
    dy = torch.randn(9, 8, generator=gen).to(dtype)
    y, grads = run_with_grads(lora_linear, x, p, dy)
    y_ref, grads_ref = reference_with_grads(x, p, dy, 1.0)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    assert y.dtype == dtype
    assert_close("y", y, y_ref, tol)
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close(f"d{name}", grads[name], grads_ref[name], tol)
