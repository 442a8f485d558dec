"""The Hopper path: the TMA descriptor kernels over a persistent grid (``fused_mm``'s and
``lora_grad``'s), against the float64 reference, where the tensors allow descriptors, and the
pointer kernels everywhere else (Triton's interpreter enforces TMA's 16-byte rules here)."""

from __future__ import annotations

import pytest
import torch
from helpers import (
    KERNEL_DEVICE,
    TRITON_TOL,
    assert_close,
    make_params,
    make_x,
    read_mask,
    reference_with_grads,
    run_with_grads,
    seed_for,
)

from lora_kernels import lora_linear, triton_path
from lora_kernels.kernels import common, fused_mm, lora_grad

LAUNCHES = ("lora_fwd_t", "lora_fwd", "lora_bwd_dx", "lora_bwd_dA", "lora_bwd_dB")


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    monkeypatch.setattr(common, "POISON_OUTPUTS", True)


@pytest.fixture
def float32_on_descriptors(monkeypatch):
    """The descriptor kernels for float32 too (off in the tables: their FMA builds spill), so
    their float32 math is checked as well."""
    dtypes = (*triton_path.DESCRIPTOR_DTYPES, torch.float32)
    monkeypatch.setattr(triton_path, "DESCRIPTOR_DTYPES", dtypes)
    monkeypatch.setattr(triton_path, "_plan_strings", {})  # plans made before: forgotten


@pytest.fixture
def kernels_run(monkeypatch):
    """``{launch name: "tma" | "pointer"}`` of the calls made while the test runs (the GEMM
    and reduction launches: float16's one-program ``lora_fp16_fit`` before each reduction is
    not one of them)."""
    seen = {}

    def spy(module):
        real = module.launch

        def wrapped(name, kernel, grid, args, kwargs):
            if name != "lora_fp16_fit":
                seen[name] = "tma" if kernel.fn.__name__.endswith("_tma_kernel") else "pointer"
            return real(name, kernel, grid, args, kwargs)

        monkeypatch.setattr(module, "launch", wrapped)

    spy(fused_mm)
    spy(lora_grad)
    return seen


def run_case(lead, k, n, rank, dtype, p, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed_for("tma", lead, k, n, rank, dtype, p, layout))
    move = {"device": KERNEL_DEVICE}
    x = make_x(lead, k, dtype, layout, gen).to(**move)
    params = {a: t.to(**move) for a, t in make_params(k, n, rank, dtype, True, gen).items()}
    dy = torch.randn(*lead, n, generator=gen, dtype=torch.float64).to(dtype).to(**move)
    seed = 4321
    y, grads = run_with_grads(
        lora_linear, x, params, dy, scaling=0.5, dropout_p=p, seed=seed, backend="triton"
    )
    mask = None
    if p:
        mask = read_mask(x[..., 0].numel(), k, p, seed, "triton").reshape(*lead, k).double()
    y_ref, grads_ref = reference_with_grads(x, params, dy, 0.5, dropout_mask=mask, dropout_p=p)
    assert_close("y", y, y_ref, TRITON_TOL[dtype])
    for name in grads:
        assert_close(f"d{name}", grads[name], grads_ref[name], TRITON_TOL[dtype])
    return y, grads


# Shapes TMA can describe: K, N and the rank give 16-byte rows for every dtype below, and none is
# a multiple of the tiles (odd M, 3-D input, edges in every direction).
ALL_FOUR = set(LAUNCHES[1:])
ALIGNED = [((1,), 64, 16), ((17,), 40, 24), ((3, 5), 136, 72), ((130,), 256, 264)]


