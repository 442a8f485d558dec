"""DoRA's two paths against the float64 oracle (issue 26): ``DoRALinearFunction`` (dropout 0:
the fused kernels in the interpreter with the column scale in the epilogue and ``c`` folded into
the backward's ``dY`` tiles; the torch path) and the dropout path, over odd shapes, ranks 1 / 16
/ 64, float32 / float16 / bfloat16, 3-D and strided inputs, with the base unfrozen; output and
every gradient (``x``, ``weight``, ``bias``, ``lora_A``, ``lora_B``, ``magnitude``)."""

from __future__ import annotations

import pytest
import torch
from helpers import BACKEND_DEVICE as DEVICE
from helpers import BACKEND_TOL as TOL
from helpers import assert_close, make_params, make_x, read_mask, seed_for
from torch import nn

from lora_kernels import LoRALayer, dora, function, torch_path
from lora_kernels.dropout import keep_mask
from lora_kernels.function import dora_linear
from lora_kernels.kernels import common
from lora_kernels.reference import dora_linear_reference

NAMES = ("x", "weight", "bias", "lora_A", "lora_B", "magnitude")
# (lead, K, N, layout): odd sizes past one tile's edge, 3-D, and a non-contiguous x
CASES = [((37,), 33, 20, "contiguous"), ((2, 3, 7), 65, 17, "strided")]
# DoRA's extra 16-bit roundings beyond LoRA's, as multiples of LoRA's bounds: without dropout
# z and c rounded to x's dtype (torch path), dz = dY c rounded before the dots (both paths): 2;
# with dropout the same 2 (PyTorch ops round the base, (c - 1) x_d W^T and the LoRA term apart;
# the kernels round dY f before its dot): the worst seen at 0.25, 1.16x LoRA's bound on the
# torch path, 0.84x on the kernels.
EXTRA = {0.0: 2.0, 0.25: 2.0}


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def leaves_for(case, dtype, rank, device, gen):
    lead, k, n, layout = case
    x = make_x(lead, k, dtype, layout, gen)
    params = make_params(k, n, rank, torch.float64, True, gen)
    magnitude = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    leaves = {"x": x, **{name: t.to(dtype) for name, t in params.items()}}
    leaves["magnitude"] = magnitude.to(dtype)
    return {name: t.to(device).requires_grad_(True) for name, t in leaves.items()}


def oracle(leaves, dy, scaling, mask=None, p=0.0, weight=None):
    """The float64 reference: its output and each leaf's gradient. ``weight``: the base's
    values when they are not a leaf (a 4-bit base's, dequantized)."""
    ref = {name: t.detach().double().requires_grad_(True) for name, t in leaves.items()}
    args = {**ref, "weight": weight.double()} if weight is not None else ref
    y = dora_linear_reference(
        *(args[name] for name in NAMES), scaling, dropout_mask=mask, dropout_p=p
    )
    y.backward(dy.double())
    return y, {name: t.grad for name, t in ref.items()}


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank", [1, 16, 64])
@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("case", CASES, ids=["2d", "3d-strided"])
def test_dora_equals_the_oracle(backend, dtype, rank, p, case, monkeypatch):
    """With dropout the Triton path is the fused launches (one forward, one dx: the K loop feeds
    x and mask(x) against each W tile), the base frozen; the torch path trains it too."""
    device = DEVICE[backend]
    gen = torch.Generator().manual_seed(seed_for("dora", backend, dtype, rank, p, case))
    leaves = leaves_for(case, dtype, rank, device, gen)
    if p and backend == "triton":  # (an unfrozen base runs PyTorch ops: tested below)
        leaves["weight"].requires_grad_(False)
        monkeypatch.setattr(torch_path, "dora_dropout_forward", None)  # never called
    scaling, seed = 0.75, 19
    y = dora_linear(*leaves.values(), scaling, dropout_p=p, seed=seed, backend=backend)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).to(device)
    y.backward(dy)
    assert y.dtype == dtype and y.shape == (*case[0], case[2])
    mask = None
    if p:  # the mask this backend draws, read back
        rows, k = y[..., 0].numel(), case[1]
        mask = read_mask(rows, k, p, seed, backend).view(leaves["x"].shape).double()
    y_ref, grads = oracle(leaves, dy, scaling, mask, p)
    tol = TOL[backend][dtype] * (EXTRA[p] if dtype.itemsize == 2 else 1.0)
    assert_close("y", y, y_ref, tol)
    for name in NAMES:
        if leaves[name].requires_grad:
            assert leaves[name].grad.dtype == dtype, name
            assert_close(f"d{name}", leaves[name].grad, grads[name], tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropout_over_an_unfrozen_base_runs_pytorch_ops(dtype):
    """DoRA with dropout and the base weight training: ``dW`` needs the mask over ``x``, so
    the Triton backend runs the PyTorch ops (over the torch path's mask), every gradient the
    oracle's."""
    gen = torch.Generator().manual_seed(seed_for("dora-unfrozen", dtype))
    case = ((2, 3, 7), 65, 17, "strided")
    leaves = leaves_for(case, dtype, 16, DEVICE["triton"], gen)
    y = dora_linear(*leaves.values(), 0.75, dropout_p=0.25, seed=5, backend="triton")
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype).to(y.device)
    y.backward(dy)
    mask = keep_mask((42, 65), 0.25, 5, y.device).view(leaves["x"].shape).double()
    y_ref, grads = oracle(leaves, dy, 0.75, mask, 0.25)
    tol = TOL["torch"][dtype] * (EXTRA[0.25] if dtype.itemsize == 2 else 1.0)
    assert_close("y", y, y_ref, tol)
    for name in NAMES:
        assert_close(f"d{name}", leaves[name].grad, grads[name], tol)


