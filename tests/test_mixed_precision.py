"""Mixed precision: float32 adapters on a 16-bit layer, and ``torch.autocast``.

The float64 oracle computes the same math: the base layer and the LoRA branch in the input's
dtype, so its inputs are the tensors as the kernels see them (adapters rounded to that dtype).
"""

from __future__ import annotations

import pytest
import torch
from helpers import BACKEND_DEVICE as DEVICE
from helpers import BACKEND_TOL as TOL
from helpers import GRAD_NAMES as NAMES
from helpers import assert_close, make_params, make_x, read_mask, seed_for
from torch import nn

from lora_kernels import LoRALayer, inject_lora, lora_linear
from lora_kernels.kernels import common
from lora_kernels.reference import lora_linear_reference

BACKENDS = ["torch", "triton"]
HALF = [torch.float16, torch.bfloat16]
# The Triton path reduces dA and dB in float32 and rounds once, to the adapters' float32: below
# 16-bit rounding, so a 16-bit intermediate fails this bound (measured with dA rounded to x's
# dtype first: 2.8e-4 for float16, 2.3e-3 for bfloat16).
FLOAT32_GRAD_TOL = 1e-4


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def inputs(case, dtype, base_dtype, adapter_dtype, device, lead=(37,), k=33, n=20, rank=5):
    """``x`` in ``dtype``, weight and bias in ``base_dtype``, adapters in ``adapter_dtype``, and
    a ``dy`` in ``dtype``; all leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed_for(*case))
    x = make_x(lead, k, dtype, "contiguous", gen)
    params = make_params(k, n, rank, torch.float64, True, gen)
    dtypes = {"weight": base_dtype, "bias": base_dtype, "lora_A": adapter_dtype}
    dtypes["lora_B"] = adapter_dtype
    leaves = {"x": x, **{name: t.to(dtypes[name]) for name, t in params.items()}}
    leaves = {name: t.to(device).requires_grad_(True) for name, t in leaves.items()}
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype).to(device)
    return leaves, dy


def reference(leaves, dy, compute_dtype, scaling, mask=None, p=0.0):
    """The float64 oracle on every leaf rounded to ``compute_dtype``: output and gradients."""
    ref = {
        name: t.detach().to(compute_dtype).double().requires_grad_(True)
        for name, t in leaves.items()
    }
    y = lora_linear_reference(
        *ref.values(), scaling, dropout_mask=None if mask is None else mask.double(),
        dropout_p=p,
    )  # fmt: skip
    y.backward(dy.double())
    return y, {name: t.grad for name, t in ref.items()}


def check_grads(backend, dtype, leaves, y, y_ref, grads_ref, lora_dtype):
    tol = TOL[backend][dtype]
    assert_close("y", y, y_ref, tol)
    for name in NAMES:
        grad = leaves[name].grad
        assert grad.dtype == leaves[name].dtype, name  # every gradient in its leaf's dtype
        assert_close(f"d{name}", grad, grads_ref[name], tol)
    if backend == "triton" and lora_dtype == torch.float32:
        for name in ("lora_A", "lora_B"):
            assert_close(f"d{name} (float32)", leaves[name].grad, grads_ref[name], FLOAT32_GRAD_TOL)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_float32_adapters_on_a_16bit_layer(backend, dtype, p):
    """peft's default: a 16-bit base layer with float32 adapters. The output is 16-bit, the
    adapters' gradients float32, every value the float64 oracle's of the same math."""
    dev = DEVICE[backend]
    leaves, dy = inputs((backend, dtype, p), dtype, dtype, torch.float32, dev)
    seed, scaling = 77, 0.5
    y = lora_linear(*leaves.values(), scaling, dropout_p=p, seed=seed, backend=backend)
    y.backward(dy)
    assert y.dtype == dtype
    mask = read_mask(*leaves["x"].shape, p, seed, backend) if p else None
    y_ref, grads_ref = reference(leaves, dy, dtype, scaling, mask, p)
    check_grads(backend, dtype, leaves, y, y_ref, grads_ref, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_float32_adapters_keep_their_range_over_float16(backend, p):
    """float16 activations, float32 adapters, a LoRA intermediate ``x A`` past float16's 65504
    (here ~2.6e5) and an output within it: both paths follow the float32 adapters' range, as
    peft does (it was inf / NaN here): output and every gradient finite, the float64 oracle's."""
    dev = DEVICE[backend]
    leaves, dy = inputs((backend, p, "range"), torch.float16, torch.float16, torch.float32, dev)
    with torch.no_grad():
        leaves["x"].mul_(30)
        leaves["lora_A"].mul_(3000)
        leaves["lora_B"].mul_(1e-3)
    s_ab = leaves["x"].double() @ leaves["lora_A"].double()
    assert s_ab.abs().max() > 2 * 65504  # the case: an intermediate float16 can't hold
    seed, scaling = 11, 0.5
    y = lora_linear(*leaves.values(), scaling, dropout_p=p, seed=seed, backend=backend)
    y.backward(dy)
    assert y.dtype == torch.float16
    mask = read_mask(*leaves["x"].shape, p, seed, backend) if p else None
    # the oracle on the tensors as given (the adapters' float32 values, unrounded)
    y_ref, grads_ref = reference(leaves, dy, torch.float32, scaling, mask, p)
    assert y_ref.abs().max() < 65504 / 2
    tol = TOL[backend][torch.float16]
    assert_close("y", y, y_ref, tol)
    for name in NAMES:
        assert leaves[name].grad.dtype == leaves[name].dtype, name
        assert_close(f"d{name}", leaves[name].grad, grads_ref[name], tol)