@pytest.mark.parametrize("p", [0.0, 0.25])
@pytest.mark.parametrize("rank", [8, 16, 64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("lead, k, n", ALIGNED)
def test_descriptor_kernels_match_the_reference(
    kernels_run, float32_on_descriptors, lead, k, n, rank, dtype, p
):
    run_case(lead, k, n, rank, dtype, p)
    expected = {name: "tma" for name in LAUNCHES[1:]}
    if p:  # dropout's T-only pass on descriptors; dx keeps the pointer kernel (registers)
        expected.update(lora_fwd_t="tma", lora_bwd_dx="pointer")
    assert kernels_run == expected


@pytest.mark.parametrize(
    "lead, k, n, rank, dtype, layout, pointer",
    [
        # a rank whose rows of A are not 16 bytes: the fused launches fall back (P, Q), and the
        # reductions too (T is (M, r) float32: 20 bytes a row)
        (
            (9,),
            64,
            32,
            5,
            torch.bfloat16,
            "contiguous",
            {"lora_fwd", "lora_bwd_dx", "lora_bwd_dA", "lora_bwd_dB"},
        ),
        # rank 1, float32: 4-byte rows of A and T
        (
            (9,),
            64,
            32,
            1,
            torch.float32,
            "contiguous",
            {"lora_fwd", "lora_bwd_dx", "lora_bwd_dA", "lora_bwd_dB"},
        ),
        # odd K (the interpreter's own "stride must be 16-byte aligned" case): x and W, and dA's x
        ((7,), 70, 32, 8, torch.float32, "contiguous", {"lora_fwd", "lora_bwd_dx", "lora_bwd_dA"}),
        # float32 with K not a multiple of 4
        ((7,), 66, 32, 8, torch.float32, "contiguous", {"lora_fwd", "lora_bwd_dx", "lora_bwd_dA"}),
        # odd N: W's rows in dx and dY's in dB
        ((7,), 64, 33, 8, torch.float16, "contiguous", {"lora_fwd", "lora_bwd_dx", "lora_bwd_dB"}),
        # non-contiguous x (every other column): forward's X and dA's V
        ((7,), 64, 32, 8, torch.bfloat16, "strided", {"lora_fwd", "lora_bwd_dA"}),
        # x with the feature dim first in memory (a transposed view): never a descriptor for X
        ((7,), 64, 32, 8, torch.float16, "transposed", {"lora_fwd", "lora_bwd_dA"}),
    ],
    ids=["rank5", "rank1-fp32", "odd-K", "fp32-K66", "odd-N", "strided-x", "transposed-x"],
)
def test_the_pointer_kernels_where_descriptors_cant_go(
    kernels_run, float32_on_descriptors, lead, k, n, rank, dtype, layout, pointer
):
    run_case(lead, k, n, rank, dtype, 0.0, layout)
    assert {name for name, kind in kernels_run.items() if kind == "pointer"} == pointer
    assert set(kernels_run) == set(LAUNCHES[1:])


@pytest.mark.parametrize("p", [0.0, 0.25])
def test_descriptor_kernels_are_deterministic(kernels_run, p):
    first = run_case((300,), 64, 48, 16, torch.bfloat16, p)
    again = run_case((300,), 64, 48, 16, torch.bfloat16, p)
    assert torch.equal(first[0], again[0])
    assert all(torch.equal(first[1][g], again[1][g]) for g in first[1])
    assert "tma" in kernels_run.values()


def tma_flags(dtype, dropout, arch):
    """The TMA flag of each launch's config; the 4-bit in-loop configs carry none (their tiles
    are decoded, never copied by TMA)."""
    plan = triton_path.plan_for(torch.device("meta"), dtype, 16, dropout, arch=arch)
    assert "TMA" not in plan.fwd_4bit and "TMA" not in plan.dx_4bit
    return {f: getattr(plan, f).get("TMA") for f in triton_path.LAUNCHES}


def test_which_tables_take_descriptors():
    on = {"fwd": True, "t_only": True, "dx": True, "grad_dA": True, "grad_dB": True}
    for dtype in (torch.float16, torch.bfloat16):
        assert tma_flags(dtype, False, 9) == on
        assert tma_flags(dtype, True, 9) == {**on, "dx": False}  # dx with dropout: registers
    assert tma_flags(torch.float32, True, 9) == dict.fromkeys(on, False)  # FMA builds spill
    assert tma_flags(torch.bfloat16, True, 8) == dict.fromkeys(on)  # Ampere: no TMA at all


def test_a_triton_without_descriptors_runs_the_pointer_kernels(kernels_run, monkeypatch):
    monkeypatch.setattr(fused_mm, "TensorDescriptor", None)
    monkeypatch.setattr(lora_grad, "TensorDescriptor", None)
    run_case((17,), 40, 24, 8, torch.bfloat16, 0.0)
    assert set(kernels_run.values()) == {"pointer"}


@pytest.mark.parametrize(
    "major, version, expected",
    [
        (9, "3.4.0", True),
        (9, "3.9.0", True),
        (10, "3.7.1", False),
        (10, "3.8.0", True),
        (8, "3.9.0", False),
    ],
)
def test_blackwell_takes_descriptors_from_triton_3_8(monkeypatch, major, version, expected):
    import triton

    monkeypatch.setattr(triton, "__version__", version)
    assert triton_path.descriptors_build(major) == expected
    flags = triton_path.plan_for(
        torch.device("meta"), torch.bfloat16, 16, False, arch=9, major=major
    )
    assert flags.fwd["TMA"] == expected