@pytest.mark.parametrize(
    ("backend", "p"), [("torch", 0.0), ("triton", 0.0), ("torch", 0.3), ("triton", 0.3)]
)
def test_dora_gradcheck(backend, p):
    """``torch.autograd.gradcheck`` in float64 through ``DoRALinearFunction`` (the kernels in
    float64 on the Triton path; with dropout the fused launches, the base frozen), every input
    but the norm (a constant by DoRA's definition: passed in, so the check differentiates
    exactly the function's math)."""
    device = DEVICE[backend]
    gen = torch.Generator().manual_seed(seed_for("dora-gradcheck", backend))
    leaves = leaves_for(((2, 5), 7, 6, "contiguous"), torch.float64, 3, device, gen)
    if p and backend == "triton":
        leaves["weight"].requires_grad_(False)
    with torch.no_grad():
        norm = dora.weight_norm(leaves["weight"], leaves["lora_A"], leaves["lora_B"], 0.5)

    def fn(x, weight, bias, lora_A, lora_B, magnitude):
        return function.DoRALinearFunction.apply(
            x, weight, bias, lora_A, lora_B, magnitude, norm, 0.5, p, 7, backend
        )

    assert torch.autograd.gradcheck(fn, tuple(leaves.values()))


def test_fused_forward_saves_z_only_for_the_magnitude():
    """What the dropout-0 path keeps: ``z`` ``(M, N)`` when the magnitude trains, not when it
    is frozen (then the saved tensors are LoRA's, plus ``c`` and ``n``)."""
    gen = torch.Generator().manual_seed(3)
    leaves = leaves_for(((64,), 32, 48, "contiguous"), torch.float32, 4, "cpu", gen)
    leaves["weight"].requires_grad_(False)
    leaves["bias"].requires_grad_(False)

    def saved(train_magnitude):
        leaves["magnitude"].requires_grad_(train_magnitude)
        sizes = []

        def pack(t):
            sizes.append(tuple(t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            dora_linear(*leaves.values(), 0.5, backend="torch")
        return sizes

    assert (64, 48) in saved(True)
    assert (64, 48) not in saved(False)


def test_dora_double_backward_is_refused_with_the_reason():
    layer = LoRALayer(8, 4, rank=2, use_dora=True)
    x = torch.randn(3, 8, requires_grad=True)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(layer(x).sum(), x, create_graph=True)


def test_the_base_rows_norms_are_computed_once_per_weight_state(monkeypatch):
    """A DoRA layer computes ``||W_j||^2`` on its first call and reuses it while the frozen
    weight is unchanged; a change in place (here a copy into it, as load_state_dict does)
    recomputes it, and the output follows the new weight (the oracle's)."""
    calls = []
    real = dora.base_row_norms_sq
    monkeypatch.setattr(dora, "base_row_norms_sq", lambda w, d=None: calls.append(1) or real(w, d))
    layer = LoRALayer(16, 8, rank=2, use_dora=True).double()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, dtype=torch.float64)
    for _ in range(3):
        layer(x)
    assert len(calls) == 1
    with torch.no_grad():
        layer.linear.weight.copy_(torch.randn(8, 16, dtype=torch.float64))
    y = layer(x)
    assert len(calls) == 2
    ref = dora_linear_reference(x, layer.linear.weight, layer.linear.bias, layer.lora_A,
                                layer.lora_B, layer.magnitude, layer.scaling)  # fmt: skip
    assert_close("y", y, ref, 1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_magnitude_alone_trains_with_an_expanded_dy(backend):
    """Only the magnitude (and x) require grad: the Triton path still runs dB's launch for the
    magnitude's sum (T kept for it), from a ``dY`` that is an expanded view (``y.sum()``)."""
    device = DEVICE[backend]
    gen = torch.Generator().manual_seed(seed_for("dora-m-only", backend))
    leaves = leaves_for(((9,), 40, 24, "contiguous"), torch.float32, 4, device, gen)
    for name in ("weight", "bias", "lora_A", "lora_B"):
        leaves[name].requires_grad_(False)
    y = dora_linear(*leaves.values(), 0.5, backend=backend)
    y.sum().backward()
    y_ref, grads = oracle(leaves, torch.ones(y.shape, dtype=torch.float64), 0.5)
    assert_close("y", y, y_ref, TOL[backend][torch.float32])
    for name in ("x", "magnitude"):
        assert_close(f"d{name}", leaves[name].grad, grads[name], TOL[backend][torch.float32])


@pytest.mark.inductor
# (ids as make floor's -k reads them: Triton 3.2's interpreter can't run compiled Triton paths)
@pytest.mark.parametrize("backend", ["torch", "triton"], ids=["torch_path", "triton_path"])
def test_compile_fullgraph_over_dora_layers(backend, monkeypatch):
    """``torch.compile(fullgraph=True)`` over DoRA layers: at dropout 0 eager's output and
    every gradient (magnitudes included); with dropout it compiles into one graph too (its
    mask then comes from the compiled generator: checked for shapes and finiteness)."""

    from lora_kernels import validation

    if backend == "triton":  # (auto picks the kernels on CPU tensors in the interpreter)
        monkeypatch.setattr(validation, "AUTO_TRITON_DEVICE_TYPES", ("cuda", "cpu"))
    # (dynamo counts recompilations per code object across tests: LoRALayer.forward's budget is
    # not this test's to spend; it starts and leaves the cache empty)
    torch._dynamo.reset()
    try:
        _compile_dora_layers(backend)
    finally:
        torch._dynamo.reset()


def _compile_dora_layers(backend):
    device = DEVICE[backend]
    for p in (0.0, 0.2):
        torch.manual_seed(0)
        model = nn.Sequential(
            LoRALayer(16, 32, rank=4, dropout=p, use_dora=True), nn.GELU(),
            LoRALayer(32, 8, rank=2, dropout=p, use_dora=True),
        ).to(device)  # fmt: skip
        with torch.no_grad():
            for layer in (model[0], model[2]):
                layer.lora_B.normal_()
        x = torch.randn(2, 5, 16, device=device, requires_grad=True)
        results = []
        for fn in (model, torch.compile(model, fullgraph=True)):
            y = fn(x)
            y.square().mean().backward()
            grads = [q.grad.clone() for q in model.parameters() if q.requires_grad]
            results.append((y.detach(), x.grad.clone(), grads))
            model.zero_grad(set_to_none=True)
            x.grad = None
        (y0, dx0, g0), (y1, dx1, g1) = results
        assert len(g1) == 6 and all(g.isfinite().all() for g in g1) and y1.isfinite().all()
        if p == 0.0:
            assert_close("y", y1, y0.double(), 1e-5)
            assert_close("dx", dx1, dx0.double(), 1e-5)
            for i, (got, want) in enumerate(zip(g1, g0)):
                assert_close(f"grad {i}", got, want.double(), 1e-5)
