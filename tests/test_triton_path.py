"""The Triton kernels (``backend="triton"``) against the float64 reference.

Without a GPU they run in Triton's interpreter (``conftest.py`` sets ``TRITON_INTERPRET=1``):
the real kernel source, every mask and offset, on CPU tensors. Every kernel output is poisoned
with NaN before launch, so an element a kernel never writes fails the comparison.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import triton
from helpers import (
    GRAD_NAMES,
    KERNEL_DEVICE,
    TRITON_TOL,
    assert_close,
    make_params,
    make_x,
    reference_with_grads,
    run_with_grads,
    seed_for,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_kernels import LoRALayer, LoRALinearFunction, lora_linear, triton_path
from lora_kernels.kernels import common, configs, fused_mm, lora_grad
from lora_kernels.validation import resolve_backend

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


def check(lead, k, n, rank, dtype, *, bias=True, layout="contiguous", scaling=0.5, tol=None):
    """Run forward + backward on both sides and compare output and every gradient."""
    gen = torch.Generator().manual_seed(seed_for(lead, k, n, rank, dtype, bias, layout, scaling))
    x = make_x(lead, k, dtype, layout, gen)
    params = make_params(k, n, rank, dtype, bias, gen)
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype)
    move = {"device": KERNEL_DEVICE}
    x, dy = x.to(**move), dy.to(**move)
    params = {k_: None if v is None else v.to(**move) for k_, v in params.items()}

    y, grads = run_with_grads(lora_linear, x, params, dy, scaling=scaling, backend="triton")
    y_ref, grads_ref = reference_with_grads(x, params, dy, scaling)
    tol = TRITON_TOL[dtype] if tol is None else tol
    assert y.dtype == dtype and y.shape == (*lead, n)
    assert_close("y", y, y_ref, tol)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert grads[name].dtype == dtype
        assert_close(f"d{name}", grads[name], grads_ref[name], tol)


@pytest.mark.parametrize("rank", [1, 3, 4, 7, 8, 16, 33, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
def test_ranks(rank, dtype):
    check((127,), 300, 17, rank, dtype)


@pytest.mark.parametrize(
    "m, k, n",
    [
        (64, 64, 64),
        # odd shapes
        (1, 1, 1),
        (1, 17, 300),
        (17, 1, 127),
        (127, 300, 1),
        (300, 127, 300),
        (300, 17, 17),
    ],
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_shapes(m, k, n, dtype):
    check((m,), k, n, 7, dtype)


@pytest.mark.parametrize("lead", [(3, 17), (2, 3, 5)])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "transposed"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_and_bias(lead, layout, bias, dtype):
    check(lead, 33, 20, 4, dtype, bias=bias, layout=layout)


@pytest.mark.parametrize("scaling", [0.0, 1.0, -3.0, 1 / 3, 64.0])
def test_scalings(scaling):
    check((40,), 50, 30, 5, torch.float32, scaling=scaling)


@pytest.mark.parametrize("arch", [8, 9])
@pytest.mark.parametrize("dtype, rank", [(torch.float16, 4), (torch.bfloat16, 64)])
def test_each_generations_config(monkeypatch, arch, dtype, rank):
    """The Ampere and the Hopper tables (tile sizes, large-rank variants) both compute right."""
    monkeypatch.setattr(triton_path, "INTERPRETER_ARCH", arch)
    triton_path._device_facts.cache_clear()
    try:
        check((300,), 130, 270, rank, dtype)
    finally:
        triton_path._device_facts.cache_clear()


@pytest.mark.parametrize("major, max_shared, expected", [(12, 99 * 1024, 8), (10, 227 * 1024, 9)])
def test_cuda_device_facts(monkeypatch, major, max_shared, expected):
    """A CUDA device's table key comes from its capability and Triton's reading of its opt-in
    shared memory per block (here both stand-ins: no GPU on this machine)."""
    from types import SimpleNamespace

    from lora_kernels.inspect import stand_in_driver

    asked = []

    def device_properties(index):
        asked.append(index)
        return {"max_shared_mem": max_shared, "multiprocessor_count": 1}

    props = SimpleNamespace(major=major, multi_processor_count=170)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: props)
    stand_in = SimpleNamespace(utils=SimpleNamespace(get_device_properties=device_properties))
    triton_path._device_facts.cache_clear()
    try:
        with stand_in_driver(stand_in):
            assert triton_path._device_facts(torch.device("cuda", 1)) == (expected, 170)
    finally:
        triton_path._device_facts.cache_clear()
    assert asked == [1]


def test_launch_runs_on_its_tensors_gpu(monkeypatch):
    """Triton launches on the current CUDA device: a launch whose tensors live on ``cuda:1``
    enters ``torch.cuda.device(cuda:1)`` first (stand-ins for the GPU pieces: no GPU here)."""
    import contextlib
    from types import SimpleNamespace

    current = []

    @contextlib.contextmanager
    def cuda_device(device):
        current.append(device)
        try:
            yield
        finally:
            current.pop()

    launched = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append((grid, list(current), kwargs))

    monkeypatch.setattr(torch.cuda, "device", cuda_device)
    on_gpu1 = SimpleNamespace(device=torch.device("cuda", 1))
    common.launch("k", Kernel(), (3,), (7, on_gpu1, on_gpu1), {"BLOCK": 16})
    assert launched == [((3,), [torch.device("cuda", 1)], {"BLOCK": 16, **common.LAUNCH_OPTIONS})]
    common.launch("k", Kernel(), (3,), (torch.empty(2),), {})  # CPU (the interpreter): as it is
    assert launched[-1][1] == [] and current == []


# Every input alone, and all of them (each case costs ~2 s of interpreter launches; the torch
# path's suite runs all 31 combinations).
GRADCHECK_CASES = [tuple(i == j for j in range(5)) for i in range(5)] + [(True,) * 5]


@pytest.mark.parametrize(
    "requires",
    GRADCHECK_CASES,
    ids=lambda c: "+".join(n for n, r in zip(GRAD_NAMES, c) if r),
)
def test_float64_gradcheck(requires):
    gen = torch.Generator().manual_seed(11)
    x = make_x((2, 3), 5, torch.float64, "contiguous", gen).to(KERNEL_DEVICE)
    params = make_params(5, 4, 3, torch.float64, True, gen)
    params = {k: v.to(KERNEL_DEVICE) for k, v in params.items()}
    base = [x, params["weight"], params["bias"], params["lora_A"], params["lora_B"]]
    inputs = [t.detach().clone().requires_grad_(r) for t, r in zip(base, requires)]

    def fn(*tensors):
        return LoRALinearFunction.apply(*tensors, 0.7, 0.0, None, "triton")

    assert torch.autograd.gradcheck(fn, inputs)


def test_backward_is_deterministic():
    gen = torch.Generator().manual_seed(12)
    x = make_x((300,), 64, torch.float16, "contiguous", gen).to(KERNEL_DEVICE)
    params = make_params(64, 48, 16, torch.float16, True, gen)
    params = {k: v.to(KERNEL_DEVICE) for k, v in params.items()}
    dy = torch.randn(300, 48, generator=gen).half().to(KERNEL_DEVICE)
    runs = [run_with_grads(lora_linear, x, params, dy, backend="triton") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0])
    for name in GRAD_NAMES:
        assert torch.equal(runs[0][1][name], runs[1][1][name]), name


def test_int64_offsets():
    """Rows 2**31 elements apart: int32 offsets would wrap and read the wrong memory."""
    k, n, r = 16, 8, 4
    stride = 2**30
    storage = torch.empty(2 * stride + k, dtype=torch.float16, device=KERNEL_DEVICE)
    x = storage.as_strided((3, k), (stride, 1))
    gen = torch.Generator().manual_seed(13)
    x.copy_(torch.randn(3, k, generator=gen).half())
    params = make_params(k, n, r, torch.float16, True, gen)
    params = {k_: v.to(KERNEL_DEVICE) for k_, v in params.items()}
    dy = torch.randn(3, n, generator=gen).half().to(KERNEL_DEVICE)
    y, grads = run_with_grads(lora_linear, x, params, dy, backend="triton")
    y_ref, grads_ref = reference_with_grads(x, params, dy, 1.0)
    assert_close("y", y, y_ref, TRITON_TOL[torch.float16])
    for name in grads:
        assert_close(f"d{name}", grads[name], grads_ref[name], TRITON_TOL[torch.float16])


@pytest.mark.parametrize("requires", list(itertools.product([False, True], repeat=3)))
def test_only_requested_gradients_launch(monkeypatch, requires):
    """Backward launches what ``needs_input_grad`` asks for, and nothing else."""
    launched = []
    real_launch = common.launch

    def record(name, kernel, grid, args, kwargs):
        launched.append((name, kwargs.get("STORE_OUT"), kwargs.get("STORE_T")))
        real_launch(name, kernel, grid, args, kwargs)

    monkeypatch.setattr(fused_mm, "launch", record)
    monkeypatch.setattr(lora_grad, "launch", record)
    need_x, need_a, need_b = requires
    gen = torch.Generator().manual_seed(14)
    x = make_x((9,), 16, torch.float32, "contiguous", gen).to(KERNEL_DEVICE)
    p = make_params(16, 8, 2, torch.float32, False, gen)
    x.requires_grad_(need_x)
    A = p["lora_A"].to(KERNEL_DEVICE).requires_grad_(need_a)
    B = p["lora_B"].to(KERNEL_DEVICE).requires_grad_(need_b)
    y = lora_linear(x, p["weight"].to(KERNEL_DEVICE), None, A, B, backend="triton")
    if any(requires):
        y.sum().backward()
    expected = [("lora_fwd", True, need_b)]
    if need_x or need_a:
        expected.append(("lora_bwd_dx", need_x, need_a))
    if need_a:
        expected.append(("lora_bwd_dA", None, None))
    if need_b:
        expected.append(("lora_bwd_dB", None, None))
    assert launched == expected


def test_empty_batch():
    x = torch.empty(0, 8, device=KERNEL_DEVICE, requires_grad=True)
    A = torch.randn(8, 2, device=KERNEL_DEVICE, requires_grad=True)
    B = torch.randn(2, 3, device=KERNEL_DEVICE, requires_grad=True)
    W = torch.randn(3, 8, device=KERNEL_DEVICE)
    y = lora_linear(x, W, None, A, B, backend="triton")
    assert y.shape == (0, 3)
    y.sum().backward()
    assert x.grad.shape == (0, 8)
    assert torch.equal(A.grad, torch.zeros_like(A))
    assert torch.equal(B.grad, torch.zeros_like(B))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # numpy: inf - inf
def test_nan_and_inf_propagate():
    gen = torch.Generator().manual_seed(15)
    for dtype in DTYPES:
        x = make_x((4,), 8, dtype, "contiguous", gen)
        x[1, 2], x[2, 5] = float("nan"), float("inf")
        p = make_params(8, 3, 2, dtype, True, gen)
        args = [t.to(KERNEL_DEVICE) for t in (x, p["weight"], p["bias"], p["lora_A"], p["lora_B"])]
        y = lora_linear(*args, backend="triton")
        assert torch.isnan(y[1]).all(), dtype
        assert not torch.isfinite(y[2]).any(), dtype
        assert torch.isfinite(y[[0, 3]]).all(), dtype


def test_dispatch():
    x = torch.randn(2, 4)
    assert resolve_backend(x, "auto") == "torch"  # CPU tensors: the torch path
    assert resolve_backend(x, "torch") == "torch"
    assert resolve_backend(x, "triton") == "triton"  # interpreter (or CUDA) available here
    if torch.cuda.is_available():
        assert resolve_backend(x.cuda(), "auto") == "triton"
        assert resolve_backend(x.cuda().double(), "auto") == "torch"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("arch", [8, 9])
def test_plan_depends_on_the_rank_only_through_its_padding(dtype, dropout, arch):
    """plan_string takes ``padded_rank(rank)`` (a loop, so a constant even for a symbolic rank
    under torch.compile): it must be the next power of two >= 16 and give the very plan of the
    rank itself."""
    dev = torch.device(KERNEL_DEVICE)
    for rank in range(1, 131):
        padded = common.padded_rank(rank)
        assert padded == max(16, triton.next_power_of_2(rank))
        plan = triton_path.plan_for(dev, dtype, rank, dropout, arch, 4)
        assert plan == triton_path.plan_for(dev, dtype, padded, dropout, arch, 4)


def test_plan_is_kept_for_backward(monkeypatch):
    """Configs are chosen once in forward; backward uses the forward's, whatever changed since."""
    gen = torch.Generator().manual_seed(16)
    x = make_x((20,), 24, torch.float16, "contiguous", gen).to(KERNEL_DEVICE)
    p = {
        k: v.to(KERNEL_DEVICE) for k, v in make_params(24, 12, 4, torch.float16, True, gen).items()
    }
    A = p["lora_A"].requires_grad_(True)
    y = lora_linear(x, p["weight"], p["bias"], A, p["lora_B"], backend="triton")
    plan = triton_path.plan_from_str(y.grad_fn.plan)
    assert plan.fwd == {**configs.fused_mm_config(9, torch.float16, 4), "TMA": True} or x.is_cuda
    seen = []
    real = triton_path.backward
    monkeypatch.setattr(
        triton_path, "backward", lambda *a, **kw: seen.append(kw["plan"]) or real(*a, **kw)
    )
    y.sum().backward()
    assert seen == [plan]