@pytest.mark.parametrize("backend", BACKENDS)
def test_16bit_adapters_on_a_float32_layer(backend):
    """The other way round: the LoRA branch computes in x's float32."""
    dev = DEVICE[backend]
    leaves, dy = inputs((backend,), torch.float32, torch.float32, torch.bfloat16, dev)
    y = lora_linear(*leaves.values(), 2.0, backend=backend)
    y.backward(dy)
    assert y.dtype == torch.float32
    y_ref, grads_ref = reference(leaves, dy, torch.float32, 2.0)
    tol = TOL[backend][torch.float32]
    assert_close("y", y, y_ref, tol)
    for name in NAMES:
        assert leaves[name].grad.dtype == leaves[name].dtype, name
        # the adapters' gradients: float32 sums rounded once to bfloat16 (2**-9)
        name_tol = 5e-3 if name.startswith("lora") else tol
        assert_close(f"d{name}", leaves[name].grad, grads_ref[name], name_tol)


# --- torch.autocast ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("p", [0.0, 0.25])
def test_autocast_computes_in_its_dtype(backend, dtype, p):
    """Under autocast a float32 call computes as autocast runs ``nn.Linear``: every operand in
    autocast's dtype, output in that dtype; gradients come back float32 (to every leaf, the
    unfrozen base included)."""
    dev = DEVICE[backend]
    leaves, dy = inputs((backend, dtype, p, "autocast"), torch.float32, torch.float32,
                        torch.float32, dev)  # fmt: skip
    seed, scaling = 5, 0.75
    with torch.autocast(torch.device(dev).type, dtype=dtype):
        y = lora_linear(*leaves.values(), scaling, dropout_p=p, seed=seed, backend=backend)
    assert y.dtype == dtype
    y.backward(dy.to(dtype))
    mask = read_mask(*leaves["x"].shape, p, seed, backend) if p else None
    y_ref, grads_ref = reference(leaves, dy.to(dtype), dtype, scaling, mask, p)
    check_grads(backend, dtype, leaves, y, y_ref, grads_ref, torch.float32)


@pytest.mark.parametrize("dtype", HALF)
def test_autocast_fresh_layer_equals_nn_linear(dtype):
    """A fresh layer (``lora_B = 0``) under autocast gives nn.Linear's autocast output, bit for
    bit (the CPU torch path: the same 16-bit GEMM plus an exact zero update)."""
    torch.manual_seed(0)
    linear = nn.Linear(24, 12)
    layer = LoRALayer.from_linear(nn.Linear(24, 12), rank=4)
    layer.linear.load_state_dict(linear.state_dict())
    x = torch.randn(7, 24)
    with torch.autocast("cpu", dtype=dtype):
        expected, got = linear(x), layer(x)
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(got, expected)


def test_autocast_leaves_float64_and_respects_disabled_regions():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 8, generator=gen)
    w, a, b = torch.randn(6, 8, generator=gen), torch.randn(8, 2), torch.randn(2, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        # autocast never casts float64 (nor does it for F.linear)
        args64 = [t.double() for t in (x, w)]
        assert lora_linear(*args64, None, a.double(), b.double()).dtype == torch.float64
        with torch.autocast("cpu", enabled=False):
            assert lora_linear(x, w, None, a, b).dtype == torch.float32
        assert lora_linear(x, w, None, a, b).dtype == torch.bfloat16


# --- layers and models with float32 adapters ----------------------------------------------------


def test_layer_adapter_dtype_trains():
    """The seeds' example on a bfloat16 layer with float32 adapters: Adam trains the float32
    adapters, the frozen bfloat16 base doesn't move."""
    torch.manual_seed(0)
    layer = LoRALayer(64, 10, rank=4, init="seed", dtype=torch.bfloat16,
                      adapter_dtype=torch.float32)  # fmt: skip
    assert layer.linear.weight.dtype == torch.bfloat16
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float32
    assert "adapter_dtype=torch.float32" in repr(layer)
    weight = layer.linear.weight.clone()
    x, target = torch.randn(32, 64).bfloat16(), torch.randn(32, 10).bfloat16()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = nn.functional.mse_loss(layer(x).float(), target.float())
        loss.backward()
        assert layer.lora_A.grad.dtype == torch.float32
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]
    assert torch.equal(layer.linear.weight, weight)
    assert layer.lora_A.dtype == torch.float32


def test_merge_with_float32_adapters():
    torch.manual_seed(1)
    layer = LoRALayer(16, 8, rank=4, init="seed", dtype=torch.bfloat16,
                      adapter_dtype=torch.float32).eval()  # fmt: skip
    x = torch.randn(5, 16).bfloat16()
    before = layer(x)
    layer.merge()
    assert layer.linear.weight.dtype == torch.bfloat16
    assert_close("merged", layer(x), before.double(), 5e-2)  # the weight rounded to bfloat16
    layer.unmerge()
    assert_close("unmerged", layer(x), before.double(), 5e-2)


@pytest.mark.parametrize("bad", [torch.int32, "float32"])
def test_bad_adapter_dtype(bad):
    with pytest.raises(TypeError, match="adapter_dtype"):
        LoRALayer(8, 4, adapter_dtype=bad)
    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(TypeError, match="adapter_dtype"):
        inject_lora(model, ["0"], adapter_dtype=bad)
    assert isinstance(model[0], nn.Linear)  # unchanged


def test_inject_lora_adapter_dtype():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).bfloat16()
    inject_lora(model, ["0", "2"], rank=2, adapter_dtype=torch.float32)
    for i in (0, 2):
        assert model[i].linear.weight.dtype == torch.bfloat16
        assert model[i].lora_A.dtype == model[i].lora_B.dtype == torch.float32
    assert model(torch.randn(3, 8).bfloat16()).dtype == torch.bfloat16