def test_layer_on_triton_backend():
    """LoRALayer with backend 'triton' through the function (auto picks it on CUDA only)."""
    torch.manual_seed(17)
    layer = LoRALayer(40, 24, rank=6, alpha=12, init="seed").to(KERNEL_DEVICE)
    x = torch.randn(5, 7, 40, device=KERNEL_DEVICE)
    y = lora_linear(
        x, layer.linear.weight, layer.linear.bias, layer.lora_A, layer.lora_B, layer.scaling,
        backend="triton",
    )  # fmt: skip
    assert_close("y", y, layer(x).double(), 1e-4)


@settings(max_examples=100, deadline=None, derandomize=True)
@given(
    m=st.integers(1, 70),
    k=st.integers(1, 70),
    n=st.integers(1, 70),
    rank=st.integers(1, 40),
    dtype=st.sampled_from(DTYPES),
    bias=st.booleans(),
    layout=st.sampled_from(["contiguous", "strided", "transposed"]),
    # float32-representable scalings (the kernels take s in fp32), none tiny enough to underflow
    scaling=st.floats(-4.0, 4.0, width=32).filter(lambda s: s == 0 or abs(s) > 1e-3),
)
def test_property_random_cases(m, k, n, rank, dtype, bias, layout, scaling):
    check((m,), k, n, rank, dtype, bias=bias, layout=layout, scaling=scaling)
